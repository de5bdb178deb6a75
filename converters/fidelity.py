"""The conversion's fidelity check: every written label file is read back, parsed, redrawn and compared
with the source masks (YOLO, YOLO-seg, VOC per image; COCO through pycocotools), and summarised in
``fidelity.json``.  A fault in the writing (a shifted box, a lost vertex, a wrong area) shows here."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np

from defectkit.converters import label_formats
from defectkit.converters.instances import box_iou, decode_rle, mask_iou, polygon_to_mask
from defectkit.converters.job import ConvertConfig, ImageResult


def source_iou(drawn: np.ndarray, source: np.ndarray) -> float:
    """IoU of two same-size masks (non-zero = defect; 1.0 when both are empty), computed with
    OpenCV's SIMD pixel counts over the image and the intersection (``min`` of the two: non-zero
    where both are) inside the source's defect box only (outside it the source is empty, so nothing
    intersects there): exact, and cheap."""

    a = drawn if drawn.dtype == np.uint8 else (drawn != 0).astype(np.uint8)
    b = source if source.dtype == np.uint8 else (source != 0).astype(np.uint8)
    na, nb = cv2.countNonZero(a), cv2.countNonZero(b)
    x, y, w, h = cv2.boundingRect(b)
    inter = cv2.countNonZero(cv2.min(a[y : y + h, x : x + w], b[y : y + h, x : x + w])) if w and h else 0
    union = na + nb - inter
    return inter / union if union else 1.0


def kept_iou(crops: list[np.ndarray], boxes: np.ndarray, source: np.ndarray) -> float:
    """:func:`source_iou` of the instances' union against the source, drawn inside the source's
    defect box only (instances lie inside it: they are its connected regions)."""
    if not crops:
        return 1.0 if not cv2.countNonZero(source) else 0.0
    x, y, w, h = cv2.boundingRect(source)
    win = np.zeros((h, w), np.uint8)
    for c, (x0, y0, x1, y1) in zip(crops, boxes, strict=True):
        win[y0 - y : y1 - y, x0 - x : x1 - x] |= c
    src = source[y : y + h, x : x + w]
    inter = cv2.countNonZero(cv2.min(win, src))
    union = cv2.countNonZero(win) + cv2.countNonZero(source) - inter
    return inter / union if union else 1.0


def verify_image(tmp: Path, r: ImageResult, cfg: ConvertConfig, names: dict[int, str]) -> None:
    """Fidelity of what is on disk for one image: its YOLO, YOLO-seg and VOC label files are read
    back, parsed and redrawn, and compared with the image's instances.  A fault in the writing (a
    shifted box, a lost vertex, labels under another image's name) shows here."""
    hw = r.image_hw
    boxes, cls_names = np.asarray(r.boxes, float).reshape(-1, 4), r.labels
    if "yolo" in cfg.formats:
        text = (tmp / "yolo" / "labels" / r.fold / f"{r.name}.txt").read_text()
        pb, pc = label_formats.parse_yolo_box_lines(text, hw)
        ok_n = len(pb) == len(boxes)
        ious = np.diag(box_iou(pb, boxes)).tolist() if ok_n and len(boxes) else ([] if ok_n else [0.0])
        r.fidelity["yolo"] = {"instance_iou": ious,
                              "classes_ok": ok_n and [names[int(c)] for c in pc] == list(cls_names)}
    if "yolo_seg" in cfg.formats:
        text = (tmp / "yolo_seg" / "labels" / r.fold / f"{r.name}.txt").read_text()
        r.fidelity["yolo_seg"] = seg_fidelity(label_formats.parse_yolo_seg_lines(text, hw), r.crops, boxes, hw)
    if "voc" in cfg.formats:
        vb, vn = label_formats.parse_voc_xml((tmp / "voc" / "Annotations" / f"{r.name}.xml").read_text())
        ok = len(vb) == len(boxes) and np.allclose(vb, boxes) and vn == list(cls_names)
        r.fidelity["voc"] = {"exact": bool(ok)}


