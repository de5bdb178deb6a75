"""Hand-made masks whose YOLO lines and COCO annotations are written out by hand, and round trips."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from defectkit.converters.instances import (
    class_name,
    class_names,
    decode_rle,
    encode_rle,
    mask_to_instances,
    masks_to_boxes,
    polygon_to_mask,
    region_to_coco_polygon,
    region_to_polygon,
)
from defectkit.converters.label_formats import (
    coco_annotations,
    label_map,
    parse_voc_xml,
    parse_yolo_box_lines,
    parse_yolo_seg_lines,
    voc_xml,
    yolo_box_lines,
    yolo_seg_lines,
)


def M(hw, *pixels):
    m = np.zeros(hw, np.uint8)
    for r, c in pixels:
        m[r, c] = 255
    return m


# (name, mask, expected YOLO lines, expected COCO (bbox, area) per instance)
CASES = [
    ("empty", np.zeros((5, 8), np.uint8), [], []),
    ("one pixel at row 2 col 3", M((5, 8), (2, 3)),
     ["0 0.437500 0.500000 0.125000 0.200000"], [([3, 2, 1, 1], 1)]),
    ("two regions, the larger on the top-left border",
     np.pad(np.ones((2, 3), np.uint8), ((0, 3), (0, 5))) | np.pad(np.ones((2, 2), np.uint8), ((3, 0), (6, 0))),
     ["0 0.187500 0.200000 0.375000 0.400000", "0 0.875000 0.800000 0.250000 0.400000"],
     [([0, 0, 3, 2], 6), ([6, 3, 2, 2], 4)]),
    ("diagonal one-pixel line is one region", np.eye(4, dtype=np.uint8),
     ["0 0.500000 0.500000 1.000000 1.000000"], [([0, 0, 4, 4], 4)]),
    ("region with a hole", M((5, 5), *[(r, c) for r in (1, 2, 3) for c in (1, 2, 3) if (r, c) != (2, 2)]),
     ["0 0.500000 0.500000 0.600000 0.600000"], [([1, 1, 3, 3], 8)]),
    ("0/1-valued mask, non-square 3x6", np.array([[0] * 6, [0, 0, 0, 0, 1, 1], [0] * 6], np.uint8),
     ["0 0.833333 0.500000 0.333333 0.333333"], [([4, 1, 2, 1], 2)]),
]


@pytest.mark.parametrize("name, mask, yolo, coco", CASES, ids=[c[0] for c in CASES])
def test_hand_made_masks(name, mask, yolo, coco):
    hw = mask.shape
    inst = mask_to_instances(mask)
    assert yolo_box_lines(inst.boxes_xyxy, inst.class_ids, hw) == yolo
    anns, kept = coco_annotations(inst, [1] * len(inst))
    assert [(a["bbox"], a["area"]) for a in anns] == coco
    assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in anns)
    for a, m in zip(anns, inst.masks, strict=True):
        # RLE is exact and pycocotools agrees on box (half-open: one pixel is 1 wide) and area
        assert np.array_equal(decode_rle(a["segmentation"]), m)
        rle = {**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}
        assert mask_utils.toBbox(rle).tolist() == a["bbox"]
        assert int(mask_utils.area(rle)) == a["area"]
    # the union of the instances is the mask
    union = inst.masks.any(0) if len(inst) else np.zeros(hw, bool)
    assert np.array_equal(union, mask > 0)


def test_one_pixel_rle_matches_hand_written_counts():
    m = M((5, 8), (2, 3))  # column-major index 3 * 5 + 2 = 17
    ours = encode_rle(m > 0)
    hand = mask_utils.frPyObjects({"counts": [17, 1, 22], "size": [5, 8]}, 5, 8)
    assert ours["counts"].encode() == hand["counts"] and ours["size"] == [5, 8]


def test_one_pixel_yolo_seg_line_by_hand():
    inst = mask_to_instances(M((5, 8), (2, 3)))
    line = yolo_seg_lines([region_to_polygon(inst.masks[0])], [0], (5, 8))
    # the pixel centre (3.5, 2.5), repeated to the three points Ultralytics needs
    assert line == ["0 " + " ".join(["0.437500 0.500000"] * 3)]


def test_instances_order_boxes_and_min_area():
    m = np.zeros((10, 10), np.uint8)
    m[0, 9] = 1
    m[5:8, 2:6] = 1
    inst = mask_to_instances(m, class_id=3)
    assert inst.areas.tolist() == [12, 1] and inst.class_ids.tolist() == [3, 3]
    assert inst.boxes_xyxy.tolist() == [[2, 5, 6, 8], [9, 0, 10, 1]]
    assert np.array_equal(masks_to_boxes(inst.masks), inst.boxes_xyxy)
    assert len(mask_to_instances(m, min_area=2)) == 1
    with pytest.raises(ValueError, match="shape"):
        mask_to_instances(np.zeros((2, 2, 2)))


def _random_masks():
    import cv2

    rng = np.random.default_rng(0)
    out = []
    for hw in [(37, 53), (64, 64), (20, 90)]:
        for thr in (0.5, 0.54):
            out.append((cv2.GaussianBlur(rng.random(hw), (9, 9), 3) > thr).astype(np.uint8))
    ring = np.zeros((40, 40), np.uint8)
    cv2.circle(ring, (20, 20), 15, 1, -1)
    cv2.circle(ring, (20, 20), 6, 0, -1)
    ring[18:23, 18:23] = 1  # an island inside the hole: a second region
    out.append(ring)
    two_holes = np.ones((30, 40), np.uint8)
    two_holes[5:10, 5:10] = 0
    two_holes[15:20, 25:30] = 0
    out.append(two_holes)
    return out


@pytest.mark.parametrize("mask", _random_masks())
def test_round_trips_through_every_format(mask):
    hw = mask.shape
    inst = mask_to_instances(mask, class_id=2)
    assert len(inst) > 0
    # YOLO boxes: within the 6-decimal rounding
    boxes, cls = parse_yolo_box_lines("\n".join(yolo_box_lines(inst.boxes_xyxy, inst.class_ids, hw)), hw)
    assert np.allclose(boxes, inst.boxes_xyxy, atol=1e-4 * max(hw)) and (cls == 2).all()
    # YOLO-seg polygons redraw every region exactly, holes included
    polys = [region_to_polygon(m) for m in inst.masks]
    parsed = parse_yolo_seg_lines("\n".join(yolo_seg_lines(polys, inst.class_ids, hw)), hw)
    for (c, p), m in zip(parsed, inst.masks, strict=True):
        assert c == 2 and np.array_equal(polygon_to_mask(p, hw), m)
    # COCO RLE exact; COCO polygons exact through pycocotools for hole-free regions
    anns, kept = coco_annotations(inst, [3] * len(inst), polygons=True)
    for a, m in zip(anns, inst.masks, strict=True):
        if isinstance(a["segmentation"], dict):
            assert np.array_equal(decode_rle(a["segmentation"]), m)
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], *hw))
            assert np.array_equal(mask_utils.decode(rle).astype(bool), m)
    # VOC: 1-based inclusive in the file, our half-open boxes back out
    names = [f"c{c}" for c in inst.class_ids]
    vb, vn = parse_voc_xml(voc_xml("x.png", hw, 3, inst.boxes_xyxy, names))
    assert np.array_equal(vb, inst.boxes_xyxy) and vn == names
    # label map: class id + 1 where the defect is
    lm = label_map(inst, hw)
    assert set(np.unique(lm)) <= {0, 3} and np.array_equal(lm > 0, mask > 0)


def test_holes_force_rle_when_polygons_are_requested():
    ring = M((5, 5), *[(r, c) for r in (1, 2, 3) for c in (1, 2, 3) if (r, c) != (2, 2)])
    anns, kept = coco_annotations(mask_to_instances(ring), [1], polygons=True)
    assert kept == 1 and isinstance(anns[0]["segmentation"], dict)
    with pytest.raises(ValueError):
        region_to_coco_polygon(np.zeros((3, 3)))


def test_voc_box_of_one_pixel_is_one_based_inclusive():
    xml = voc_xml("a.png", (5, 8), 1, np.array([[3, 2, 4, 3]]), ["speck"])
    assert "<xmin>4</xmin>" in xml and "<xmax>4</xmax>" in xml and "<ymin>3</ymin>" in xml


def test_class_schemes():
    pairs = [("bottle", "good"), ("bottle", "crack"), ("screw", "crack"), ("screw", "thread_top")]
    assert class_names(pairs, "defect") == ["crack", "thread_top"]
    assert class_names(pairs, "single") == ["defect"]
    assert class_names(pairs, "category_defect") == ["bottle_crack", "screw_crack", "screw_thread_top"]
    assert class_name("bottle", "broken_large", "category_defect") == "bottle_broken_large"
    with pytest.raises(ValueError, match="unknown class scheme"):
        class_name("a", "b", "nope")


def test_parsers_reject_malformed_lines():
    with pytest.raises(ValueError, match="5 fields"):
        parse_yolo_box_lines("0 0.5 0.5 0.1", (10, 10))
    with pytest.raises(ValueError, match="at least 3"):
        parse_yolo_seg_lines("0 0.1 0.1 0.2 0.2", (10, 10))


@pytest.mark.parametrize("seed", range(40))
def test_rle_from_the_box_is_byte_identical_to_pycocotools_on_the_whole_image(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    m = np.zeros((h, w), bool)
    y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
    y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
    m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.0, 0.3, 0.9, 1.0])
    theirs = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
    assert encode_rle(m, (x0, y0, x1, y1))["counts"] == theirs
    assert encode_rle(m)["counts"] == theirs


def test_coco_document_numbers_images_annotations_and_categories_from_one():
    from defectkit.converters.label_formats import coco_document

    images = [{"file_name": "a.png"}, {"file_name": "b.png"}, {"file_name": "c.png"}]
    anns = [[{"bbox": [0, 0, 1, 1]}, {"bbox": [1, 1, 2, 2]}], [], [{"bbox": [3, 3, 1, 1]}]]
    doc = coco_document(images, anns, ["crack", "hole"], {"id": 1, "name": "CC0"}, {"fold": "test"})
    assert [i["id"] for i in doc["images"]] == [1, 2, 3] and doc["images"][1]["file_name"] == "b.png"
    assert [(a["id"], a["image_id"]) for a in doc["annotations"]] == [(1, 1), (2, 1), (3, 3)]
    assert doc["annotations"][2]["bbox"] == [3, 3, 1, 1]
    assert doc["categories"] == [{"id": 1, "name": "crack", "supercategory": "defect"},
                                 {"id": 2, "name": "hole", "supercategory": "defect"}]
    assert doc["licenses"] == [{"id": 1, "name": "CC0"}] and doc["info"] == {"fold": "test"}
