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
from defectkit.converters.instances import box_iou, decode_rle
from defectkit.core.atomic import atomic_write_json, atomic_write_text
from defectkit.core.cli import run_cli
from defectkit.core.errors import DataError, MissingFileError
from defectkit.review.detection import coco_evaluate, image_auroc
from defectkit.review.metrics import confusion_at, iou_dice, mean_defined, pixel_metrics, resize_map

log = logging.getLogger("defectkit.compare")
PRED_FILES = ("predictions.jsonl", "cascade_predictions.jsonl", "cascade_anomaly_predictions.jsonl")


def find_prediction_files(runs: list[Path]) -> list[Path]:
    files = []
    for r in runs:
        r = Path(r)
        if r.is_file():
            files.append(r)
            continue
        found = [r / f for f in PRED_FILES if (r / f).is_file()]
        if not found:  # a run per category (anomaly/train.py --category all)
            found = sorted(p for f in PRED_FILES for p in r.glob(f"*/{f}"))
        if not found:
            raise MissingFileError(f"{r} has no predictions.jsonl: is it a run folder of this suite?")
        files += found
    return files


def _agnostic(records: list[ImageRecord]) -> list[ImageRecord]:
    out = []
    for r in records:
        c = ImageRecord(**{**r.__dict__})
        c.labels = ["defect"] * len(r)
        out.append(c)
    return out


def _union(rec: ImageRecord | None, hw, conf: float) -> np.ndarray | None:
    if rec is None or rec.masks is None:
        return None
    m = np.zeros(hw, bool)
    for k, rle in enumerate(rec.masks):
        if rec.scores is None or rec.scores[k] >= conf:
            m |= decode_rle(rle)
    return m


def pixel_score_map(rec: ImageRecord, run_dir: Path, hw) -> np.ndarray | None:
    """A per-pixel score map at image size: the anomaly map if any, else max(score x mask): the one
    definition every pixel AUROC of a predictions file uses (the comparison, the SAM cascade)."""
    if rec.anomaly_map:
        path = run_dir / rec.anomaly_map
        if not path.is_file():
            raise MissingFileError(f"{path} (anomaly map of {rec.image}) does not exist")
        return resize_map(np.load(path).astype(np.float32), hw)
    if rec.masks is None:
        return None
    s = np.zeros(hw, np.float32)
    for k, rle in enumerate(rec.masks):
        s = np.maximum(s, decode_rle(rle) * float(rec.scores[k] if rec.scores is not None else 1.0))
    return s


def run_name(path: Path, header: dict) -> str:
    return header.get("model", path.parent.name) + (" (cascade)" if path.name.startswith("cascade") else "")


def load_runs(runs: list[Path]) -> dict[str, tuple[list[Path], dict, list[ImageRecord], dict[str, Path]]]:
    """Every prediction file of ``runs``, read once, grouped by model: several files of one model
    (one anomaly run per category) become one run.  ``{name: (paths, header, records, run folder
    per image)}``."""
    out: dict[str, tuple[list[Path], dict, list[ImageRecord], dict[str, Path]]] = {}
    for p in find_prediction_files(runs):
        h, recs = read_records(p)
        name = run_name(p, h)
        if name not in out:
            out[name] = ([], h, [], {})
        paths, header, preds, dirs = out[name]
        if h["classes"] != header["classes"]:
            raise DataError(f"{p}: classes {h['classes']} differ from {paths[0]}'s {header['classes']}")
        paths.append(p)
        preds += recs
        dirs.update({r.image: p.parent for r in recs})
        thr = run_threshold(p, h)
        header.setdefault("_image_thresholds", {}).update({r.image: thr for r in recs if thr is not None})
    return out


def deploy_threshold(path: Path, key: str) -> float | None:
    """``thresholds[key]`` of the ``deploy.json`` beside a run's own predictions file (what the run chose on
    its val fold), None when there is none; a cascade file's neighbour is the SAM run's, not its detector's."""
    spec = path.parent / "deploy.json"
    if not spec.is_file() or path.name.startswith("cascade"):
        return None
    t = json.loads(spec.read_text()).get("thresholds", {}).get(key)
    return None if t is None else float(t)


