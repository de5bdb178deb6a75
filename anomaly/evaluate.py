"""Scoring a trained anomaly model: thresholds chosen on the val fold (never on test), the test fold's
image and pixel metrics, and the run folder's writers (scores.csv, maps, canonical predictions, plots,
the printed summary)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectkit.anomaly.config import RunConfig
from defectkit.anomaly.data import CategoryData, downsample_mask, entry_masks
from defectkit.anomaly.deploy import map_regions
from defectkit.anomaly.plots import write_plots
from defectkit.anomaly.scoring import knn_scores, latents, pca_scores, reconstruct
from defectkit.converters.canonical import ImageRecord, make_header, write_records
from defectkit.core.atomic import atomic_write_bytes, atomic_write_text
from defectkit.review import metrics as M


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float | None
    rule: str
    source: str


def choose_thresholds(cfg: RunConfig, scorer, data: CategoryData, pixel_level: bool) -> Thresholds:
    """Image and pixel thresholds from the val fold (at the ground truth's resolution), or from
    held-out good images + CutPaste when the val fold has no defect image; never from test."""
    s = cfg.score
    vy = data.val_y
    if len(vy) and vy.any():
        maps = scorer.maps(data.val_x)
        image, rule = M.choose_threshold(s.threshold, scorer.image_scores(maps), vy, s.false_alarm_rate,
                                       s.target_recall)
        pixel = None
        if pixel_level:
            masks = entry_masks(data.root, data.val_e)
            flat = np.concatenate([M.resize_map(a, m.shape).ravel() for a, m in zip(maps, masks, strict=True)])
            pixel = M.choose_threshold(pixel_method(s.threshold), flat, np.concatenate([m.ravel() for m in masks]),
                                     s.false_alarm_rate)[0]
        return Thresholds(image, pixel, rule, "val fold")
    x = np.concatenate([data.hold_x, data.cp_x])
    y = np.r_[np.zeros(len(data.hold_x)), np.ones(len(data.cp_x))]
    maps = scorer.maps(x)
    image, rule = M.choose_threshold(s.threshold, scorer.image_scores(maps), y, s.false_alarm_rate, s.target_recall)
    masks = np.concatenate([np.zeros((len(data.hold_x), *maps.shape[1:]), bool), data.cp_masks])
    pixel = (M.choose_threshold(pixel_method(s.threshold), maps.ravel(), masks.ravel(), s.false_alarm_rate)[0]
             if pixel_level else None)
    return Thresholds(image, pixel, rule, "CutPaste on held-out good images (the val fold has no defect image)")


def pixel_method(image_method: str) -> str:
    """The pixel threshold (region masks) stays F1-optimal when the image threshold is an operating point."""
    return "f1" if image_method in ("false_alarm", "recall") else image_method


def score_test_fold(cfg: RunConfig, scorer, model, data: CategoryData, test_maps: np.ndarray, masks: list[np.ndarray],
                 thr: Thresholds, device: str) -> dict:
    """Image metrics, pixel metrics at the ground truth's resolution, latent scores, operating point."""
    y = data.test_y
    scores = scorer.image_scores(test_maps)
    out: dict = {"image": M.image_metrics(scores, y, [e.defect_type for e in data.test_e])}
    if thr.pixel is not None:
        out["pixel"] = M.pixel_metrics([M.resize_map(a, m.shape) for a, m in zip(test_maps, masks, strict=True)],
                                       masks, types=[e.defect_type for e in data.test_e])
        out["pixel"]["map_resolution"] = cfg.model.imgsz
    out["image"]["at_threshold"] = {**M.confusion_at(scores, y, thr.image), "rule": thr.rule}
    if model is not None:  # encoder-latent scoring on the same model
        tr_lat, te_lat = latents(model, data.fit_x, device), latents(model, data.test_x, device)
        out["latent_knn_auroc"] = M.auroc(knn_scores(tr_lat, te_lat), y)
        out["latent_pca_auroc"] = M.auroc(pca_scores(tr_lat, te_lat), y)
    return out


def write_scores(run: Path, test_e, scores, y) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "defect_type", "label", "score"])
    for e, s, lab in zip(test_e, scores, y, strict=True):
        w.writerow([e.image, e.defect_type, int(lab), f"{s:.6g}"])
    atomic_write_text(run / "scores.csv", buf.getvalue())


