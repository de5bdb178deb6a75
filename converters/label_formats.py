"""YOLO, YOLO-seg, COCO and Pascal VOC label encodings: pure functions, each with its parser.

Every writer here has an inverse, so that tests and the fidelity report can redraw what was
written and compare it with the source masks.  Coordinates follow ``instances``'s conventions.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from defectkit.converters.instances import (
    Instances,
    encode_rle,
    region_to_coco_polygon,
    region_to_polygon,
)
from defectkit.core.errors import DataError

# ------------------------------------------------------------------------------ YOLO boxes


def yolo_box_lines(boxes_xyxy: np.ndarray, class_ids: Sequence[int], image_hw: tuple[int, int]) -> list[str]:
    """``class cx cy w h`` lines, normalised by the image size, 6 decimals."""
    h, w = image_hw
    out = []
    for (x0, y0, x1, y1), c in zip(np.asarray(boxes_xyxy, float).reshape(-1, 4), class_ids, strict=True):
        out.append(f"{int(c)} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
    return out


def parse_yolo_box_lines(text: str, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`yolo_box_lines`: ``(N, 4)`` pixel xyxy boxes and ``(N,)`` class ids."""
    h, w = image_hw
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if any(len(r) != 5 for r in rows):
        raise DataError("YOLO detection lines have 5 fields: class cx cy w h")
    a = np.array([[float(v) for v in r] for r in rows], float).reshape(-1, 5)
    cx, cy, bw, bh = a[:, 1] * w, a[:, 2] * h, a[:, 3] * w, a[:, 4] * h
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1), a[:, 0].astype(int)


# ------------------------------------------------------------------------------ YOLO-seg


def yolo_seg_lines(polygons: Sequence[np.ndarray], class_ids: Sequence[int], image_hw: tuple[int, int]) -> list[str]:
    """``class x1 y1 x2 y2 ...`` lines (normalised pixel-centre coordinates), one per polygon."""
    h, w = image_hw
    out = []
    for poly, c in zip(polygons, class_ids, strict=True):
        p = np.asarray(poly, float).reshape(-1, 2) / (w, h)
        out.append(f"{int(c)} " + " ".join(f"{x:.6f} {y:.6f}" for x, y in p))
    return out


def parse_yolo_seg_lines(text: str, image_hw: tuple[int, int]) -> list[tuple[int, np.ndarray]]:
    """Inverse of :func:`yolo_seg_lines`: ``[(class_id, (K, 2) pixel polygon), ...]``."""
    h, w = image_hw
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        v = line.split()
        if len(v) < 7 or len(v) % 2 == 0:
            raise DataError(f"YOLO-seg line needs a class and at least 3 x y pairs: {line[:60]!r}")
        out.append((int(v[0]), np.array(v[1:], float).reshape(-1, 2) * (w, h)))
    return out


def instance_polygons(inst: Instances) -> list[np.ndarray]:
    """:func:`region_to_polygon` of every instance, traced inside its box (plus a 1 px margin)
    rather than over the whole image: the cost follows the defect's size, not the image's."""
    h, w = inst.image_hw
    out = []
    for m, (x0, y0, x1, y1) in zip(inst.masks, inst.boxes_xyxy.astype(int), strict=True):
        ox, oy = max(x0 - 1, 0), max(y0 - 1, 0)
        crop = m[oy : min(y1 + 1, h), ox : min(x1 + 1, w)]
        out.append(region_to_polygon(crop) + (ox, oy))
    return out


# ------------------------------------------------------------------------------ COCO


