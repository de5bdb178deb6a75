"""The embedded synthetic dataset: deterministic, exact masks, the defect kinds it promises."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from defectkit.datasets import synthetic
from defectkit.datasets.image_files import read_image, read_mask
from defectkit.datasets.mvtec import index_dataset
from defectkit.datasets.scan import scan_category


def _pixels(root):
    return {p.relative_to(root).as_posix(): cv2.imread(str(p), cv2.IMREAD_UNCHANGED).tobytes()
            for p in sorted(root.rglob("*.png"))}


def test_generation_is_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", categories=["weave"], progress=False)
    b = synthetic.generate(tmp_path / "b", categories=["weave"], progress=False)
    pa, pb = _pixels(a), _pixels(b)
    assert pa == pb and len(pa) > 50
    c = synthetic.generate(tmp_path / "c", categories=["weave"], seed=1, progress=False)
    assert _pixels(c) != pa


def test_layout_is_valid_and_has_what_the_suite_needs(synthetic_root):
    idx = {i.category: i for i in index_dataset(synthetic_root)}
    kinds = {synthetic.CATEGORIES[c].kind for c in idx}
    assert kinds == {"object", "texture"}
    for cat, i in idx.items():
        assert len(i.defect_types) >= 3
        scans, warnings = scan_category(i, deep=True, progress=False)
        assert warnings == []  # binary, non-empty masks
        assert all(s.mask.area > 0 for s in scans if s.mask is not None)
        assert len(i.select(split="train")) == synthetic.CATEGORIES[cat].n_train_good
    # one RGB square category, one grayscale non-square one
    assert {s.channels for s in idx["washer"].samples} == {3}
    assert {s.image_hw for s in idx["weave"].samples} == {(224, 320)}
    assert {s.channels for s in idx["weave"].samples} == {1}


def _masks(root, cat, defect):
    return [read_mask(p) for p in sorted((root / cat / "ground_truth" / defect).glob("*_mask.png"))]


def test_defect_kinds(synthetic_root):
    r = synthetic_root
    # thin (at most ~3 px wide): a 5x5 opening removes most of a scratch or cut
    for cat, d in [("washer", "scratch"), ("weave", "cut")]:
        kept = [cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)).sum() / m.sum()
                for m in _masks(r, cat, d)]
        assert np.median(kept) < 0.5, (cat, d, kept)
    # several regions
    n_regions = [cv2.connectedComponents(m.astype(np.uint8), connectivity=8)[0] - 1
                 for m in _masks(r, "washer", "contamination")]
    assert min(n_regions) >= 2
    # on the image border
    for d in ["cut", "tear"]:
        for m in _masks(r, "weave", d):
            assert m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
    # with a hole: a contour hierarchy with a child
    for m in _masks(r, "washer", "stain"):
        _, hier = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        assert (hier[0][:, 3] >= 0).any()
    # tiny: specks down to a single pixel
    areas = [a for m in _masks(r, "weave", "speck")
             for a in cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)[2][1:, 4]]
    assert min(areas) == 1 and max(areas) <= 9


def test_defects_are_visible_where_the_mask_says(synthetic_root):
    """The painted defect differs from its surroundings: a mask is not drawn on an unchanged image."""
    for cat, d in [("washer", "hole"), ("weave", "stain"), ("weave", "cut")]:
        for p in sorted((synthetic_root / cat / "test" / d).glob("*.png"))[:5]:
            img = read_image(p).astype(float).mean(axis=2)
            m = read_mask(synthetic_root / cat / "ground_truth" / d / f"{p.stem}_mask.png")
            ring = cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~m
            assert abs(img[m].mean() - img[ring].mean()) > 25, (cat, d, p.name)


def test_rerun_reuses_and_never_overwrites_foreign_data(tmp_path):
    root = synthetic.generate(tmp_path / "s", categories=["weave"], progress=False)
    stamp = root / synthetic.STAMP
    before = stamp.stat().st_mtime_ns
    assert synthetic.generate(root, categories=["weave"], progress=False) == root
    assert stamp.stat().st_mtime_ns == before
    assert json.loads(stamp.read_text())["seed"] == 0
    foreign = tmp_path / "mine"
    (foreign / "bottle").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not this generator's output"):
        synthetic.generate(foreign, progress=False)
    assert (foreign / "bottle").is_dir()


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.make_sample

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(synthetic, "make_sample", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.generate(tmp_path / "s", categories=["weave"], progress=False)
    assert list(tmp_path.iterdir()) == []