def write_predictions(run: Path, data: CategoryData, maps: np.ndarray, scores: np.ndarray, hws, thr: Thresholds,
                      model_name: str, map_resolution: int, protocol: str = "manifest") -> None:
    """Canonical predictions: maps saved once (float16), thresholded maps as masks and boxes."""
    (run / "maps").mkdir(exist_ok=True)
    records = []
    for e, m, s, hw in zip(data.test_e, maps, scores, hws, strict=True):
        name = f"{e.category}__{e.defect_type}__{Path(e.image).stem}.npy"
        buf = io.BytesIO()
        np.save(buf, m.astype(np.float16))
        atomic_write_bytes(run / "maps" / name, buf.getvalue())
        boxes, labels, box_scores, rles = map_regions(M.resize_map(m, hw), thr.pixel)
        records.append(ImageRecord(image=e.image, height=hw[0], width=hw[1], boxes_xyxy=boxes, labels=labels,
                                   scores=box_scores, masks=rles, anomaly_map=f"maps/{name}", image_score=float(s),
                                   key=e.key, category=e.category, defect_type=e.defect_type, fold=e.fold))
    header = make_header("predictions", model_name, ["anomaly"], data.root, manifest=data.manifest.get("path"),
                         fold="test", protocol=protocol, map_resolution=map_resolution, pixel_threshold=thr.pixel,
                         image_threshold=thr.image, kind_of_model="anomaly",
                         note="box/mask scores are raw anomaly-map values, not probabilities")
    write_records(run / "predictions.jsonl", header, records)


def write_run_plots(run, cfg, model, data, test_maps, masks, scores, device, pixel_level) -> None:
    recon = reconstruct(model, data.test_x, device) if model is not None else None
    lat = latents(model, data.test_x, device) if model is not None else None
    small = np.stack([downsample_mask(m, cfg.model.imgsz) for m in masks])
    write_plots(run / "plots", data.test_x, recon, test_maps, small, scores, data.test_y,
                [e.defect_type for e in data.test_e], lat, pixel=pixel_level,
                title=f"{cfg.model.model} on {cfg.data.category}")


def print_metrics(m: dict, run: Path) -> None:
    px = m.get("pixel", {})
    where = "whole test split, paper protocol" if m.get("protocol") == "paper" else "test fold"
    print(f"{m['model']} on {m['category']} {where} ({m['test_images']} images): "
          f"image AUROC {m['image']['auroc']:.3f}"
          + (f", pixel AUROC {px['auroc']:.3f}, AUPRO@30% {px['aupro']:.3f}" if px else "")
          + (f", latent kNN AUROC {m['latent_knn_auroc']:.3f}" if "latent_knn_auroc" in m else "")
          + f"; trained in {m['train_seconds']:.0f}s, {m['images_per_s']:.1f} images/s")
    if px.get("per_type_auroc"):
        print("per defect type, image / pixel AUROC against the good test images: " + ", ".join(
            f"{t} {m['image'].get('per_type_auroc', {}).get(t, float('nan')):.3f} / {a:.3f}"
            for t, a in px["per_type_auroc"].items()))
    op = m["image"].get("at_threshold")
    if op:
        print(f"at the threshold chosen on validation ({op['rule']}): {op['fp']} of {op['fp'] + op['tn']} good test "
              f"images rejected (false-alarm rate {op['false_alarm_rate']:.3f}), {op['fn']} of {op['fn'] + op['tp']} "
              f"defective ones passed (miss rate {op['miss_rate']:.3f})")
    print(f"run folder: {run}")
