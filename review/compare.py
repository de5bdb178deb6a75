"""Side-by-side comparison of runs on the same held-out images (``make compare RUNS="..."``).

    python -m defectkit.review.compare --gt work/out/<data>/converted/<cat>-defect/ground_truth.jsonl \\
        --runs work/runs/yolo/<run> work/runs/anomaly/<run> work/runs/sam/<run> --out work/compare/<name>

Every run is read through its canonical ``predictions.jsonl`` (``cascade_predictions.jsonl``
too, as its own entry) and scored by the same code against the ground truth's test fold:

* detection mAP50 / mAP50-95 (pycocotools), class-aware when the run's classes are the ground
  truth's, and class-agnostic (every label -> ``defect``) for every run, anomaly models included;
* instance-mask AP when the run has masks;
* pixel IoU and Dice of the union of the masks with score >= the run's own box confidence (chosen
  on its val fold, the peak of box F1: a cascade's header ``box_conf``, a YOLO run's ``deploy.json``),
  else ``--conf`` (anomaly runs' masks are already thresholded on their val fold), mean over
  images with a defect or a prediction (an image with neither has no IoU and is left out, as
  everywhere in the suite);
* pixel AUROC, AUPRO and AP from anomaly maps, or from mask scores (score x mask), exact, at
  the ground truth's resolution (maps resized to each image's size), by ``review/metrics.py``;
* image AUROC from image scores (the highest box confidence for detectors);
* per defect type: image AUROC and pixel IoU; speed from the run's ``metrics.json``.

Writes ``comparison.md`` (table), ``comparison.json`` (everything) and ``report.html``
(self-contained: metric bars per model and defect type, ROC curves, example images with the
ground truth and each model's output side by side, worst cases first).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import ImageRecord, read_records
from defectkit.converters.instances import box_iou
from defectkit.core.atomic import atomic_write_json, atomic_write_text
from defectkit.core.cli import HelpFormatter, run_cli
from defectkit.core.errors import DataError
from defectkit.review.detection import coco_evaluate, image_auroc
from defectkit.review.metrics import confusion_at, iou_dice, mean_defined, pixel_metrics
from defectkit.review.predictions import (
    DEFAULT_BOX_CONF,
    agnostic,
    load_runs,
    pixel_score_map,
    run_box_conf,
    run_name,
    union_mask,
)
from defectkit.review.report import write_report
from defectkit.review.tables import table

log = logging.getLogger("defectkit.compare")
@dataclass
class PixelScores:
    """Per-image pixel results of one run: IoU/Dice of the union masks, and the score maps at the
    ground truth's resolution for the ranking metrics."""

    iou: dict[str, float] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)


def pixel_scores(covered: list[ImageRecord], by_image: dict[str, ImageRecord], dirs: dict[str, Path],
                 run_dir: Path, conf: float) -> PixelScores:
    out = PixelScores()
    for g in covered:
        hw = (g.height, g.width)
        rec = by_image[g.image]
        gm = g.decode_masks().any(0) if g.masks else np.zeros(hw, bool)
        pm = union_mask(rec, hw, conf)
        if pm is not None:
            out.iou[g.image], out.dice[g.image] = iou_dice(pm, gm)
        ps = pixel_score_map(rec, dirs.get(g.image, run_dir), hw)
        if ps is not None:
            out.maps.append(ps)
            out.masks.append(gm)
    return out


def score_run(run: tuple, gt: list[ImageRecord], classes: list[str], conf: float = DEFAULT_BOX_CONF) -> dict:
    """All metrics of one model (an entry of :func:`load_runs`) against the ground-truth records."""
    paths, header, preds, dirs = run
    path = paths[0]
    by_image = {r.image: r for r in preds}
    covered = [g for g in gt if g.image in by_image]
    if not covered:
        raise DataError(f"{path} has no prediction for any test image of the ground truth")
    out: dict = {"name": run_name(path, header), "files": [str(p) for p in paths], "model": header.get("model"),
                 "images": len(covered), "missing_images": len(gt) - len(covered)}
    # anomaly runs' masks were thresholded on their val fold; their scores are raw map values
    run_conf = run_box_conf(path, header, conf)
    out["conf"] = None if run_conf == -np.inf else run_conf
    out.update(_detection_metrics(covered, preds, classes, header))
    out["image_auroc"] = image_auroc(covered, preds)
    px = pixel_scores(covered, by_image, dirs, path.parent, run_conf)
    types = sorted({g.defect_type for g in covered if g.defect_type != "good"})
    out["per_type"] = {t: {"image_auroc": image_auroc([g for g in covered if g.defect_type in (t, "good")], preds),
                           "pixel_iou": mean_defined(px.iou.get(g.image, np.nan) for g in covered
                                                     if g.defect_type == t)} for t in types}
    if px.iou:
        out["pixel_iou"] = mean_defined(px.iou.values())
        out["pixel_dice"] = mean_defined(px.dice.values())
    if px.maps:
        pm = pixel_metrics(px.maps, px.masks)
        out["pixel_auroc"], out["pixel_aupro"], out["pixel_ap"] = pm["auroc"], pm["aupro"], pm["ap"]
    out["per_image_iou"] = {k: v for k, v in px.iou.items() if not np.isnan(v)}
    out["per_image_quality"] = {g.image: out["per_image_iou"].get(g.image, box_recall_iou(g, by_image[g.image],
                                                                                        run_conf))
                                for g in covered if len(g)}
    out["image_scores"] = {r.image: r.image_score for r in preds}
    thr = header.get("_image_thresholds", {})
    if covered and all(g.image in thr for g in covered):
        y = np.array([len(g) > 0 for g in covered])
        s = np.array([by_image[g.image].image_score or 0.0 for g in covered])
        t = np.array([thr[g.image] for g in covered])
        # per-image thresholds (one per category file): NG = score >= its own run's threshold
        out["operating_point"] = confusion_at(s - t, y, 0.0) | {"threshold": "the run's, chosen on its val fold"}
    m = path.parent / "metrics.json"
    run_metrics = json.loads(m.read_text()) if m.is_file() else {}
    out["images_per_s"] = run_metrics.get("images_per_s")
    out["note"] = header.get("note") or run_metrics.get("note")
    if header.get("prompts") == ORACLE_PROMPTS:
        _hide_leaked(out)
    return out


