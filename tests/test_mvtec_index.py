"""The indexer on hand-built trees: what it finds, and every layout error it must name."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from defectkit.datasets.mvtec import DatasetLayoutError, index_category, index_dataset, list_categories
from defectkit.datasets.scan import analyze_mask, mask_to_bool, scan_category


def _basic(blob_mask):
    return {
        ("train", "good", "000"): None,
        ("train", "good", "001"): None,
        ("test", "good", "000"): None,
        ("test", "crack", "000"): blob_mask(),
        ("test", "crack", "001"): blob_mask(boxes=((0, 0, 3, 3), (40, 20, 48, 32))),
        ("test", "hole", "000"): blob_mask(boxes=((10, 10, 11, 11),)),
    }


def test_index_finds_every_image_with_type_mask_and_size(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", _basic(blob_mask))
    idx = index_category(root, "bottle")
    assert idx.layout == "mvtec_ad"
    assert [s.key for s in idx.samples] == sorted(s.key for s in idx.samples)
    assert len(idx.samples) == 6
    assert idx.defect_types == ["crack", "hole"]
    assert len(idx.select(split="train")) == 2
    crack = idx.select(defect_type="crack")
    assert [s.mask_path.name for s in crack] == ["000_mask.png", "001_mask.png"]
    assert all(s.image_hw == (32, 48) and s.channels == 3 for s in idx.samples)
    assert all(s.mask_path is None for s in idx.select(defect_type="good"))
    assert crack[0].relpath == "bottle/test/crack/000.png"
    assert crack[0].mask_relpath == "bottle/ground_truth/crack/000_mask.png"


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".bmp", ".tif"])
@pytest.mark.parametrize("gray", [True, False])
def test_formats_channels_and_non_square(mvtec_tree, blob_mask, ext, gray):
    items = {("train", "good", "a"): None, ("test", "dent", "a"): blob_mask(hw=(20, 50))}
    root = mvtec_tree("widget", items, hw=(20, 50), gray=gray, ext=ext)
    idx = index_category(root, "widget")
    assert {s.image_hw for s in idx.samples} == {(20, 50)}
    assert {s.channels for s in idx.samples} == {1 if gray else 3}


def test_mask_named_like_its_image_is_accepted(mvtec_tree, blob_mask):
    """VisA's split script names masks <stem>.png, not <stem>_mask.png."""
    root = mvtec_tree("pcb1", {("test", "bad", "007"): blob_mask()})
    m = root / "pcb1" / "ground_truth" / "bad" / "007_mask.png"
    m.rename(m.with_name("007.png"))
    (s,) = index_category(root, "pcb1").samples
    assert s.mask_path.name == "007.png"


def test_mvtec_3d_rgb_layout(tmp_path):
    root = tmp_path / "mvtec3d"
    img = np.full((24, 24, 3), 120, np.uint8)
    for split, d in [("train", "good"), ("validation", "good"), ("test", "good"), ("test", "crack")]:
        (root / "bagel" / split / d / "rgb").mkdir(parents=True)
        cv2.imwrite(str(root / "bagel" / split / d / "rgb" / "000.png"), img)
        (root / "bagel" / split / d / "xyz").mkdir()
    (root / "bagel" / "test" / "crack" / "gt").mkdir()
    m = np.zeros((24, 24), np.uint8)
    m[3:6, 3:9] = 255
    cv2.imwrite(str(root / "bagel" / "test" / "crack" / "gt" / "000.png"), m)
    idx = index_category(root, "bagel")
    assert idx.layout == "mvtec_3d"
    assert sorted((s.split, s.defect_type) for s in idx.samples) == [
        ("test", "crack"), ("test", "good"), ("train", "good"), ("validation", "good")]
    assert idx.select(defect_type="crack")[0].mask_path.parent.name == "gt"


def _error(root, category="bottle") -> DatasetLayoutError:
    with pytest.raises(DatasetLayoutError) as ei:
        index_category(root, category)
    return ei.value