def run_threshold(path: Path, header: dict) -> float | None:
    """The image threshold a run chose on its val fold: in its predictions header (anomaly runs, one per
    category file) or its ``deploy.json`` (YOLO runs); None when it has none (SAM, the cascade)."""
    if header.get("image_threshold") is not None:
        return float(header["image_threshold"])
    return deploy_threshold(path, "image")


def run_box_conf(path: Path, header: dict, default: float) -> float:
    """The box confidence a detector's masks and boxes are kept at: the one its run chose on the val fold
    (the cascade's header ``box_conf``; a YOLO run's ``deploy.json`` ``thresholds.box_conf``), else
    ``default`` (``--conf``)."""
    if header.get("box_conf") is not None:
        return float(header["box_conf"])
    c = deploy_threshold(path, "box_conf")
    return default if c is None else c


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
        pm = _union(rec, hw, conf)
        if pm is not None:
            out.iou[g.image], out.dice[g.image] = iou_dice(pm, gm)
        ps = pixel_score_map(rec, dirs.get(g.image, run_dir), hw)
        if ps is not None:
            out.maps.append(ps)
            out.masks.append(gm)
    return out


def score_run(run: tuple, gt: list[ImageRecord], classes: list[str], conf: float = 0.25) -> dict:
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
    run_conf = -np.inf if header.get("kind_of_model") == "anomaly" else run_box_conf(path, header, conf)
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
    out["det_class_agnostic"] = coco_evaluate(_agnostic(covered), _agnostic(preds), ["defect"], "bbox")
    if with_masks and "mask_ap" not in out:
        out["mask_ap_class_agnostic"] = coco_evaluate(_agnostic(covered), _agnostic(preds), ["defect"], "segm")
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _rate(op: dict | None, bad: str, other: str) -> str:
    """``0.125 (2/16)``: a rate at the run's own threshold, with the counts it rests on."""
    if not op:
        return "-"
    n = op[bad] + op[other]
    return f"{op[bad] / max(n, 1):.3f} ({op[bad]}/{n})"


def table(results: list[dict]) -> str:
    head = [
        "model",
        "test images",
        "mAP50",
        "mAP50-95",
        "mAP50 (agnostic)",
        "mask AP50",
        "pixel IoU",
        "pixel Dice",
        "pixel AUROC",
        "image AUROC",
        "false alarms",
        "misses",
        "images/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        mask = r.get("mask_ap") or r.get("mask_ap_class_agnostic") or {}
        row = [
            r["name"],
            str(r["images"]),
            r.get("det_class_aware", {}).get("map50"),
            r.get("det_class_aware", {}).get("map50_95"),
            r["det_class_agnostic"]["map50"],
            mask.get("map50"),
            r.get("pixel_iou"),
            r.get("pixel_dice"),
            r.get("pixel_auroc"),
            r["image_auroc"],
            _rate(r.get("operating_point"), "fp", "tn"),
            _rate(r.get("operating_point"), "fn", "tp"),
            r.get("images_per_s"),
        ]
        lines.append("| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |")
    types = sorted({t for r in results for t in r["per_type"]})
    if types:
        lines += [
            "",
            "Image AUROC / pixel IoU per defect type:",
            "",
            "| model | " + " | ".join(types) + " |",
            "|---|" + "---|" * len(types),
        ]
        for r in results:
            cells = [
                f"{_fmt(r['per_type'].get(t, {}).get('image_auroc'))} / "
                f"{_fmt(r['per_type'].get(t, {}).get('pixel_iou'))}"
                for t in types
            ]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    notes = ["- false alarms / misses: good test images rejected / defective ones passed, at the image threshold "
             "each run chose on its val fold (- : the run has none)"]
    notes += [f"- {r['name']}: {r['note']}" for r in results if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def compare(gt_path: Path, runs: list[Path], out: Path, conf: float = 0.25, fold: str = "test") -> list[dict]:
    header, gt_all = read_records(gt_path)
    loaded = load_runs(runs)
    images = {r.image for _, _, preds, _ in loaded.values() for r in preds}
    gt = [g for g in gt_all if g.fold == fold and g.image in images]
    if not gt:
        raise DataError(f"none of the runs predicted an image of {gt_path}'s {fold} fold")
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
    from defectkit.review.report import write_report

    write_report(out, results, list(loaded.values()), gt, Path(header["data_root"]), conf)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m defectkit.review.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gt", type=Path, required=True, help="ground_truth.jsonl of a conversion")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders or predictions files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--conf", type=float, default=0.25,
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
