"""Class-name embeddings for YOLO-World, without a network.

YOLO-World classifies boxes against one text embedding per class (CLIP ViT-B/32, 512-d,
L2-normalised).  Ultralytics computes them with CLIP in ``set_classes`` on every training run,
which needs the ``clip`` package and downloads weights.  Here the embeddings come from one of
three providers, are written once into the cache file Ultralytics' trainer reads
(``<parent of train images>/text_embeddings_clip_ViT-B_32.pt``, a ``{name: tensor}`` dict), and
the trainer in :mod:`defectkit.finetune.world_offline` never calls CLIP:

* ``clip``: a local CLIP checkpoint (``--clip-model /path/ViT-B-32.pt``, the file OpenAI's
  ``clip`` package downloads), encoded with the ``clip`` package (PyPI ``clip-anytorch``).  The
  same embeddings pretrained YOLO-World weights were trained with.
* ``file``: a prepared ``{name or prompt: tensor}`` file, made on a machine that has CLIP with
  ``python finetune/yolo.py --make-text-embeddings OUT.pt --clip-model ... --data ...``.
* ``hash``: deterministic pseudo-random unit vectors seeded by the prompt's SHA-256.  They carry
  no language: only for training from scratch (tests, the offline demo).  Results obtained with
  them are never those of a pretrained YOLO-World, and every run records which provider it used.

Prompts: a class name ``broken_large`` becomes ``"broken large"``; ``--prompt-template`` such as
``"a {defect} on a {category}"`` adds context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from defectkit.core.errors import ConfigError, DataError, MissingFileError

EMBED_DIM = 512
CACHE_NAME = "text_embeddings_clip_ViT-B_32.pt"  # what ultralytics' WorldTrainer looks for
PROVIDERS = ("clip", "file", "hash")


def prompt_for(name: str, template: str = "{defect}", category: str = "") -> str:
    """``broken_large`` -> ``"broken large"``, put into ``template`` (``{defect}``, ``{category}``)."""
    defect = name
    if category and name.startswith(f"{category}_"):
        defect = name[len(category) + 1 :]
    return template.format(defect=defect.replace("_", " "), category=category.replace("_", " ")).strip()


def hash_embeddings(prompts: Sequence[str], dim: int = EMBED_DIM) -> np.ndarray:
    """``(N, dim)`` float32 unit vectors, a pure function of each prompt's text."""
    out = np.zeros((len(prompts), dim), np.float32)
    for i, p in enumerate(prompts):
        seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(dim)
        out[i] = v / np.linalg.norm(v)
    return out


def clip_embeddings(prompts: Sequence[str], clip_model: str | Path, device: str = "cpu") -> np.ndarray:
    """Encode prompts with a *local* CLIP checkpoint; L2-normalised, as Ultralytics does.

    Raises:
        FileNotFoundError: the checkpoint is missing (says where to get it).
        ImportError: the ``clip`` package is missing (``pip install clip-anytorch``).
    """
    import torch

    path = Path(clip_model)
    if not path.is_file():
        raise MissingFileError(
            f"CLIP checkpoint {path} not found. On a machine with internet run "
            "`python -c \"import clip; clip.load('ViT-B/32', download_root='.')\"` and copy the "
            "resulting ViT-B-32.pt here, or pass --text-embeddings-file with embeddings made elsewhere."
        )
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
            import clip
    except ImportError as e:  # pragma: no cover - the lock file installs it
        raise ImportError("the `clip` package is needed for --text-embeddings clip: pip install clip-anytorch") from e
    model, _ = clip.load(str(path), device=device, jit=False)
    model.eval()
    with torch.no_grad():
        tokens = clip.tokenize(list(prompts), truncate=True).to(device)
        feats = model.encode_text(tokens).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
    return feats.cpu().numpy()


def load_embedding_file(path: str | Path, keys: Sequence[str]) -> np.ndarray:
    """Rows of a prepared ``{text: tensor}`` file for ``keys`` (class names or prompts).

    Raises ``KeyError`` naming the file and the missing keys, ``ValueError`` on a wrong width.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"text-embedding file {path} not found; make one with "
                                "`python finetune/yolo.py --make-text-embeddings` on a machine that has CLIP")
    table = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in keys if k not in table]
    if missing:
        raise DataError(f"{path} has no embedding for {missing}; it has {sorted(table)[:20]}")
    rows = np.stack([np.asarray(table[k], np.float32).reshape(-1) for k in keys])
    if rows.shape[1] != EMBED_DIM:
        raise DataError(f"{path}: embeddings are {rows.shape[1]}-d, YOLO-World needs {EMBED_DIM}")
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def embed(names: Sequence[str], prompts: Sequence[str], provider: str, *, clip_model: str | Path | None = None,
          embeddings_file: str | Path | None = None, device: str = "cpu") -> np.ndarray:
    """``(N, 512)`` embeddings of ``prompts`` (one per class name) from ``provider``."""
    if provider == "hash":
        return hash_embeddings(prompts)
    if provider == "clip":
        if clip_model is None:
            raise ConfigError("--text-embeddings clip needs --clip-model /path/to/ViT-B-32.pt")
        return clip_embeddings(prompts, clip_model, device)
    if provider == "file":
        if embeddings_file is None:
            raise ConfigError("--text-embeddings file needs --text-embeddings-file PATH")
        table_keys = list(prompts)
        try:
            return load_embedding_file(embeddings_file, table_keys)
        except KeyError:
            return load_embedding_file(embeddings_file, list(names))
    raise ConfigError(f"unknown text-embedding provider {provider!r}; choose one of {PROVIDERS}")


def write_cache(names: Sequence[str], embeddings: np.ndarray, cache_dir: str | Path) -> Path:
    """Write Ultralytics' text-embedding cache (``{name: tensor}``) atomically; returns its path."""
    import os
    import tempfile

    import torch

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / CACHE_NAME
    table = {n: torch.from_numpy(np.ascontiguousarray(e, np.float32)) for n, e in zip(names, embeddings, strict=True)}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(fd)
    torch.save(table, tmp)
    os.replace(tmp, path)
    return path


def read_cache(path: str | Path, names: Sequence[str]) -> np.ndarray:
    """Embeddings for ``names`` from an Ultralytics cache file, in that order."""
    import torch

    table: Mapping = torch.load(path, map_location="cpu", weights_only=True)
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"{path} has no embedding for classes {missing}")
    return np.stack([table[n].float().numpy().reshape(-1) for n in names])