def seg_fidelity(parsed, crops: list[np.ndarray], boxes: np.ndarray, hw) -> dict:
    """Each polygon redrawn against its instance (inside the window holding both), and the union
    of the polygons against the union of the instances (inside the window holding them all).
    ``crops`` are the instances' masks inside their boxes (instances are empty outside them), so
    nothing here is image-sized: the cost follows the defects."""
    if len(parsed) != len(crops):
        return {"instance_iou": [0.0], "image_iou": 0.0}
    if not crops:
        return {"instance_iou": [], "image_iou": None}
    boxes = np.asarray(boxes, int).reshape(-1, 4)
    wins = []
    for (_, p), box in zip(parsed, boxes, strict=True):
        lo = np.maximum(np.minimum(np.floor(p.min(0)), box[:2]), 0).astype(int)
        hi = np.minimum(np.maximum(np.floor(p.max(0)) + 1, box[2:]), [hw[1], hw[0]]).astype(int)
        wins.append((lo, hi))
    glo = np.min([lo for lo, _ in wins], 0)
    ghi = np.max([hi for _, hi in wins], 0)
    union = np.zeros((ghi[1] - glo[1], ghi[0] - glo[0]), bool)
    truth = np.zeros_like(union)
    ious = []
    for (_, p), crop, box, (lo, hi) in zip(parsed, crops, boxes, wins, strict=True):
        r = polygon_to_mask(p - lo, (hi[1] - lo[1], hi[0] - lo[0]))
        m = np.zeros_like(r)
        m[box[1] - lo[1] : box[3] - lo[1], box[0] - lo[0] : box[2] - lo[0]] = crop
        ious.append(mask_iou(r, m, empty=1.0))
        union[lo[1] - glo[1] : hi[1] - glo[1], lo[0] - glo[0] : hi[0] - glo[0]] |= r
        truth[box[1] - glo[1] : box[3] - glo[1], box[0] - glo[0] : box[2] - glo[0]] |= crop
    return {"instance_iou": ious, "image_iou": mask_iou(union, truth, empty=1.0)}


