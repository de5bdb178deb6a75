"""Class-name embeddings for YOLO-World: providers, the Ultralytics cache, a real (tiny) CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectkit.core.errors import DataError
from defectkit.finetune import text_embeddings as te


def test_prompts():
    assert te.prompt_for("broken_large") == "broken large"
    assert te.prompt_for("broken_large", "a {defect} on a {category}", "metal_nut") == "a broken large on a metal nut"
    # category_defect names lose their category prefix inside the template
    assert te.prompt_for("bottle_broken_large", "a {defect} on a {category}", "bottle") == "a broken large on a bottle"


def test_hash_embeddings_are_deterministic_unit_vectors():
    a = te.hash_embeddings(["crack", "hole"])
    assert a.shape == (2, 512) and np.allclose(np.linalg.norm(a, axis=1), 1)
    assert np.array_equal(a, te.hash_embeddings(["crack", "hole"]))
    assert abs(float(a[0] @ a[1])) < 0.3  # different prompts, nearly orthogonal


def test_cache_round_trip_in_ultralytics_format(tmp_path):
    emb = te.hash_embeddings(["crack", "hole"])
    path = te.write_cache(["crack", "hole"], emb, tmp_path)
    assert path.name == "text_embeddings_clip_ViT-B_32.pt"
    table = torch.load(path, weights_only=True)
    assert sorted(table) == ["crack", "hole"] and table["hole"].shape == (512,)
    assert np.allclose(te.read_cache(path, ["hole", "crack"]), emb[::-1])
    with pytest.raises(DataError, match="scratch"):
        te.read_cache(path, ["scratch"])


def test_provider_errors_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="ViT-B-32.pt"):
        te.embed(["a"], ["a"], "clip", clip_model=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="--clip-model"):
        te.embed(["a"], ["a"], "clip")
    with pytest.raises(FileNotFoundError, match="make-text-embeddings"):
        te.embed(["a"], ["a"], "file", embeddings_file=tmp_path / "x.pt")
    torch.save({"crack": torch.ones(512)}, tmp_path / "e.pt")
    with pytest.raises(DataError, match="e.pt has no embedding for \\['hole'\\]"):
        te.load_embedding_file(tmp_path / "e.pt", ["hole"])
    torch.save({"crack": torch.ones(8)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="8-d"):
        te.load_embedding_file(tmp_path / "w.pt", ["crack"])
    with pytest.raises(ValueError, match="unknown text-embedding provider"):
        te.embed(["a"], ["a"], "magic")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A real CLIP (OpenAI's architecture and tokenizer) with 1-layer, 64-wide towers, saved
    as a state dict the way `clip.load` reads local checkpoints: no download involved."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from clip.model import CLIP

    torch.manual_seed(0)
    m = CLIP(embed_dim=512, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=32,
             context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny.pt"
    torch.save(m.state_dict(), path)
    return path


def test_clip_provider_with_a_local_checkpoint(tiny_clip, tmp_path):
    a = te.embed(["crack", "hole"], ["crack", "hole"], "clip", clip_model=tiny_clip)
    assert a.shape == (2, 512) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert not np.allclose(a[0], a[1])
    b = te.clip_embeddings(["hole"], tiny_clip)
    assert np.allclose(a[1], b[0], atol=1e-5)
    # a prepared file gives back the same rows, by name or by prompt
    torch.save({"crack": torch.from_numpy(a[0]), "hole": torch.from_numpy(a[1])}, tmp_path / "e.pt")
    assert np.allclose(te.embed(["hole"], ["hole"], "file", embeddings_file=tmp_path / "e.pt"), a[1:])
