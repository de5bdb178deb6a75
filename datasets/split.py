"""The split manifest: which image is train / val / test for every model of the suite.

MVTec's train split holds good images only, so supervised models (YOLO, SAM) need some of the
*test* images to learn from.  The manifest splits each category's test images into the suite's
``train`` / ``val`` / ``test`` folds, stratified by defect type (``good`` included), and lists
the dataset's ``train/good`` images too (fold ``train``, ``source_split`` ``train``) so that one
file says where every image goes.  Anomaly models train on ``source_split == "train"`` only;
thresholds and model selection use fold ``val``; results are reported on fold ``test``.

Stability: an image's place depends only on the seed and its own key, not on the machine, the
file system's order, or NumPy's RNG: each stratum is ordered by ``sha256(f"{seed}:{key}")`` and
cut into folds by largest-remainder counts.  Adding an image moves at most a few others.

Format (JSON, ``format`` = ``defectkit.split_manifest/1``)::

    {"format": ..., "seed": 0, "fractions": {"train": .., "val": .., "test": ..},
     "root": "<abs path at creation>", "categories": [...],
     "counts": {"<category>": {"<defect_type>": {"train": n, "val": n, "test": n}}},
     "entries": [{"key", "category", "source_split", "defect_type", "image", "mask", "fold"}]}

``image`` and ``mask`` are paths relative to the dataset root, so the manifest survives moving
the dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from defectkit.core.atomic import atomic_write_text
from defectkit.core.errors import ConfigError, DataError, MissingFileError
from defectkit.datasets.mvtec import CategoryIndex, Sample

FORMAT = "defectkit.split_manifest/1"
FOLDS = ("train", "val", "test")
DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.4, "val": 0.2, "test": 0.4}


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    category: str
    source_split: str
    defect_type: str
    image: str
    mask: str | None
    fold: str


def fold_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` items into folds by largest remainder.

    When ``n >= len(folds)`` every fold with a positive fraction gets at least one item, so that
    every defect type is seen in training, validation and test.  Ties go to the earlier fold.
    """
    folds = [f for f in FOLDS if fractions.get(f, 0) > 0]
    total = sum(fractions[f] for f in folds)
    if total <= 0:
        raise ConfigError(f"fractions must have a positive sum, got {dict(fractions)}")
    exact = {f: n * fractions[f] / total for f in folds}
    counts = {f: int(exact[f]) for f in folds}
    by_remainder = sorted(folds, key=lambda f: (-(exact[f] - counts[f]), FOLDS.index(f)))
    for f in by_remainder[: n - sum(counts.values())]:
        counts[f] += 1
    if n >= len(folds):
        for f in folds:
            while counts[f] == 0:
                donor = max(folds, key=lambda g: (counts[g], -FOLDS.index(g)))
                counts[donor] -= 1
                counts[f] += 1
    return {f: counts.get(f, 0) for f in FOLDS}


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign_folds(
    keys: Sequence[str], strata: Sequence[str], seed: int, fractions: Mapping[str, float] = DEFAULT_FRACTIONS
) -> dict[str, str]:
    """Pure: map each key to a fold, stratified by ``strata`` (same length as ``keys``)."""
    if len(keys) != len(strata):
        raise ValueError(f"keys and strata differ in length: {len(keys)} vs {len(strata)}")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique")
    groups: dict[str, list[str]] = defaultdict(list)
    for k, s in zip(keys, strata, strict=True):
        groups[s].append(k)
    out: dict[str, str] = {}
    for stratum in sorted(groups):
        members = sorted(groups[stratum], key=lambda k: _rank(seed, k))
        counts = fold_counts(len(members), fractions)
        i = 0
        for fold in FOLDS:
            for k in members[i : i + counts[fold]]:
                out[k] = fold
            i += counts[fold]
    return out


def build_manifest(
    indexes: Iterable[CategoryIndex], seed: int = 0, fractions: Mapping[str, float] = DEFAULT_FRACTIONS
) -> dict:
    """The manifest (a JSON-able dict) for the given categories."""
    bad = {k: v for k, v in fractions.items() if k not in FOLDS or v < 0}
    if bad:
        raise ConfigError(f"fractions must be non-negative and keyed by {FOLDS}, got {bad}")
    indexes = list(indexes)
    entries: list[ManifestEntry] = []
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for idx in indexes:
        held_out = [s for s in idx.samples if s.split != "train"]
        folds = assign_folds(
            [s.key for s in held_out], [s.defect_type for s in held_out], seed, fractions
        )
        cat_counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FOLDS, 0))
        for s in idx.samples:
            fold = "train" if s.split == "train" else folds[s.key]
            entries.append(_entry(s, fold))
            if s.split != "train":
                cat_counts[s.defect_type][fold] += 1
        counts[idx.category] = {k: cat_counts[k] for k in sorted(cat_counts)}
    return {
        "format": FORMAT,
        "seed": seed,
        "fractions": {f: float(fractions.get(f, 0.0)) for f in FOLDS},
        "root": str(indexes[0].root.resolve()) if indexes else None,
        "categories": [i.category for i in indexes],
        "counts": counts,
        "entries": [asdict(e) for e in entries],
    }


def _entry(s: Sample, fold: str) -> ManifestEntry:
    return ManifestEntry(s.key, s.category, s.split, s.defect_type, s.relpath, s.mask_relpath, fold)