def coco_check(path: Path, results: list[ImageResult]) -> dict:
    """Load the written COCO file with pycocotools and rasterise every annotation its way.

    Compressed RLE strings are equal exactly when masks are, so a mask is decoded only when
    they differ; box and area are checked with pycocotools' ``toBbox`` and ``area``.
    """
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    by_key = {r.entry["key"]: r for r in results}
    ious, bbox_ok, area_ok = [], True, True
    for img in coco.dataset["images"]:
        r = by_key[img["key"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        for a, rle, box, area in zip(anns, r.rles, r.boxes, r.areas, strict=True):
            theirs = coco.annToRLE(a)
            counts = theirs["counts"].encode() if isinstance(theirs["counts"], str) else theirs["counts"]
            same = counts == rle["counts"].encode()
            ious.append(1.0 if same else mask_iou(mask_utils.decode(theirs).astype(bool), decode_rle(rle), empty=1.0))
            bbox_ok &= bool(np.allclose(a["bbox"], label_formats.xyxy_to_coco_bbox(box)))
            bbox_ok &= bool(np.allclose(mask_utils.toBbox({**theirs, "counts": counts}), a["bbox"])) or not same
            area_ok &= a["area"] == area and (int(mask_utils.area({**theirs, "counts": counts})) == area or not same)
    return {"instance_iou": ious, "bbox_matches_toBbox": bool(bbox_ok), "area_is_pixel_count": bool(area_ok)}


def summarize(values: list[float]) -> dict | None:
    """Mean, min and count of a list of scores (None when empty)."""
    if not values:
        return None
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "min": float(a.min()), "n": len(a)}


def fidelity_report(
    results: list[ImageResult], classes: list[str], cfg: ConvertConfig, coco_files: dict, data_root: Path
) -> dict:
    """``fidelity.json``: per format, the read-back scores of every image; counts and skipped images."""
    used = [r for r in results if r.skipped is None]
    per_format: dict[str, dict] = {}
    for fmt in cfg.formats if cfg.verify else ():
        if fmt == "coco":
            checks = [coco_check(p, used) for p in coco_files.values()]
            ious = [v for c in checks for v in c["instance_iou"]]
            per_format["coco"] = {
                "instance_iou": summarize(ious),
                "bbox_matches_toBbox": all(c["bbox_matches_toBbox"] for c in checks),
                "area_is_pixel_count": all(c["area_is_pixel_count"] for c in checks),
                "segmentation": "polygons (RLE for regions with holes)" if cfg.coco_polygons else "rle",
                "regions_kept_as_rle_for_holes": sum(r.coco_kept_rle for r in used),
            }
            continue
        f = [r.fidelity[fmt] for r in used if fmt in r.fidelity]
        entry: dict = {}
        inst = [v for x in f for v in x.get("instance_iou", [])]
        if inst or fmt in ("yolo", "yolo_seg"):
            entry["instance_iou"] = summarize(inst)
        img = [x["image_iou"] for x in f if x.get("image_iou") is not None]
        if img:
            entry["image_iou_vs_source"] = summarize(img)
        if f and "exact" in f[0]:
            entry["exact"] = all(x["exact"] for x in f)
        if fmt == "yolo":
            entry["classes_ok"] = all(x["classes_ok"] for x in f)
        per_format[fmt] = entry
    counts: Counter = Counter()
    per_fold: dict[str, Counter] = defaultdict(Counter)
    for r in used:
        for lab in r.labels:
            counts[lab] += 1
            per_fold[r.fold][lab] += 1
    skipped = [{"image": r.entry["image"], "reason": r.skipped} for r in results if r.skipped]
    dropped = sum(r.dropped_small for r in results)
    kept = [r.fidelity["kept_vs_source_iou"] for r in used if r.fidelity.get("kept_vs_source_iou") is not None]
    return {
        "data_root": str(data_root.resolve()),
        "scheme": cfg.scheme,
        "classes": classes,
        "images": len(used),
        "background_images": sum(1 for r in used if not r.labels),
        "instances_per_class": {c: counts[c] for c in classes},
        "instances_per_fold": {f: dict(sorted(c.items())) for f, c in sorted(per_fold.items())},
        "formats": per_format,
        "skipped_images": skipped,
        "regions_dropped_by_min_area": {"min_area": cfg.min_area, "count": dropped,
                                        "kept_vs_source_iou": summarize(kept)},
    }


def format_report(report: dict) -> str:
    """The fidelity report as a printed table."""
    from tabulate import tabulate

    rows = []
    for fmt, f in report["formats"].items():
        inst = f.get("instance_iou")
        img = f.get("image_iou_vs_source")
        rows.append(
            [
                fmt,
                inst and f"{inst['mean']:.4f}",
                inst and f"{inst['min']:.4f}",
                img and f"{img['mean']:.4f} / {img['min']:.4f}",
                ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("instance_iou", "image_iou_vs_source")),
            ]
        )
    lines = [
        f"converted {report['images']} images ({report['background_images']} backgrounds), scheme "
        f"{report['scheme']}, {sum(report['instances_per_class'].values())} instances: "
        + ", ".join(f"{k} {v}" for k, v in report["instances_per_class"].items()),
        tabulate(
            rows,
            ["format", "instance IoU mean", "min", "image IoU mean / min", "checks"],
            tablefmt="github",
            missingval="-",
        ),
    ]
    if report["skipped_images"]:
        lines.append(
            f"skipped {len(report['skipped_images'])} image(s): "
            + "; ".join(f"{s['image']} ({s['reason']})" for s in report["skipped_images"][:5])
        )
    d = report["regions_dropped_by_min_area"]
    if d["count"]:
        lines.append(f"dropped {d['count']} region(s) smaller than {d['min_area']} px")
    return "\n".join(lines)
