"""Side-by-side comparison of runs on the same held-out images (``make compare RUNS="..."``).

    python -m defectkit.converters.compare --gt work/out/<data>/converted/<cat>-defect/ground_truth.jsonl \\
        --runs work/runs/yolo/<run> work/runs/anomaly/<run> work/runs/sam/<run> --out work/compare/<name>

Every run is read through its canonical ``predictions.jsonl`` (``cascade_predictions.jsonl``
too, as its own entry) and scored by the same code against the ground truth's test fold:

* detection mAP50 / mAP50-95 (pycocotools), class-aware when the run's classes are the ground
  truth's, and class-agnostic (every label -> ``defect``) for every run, anomaly models included;
* instance-mask AP when the run has masks;
* pixel IoU and Dice of the union of the masks with score >= ``--conf`` (anomaly runs' masks are
  already thresholded on their val fold), mean over images with a defect or a prediction;
* pixel AUROC from anomaly maps, or from mask scores (score x mask);
* image AUROC from image scores (the highest box confidence for detectors);
* per defect type: image AUROC and pixel IoU; speed from the run's ``metrics.json``.

Writes ``comparison.md`` (table), ``comparison.json`` (everything) and ``report.html``
(self-contained: metric bars per model and defect type, ROC curves, example images with the
ground truth and each model's output side by side, worst cases first).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import ImageRecord, read_records
from defectkit.converters.detection_eval import coco_evaluate, image_auroc
from defectkit.converters.instances import decode_rle

log = logging.getLogger("defectkit.compare")
PRED_FILES = ("predictions.jsonl", "cascade_predictions.jsonl")


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
            raise FileNotFoundError(f"{r} has no predictions.jsonl: is it a run folder of this suite?")
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


def _pixel_scores(rec: ImageRecord, run_dir: Path, hw) -> np.ndarray | None:
    """A per-pixel score map at image size: the anomaly map if any, else max(score x mask)."""
    if rec.anomaly_map:
        from defectkit.anomaly.scoring import upsample

        a = np.load(run_dir / rec.anomaly_map).astype(np.float32)
        return upsample(a[None], hw)[0]
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
            raise ValueError(f"{p}: classes {h['classes']} differ from {paths[0]}'s {header['classes']}")
        paths.append(p)
        preds += recs
        dirs.update({r.image: p.parent for r in recs})
    return out


def score_run(run: tuple, gt: list[ImageRecord], classes: list[str], conf: float = 0.25) -> dict:
    """All metrics of one model (an entry of :func:`load_runs`) against the ground-truth records."""
    from defectkit.anomaly.metrics import auroc

    paths, header, preds, dirs = run
    path = paths[0]
    run_dir = path.parent
    by_image = {r.image: r for r in preds}
    covered = [g for g in gt if g.image in by_image]
    if not covered:
        raise ValueError(f"{path} has no prediction for any test image of the ground truth")
    out: dict = {"name": run_name(path, header), "files": [str(p) for p in paths], "model": header.get("model"),
                 "images": len(covered), "missing_images": len(gt) - len(covered)}
    # anomaly runs' masks were thresholded on their val fold; their scores are raw map values
    run_conf = -np.inf if header.get("kind_of_model") == "anomaly" else conf
    out["conf"] = None if run_conf == -np.inf else conf
    with_masks = all(r.masks is not None for r in preds)
    if header["classes"] == classes:
        out["det_class_aware"] = coco_evaluate(covered, preds, classes, "bbox")
        if with_masks:
            out["mask_ap"] = coco_evaluate(covered, preds, classes, "segm")
    out["det_class_agnostic"] = coco_evaluate(_agnostic(covered), _agnostic(preds), ["defect"], "bbox")
    if with_masks and "mask_ap" not in out:
        out["mask_ap_class_agnostic"] = coco_evaluate(_agnostic(covered), _agnostic(preds), ["defect"], "segm")
    out["image_auroc"] = image_auroc(covered, preds)
    types = sorted({g.defect_type for g in covered if g.defect_type != "good"})
    per_type: dict[str, dict] = {t: {} for t in types}
    for t in types:
        sel = [g for g in covered if g.defect_type in (t, "good")]
        per_type[t]["image_auroc"] = image_auroc(sel, preds)
    ious, dices, pix_s, pix_y, per_img = [], [], [], [], {}
    for g in covered:
        hw = (g.height, g.width)
        rec = by_image[g.image]
        gm = g.decode_masks().any(0) if g.masks else np.zeros(hw, bool)
        pm = _union(rec, hw, run_conf)
        if pm is not None and (gm.any() or pm.any()):
            inter, union = (gm & pm).sum(), (gm | pm).sum()
            iou, dice = inter / union, 2 * inter / (gm.sum() + pm.sum())
            ious.append(iou)
            dices.append(dice)
            per_img[g.image] = float(iou)
            if g.defect_type in per_type:
                per_type[g.defect_type].setdefault("_ious", []).append(iou)
        ps = _pixel_scores(rec, dirs.get(g.image, run_dir), hw)
        if ps is not None:
            step = max(1, ps.size // 20000)
            pix_s.append(ps.ravel()[::step])
            pix_y.append(gm.ravel()[::step])
    for t in types:
        v = per_type[t].pop("_ious", [])
        per_type[t]["pixel_iou"] = float(np.mean(v)) if v else None
    if ious:
        out["pixel_iou"] = float(np.mean(ious))
        out["pixel_dice"] = float(np.mean(dices))
    if pix_s:
        out["pixel_auroc"] = auroc(np.concatenate(pix_s), np.concatenate(pix_y))
    out["per_type"] = per_type
    out["per_image_iou"] = per_img
    out["image_scores"] = {r.image: r.image_score for r in preds}
    m = run_dir / "metrics.json"
    run_metrics = json.loads(m.read_text()) if m.is_file() else {}
    out["images_per_s"] = run_metrics.get("images_per_s")
    out["note"] = header.get("note") or run_metrics.get("note")
    return out


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}" if isinstance(v, float) else str(v)


def table(results: list[dict]) -> str:
    head = ["model", "test images", "mAP50", "mAP50-95", "mAP50 (agnostic)", "mask AP50", "pixel IoU", "pixel Dice",
            "pixel AUROC", "image AUROC", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        mask = r.get("mask_ap") or r.get("mask_ap_class_agnostic") or {}
        row = [r["name"], str(r["images"]), r.get("det_class_aware", {}).get("map50"), r.get("det_class_aware", {}).get("map50_95"),
               r["det_class_agnostic"]["map50"], mask.get("map50"), r.get("pixel_iou"), r.get("pixel_dice"),
               r.get("pixel_auroc"), r["image_auroc"], r.get("images_per_s")]
        lines.append("| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |")
    types = sorted({t for r in results for t in r["per_type"]})
    if types:
        lines += ["", "Image AUROC / pixel IoU per defect type:", "",
                  "| model | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for r in results:
            cells = [f"{_fmt(r['per_type'].get(t, {}).get('image_auroc'))} / {_fmt(r['per_type'].get(t, {}).get('pixel_iou'))}"
                     for t in types]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    notes = [f"- {r['name']}: {r['note']}" for r in results if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- report


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(results, gt, data_root: Path, conf: float) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    figs = []
    names = [r["name"] for r in results]
    metrics = [("mAP50 (agnostic)", lambda r: r["det_class_agnostic"]["map50"]), ("pixel IoU", lambda r: r.get("pixel_iou")),
               ("pixel AUROC", lambda r: r.get("pixel_auroc")), ("image AUROC", lambda r: r["image_auroc"])]
    fig, ax = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2))
    for a, (label, get) in zip(ax, metrics, strict=True):
        vals = [get(r) if get(r) is not None else 0 for r in results]
        a.barh(names, vals, color=[f"C{i}" for i in range(len(names))])
        a.set_xlim(0, 1)
        a.set_title(label, fontsize=9)
        a.tick_params(labelsize=7)
    fig.tight_layout()
    figs.append(("Metrics per model", _png(fig)))

    types = sorted({t for r in results for t in r["per_type"]})
    if types:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(types) * len(names) / 2), 3.2))
        w = 0.8 / max(1, len(names))
        for i, r in enumerate(results):
            vals = [r["per_type"].get(t, {}).get("image_auroc") or 0 for t in types]
            ax.bar(np.arange(len(types)) + i * w, vals, w, label=r["name"])
        ax.set_xticks(np.arange(len(types)) + w * (len(names) - 1) / 2, types, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("image AUROC")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs.append(("Image AUROC per defect type", _png(fig)))

    fig, ax = plt.subplots(figsize=(4.5, 4))
    y = np.array([g.defect_type != "good" for g in gt])
    for i, r in enumerate(results):
        s = np.array([r["image_scores"].get(g.image) or 0.0 for g in gt])
        if y.any() and (~y).any() and not np.isnan(r["image_auroc"]):
            f, t, _ = roc_curve(y, s)
            ax.plot(f, t, color=f"C{i}", label=f"{r['name']} ({_fmt(r['image_auroc'])})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.5)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image-level ROC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs.append(("Image-level ROC curves", _png(fig)))
    return figs


def _examples(results, groups, gt, data_root: Path, conf: float, n: int = 6) -> list[tuple[str, str]]:
    """Ground truth and every model's output side by side; worst mean pixel IoU first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from defectkit.datasets.image_files import read_image

    defect = [g for g in gt if g.defect_type != "good"]
    worst = sorted(defect, key=lambda g: np.mean([r["per_image_iou"].get(g.image, 0.0) for r in results]))[:n]
    preds = [{p.image: p for p in g[2]} for g in groups]
    out = []
    for g in worst:
        img = read_image(data_root / g.image)
        hw = img.shape[:2]
        fig, ax = plt.subplots(1, len(results) + 1, figsize=(2.6 * (len(results) + 1), 2.8))
        gm = g.decode_masks().any(0) if g.masks else np.zeros(hw, bool)
        panels = [("ground truth", gm, g.boxes_xyxy, None)]
        for r, p in zip(results, preds, strict=True):
            rec = p.get(g.image)
            rconf = -np.inf if r.get("conf") is None else conf
            um = _union(rec, hw, rconf) if rec is not None else None
            keep = (rec.scores >= rconf) if rec is not None and rec.scores is not None else None
            boxes = rec.boxes_xyxy[keep] if rec is not None and keep is not None else np.zeros((0, 4))
            panels.append((f"{r['name']}\nIoU {_fmt(r['per_image_iou'].get(g.image))}", um, boxes, rec))
        for a, (title, mask, boxes, _) in zip(ax, panels, strict=True):
            a.imshow(img)
            if mask is not None and mask.any():
                a.imshow(np.ma.masked_where(~mask, mask), alpha=0.5, cmap="autumn")
            for x0, y0, x1, y1 in boxes:
                a.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1))
            a.set_title(title, fontsize=7)
            a.axis("off")
        fig.suptitle(f"{g.image} ({g.defect_type})", fontsize=8)
        fig.tight_layout()
        out.append((g.image, _png(fig)))
    return out


