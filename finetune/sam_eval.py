"""Scoring a SAM: masks for box prompts, per-instance IoU / Dice, the box-as-mask baseline, and the
canonical predictions records."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import ImageRecord, make_header, write_records
from defectkit.converters.instances import encode_rle, iou_dice, masks_to_boxes
from defectkit.finetune.sam_core import segment_boxes


def mask_confidence(prob: np.ndarray) -> np.ndarray:
    """A score per mask from its own logits: the mean probability inside the predicted mask (0 for
    an empty mask).  SAM's IoU head is not trained by the decoder loss here, so its output is
    not used as a confidence."""
    inside = prob > 0.5
    n = inside.reshape(len(prob), -1).sum(1)
    total = (prob * inside).reshape(len(prob), -1).sum(1)
    return np.where(n > 0, total / np.maximum(n, 1), 0.0)


def predict(sam, items, cache, device: str, boxes_of=None, crop: float = 0.0):
    """For each item: masks (N, H, W) bool, mask probabilities, mask confidences
    (:func:`mask_confidence`), for box prompts (the item's GT boxes unless ``boxes_of(item)``
    gives others), each segmented on its own crop when ``crop`` > 0 (``--crop``)."""
    import torch

    sam.eval()
    out = []
    with torch.no_grad():
        for it in items:
            boxes = it.boxes if boxes_of is None else boxes_of(it)
            if not len(boxes):
                out.append((np.zeros((0, *it.hw), bool), np.zeros((0, *it.hw), np.float32), np.zeros(0)))
                continue
            prob = segment_boxes(sam, it.rgb, boxes, cache, crop, encode=lambda rgb: cache.get(rgb).to(device))
            out.append((prob > 0.5, prob, mask_confidence(prob)))
    return out


def instance_scores(items, preds) -> dict:
    """Per-instance IoU and Dice of predicted vs GT masks (same order), overall and per type
    (``converters.instances.iou_dice``, the suite's one definition)."""
    ious, dices, types = [], [], []
    for it, (masks, _, _) in zip(items, preds, strict=True):
        for m, g in zip(masks, it.masks, strict=True):
            iou, dice = iou_dice(m, g)
            ious.append(iou)
            dices.append(dice)
            types.append(it.record.defect_type)
    t, ious, dices = np.asarray(types), np.asarray(ious), np.asarray(dices)
    per = {
        d: {
            "iou": float(np.nanmean(ious[t == d])),
            "dice": float(np.nanmean(dices[t == d])),
            "instances": int((t == d).sum()),
        }
        for d in sorted(set(types))
    }
    return {
        "iou": float(np.nanmean(ious)) if len(ious) else float("nan"),
        "dice": float(np.nanmean(dices)) if len(dices) else float("nan"),
        "instances": len(ious),
        "per_type": per,
    }


def box_as_mask(items) -> list:
    """The baseline every box-prompted segmenter must beat: each prompt box, filled, as the mask
    (in :func:`predict`'s form, for :func:`instance_scores`)."""
    out = []
    for it in items:
        m = fill_boxes(it.boxes, it.hw)
        out.append((m, m.astype(np.float32), np.ones(len(m))))
    return out


def fill_boxes(boxes, hw) -> np.ndarray:
    """``(N, H, W)`` bool: each box, filled (outward to whole pixels), as a mask."""
    b = np.asarray(boxes, float).reshape(-1, 4)
    m = np.zeros((len(b), *hw), bool)
    for j, (x0, y0, x1, y1) in enumerate(b):
        m[j, int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
    return m


def to_records(items, preds, classes_of):
    """Canonical records of :func:`predict` output; ``classes_of``: per item ``(labels, boxes, box scores)``."""
    recs = []
    for it, (masks, _prob, _iou), (labels, _boxes, box_scores) in zip(items, preds, classes_of, strict=True):
        recs.append(
            ImageRecord(
                image=it.record.image,
                height=it.hw[0],
                width=it.hw[1],
                boxes_xyxy=masks_to_boxes(masks) if len(masks) else np.zeros((0, 4)),
                labels=list(labels),
                scores=np.asarray(box_scores, float),
                masks=[encode_rle(m) for m in masks],
                image_score=float(np.max(box_scores)) if len(box_scores) else 0.0,
                key=it.record.key,
                category=it.record.category,
                defect_type=it.record.defect_type,
                fold=it.record.fold,
            )
        )
    return recs


def score_fine_tuned(sam, cache, test_items, d, key: str, model: str, run: Path, device: str,
                     crop: float = 0.0) -> dict:
    """GT-box-prompted masks of the trained decoder on the test fold: scores, speed, predictions file.

    Every test image gets a record (an image without a defect has no prompt and no mask), so the
    comparison sees the same test images for SAM as for every other model."""
    t0 = time.perf_counter()
    preds = predict(sam, test_items, cache, device, crop=crop)
    infer_s = time.perf_counter() - t0
    meta = [(list(it.record.labels), it.boxes, conf) for it, (_, _, conf) in zip(test_items, preds, strict=True)]
    write_records(run / "predictions.jsonl",
                  make_header("predictions", f"sam-{model}", d.classes, d.data_root,
                              manifest=d.header.get("manifest"), fold="test", prompts="ground-truth boxes", base=key,
                              crop=crop),
                  to_records(test_items, preds, meta))
    return {"fine_tuned": instance_scores(test_items, preds), "test_images": len(test_items),
            "images_per_s": len(test_items) / infer_s if infer_s else float("nan")}
