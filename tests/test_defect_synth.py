"""The defect synthesizer: exact masks, seeds that reproduce, defects on the part, output the suite consumes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from defectkit.datasets import defect_shapes as shapes
from defectkit.datasets import defect_synth as D


def _rng(i=0):
    return np.random.default_rng(i)


@pytest.mark.parametrize("kind", shapes.SHAPES)
def test_the_mask_is_exactly_what_was_painted(kind):
    img = _rng(1).random((64, 80, 3)).astype(np.float32)
    synth = D.Synthesizer(D.Foreground("texture"), others=[_rng(2).random((50, 50, 3)).astype(np.float32)])
    for seed in range(6):
        out, mask, k = synth(img, _rng(seed), kind)
        assert k == kind and mask.dtype == bool and mask.shape == (64, 80) and mask.sum() >= 4
        assert np.array_equal(out[~mask], img[~mask])  # outside the mask: the good image, bit for bit
        changed = np.abs(out - img).max(-1) > 0
        assert not (changed & ~mask).any()  # nothing painted outside the mask
        assert changed[mask].mean() > 0.5  # and the mask is mostly visibly painted (opacity >= 0.2)


def test_blend_by_hand():
    img = np.zeros((2, 2, 1), np.float32)
    fill = np.ones((2, 2, 1), np.float32)
    m = np.array([[True, False], [False, False]])
    out = shapes.blend(img, fill, m, 0.25)
    assert out[..., 0].tolist() == [[0.25, 0.0], [0.0, 0.0]]


def test_shapes_cover_borders_thin_lines_and_several_regions():
    import cv2

    border = thin = multi = 0
    for s in range(40):
        m = shapes.blob_mask((96, 96), _rng(s))
        n = cv2.connectedComponents(m.astype(np.uint8))[0] - 1
        multi += n >= 2
        border += bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
        sc = shapes.scratch_mask((200, 200), _rng(s))
        thin += sc.sum() < 0.05 * sc.size and sc.any()
    assert multi >= 5 and border >= 10 and thin == 40


def test_perlin_noise_is_smooth_and_seeded():
    a = shapes.perlin_noise((64, 64), (4, 4), _rng(0))
    assert np.array_equal(a, shapes.perlin_noise((64, 64), (4, 4), _rng(0)))
    assert -1.5 < a.min() < 0 < a.max() < 1.5
    assert np.abs(np.diff(a, axis=1)).max() < 0.3  # gradient noise has no jumps


def test_foreground_mode_and_placement_on_an_object():
    """A bright disc on a dark background is an object: defects stay on the disc."""
    import cv2

    goods = []
    for s in range(8):
        img = np.full((96, 96, 3), 0.1, np.float32) + _rng(s).normal(0, 0.01, (96, 96, 3)).astype(np.float32)
        cv2.circle(img, (48 + s % 3, 48), 30, (0.8, 0.7, 0.5), -1)
        goods.append(np.clip(img, 0, 1))
    fg = D.estimate_foreground(goods)
    assert fg.mode == "object" and 0.2 < fg.object_fraction < 0.5
    disc = np.zeros((96, 96), bool)
    cv2.circle(disc.view(np.uint8), (48, 48), 31, 1, -1)
    synth = D.Synthesizer(fg, others=goods)
    for s in range(20):
        _, mask, _ = synth(goods[0], _rng(s))
        assert mask.any() and not (mask & ~disc).any()
    texture = [_rng(s).random((96, 96, 3)).astype(np.float32) for s in range(4)]
    assert D.estimate_foreground(texture).mode == "texture"


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png")) if not p.is_symlink()}


def test_written_root_reproduces_indexes_and_converts_without_a_warning(synthetic_root, tmp_path, caplog):
    from defectkit.converters.convert import ConvertConfig, convert
    from defectkit.datasets.mvtec import index_category
    from defectkit.datasets.split import build_manifest

    a = D.write_synthetic_root(synthetic_root, "washer", tmp_path / "a", 12, seed=3, progress=False)
    D.write_synthetic_root(synthetic_root, "washer", tmp_path / "b", 12, seed=3, progress=False)
    assert _digest(tmp_path / "a" / "washer") == _digest(tmp_path / "b" / "washer")  # byte-identical
    D.write_synthetic_root(synthetic_root, "washer", tmp_path / "c", 12, seed=4, progress=False)
    assert _digest(tmp_path / "a" / "washer") != _digest(tmp_path / "c" / "washer")
    assert a["foreground_mode"] == "object" and sum(a["per_shape"].values()) == 12
    assert json.loads((tmp_path / "a" / "washer" / "synthesis.json").read_text())["seed"] == 3
    assert (tmp_path / "a" / "washer" / "montage.png").stat().st_size > 10_000
    caplog.set_level("WARNING")
    idx = index_category(tmp_path / "a", "washer")
    assert not idx.warnings
    rep = convert(tmp_path / "a", build_manifest([idx]), tmp_path / "conv", ConvertConfig(formats=("yolo", "coco")),
                  progress=False)
    assert not rep["skipped_images"] and not [r for r in caplog.records if r.levelname == "WARNING"]
    assert rep["formats"]["coco"]["instance_iou"]["min"] == 1.0  # COCO RLE redraws every painted mask