def xyxy_to_coco_bbox(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_annotations(inst: Instances, category_ids: Sequence[int], *, polygons: bool = False,
                     rles: Sequence[dict] | None = None) -> tuple[list[dict], int]:
    """COCO annotation dicts (without ``id``/``image_id``) for the instances of one image.

    ``bbox`` is xywh with half-open edges, ``area`` the region's pixel count, ``iscrowd`` 0.
    Segmentation is compressed RLE; with ``polygons=True`` a polygon list is written instead,
    except for regions with holes (COCO polygons cannot cut holes: they stay RLE).  Returns the
    annotations and how many regions kept RLE for that reason.
    """
    import cv2

    anns, kept_rle = [], 0
    rles = rles if rles is not None else [encode_rle(m) for m in inst.masks]
    for m, box, area, cid, rle in zip(inst.masks, inst.boxes_xyxy, inst.areas, category_ids, rles, strict=True):
        seg: dict | list = rle
        if polygons:
            cs, hier = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            has_hole = hier is not None and (hier[0][:, 3] >= 0).any()
            if has_hole:
                kept_rle += 1
            else:
                seg = [[float(v) for v in region_to_coco_polygon(m).reshape(-1)]]
        anns.append({"category_id": int(cid), "bbox": xyxy_to_coco_bbox(box), "area": int(area),
                     "segmentation": seg, "iscrowd": 0})
    return anns, kept_rle


# ------------------------------------------------------------------------------ Pascal VOC


def voc_xml(filename: str, image_hw: tuple[int, int], depth: int, boxes_xyxy: np.ndarray,
            names: Sequence[str], *, folder: str = "", path: str = "") -> str:
    """Pascal VOC annotation.  VOC boxes are 1-based and inclusive: ``xmin = x0 + 1``,
    ``xmax = x1`` for our half-open 0-based ``x0, x1``."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = filename
    if path:
        ET.SubElement(ann, "path").text = path
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "defectkit"
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", image_hw[1]), ("height", image_hw[0]), ("depth", depth)):
        ET.SubElement(size, tag).text = str(int(v))
    ET.SubElement(ann, "segmented").text = "0"
    for (x0, y0, x1, y1), name in zip(np.asarray(boxes_xyxy).reshape(-1, 4), names, strict=True):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, tag).text = str(int(round(v)))
    ET.indent(ann)
    return ET.tostring(ann, encoding="unicode") + "\n"


def parse_voc_xml(text: str) -> tuple[np.ndarray, list[str]]:
    """Inverse of :func:`voc_xml`: half-open 0-based ``(N, 4)`` xyxy boxes and names."""
    root = ET.fromstring(text)
    boxes, names = [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (float(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0 - 1, y0 - 1, x1, y1])
        names.append(obj.find("name").text)
    return np.array(boxes, float).reshape(-1, 4), names


# ------------------------------------------------------------------------------ label maps


def label_map(inst: Instances, image_hw: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` class map for semantic segmentation: 0 background, ``class_id + 1`` defect.
    uint8 for up to 255 classes, else uint16."""
    top = int(inst.class_ids.max()) + 1 if len(inst) else 0
    out = np.zeros(image_hw, np.uint8 if top <= 255 else np.uint16)
    for m, c, (x0, y0, x1, y1) in zip(inst.masks, inst.class_ids, inst.boxes_xyxy.astype(int), strict=True):
        out[y0:y1, x0:x1][m[y0:y1, x0:x1]] = c + 1  # instances are empty outside their box
    return out


def coco_document(images: Sequence[dict], annotations: Sequence[Sequence[dict]], classes: Sequence[str],
                  license: dict, info: dict) -> dict:
    """A COCO instances document: ``images[i]`` (file_name, height, width, ...) gets id ``i + 1`` and owns
    ``annotations[i]`` (:func:`coco_annotations` output, given ids in order); class ``k`` is category
    ``k + 1`` (COCO reserves 0)."""
    imgs, anns = [], []
    for i, (img, own) in enumerate(zip(images, annotations, strict=True), start=1):
        imgs.append({"id": i, **img})
        for a in own:
            anns.append({"id": len(anns) + 1, "image_id": i, **a})
    return {"info": info, "licenses": [license], "images": imgs, "annotations": anns,
            "categories": [{"id": k + 1, "name": n, "supercategory": "defect"} for k, n in enumerate(classes)]}
