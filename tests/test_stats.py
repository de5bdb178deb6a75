"""Statistics on data whose answers are known."""

from __future__ import annotations

import json

import cv2
import numpy as np

from defectkit.datasets.mvtec import index_category
from defectkit.datasets.scan import scan_category
from defectkit.datasets.stats import compute_stats, format_table, write_stats


def _stats(mvtec_tree, blob_mask):
    items = {
        ("train", "good", "0"): None,
        ("train", "good", "1"): None,
        ("test", "good", "0"): None,
        ("test", "crack", "0"): blob_mask(boxes=((0, 0, 4, 2),)),  # 8 px, 1 region
        ("test", "crack", "1"): blob_mask(boxes=((0, 0, 2, 2), (10, 10, 14, 14))),  # 4+16 px, 2 regions
        ("test", "hole", "0"): blob_mask(boxes=((5, 5, 6, 6),)),  # 1 px
    }
    root = mvtec_tree("bottle", items, hw=(32, 48))
    idx = index_category(root, "bottle")
    scans, warnings = scan_category(idx, progress=False)
    return compute_stats(idx, scans, warnings)


def test_counts_areas_and_regions(mvtec_tree, blob_mask):
    s = _stats(mvtec_tree, blob_mask)
    assert s["n_images"] == 6
    assert s["defect_types"] == ["crack", "hole"]
    assert s["images_per_split"] == {"test": {"crack": 2, "good": 1, "hole": 1}, "train": {"good": 2}}
    assert s["image_sizes_hw"] == {"32x48": 6} and s["channels"] == {"3": 6}
    crack = s["per_type"]["crack"]
    assert crack["images"] == 2 and crack["splits"] == {"test": 2}
    assert crack["regions"]["total"] == 3 and crack["regions"]["histogram"] == {"1": 1, "2": 1}
    assert crack["area_px"] == {"min": 8, "median": 14, "mean": 14, "max": 20}
    assert crack["region_area_px"]["min"] == 4 and crack["region_area_px"]["max"] == 16
    assert np.isclose(crack["area_pct"]["max"], 100 * 20 / (32 * 48))
    hole = s["per_type"]["hole"]
    assert hole["area_px"]["max"] == 1 and hole["empty_masks"] == 0
    good = s["per_type"]["good"]
    assert good["images"] == 3 and good["masks"] == 0 and good["area_px"] is None
    assert list(s["per_type"]) == ["good", "crack", "hole"]  # good first, then sorted


def test_empty_mask_is_counted(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", {("test", "crack", "0"): blob_mask(), ("test", "crack", "1"): blob_mask()})
    cv2.imwrite(str(root / "bottle/ground_truth/crack/1_mask.png"), np.zeros((32, 48), np.uint8))
    idx = index_category(root, "bottle")
    scans, warnings = scan_category(idx, progress=False)
    s = compute_stats(idx, scans, warnings)
    assert s["per_type"]["crack"]["empty_masks"] == 1
    assert s["warnings"] == {"empty_mask": 1}
    assert "warnings: 1 empty_mask" in format_table(s)


def test_table_json_and_plot_are_written(mvtec_tree, blob_mask, tmp_path):
    s = _stats(mvtec_tree, blob_mask)
    table = format_table(s)
    lines = table.splitlines()
    assert lines[0].startswith("bottle: 6 images, 2 defect types (crack, hole)")
    row = next(line for line in lines if line.startswith("| crack"))
    assert "| 1.50 / 2" in row and "14 (8-20)" in row
    paths = write_stats(s, tmp_path / "stats")
    assert json.loads(paths["json"].read_text()) == s
    assert paths["table"].read_text().strip() == table
    img = cv2.imread(str(paths["plot"]))
    assert img is not None and img.shape[0] > 100 and img.std() > 0


def test_many_sizes_are_summarised(mvtec_tree, blob_mask):
    root = mvtec_tree("a", {("train", "good", "0"): None}, hw=(10, 20))
    for i, hw in enumerate([(11, 21), (12, 22), (13, 23), (14, 24), (15, 25)]):
        mvtec_tree("a", {("train", "good", f"x{i}"): None}, hw=hw, root=root)
    idx = index_category(root, "a")
    s = compute_stats(idx, scan_category(idx, progress=False)[0])
    assert "6 distinct, H 10-15, W 20-25" in format_table(s)
