"""Detect-then-segment: another model's boxes (a YOLO run, or an anomaly run's thresholded regions)
prompt the fine-tuned SAM; the cascade is scored as instance segmentation and as pixel masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import make_header, read_records, write_records
from defectkit.converters.instances import iou_dice
from defectkit.core.errors import DataError
from defectkit.finetune.sam_eval import fill_boxes, predict, to_records
from defectkit.review.detection import coco_evaluate
from defectkit.review.metrics import mean_defined, pixel_metrics
from defectkit.review.predictions import (
    DEFAULT_BOX_CONF,
    agnostic,
    deploy_threshold,
    find_prediction_files,
    pixel_score_map,
)


def resolve_cascade_conf(conf: float | None, predictions: Path) -> tuple[float, str]:
    """The box confidence of the YOLO cascade and where it came from: ``--cascade-conf``, else the YOLO run's
    val-chosen ``thresholds.box_conf`` (its ``deploy.json``, beside the predictions file), else 0.25."""
    if conf is not None:
        return conf, "--cascade-conf"
    c = deploy_threshold(Path(predictions), "box_conf")
    if c is not None:
        return c, f"{Path(predictions).parent / 'deploy.json'}: the peak of the val fold's box F1"
    return DEFAULT_BOX_CONF, f"default {DEFAULT_BOX_CONF} (the YOLO run has no val-chosen box confidence)"


#: the most boxes per image a cascade prompts SAM with (highest confidence first), as Ultralytics' max_det
MAX_DET = 30


def prompt_boxes(scores, conf: float, max_det: int | None = MAX_DET) -> np.ndarray:
    """Indices of the boxes a cascade segments: confidence >= ``conf``, highest first, at most ``max_det``
    (``None``: all).  A detector's predictions file holds up to 300 boxes an image down to confidence 0.001
    (Ultralytics' val settings), each one an encoder pass with ``--crop``: the cap keeps SAM's work bounded."""
    s = np.asarray(scores, float).reshape(-1)
    idx = np.flatnonzero(s >= conf)
    idx = idx[np.argsort(-s[idx], kind="stable")]
    return idx if max_det is None else idx[:max_det]


def with_box_masks(prompted: tuple, boxes, hw) -> tuple:
    """:func:`~defectkit.finetune.sam_eval.predict`'s ``(masks, probabilities, confidences)`` for the first
    ``len(masks)`` of ``boxes`` (the prompted ones), completed for the others with each box, filled, as its
    mask (probability 1 inside, confidence 1)."""
    masks, prob, conf = prompted
    rest = fill_boxes(np.asarray(boxes).reshape(-1, 4)[len(masks):], hw)
    return (np.concatenate([masks, rest]), np.concatenate([prob, rest.astype(np.float32)]),
            np.concatenate([conf, np.ones(len(rest))]))


@dataclass(frozen=True)
class CascadeConfig:
    predictions: Path  # a predictions file, or a run folder (an anomaly run: one file per category)
    conf: float = DEFAULT_BOX_CONF
    sam_model: str = "tiny"
    crop: float = 0.0
    out_name: str = "cascade_predictions.jsonl"
    max_det: int | None = MAX_DET


def read_prompt_predictions(src: Path, classes: list[str]) -> tuple[dict, list, bool]:
    """The boxes a cascade prompts SAM with: ``(header, records, class_aware)``.  Every predictions file
    of ``src`` (an anomaly run trained with ``--category all`` has one per category) is read; a detector
    of the data's classes gives a class-aware cascade, an anomaly model (or a one-class ``defect``
    detector) a class-agnostic one.  Anything else is refused with the reason."""
    files = [f for f in find_prediction_files([src]) if not f.name.startswith("cascade")]
    header, recs = None, []
    for f in files:
        h, r = read_records(f)
        if header is not None and h["classes"] != header["classes"]:
            raise DataError(f"{f}: classes {h['classes']} differ from {files[0]}'s {header['classes']}")
        header = header or h
        recs += r
    if header["classes"] == classes:
        return header, recs, True
    if header.get("kind_of_model") == "anomaly" or header["classes"] == ["defect"]:
        return header, recs, False
    raise DataError(
        f"{files[0]} has classes {header['classes']}, the data has {classes}: use a detector trained on the "
        "same conversion, or an anomaly model (or a one-class `defect` detector) for a class-agnostic cascade"
    )


def cascade(sam, cache, test_items, gt_test, header, classes, cfg: CascadeConfig, run: Path, device: str) -> dict:
    """Boxes of another model (YOLO, or an anomaly model's thresholded regions) as prompts: instance masks
    scored by mask AP (class-agnostic when the prompts carry no defect class), pixel IoU and pixel
    AUROC/AUPRO (the suite's metrics: images with neither a defect nor a kept box have no IoU and are
    left out).  An anomaly model's regions were already thresholded on its val fold: all are kept."""
    yh, ypreds, class_aware = read_prompt_predictions(cfg.predictions, classes)
    anomaly = yh.get("kind_of_model") == "anomaly"
    conf = -np.inf if anomaly else cfg.conf
    by_image = {r.image: r for r in ypreds}
    none = ([], np.zeros((0, 4)), np.zeros(0))

    def ordered(r):  # every box, the max_det most confident first: SAM segments those (whatever their confidence,
        # so that mask AP ranks SAM's masks as box AP ranks the boxes); the rest keep their box as the mask
        scores = np.asarray(r.scores if r.scores is not None else np.ones(len(r)), float)
        i = prompt_boxes(scores, -np.inf, cfg.max_det)
        order = np.concatenate([i, np.setdiff1d(np.arange(len(scores)), i)]).astype(int)
        return [r.labels[k] for k in order], np.asarray(r.boxes_xyxy).reshape(-1, 4)[order], scores[order], len(i)

    full = [ordered(r) if (r := by_image.get(it.record.image)) is not None else (*none, 0) for it in test_items]
    meta = [m[:3] for m in full]
    prompts = {id(it): boxes[:n] for it, (_l, boxes, _s, n) in zip(test_items, full, strict=True)}
    prompted = predict(sam, test_items, cache, device, lambda it: prompts[id(it)], cfg.crop)
    # the records hold every detection, so the image score is the detector's own
    preds = [with_box_masks(p, m[1], it.hw) for it, p, m in zip(test_items, prompted, meta, strict=True)]
    recs = to_records(test_items, preds, meta)
    extra = {"kind_of_model": "anomaly", "note": f"{yh['model']} regions (thresholded on its val fold) as "
             "prompts; mask scores are its raw map values"} if anomaly else {}
    write_records(
        run / cfg.out_name,
        make_header(
            "predictions",
            f"{yh['model']}+sam-{cfg.sam_model}",
            yh["classes"],
            header["data_root"],
            manifest=header.get("manifest"),
            fold="test",
            prompts_from=str(cfg.predictions),
            **({"yolo_run": str(cfg.predictions), "box_conf": cfg.conf} if not anomaly else {}),
            max_det=cfg.max_det,
            **extra,
        ),
        recs,
    )
    ious, score_maps, gts = [], [], []
    for it, rec, (masks, _prob, _), (*_, scores, n) in zip(test_items, recs, preds, full, strict=True):
        # what a deployed cascade segments: prompted (the first n) and at or above the confidence
        keep = (np.asarray(scores) >= conf) & (np.arange(len(scores)) < n)
        pred_union = masks[keep].any(0) if keep.any() else np.zeros(it.hw, bool)
        gt_union = it.masks.any(0) if len(it.masks) else np.zeros(it.hw, bool)
        ious.append(iou_dice(pred_union, gt_union)[0])
        score_maps.append(pixel_score_map(rec, run, it.hw))  # from what was written, as the comparison does
        gts.append(gt_union)
    px = pixel_metrics(score_maps, gts)
    if class_aware:
        ap = {"mask_ap": coco_evaluate(gt_test, recs, classes, "segm"),
              "box_ap_after_sam": coco_evaluate(gt_test, recs, classes, "bbox")}
    else:
        ap = {"mask_ap_class_agnostic": coco_evaluate(agnostic(gt_test), agnostic(recs), ["defect"], "segm"),
              "box_ap_after_sam_class_agnostic": coco_evaluate(agnostic(gt_test), agnostic(recs), ["defect"],
                                                               "bbox")}
    return {
        **ap,
        "prompts": str(cfg.predictions),
        "prompt_model": yh["model"],
        "class_aware": class_aware,
        "predictions": cfg.out_name,
        "pixel_iou_per_image": mean_defined(ious),
        "cascade_conf": None if anomaly else cfg.conf,
        "pixel_auroc": px["auroc"],
        "pixel_aupro": px["aupro"],
    }
