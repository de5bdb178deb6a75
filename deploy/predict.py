"""Predict on new images with a trained run: OK/NG per image, maps/boxes/masks, overlays, a CSV.

``python -m defectkit.deploy predict --run RUN --images DIR|GLOB --out OUT``  (``make predict``)

* Runs: an anomaly run (a category folder of ``anomaly/train.py``; ``deploy.json`` holds its
  thresholds and preprocessing), a YOLO run (``finetune/yolo.py``; ``deploy.json`` holds the image
  threshold chosen on its val fold) or a SAM run trained with ``--yolo-predictions`` (the YOLO -> SAM
  cascade: the YOLO run's boxes prompt SAM, its threshold decides).  ``--threshold`` overrides.
* Images: any png/jpg/bmp/tif, any size, gray or RGB, a folder tree or a glob.  An unreadable or
  truncated image is named, counted and skipped; the rest are processed.
* ``OUT`` (written whole or not at all, a rerun replaces it): ``predictions.jsonl`` (the suite's
  canonical format: image score, decision, boxes, masks, map paths), ``maps/*.npy`` (float16, at each
  image's original size), ``overlays/*.png`` for NG and uncertain images, ``summary.csv`` (one line per
  readable image, what a line PC reads) and ``predict.json`` (counts, threshold and where it came from).
* Decision: ``NG`` when the image score reaches the threshold, else ``OK``; ``uncertain`` marks images
  whose score lies within ``--band`` (a fraction of the threshold's magnitude) of it, to review first.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import time
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import Prediction
from defectkit.core.atomic import atomic_dir
from defectkit.core.errors import ConfigError, DataError, MissingFileError, UnreadableFileError

log = logging.getLogger("defectkit.deploy")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------ input images


def find_images(spec: str | Path) -> tuple[Path, list[Path]]:
    """``(root, files)`` for a folder (searched recursively), one file, or a glob pattern."""
    p = Path(spec)
    if p.is_dir():
        root, files = p, [f for f in p.rglob("*") if f.is_file()]
    elif p.is_file():
        root, files = p.parent, [p]
    else:
        files = [Path(f) for f in glob.glob(str(spec), recursive=True)]
        fixed = [part for part in p.parts if not any(c in part for c in "*?[")]
        root = Path(*p.parts[: len(fixed)]) if fixed and p.parts[: len(fixed)] == tuple(fixed) else Path(".")
        while not root.is_dir() and root != root.parent:
            root = root.parent
    files = sorted(f for f in files if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith("."))
    if not files:
        raise DataError(f"{spec}: no images found (looked for {', '.join(IMAGE_EXTS)})")
    return root.absolute(), [f.absolute() for f in files]  # not resolve(): linked images keep their place


def read_images(files: list[Path]) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, str]]]:
    """Readable images (RGB or gray uint8) and ``(file, reason)`` for those that are not."""
    from defectkit.datasets.image_files import check_complete, read_image

    good, bad = [], []
    for f in files:
        try:
            check_complete(f)
            good.append((f, read_image(f)))
        except (UnreadableFileError, DataError, OSError, ValueError) as e:
            log.warning("skipping %s: %s", f, e)
            bad.append((f, str(e)))
    return good, bad


# ------------------------------------------------------------------------------------------ run kinds


def run_kind(run: Path) -> str:
    """``anomaly`` or ``yolo``; a clear error for anything else."""
    run = Path(run)
    if not run.is_dir():
        raise MissingFileError(f"run folder {run} does not exist")
    if (run / "deploy.json").is_file():
        from defectkit.core.deploy_spec import read_deploy_spec

        kind = read_deploy_spec(run, ["anomaly", "yolo", "sam", "sam_cascade"])["kind"]
        if kind == "sam":
            from defectkit.finetune.sam_deploy import read_spec

            read_spec(run)  # raises: SAM alone needs prompts
        return kind
    if (run / "run_args.json").is_file() and (run / "metrics.json").is_file():
        return "anomaly"  # read_spec explains what is missing
    if (run / "weights" / "best.pt").is_file():
        return "yolo"
    cats = sorted(d.name for d in run.iterdir() if d.is_dir() and (d / "deploy.json").is_file())
    if cats:
        raise ConfigError(f"{run} holds one anomaly run per category ({', '.join(cats)}): pass --run {run}/<category>")
    if (run / "cascade_predictions.jsonl").is_file():
        raise MissingFileError(f"{run}/deploy.json not found: the SAM run was trained by an older version (retrain "
                               "it with --yolo-predictions to predict with the YOLO -> SAM cascade)")
    raise MissingFileError(f"{run}: no deploy.json, weights/best.pt or run_args.json: not a trained run folder")


def predict_anomaly(run: Path, images, backend: str, batch: int = 16) -> tuple[dict, list[Prediction]]:
    from defectkit.anomaly.deploy import AnomalyRunner, map_regions, prepare_batch
    from defectkit.review.metrics import resize_map

    runner = AnomalyRunner(run, backend)
    spec = runner.spec
    thr = spec["thresholds"]
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        maps, scores = runner(prepare_batch([im for _, im in chunk], spec))
        for (rel, im), m, s in zip(chunk, maps, scores, strict=True):
            hw = im.shape[:2]
            full = resize_map(m, hw)  # back at the image's own size, as the trainer's pixel metrics
            boxes, labels, box_scores, rles = map_regions(full, thr["pixel"])
            out.append(Prediction(rel, hw[0], hw[1], float(s), boxes, labels, box_scores, rles, full))
    info = {"model": spec["model"]["model"], "classes": ["anomaly"], "threshold": thr["image"],
            "threshold_source": f"{run / 'deploy.json'}: {thr['rule']} on the {thr['source']}",
            "pixel_threshold": thr["pixel"], "kind_of_model": "anomaly",
            "score": "raw anomaly-map values (not probabilities)"}
    return info, out


def predict_yolo(run: Path, images, backend: str, batch: int = 16) -> tuple[dict, list[Prediction]]:
    from defectkit.finetune.yolo_deploy import predict_images

    return predict_images(run, images, backend)


def predict_cascade(run: Path, images, backend: str, batch: int = 16) -> tuple[dict, list[Prediction]]:
    from defectkit.finetune.sam_deploy import predict_images

    return predict_images(run, images, backend)


PREDICTORS = {"anomaly": predict_anomaly, "yolo": predict_yolo, "sam_cascade": predict_cascade}


# ------------------------------------------------------------------------------------------ decisions and outputs


def decide(preds: list[Prediction], threshold: float, band: float) -> None:
    """NG at or above the threshold; uncertain within ``band * |threshold|`` of it."""
    margin = band * abs(threshold)
    for p in preds:
        p.decision = "NG" if p.score >= threshold else "OK"
        p.uncertain = bool(abs(p.score - threshold) <= margin)


def _name(rel: str) -> str:
    return rel.replace("/", "__")  # the extension stays: a.png and a.jpg must not collide


def overlay(img: np.ndarray, p: Prediction, vrange: tuple[float, float] | None) -> np.ndarray:
    """The image with the heatmap (if any), region outlines and boxes drawn, and the verdict written."""
    import cv2

    from defectkit.converters.instances import decode_rle

    rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, 2)
    canvas = rgb.copy()
    if p.amap is not None and vrange is not None:
        lo, hi = vrange
        norm = np.clip((p.amap - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        canvas = cv2.addWeighted(canvas, 0.55, heat, 0.45, 0)
    for rle in p.masks or []:
        contours, _ = cv2.findContours(decode_rle(rle).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, (255, 0, 0), max(1, min(p.height, p.width) // 300))
    for (x0, y0, x1, y1), lab, s in zip(p.boxes, p.labels, p.box_scores, strict=True):
        cv2.rectangle(canvas, (int(x0), int(y0)), (int(x1), int(y1)), (255, 255, 0), 1)
        cv2.putText(canvas, f"{lab} {s:.2f}", (int(x0), max(10, int(y0) - 2)), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (255, 255, 0), 1, cv2.LINE_AA)
    text = f"{p.decision}{' (uncertain)' if p.uncertain else ''} score {p.score:.4g}"
    cv2.putText(canvas, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 0, 0) if p.decision == "NG" else
                (0, 160, 0), 1, cv2.LINE_AA)
    return canvas


def write_outputs(out: Path, root: Path, info: dict, preds: list[Prediction], images: dict, unreadable,
                  extra: dict) -> dict:
    """Everything in ``out`` at once (a temporary folder renamed into place)."""
    import cv2

    from defectkit.converters.canonical import ImageRecord, make_header, write_records

    maps = [p.amap for p in preds if p.amap is not None]
    vrange = (float(min(m.min() for m in maps)), float(max(m.max() for m in maps))) if maps else None
    counts = {"images": len(preds), "NG": sum(p.decision == "NG" for p in preds),
              "OK": sum(p.decision == "OK" for p in preds), "uncertain": sum(p.uncertain for p in preds),
              "unreadable": len(unreadable)}
    with atomic_dir(out) as tmp:
        records, rows = [], []
        for p in preds:
            name = _name(p.image)
            map_rel = overlay_rel = None
            if p.amap is not None:
                (tmp / "maps").mkdir(exist_ok=True)
                map_rel = f"maps/{name}.npy"
                np.save(tmp / map_rel, p.amap.astype(np.float16))
            if p.decision == "NG" or p.uncertain:
                (tmp / "overlays").mkdir(exist_ok=True)
                overlay_rel = f"overlays/{name}.png"
                cv2.imwrite(str(tmp / overlay_rel), overlay(images[p.image], p, vrange)[..., ::-1])
            records.append(ImageRecord(image=p.image, height=p.height, width=p.width, boxes_xyxy=p.boxes,
                                       labels=p.labels, scores=p.box_scores, masks=p.masks, anomaly_map=map_rel,
                                       image_score=p.score, decision=p.decision, uncertain=p.uncertain))
            rows.append([p.image, p.decision, int(p.uncertain), f"{p.score:.6g}", f"{info['threshold']:.6g}",
                         len(p.boxes), p.width, p.height, overlay_rel or ""])
        header = make_header("predictions", info["model"], info["classes"], root, fold=None,
                             **{k: v for k, v in info.items() if k not in ("model", "classes")}, **extra)
        write_records(tmp / "predictions.jsonl", header, records)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image", "decision", "uncertain", "score", "threshold", "regions", "width", "height", "overlay"])
        w.writerows(rows)
        w.writerows([[str(f), "UNREADABLE", "", "", "", "", "", "", reason] for f, reason in unreadable])
        (tmp / "summary.csv").write_text(buf.getvalue())
        summary = {"counts": counts, "threshold": info["threshold"], "threshold_source": info["threshold_source"],
                   "unreadable": [{"file": str(f), "reason": r} for f, r in unreadable], **extra}
        (tmp / "predict.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def predict(run: Path, images_spec: str, out: Path, *, threshold: float | None = None, backend: str = "torch",
            band: float = 0.1) -> dict:
    kind = run_kind(run)
    root, files = find_images(images_spec)
    t0 = time.perf_counter()
    readable, unreadable = read_images(files)
    if not readable:
        raise DataError(f"{images_spec}: none of the {len(files)} images could be read (first: {unreadable[0][1]})")
    images = [(f.relative_to(root).as_posix(), im) for f, im in readable]
    info, preds = PREDICTORS[kind](Path(run), images, backend)
    if threshold is not None:
        info["threshold"], info["threshold_source"] = threshold, "--threshold"
    decide(preds, info["threshold"], band)
    seconds = time.perf_counter() - t0
    extra = {"run": str(Path(run).resolve()), "run_kind": kind, "backend": backend, "band": band,
             "seconds": round(seconds, 3), "images_per_s": round(len(preds) / seconds, 3) if seconds else None}
    summary = write_outputs(Path(out), root, info, preds, dict(images), unreadable, extra)
    c = summary["counts"]
    print(f"{c['images']} images: {c['NG']} NG, {c['OK']} OK ({c['uncertain']} uncertain, to review first)"
          + (f"; {c['unreadable']} unreadable, skipped: {', '.join(str(f) for f, _ in unreadable[:3])}"
             if unreadable else "")
          + f"; threshold {info['threshold']:.4g} ({info['threshold_source']})")
    print(f"-> {out}/summary.csv, {out}/predictions.jsonl" + (f", {out}/overlays/" if c["NG"] + c["uncertain"] else ""))
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="a trained run folder (anomaly category folder or YOLO run)")
    p.add_argument("--images", required=True, help="a folder (searched recursively), an image, or a glob")
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced as a whole)")
    p.add_argument("--threshold", type=float, help="image-score threshold (default: the one the run chose on val)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="onnx: the exported file through onnxruntime (make export first)")
    p.add_argument("--band", type=float, default=0.1, help="uncertain within band x |threshold| of the threshold")


def main(args: argparse.Namespace) -> dict:
    if args.band < 0:
        raise ConfigError(f"--band must be >= 0, got {args.band}")
    return predict(args.run, args.images, args.out, threshold=args.threshold, backend=args.backend, band=args.band)