def write_manifest(manifest: dict, path: str | Path) -> Path:
    """Write atomically (a crash leaves the old file or none, never half a file).  An identical
    existing file is left untouched, so that its modification time keeps later stages (make
    targets that depend on it) from rerunning needlessly."""
    path = Path(path)
    text = json.dumps(manifest, indent=1) + "\n"
    if path.is_file() and path.read_text() == text:
        return path
    return atomic_write_text(path, text)


def read_manifest(path: str | Path) -> dict:
    """Load and check a manifest.  Raises ``ValueError`` naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"split manifest {path} does not exist; run `make split` first") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path} is not a split manifest (expected format {FORMAT!r})")
    for i, e in enumerate(data["entries"]):
        if e.get("fold") not in FOLDS:
            raise DataError(f"{path}: entry {i} ({e.get('key')}) has fold {e.get('fold')!r}, expected one of {FOLDS}")
    return data


def entries(manifest: dict, *, fold: str | None = None, category: str | None = None,
            source_split: str | None = None) -> list[ManifestEntry]:
    """Entries of a manifest, filtered."""
    return [
        ManifestEntry(**e)
        for e in manifest["entries"]
        if (fold is None or e["fold"] == fold)
        and (category is None or e["category"] == category)
        and (source_split is None or e["source_split"] == source_split)
    ]


def _check_matches(manifest: dict, path: Path, root: str | Path, category: str, seed: int) -> None:
    """Refuse a manifest written for another data root, seed or set of categories."""
    problems = []
    if manifest.get("seed") != seed:
        problems.append(f"seed {manifest.get('seed')} (asked: {seed})")
    want_root = str(Path(root).resolve())
    if manifest.get("root") is not None and manifest["root"] != want_root:
        problems.append(f"data root {manifest['root']} (asked: {want_root})")
    if category not in (None, "all") and category not in manifest.get("categories", []):
        problems.append(f"categories {manifest.get('categories')} (asked: {category})")
    if problems:
        raise DataError(f"split manifest {path} was written for {', '.join(problems)}: pass --manifest with another "
                        "path (or OUT=...), or delete it to have it rebuilt")


def merge_into(path: str | Path, manifest: dict) -> dict:
    """Write ``manifest`` to ``path``, keeping the other categories of a manifest already there when it was made
    with the same seed, fractions and data root (a fold depends only on those and the image's own path inside its
    category, so the result is the manifest the categories would have had together).  Returns what was written."""
    path = Path(path)
    if path.is_file():
        try:
            old = read_manifest(path)
        except DataError:
            old = None
        if old is not None and all(old.get(k) == manifest.get(k) for k in ("seed", "fractions", "root")):
            mine = set(manifest["categories"])
            manifest = {**manifest,
                        "categories": [c for c in old["categories"] if c not in mine] + list(manifest["categories"]),
                        "counts": {**{c: n for c, n in old["counts"].items() if c not in mine}, **manifest["counts"]},
                        "entries": [e for e in old["entries"] if e["category"] not in mine] + manifest["entries"]}
    write_manifest(manifest, path)
    return manifest


def _add_category(manifest: dict, path: Path, root: str | Path, category: str, seed: int) -> dict:
    """``manifest`` with ``category`` of ``root`` split in and written back (:func:`merge_into`); unchanged when
    it was made for another seed or root, which :func:`_check_matches` then reports."""
    from defectkit.datasets.mvtec import index_dataset

    if manifest.get("seed") != seed or manifest.get("root") not in (None, str(Path(root).resolve())):
        return manifest
    add = build_manifest(index_dataset(root, category), seed=seed, fractions=manifest.get("fractions") or
                         DEFAULT_FRACTIONS)
    return merge_into(path, {**add, "root": manifest.get("root") or add["root"]})


def load_or_build_manifest(root: str | Path, path: str | Path, category: str = "all", seed: int = 0) -> dict:
    """The manifest at ``path``, written first (for ``category`` of ``root``, with ``seed``) when
    it does not exist yet.  The returned dict carries its file in ``"path"``.

    Raises:
        DataError: the manifest at ``path`` was written for another data root, seed or category
            (it is never silently reused for other data).
    """
    from defectkit.datasets.mvtec import index_dataset

    path = Path(path)
    if path.is_file():
        manifest = read_manifest(path)
        if category not in (None, "all") and category not in manifest.get("categories", []):
            manifest = _add_category(manifest, path, root, category, seed)
        _check_matches(manifest, path, root, category, seed)
    else:
        manifest = build_manifest(index_dataset(root, category), seed=seed)
        write_manifest(manifest, path)
    manifest["path"] = str(path)
    return manifest


def resolve_manifest(data: str | Path | None, manifest: str | Path | None, seed: int = 0,
                     category: str | None = None) -> tuple[Path, dict]:
    """The data root (the embedded set, generated on first use, when ``data`` is None) and its
    split manifest (``manifest``, default ``work/out/<data name>/manifest.json``, written on first
    use for every category).

    Raises:
        ConfigError: ``category`` is not in the manifest.
        DataError: the manifest was written for other data (see :func:`load_or_build_manifest`).
    """
    from defectkit.core.paths import WORK
    from defectkit.datasets import synthetic

    root = Path(data) if data is not None else synthetic.generate(progress=False)
    path = Path(manifest) if manifest is not None else WORK / "out" / root.resolve().name / "manifest.json"
    m = load_or_build_manifest(root, path, "all", seed)
    if category is not None and category not in m["categories"]:  # a category split later is added to the file
        m = {**_add_category(m, path, root, category, seed), "path": str(path)}
    if category is not None and category not in m["categories"]:
        raise ConfigError(f"category {category!r} is not in {path} (has {m['categories']})")
    return root, m