def write_report(out: Path, results, groups, gt, data_root: Path, conf: float) -> Path:
    """``groups``: the runs of :func:`load_runs`, in ``results`` order."""
    md = table(results)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>defectkit comparison</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px} img{max-width:100%}</style></head><body>",
             f"<h1>Model comparison on the test fold ({len(gt)} images)</h1>",
             f"<p>Ground truth: {html.escape(str(data_root))}; masks and boxes counted at score &ge; {conf}.</p>",
             _md_table_html(md)]
    for title, b64 in _plots(results, gt, data_root, conf):
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    parts.append("<h2>Examples, worst cases first</h2>")
    for name, b64 in _examples(results, groups, gt, data_root, conf):
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'></figure>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def _md_table_html(md: str) -> str:
    rows, out = [], []
    for line in md.splitlines():
        if line.startswith("|") and set(line) <= set("|-"):
            continue  # the Markdown header separator
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        else:
            if rows:
                out.append(_rows_html(rows))
                rows = []
            if line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
    if rows:
        out.append(_rows_html(rows))
    return "\n".join(out)


def _rows_html(rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:] if r != rows[0])
    return f"<table><tr>{head}</tr>{body}</table>"


def compare(gt_path: Path, runs: list[Path], out: Path, conf: float = 0.25, fold: str = "test") -> list[dict]:
    header, gt_all = read_records(gt_path)
    loaded = load_runs(runs)
    images = {r.image for _, _, preds, _ in loaded.values() for r in preds}
    gt = [g for g in gt_all if g.fold == fold and g.image in images]
    if not gt:
        raise ValueError(f"none of the runs predicted an image of {gt_path}'s {fold} fold")
    results = [score_run(run, gt, header["classes"], conf) for run in loaded.values()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table(results) + "\n")
    (out / "comparison.json").write_text(json.dumps({"ground_truth": str(gt_path), "fold": fold, "conf": conf,
                                                     "runs": results}, indent=1, default=float) + "\n")
    write_report(out, results, list(loaded.values()), gt, Path(header["data_root"]), conf)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectkit.converters.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", type=Path, required=True, help="ground_truth.jsonl of a conversion")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders or predictions files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--conf", type=float, default=0.25)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = compare(a.gt, a.runs, a.out, a.conf)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    print(f"\nreport: {a.out / 'report.html'}\ntable: {a.out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
