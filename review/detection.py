"""Detection and instance-segmentation metrics over canonical records, with pycocotools.

Ground truth and predictions are :class:`~defectkit.converters.canonical.ImageRecord` lists (the
suite's one format), matched by their ``image`` path; COCO dicts are built here, in memory, so
every model is scored by the same code.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

from defectkit.converters.canonical import ImageRecord
from defectkit.converters.label_formats import xyxy_to_coco_bbox
from defectkit.core.errors import DataError
from defectkit.review.metrics import auroc


def _rle_for_coco(rle: dict) -> dict:
    return {
        "size": list(rle["size"]),
        "counts": rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"],
    }


def coco_ground_truth(gt: Sequence[ImageRecord], classes: Sequence[str]) -> dict:
    """A COCO ground-truth dict; image ids follow ``gt`` order from 1, category ids ``classes`` from 1."""
    from pycocotools import mask as mask_utils

    cat = {n: i + 1 for i, n in enumerate(classes)}
    images, anns = [], []
    for i, r in enumerate(gt, start=1):
        images.append({"id": i, "file_name": r.image, "height": r.height, "width": r.width})
        for k, (box, lab) in enumerate(zip(r.boxes_xyxy, r.labels, strict=True)):
            a = {
                "id": len(anns) + 1,
                "image_id": i,
                "category_id": cat[lab],
                "bbox": xyxy_to_coco_bbox(box),
                "iscrowd": 0,
            }
            if r.masks is not None:
                rle = _rle_for_coco(r.masks[k])
                a["segmentation"] = rle
                a["area"] = float(mask_utils.area(rle))
            else:
                a["area"] = float((box[2] - box[0]) * (box[3] - box[1]))
            anns.append(a)
    return {"images": images, "annotations": anns, "categories": [{"id": v, "name": n} for n, v in cat.items()]}


def coco_evaluate(
    gt: Sequence[ImageRecord], pred: Sequence[ImageRecord], classes: Sequence[str], iou_type: str = "bbox"
) -> dict:
    """COCO mAP@[.5:.95], mAP@.5 and per-class APs of ``pred`` against ``gt``.

    Images of ``gt`` missing from ``pred`` count as images with no detection.  ``iou_type``
    ``"segm"`` needs masks on both sides.  Returns NaN metrics when ``gt`` has no instance.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict = coco_ground_truth(gt, classes)
    ids = {im["file_name"]: im["id"] for im in gt_dict["images"]}
    cat = {n: i + 1 for i, n in enumerate(classes)}
    dets = []
    for r in pred:
        if r.image not in ids:
            continue
        if iou_type == "segm" and r.masks is None:
            raise DataError(f"{r.image}: segm evaluation needs predicted masks")
        for k, (box, lab, score) in enumerate(zip(r.boxes_xyxy, r.labels, r.scores, strict=True)):
            d = {
                "image_id": ids[r.image],
                "category_id": cat[lab],
                "bbox": xyxy_to_coco_bbox(box),
                "score": float(score),
            }
            if iou_type == "segm":
                d["segmentation"] = _rle_for_coco(r.masks[k])
            dets.append(d)
    nan = float("nan")
    if not gt_dict["annotations"]:
        return {"map50_95": nan, "map50": nan, "per_class": {}, "n_gt": 0, "n_det": len(dets)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        if not dets:
            return {
                "map50_95": 0.0,
                "map50": 0.0,
                "per_class": {n: {"ap50_95": 0.0, "ap50": 0.0} for n in classes},
                "n_gt": len(gt_dict["annotations"]),
                "n_det": 0,
            }
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [iou thr, recall, class, area, max dets]
    per_class = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        per_class[name] = {
            "ap50_95": float(p[p > -1].mean()) if (p > -1).any() else nan,
            "ap50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else nan,
        }
    return {
        "map50_95": float(ev.stats[0]),
        "map50": float(ev.stats[1]),
        "per_class": per_class,
        "n_gt": len(gt_dict["annotations"]),
        "n_det": len(dets),
    }


def image_auroc(gt: Sequence[ImageRecord], pred: Sequence[ImageRecord]) -> float:
    """AUROC of ``pred``'s image scores for defect (``defect_type != "good"`` in ``gt``) vs good.

    A ground-truth image without a prediction record scores 0.  NaN when only one class is present.
    """
    scores = {r.image: (r.image_score if r.image_score is not None else 0.0) for r in pred}
    y = np.array([r.defect_type != "good" for r in gt], int)
    s = np.array([scores.get(r.image, 0.0) for r in gt], float)
    return auroc(s, y)


def box_f1_conf(gt: Sequence[ImageRecord], pred: Sequence[ImageRecord], iou_thr: float = 0.5,
                class_aware: bool = True) -> dict | None:
    """The box confidence at which detection F1 (IoU >= ``iou_thr``) is highest: the peak of
    Ultralytics' F1-confidence curve, as an operating point chosen on a val fold.

    Matching is COCO's greedy one (per image and class, boxes by falling score, each to the
    best-overlapping unmatched ground-truth box), so the matches among the boxes scored >= t are
    the same for every t and one pass gives the whole curve.  Written here (not taken from
    Ultralytics) because it must run on any canonical predictions file.  Returns
    ``{"conf", "f1", "precision", "recall"}``, or None when either side has no box."""
    from defectkit.converters.instances import box_iou

    by = {p.image: p for p in pred}
    scores, tp, n_gt = [], [], 0
    for g in gt:
        n_gt += len(g)
        p = by.get(g.image)
        if p is None or not len(p):
            continue
        ps = np.asarray(p.scores if p.scores is not None else np.ones(len(p)), float)
        plab = list(p.labels) if class_aware else ["*"] * len(p)
        glab = list(g.labels) if class_aware else ["*"] * len(g)
        for c in set(plab):
            pi = np.array([k for k, lab in enumerate(plab) if lab == c])
            gi = np.array([k for k, lab in enumerate(glab) if lab == c])
            pi = pi[np.argsort(-ps[pi], kind="stable")]
            ious = box_iou(np.asarray(p.boxes_xyxy, float)[pi], np.asarray(g.boxes_xyxy, float)[gi]) if len(gi) \
                else np.zeros((len(pi), 0))
            used = np.zeros(len(gi), bool)
            for row, k in enumerate(pi):
                cand = np.where(~used & (ious[row] >= iou_thr))[0]
                hit = len(cand) > 0
                if hit:
                    used[cand[np.argmax(ious[row][cand])]] = True
                scores.append(ps[k])
                tp.append(hit)
    if not scores or not n_gt:
        return None
    order = np.argsort(-np.asarray(scores), kind="stable")
    s, ctp = np.asarray(scores)[order], np.cumsum(np.asarray(tp)[order])
    last = np.r_[s[1:] != s[:-1], True]  # a threshold keeps every box tied at its score
    k = np.arange(1, len(s) + 1)
    prec, rec = ctp / k, ctp / n_gt
    f1 = np.where(ctp > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    f1 = np.where(last, f1, -1.0)
    i = int(np.argmax(f1))
    return {"conf": float(s[i]), "f1": float(max(f1[i], 0.0)), "precision": float(prec[i]), "recall": float(rec[i])}
