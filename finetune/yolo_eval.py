"""Scoring a YOLO run on the test fold: Ultralytics' validator, canonical predictions scored by
pycocotools, image AUROC, and the thresholds chosen on the val fold (image, and the box confidence a
cascade keeps boxes at)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import ImageRecord, make_header, read_records, write_records
from defectkit.converters.instances import encode_rle
from defectkit.core.errors import DataError
from defectkit.finetune.yolo_core import YoloConfig, conversion_dir, device
from defectkit.finetune.yolo_deploy import image_threshold
from defectkit.review.detection import box_f1_conf, coco_evaluate, image_auroc
from defectkit.review.metrics import confusion_at

log = logging.getLogger("defectkit.finetune.yolo")


def predict_records(model, gt_records, data_root: Path, classes: list[str], cfg: YoloConfig, task: str):
    """Canonical prediction records for ``gt_records``' images, and images/s."""
    records, t0 = [], time.perf_counter()
    paths = [str(data_root / r.image) for r in gt_records]
    results = model.predict(
        source=paths,
        imgsz=cfg.imgsz,
        conf=cfg.conf,
        iou=0.7,
        max_det=100,
        device=device(cfg),
        stream=True,
        verbose=False,
        retina_masks=task == "segment",
    )
    for r, res in zip(gt_records, results, strict=True):
        b = res.boxes
        boxes = b.xyxy.cpu().numpy() if len(b) else np.zeros((0, 4))
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, r.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, r.height)
        scores = b.conf.cpu().numpy() if len(b) else np.zeros(0)
        labels = [res.names[int(c)] for c in b.cls.cpu().numpy()] if len(b) else []
        masks = None
        if task == "segment":
            data = (
                res.masks.data.cpu().numpy() > 0.5 if res.masks is not None else np.zeros((0, r.height, r.width), bool)
            )
            masks = [encode_rle(m) for m in data]
        records.append(
            ImageRecord(
                image=r.image,
                height=r.height,
                width=r.width,
                boxes_xyxy=boxes,
                labels=labels,
                scores=scores,
                masks=masks,
                image_score=float(scores.max()) if len(scores) else 0.0,
                key=r.key,
                category=r.category,
                defect_type=r.defect_type,
                fold=r.fold,
            )
        )
    seconds = time.perf_counter() - t0
    unknown = {lab for rec in records for lab in rec.labels} - set(classes)
    if unknown:
        raise DataError(f"model predicts classes {sorted(unknown)} that the data does not have")
    return records, len(records) / seconds if seconds > 0 else float("nan")


def ultralytics_metrics(model, data_yaml: Path, run_dir: Path, cfg: YoloConfig, spec: dict, names: list[str]) -> dict:
    """Ultralytics' own validator on the test split (its plots go to ``<run>/test``)."""
    v = model.val(
        data=str(data_yaml),
        split="test",
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        device=device(cfg),
        plots=True,
        project=str(run_dir),
        name="test",
        exist_ok=True,
        verbose=False,
    )
    part = v.seg if spec["task"] == "segment" else v.box
    per = {
        names[int(c)]: {
            "precision": float(part.p[i]),
            "recall": float(part.r[i]),
            "ap50": float(part.ap50[i]),
            "ap50_95": float(part.ap[i]),
        }
        for i, c in enumerate(v.ap_class_index)
    }
    out = {
        "map50": float(v.box.map50),
        "map50_95": float(v.box.map),
        "precision": float(v.box.mp),
        "recall": float(v.box.mr),
        "per_class": per,
    }
    if spec["task"] == "segment":
        out["mask_map50"] = float(v.seg.map50)
        out["mask_map50_95"] = float(v.seg.map)
    return out


def evaluate(
    model, data_yaml: Path, run_dir: Path, cfg: YoloConfig, spec: dict, names: list[str], ultralytics_val: bool = True
) -> dict:
    """Test-fold metrics: Ultralytics' validator, pycocotools on canonical predictions, image AUROC."""
    metrics: dict = {}
    if ultralytics_val:
        metrics["ultralytics"] = ultralytics_metrics(model, data_yaml, run_dir, cfg, spec, names)
    gt_path = conversion_dir(data_yaml) / "ground_truth.jsonl"
    if not gt_path.is_file():
        log.warning("%s not found: no canonical predictions or pycocotools cross-check", gt_path)
        return metrics
    header, gt = read_records(gt_path)
    test = [r for r in gt if r.fold == "test"]
    preds, ips = predict_records(model, test, Path(header["data_root"]), names, cfg, spec["task"])
    pred_header = make_header(
        "predictions",
        cfg.model + (f" ({cfg.recipe})" if cfg.recipe else ""),
        names,
        header["data_root"],
        manifest=header.get("manifest"),
        run=str(run_dir),
        fold="test",
        from_scratch=cfg.from_scratch,
        text_embeddings=cfg.text_embeddings if spec["family"] == "world" else None,
    )
    write_records(run_dir / "predictions.jsonl", pred_header, preds)
    metrics["pycocotools"] = {"bbox": coco_evaluate(test, preds, names, "bbox")}
    if spec["task"] == "segment":
        metrics["pycocotools"]["segm"] = coco_evaluate(test, preds, names, "segm")
    metrics["image_auroc"] = image_auroc(test, preds)
    metrics["test_images"] = len(test)
    metrics["images_per_s"] = ips
    val = [r for r in gt if r.fold == "val"]
    val_preds = predict_records(model, val, Path(header["data_root"]), names, cfg, spec["task"])[0] if val else []
    metrics["thresholds"] = image_threshold(val, val_preds, cfg.threshold, cfg.false_alarm_rate)
    y = np.array([len(r) > 0 for r in test])
    s = np.array([p.image_score or 0.0 for p in preds])
    metrics["at_threshold"] = confusion_at(s, y, metrics["thresholds"]["image"])  # the test fold's operating point
    # the box confidence a detect-then-segment cascade keeps boxes at: the peak of the val fold's F1 curve
    box = box_f1_conf(val, val_preds) if val_preds else None
    metrics["thresholds"]["box_conf"] = None if box is None else box["conf"]
    metrics["thresholds"]["box_at_conf"] = box
    return metrics