ORACLE_PROMPTS = "ground-truth boxes"


def _hide_leaked(out: dict) -> None:
    """A model prompted with the ground truth's boxes knows which images are defective and where: its
    image AUROC and box AP measure the prompts, not the model.  They become n/a; its mask quality stays."""
    nan = float("nan")
    out["image_auroc"] = nan
    for t in out["per_type"].values():
        t["image_auroc"] = nan
    for k in ("det_class_aware", "det_class_agnostic"):
        if k in out:
            out[k] = {**out[k], "map50": nan, "map50_95": nan}
    out["image_scores"] = {}
    out.pop("operating_point", None)
    leak = "prompted with ground-truth boxes: image AUROC and box mAP would measure the prompts (shown as -)"
    out["note"] = f"{out['note']}; {leak}" if out.get("note") else leak


def box_recall_iou(g: ImageRecord, rec: ImageRecord, conf: float) -> float:
    """How well a box-only prediction covers an image's defects: the mean over ground-truth boxes of the
    best IoU with a predicted box scored at least ``conf`` (0 when it predicts none)."""
    keep = np.ones(len(rec), bool) if rec.scores is None else rec.scores >= conf
    if not len(g) or not keep.any():
        return 0.0
    return float(box_iou(g.boxes_xyxy, rec.boxes_xyxy[keep]).max(1).mean())


def _detection_metrics(covered, preds, classes, header) -> dict:
    out = {}
    with_masks = all(r.masks is not None for r in preds)
    if header["classes"] == classes:
        out["det_class_aware"] = coco_evaluate(covered, preds, classes, "bbox")
        if with_masks:
            out["mask_ap"] = coco_evaluate(covered, preds, classes, "segm")
    out["det_class_agnostic"] = coco_evaluate(agnostic(covered), agnostic(preds), ["defect"], "bbox")
    if with_masks and "mask_ap" not in out:
        out["mask_ap_class_agnostic"] = coco_evaluate(agnostic(covered), agnostic(preds), ["defect"], "segm")
    return out


def compare(gt_path: Path, runs: list[Path], out: Path, conf: float = DEFAULT_BOX_CONF,
            fold: str | None = "test") -> list[dict]:
    """Score ``runs`` on ``fold`` of the ground truth (``None``: every image the runs predicted)."""
    header, gt_all = read_records(gt_path)
    loaded = load_runs(runs)
    images = {r.image for _, _, preds, _ in loaded.values() for r in preds}
    gt = [g for g in gt_all if (fold is None or g.fold == fold) and g.image in images]
    if not gt:
        raise DataError(f"none of the runs predicted an image of {gt_path}'s {fold or 'any'} fold")
    results = [score_run(run, gt, header["classes"], conf) for run in loaded.values()]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.md", table(results) + "\n")
    atomic_write_json(
        out / "comparison.json",
        {
            "ground_truth": str(gt_path),
            "fold": fold,
            "conf": conf,
            "pixel_metrics": "exact, at the ground truth's resolution",
            "runs": results,
        },
    )
    write_report(out, results, list(loaded.values()), gt, Path(header["data_root"]), conf)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m defectkit.review.compare",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--gt", type=Path, required=True, help="ground_truth.jsonl of a conversion")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders or predictions files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--conf", type=float, default=DEFAULT_BOX_CONF,
                   help="box confidence for runs that chose none on their val fold")
    p.add_argument("-q", "--quiet", action="store_true", help="write the table, do not print it")
    return p


def main(args: argparse.Namespace) -> list[dict]:
    results = compare(args.gt, args.runs, args.out, args.conf)
    if not args.quiet:
        print(table(results))
    print(f"\nreport: {args.out / 'report.html'}\ntable: {args.out / 'comparison.md'}")
    return results


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
