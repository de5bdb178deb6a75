"""Indexing, statistics and splits on the real images in ../shared/data."""

from __future__ import annotations

import pytest

from defectkit.datasets.mvtec import index_category
from defectkit.datasets.scan import scan_category
from defectkit.datasets.split import build_manifest
from defectkit.datasets.stats import compute_stats, format_table

pytestmark = pytest.mark.shared_data


def test_magnetic_tile(shared_data):
    idx = index_category(shared_data, "magnetic_tile")
    assert idx.defect_types == ["blowhole", "break", "crack", "fray", "uneven"]
    assert len({s.image_hw for s in idx.samples}) > 100  # many sizes
    assert {s.channels for s in idx.samples} == {1}
    scans, warnings = scan_category(idx, progress=False)
    s = compute_stats(idx, scans, warnings)
    # the shared README: four `uneven` masks are empty, edges are anti-aliased
    assert s["per_type"]["uneven"]["empty_masks"] == 4
    assert sum(t["empty_masks"] for t in s["per_type"].values()) == 4
    assert s["warnings"]["empty_mask"] == 4 and s["warnings"]["stray_mask_values"] > 0
    assert "| fray" in format_table(s)
    m = build_manifest([idx], seed=0)
    assert set(m["counts"]["magnetic_tile"]) == {"good", *idx.defect_types}
    for counts in m["counts"]["magnetic_tile"].values():
        assert min(counts.values()) >= 1


def test_hazelnut_toy(shared_data):
    idx = index_category(shared_data, "hazelnut_toy")
    assert len(idx.select(split="train", defect_type="good")) == 28
    assert len(idx.select(split="test", defect_type="good")) == 6
    assert len(idx.select(defect_type="colour")) == 17
    sizes = {s.image_hw for s in idx.samples}
    assert (512, 512) in sizes and len(sizes) == 2  # one image is 512x522
    scans, warnings = scan_category(idx, deep=True, progress=False)
    assert len(scans) == 51