def test_defect_image_without_mask_names_the_image_and_expected_mask(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", _basic(blob_mask))
    (root / "bottle/ground_truth/crack/001_mask.png").unlink()
    err = _error(root)
    assert [p.kind for p in err.problems] == ["missing_mask"]
    assert "test/crack/001.png" in str(err) and "001_mask.png" in str(err)


def test_mask_without_image_is_an_error(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", _basic(blob_mask))
    (root / "bottle/test/hole/000.png").unlink()
    err = _error(root)
    assert [p.kind for p in err.problems] == ["orphan_mask"]
    assert "ground_truth/hole/000_mask.png" in str(err) and "mask has no image" in str(err)


def test_mask_size_mismatch_names_both_sizes(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", _basic(blob_mask))
    cv2.imwrite(str(root / "bottle/ground_truth/crack/000_mask.png"), np.zeros((16, 16), np.uint8))
    err = _error(root)
    assert [p.kind for p in err.problems] == ["size_mismatch"]
    assert "16x16" in str(err) and "48x32" in str(err) and "000_mask.png" in str(err)


def test_unreadable_image_and_every_problem_listed_at_once(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", _basic(blob_mask))
    (root / "bottle/train/good/001.png").write_bytes(b"not a png at all")
    (root / "bottle/ground_truth/hole/000_mask.png").unlink()
    err = _error(root)
    assert sorted(p.kind for p in err.problems) == ["missing_mask", "unreadable_image"]
    assert "train/good/001.png" in str(err)


def test_truncated_files_are_caught_by_the_deep_scan(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", _basic(blob_mask))
    for rel in ["bottle/test/good/000.png", "bottle/ground_truth/crack/000_mask.png"]:
        p = root / rel
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])  # header intact, data cut
    idx = index_category(root, "bottle")  # headers still read
    with pytest.raises(DatasetLayoutError) as ei:
        scan_category(idx, deep=True, progress=False)
    kinds = sorted((p.kind, p.path.name) for p in ei.value.problems)
    assert kinds == [("corrupt_image", "000.png"), ("corrupt_mask", "000_mask.png")]


def test_empty_and_unknown_categories(tmp_path, mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", _basic(blob_mask))
    (root / "empty" / "train" / "good").mkdir(parents=True)
    err = _error(root, "empty")
    assert err.problems[0].kind == "empty_category" and "empty" in str(err)
    err = _error(root, "bottel")
    assert err.problems[0].kind == "unknown_category"
    assert "bottel" in str(err) and "available: bottle, empty" in str(err)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_categories(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetLayoutError, match="no category folder"):
        index_dataset(tmp_path / "flat")


def test_index_dataset_all_categories(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", _basic(blob_mask))
    mvtec_tree("carpet", {("train", "good", "0"): None}, root=root)
    assert [i.category for i in index_dataset(root)] == ["bottle", "carpet"]
    assert [i.category for i in index_dataset(root, "carpet")] == ["carpet"]


def test_oddities_are_warned_and_counted_not_dropped(mvtec_tree, blob_mask, caplog):
    root = mvtec_tree("bottle", _basic(blob_mask))
    cv2.imwrite(str(root / "bottle/ground_truth/hole/000_mask.png"), np.zeros((32, 48), np.uint8))
    aa = (blob_mask() * 255).astype(np.uint8)
    aa[4, 3] = 37  # an anti-aliased edge pixel
    cv2.imwrite(str(root / "bottle/ground_truth/crack/000_mask.png"), aa)
    idx = index_category(root, "bottle")
    with caplog.at_level(logging.WARNING):
        scans, warnings = scan_category(idx, progress=False)
    assert len(scans) == 6  # nothing dropped
    assert sorted(w.kind for w in warnings) == ["empty_mask", "stray_mask_values"]
    assert "1 empty_mask" in caplog.text and "1 stray_mask_values" in caplog.text
    crack0 = next(s for s in scans if s.sample.key == "bottle/test/crack/000")
    assert crack0.mask.area == 6 * 5 + 1  # the stray pixel counts as defect


@pytest.mark.parametrize("value", [1, 255])
def test_mask_values_0_1_and_0_255_mean_the_same(mvtec_tree, blob_mask, value):
    root = mvtec_tree("bottle", {("test", "crack", "0"): blob_mask()}, mask_value=value)
    scans, warnings = scan_category(index_category(root, "bottle"), progress=False)
    assert scans[0].mask.area == 30 and warnings == []


def test_defect_images_in_train_are_warned(mvtec_tree, blob_mask):
    root = mvtec_tree("bottle", {("train", "good", "0"): None, ("train", "crack", "0"): blob_mask()})
    idx = index_category(root, "bottle")
    assert [w.kind for w in idx.warnings] == ["defect_in_train"]


@pytest.mark.parametrize(
    "name, mask, area, regions",
    [
        ("empty", np.zeros((5, 7), np.uint8), 0, ()),
        ("one pixel", np.pad([[255]], ((2, 2), (3, 3))).astype(np.uint8), 1, (1,)),
        ("two blobs", np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 1]], np.uint8), 5, (4, 1)),
        ("diagonal line is one 8-connected region", np.eye(6, dtype=np.uint8), 6, (6,)),
        ("ring keeps its hole", np.pad(np.pad(np.zeros((1, 1)), 1, constant_values=1), 1).astype(np.uint8), 8, (8,)),
        ("class ids 253/254/255", np.array([[253, 254, 0, 0], [0, 0, 0, 255]], np.uint8), 3, (2, 1)),
    ],
)
def test_analyze_mask(name, mask, area, regions):
    facts = analyze_mask(mask)
    assert facts.area == area, name
    assert facts.region_areas == regions, name
    assert facts.n_regions == len(regions)


def test_analyze_mask_stray_values_and_channels():
    m = np.array([[0, 255, 128], [0, 0, 255]], np.uint8)
    assert analyze_mask(m).stray_pixels == 1
    rgb = np.zeros((3, 3, 3), np.uint8)
    rgb[1, 1, 2] = 9
    assert mask_to_bool(rgb).sum() == 1 and analyze_mask(rgb).area == 1
    with pytest.raises(ValueError, match="shape"):
        mask_to_bool(np.zeros((2, 2, 2, 2)))


def test_unreadable_image_after_ultralytics_patched_pil(mvtec_tree, blob_mask):
    """Ultralytics replaces PIL's Image.open with one that imports pi_heif for unknown files;
    a garbage file must still give our error, not ModuleNotFoundError."""
    import ultralytics.utils.patches  # noqa: F401  (installs the patch)

    root = mvtec_tree("bottle", _basic(blob_mask))
    (root / "bottle/train/good/001.png").write_bytes(b"not a png at all")
    err = _error(root)
    assert [p.kind for p in err.problems] == ["unreadable_image"]
