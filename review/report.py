"""The self-contained HTML report of a comparison: metric bars, ROC curves, examples."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path

import numpy as np

from defectkit.core.atomic import atomic_write_text
from defectkit.review.predictions import pixel_score_map, union_mask
from defectkit.review.tables import fmt, table


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _value(v) -> float | None:
    """A metric value, or None when the model has no such output (drawn as "n/a", never as 0)."""
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def _labelled_barh(ax, names: list[str], vals: list[float | None]) -> None:
    """Horizontal bars with their value printed; a missing value is a hatched grey "n/a" bar."""
    y = np.arange(len(names))
    for i, v in enumerate(vals):
        if v is None:
            ax.barh(y[i], 1.0, color="none", edgecolor="0.75", hatch="//", lw=0)
            ax.text(0.5, y[i], "n/a", va="center", ha="center", fontsize=7, color="0.35")
        else:
            ax.barh(y[i], v, color=f"C{i}")
            ax.text(min(v, 0.82) + 0.02, y[i], f"{v:.3f}", va="center", fontsize=7)
    ax.set_yticks(y, [textwrap.fill(n, 24) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.tick_params(labelsize=7)


def _plots(results, gt, data_root: Path, conf: float) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    figs = []
    names = [r["name"] for r in results]
    metrics = [
        ("mAP50 (agnostic)", lambda r: r["det_class_agnostic"]["map50"]),
        ("pixel IoU", lambda r: r.get("pixel_iou")),
        ("pixel AUROC", lambda r: r.get("pixel_auroc")),
        ("image AUROC", lambda r: r["image_auroc"]),
    ]
    fig, ax = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 0.5 * len(names) + 1.6))
    for a, (label, get) in zip(ax, metrics, strict=True):
        _labelled_barh(a, names, [_value(get(r)) for r in results])
        a.set_title(label, fontsize=9)
    for a in ax[1:]:
        a.set_yticklabels([])
    fig.tight_layout()
    figs.append(("Metrics per model (n/a: the model has no such output)", _png(fig)))

    types = sorted({t for r in results for t in r["per_type"]})
    if types:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(types) * len(names) + 3), 3.4))
        w = 0.8 / max(1, len(names))
        for i, r in enumerate(results):
            vals = [_value(r["per_type"].get(t, {}).get("image_auroc")) for t in types]
            x = np.arange(len(types)) + i * w
            ax.bar(x, [0 if v is None else v for v in vals], w, label=r["name"], color=f"C{i}")
            for xi, v in zip(x, vals, strict=True):
                ax.text(xi, (v or 0) + 0.01, "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom",
                        fontsize=6, rotation=90, color="0.4" if v is None else "black")
        ax.set_xticks(np.arange(len(types)) + w * (len(names) - 1) / 2, types, fontsize=8)
        ax.set_ylim(0, 1.25)
        ax.set_ylabel("image AUROC")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        figs.append(("Image AUROC per defect type", _png(fig)))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    y = np.array([g.defect_type != "good" for g in gt])
    curves = []  # [(fpr, tpr, [labels], first index)], curves that coincide drawn once, labelled together
    for i, r in enumerate(results):
        if y.any() and (~y).any() and not np.isnan(r["image_auroc"]):
            s = np.array([r["image_scores"].get(g.image) or 0.0 for g in gt])
            f, t, _ = roc_curve(y, s, drop_intermediate=True)
            label = f"{r['name']} ({fmt(r['image_auroc'])})"
            same = next((c for c in curves if len(c[0]) == len(f) and np.allclose(c[0], f) and np.allclose(c[1], t)),
                        None)
            if same is None:
                curves.append((f, t, [label], i))
            else:
                same[2].append(label)
    for f, t, labels, i in curves:
        text = labels[0] if len(labels) == 1 else " = ".join(labels) + " (same curve)"
        ax.plot(f, t, color=f"C{i}", label=textwrap.fill(text, 48))
    ax.plot([0, 1], [0, 1], "k:", lw=0.5)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image-level ROC")
    if curves:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    figs.append(("Image-level ROC curves (models that only see ground-truth prompts have none)", _png(fig)))
    return figs


def score_scale(header: dict, conf: float) -> str:
    """What a model's scores mean, by family: the one explanation the report gives per model."""
    if header.get("kind_of_model") == "anomaly":
        thr = header.get("pixel_threshold")
        at = f" ({thr:.4g})" if isinstance(thr, float) else ""
        return ("raw anomaly-map values (not probabilities; higher = more anomalous). Its masks are the map "
                f"thresholded at the pixel threshold it chose on the val fold{at}; the score cut-off is not applied. "
                "Pixel and image AUROC rank these values and need no threshold.")
    if header.get("prompts"):
        return (f"mask confidence in [0, 1] from the mask logits; prompted with {header['prompts']}, so only its mask "
                f"quality is meaningful. Masks counted at score >= {conf}.")
    if header.get("yolo_run"):
        return f"the YOLO box's confidence in [0, 1], carried by SAM's mask. Masks counted at score >= {conf}."
    return f"detector confidence in [0, 1]. Boxes counted at score >= {conf}; image score = its highest box score."


def _choose_examples(r: dict, gt, k: int = 2) -> list[tuple[str, object]]:
    """A model's ``k`` worst and ``k`` best defect images (by its per-image IoU, or box coverage for box-only
    models) and the good image it scores highest (its likeliest false alarm)."""
    q = r["per_image_quality"]
    by = {g.image: g for g in gt}
    ranked = sorted(q, key=lambda im: (q[im], im))
    worst = ranked[:k]
    best = [im for im in ranked[::-1][:k] if im not in worst]
    def what(im: str) -> str:
        return "mask IoU" if im in r["per_image_iou"] else "box IoU"

    picks = [(f"worst: {what(im)} {fmt(q[im])}", by[im]) for im in worst]
    picks += [(f"best: {what(im)} {fmt(q[im])}", by[im]) for im in best]
    goods = [g for g in gt if g.defect_type == "good" and r["image_scores"].get(g.image) is not None]
    if goods:
        g = max(goods, key=lambda g: r["image_scores"][g.image])
        picks.append((f"good image, its top score {r['image_scores'][g.image]:.3g}", g))
    return picks


def _examples(results, groups, gt, data_root: Path, conf: float) -> list[tuple[str, str, str]]:
    """Per model: its worst and best test images with its actual output drawn (heatmap with a colour
    bar, masks, boxes) over the ground truth's outline.  Returns ``[(model, caption, png)]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from defectkit.datasets.image_files import read_image

    out = []
    for r, (_, header, records, dirs) in zip(results, groups, strict=True):
        preds = {p.image: p for p in records}
        picks = [(t, g) for t, g in _choose_examples(r, gt) if g.image in preds]
        if not picks:
            continue
        rconf = -np.inf if r.get("conf") is None else conf
        fig, axes = plt.subplots(1, len(picks), figsize=(2.9 * len(picks) + 0.8, 3.2), squeeze=False)
        images = [read_image(data_root / g.image) for _, g in picks]
        maps = [pixel_score_map(preds[g.image], dirs.get(g.image, Path(".")), im.shape[:2])
                if preds[g.image].anomaly_map else None for (_, g), im in zip(picks, images, strict=True)]
        shown = [m for m in maps if m is not None]
        lo, hi = (min(map(np.min, shown)), max(map(np.max, shown))) if shown else (None, None)  # one colour scale
        heat = None
        for a, (title, g), img, amap in zip(axes[0], picks, images, maps, strict=True):
            hw = img.shape[:2]
            rec = preds[g.image]
            a.imshow(img, cmap="gray" if img.ndim == 2 else None)
            if amap is not None:
                heat = a.imshow(amap, cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
            um = union_mask(rec, hw, rconf)
            if um is not None and um.any():
                a.contour(um, levels=[0.5], colors="red", linewidths=1.0)
            keep = np.ones(len(rec), bool) if rec.scores is None else rec.scores >= rconf
            for (x0, y0, x1, y1), sc in zip(rec.boxes_xyxy[keep], (rec.scores[keep] if rec.scores is not None
                                                                    else [None] * keep.sum()), strict=True):
                a.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1))
                if sc is not None and not rec.anomaly_map:
                    a.text(x0, y0, f"{sc:.2f}", color="yellow", fontsize=6, va="bottom")
            if g.masks:
                a.contour(g.decode_masks().any(0), levels=[0.5], colors="lime", linewidths=0.8, linestyles="dashed")
            a.set_title(f"{g.category or ''} {g.defect_type}\n{title}", fontsize=7)
            a.axis("off")
        if heat is not None:
            cb = fig.colorbar(heat, ax=list(axes[0]), shrink=0.8, pad=0.01)
            cb.set_label("anomaly-map value", fontsize=7)
            cb.ax.tick_params(labelsize=6)
        fig.suptitle(f"{r['name']}: green dashed = ground truth, red = its masks, yellow = its boxes", fontsize=8)
        out.append((r["name"], score_scale(header, conf), _png(fig)))
    return out


def write_report(out: Path, results, groups, gt, data_root: Path, conf: float) -> Path:
    """``groups``: the runs of :func:`load_runs`, in ``results`` order."""
    md = table(results)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>defectkit comparison</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px} img{max-width:100%}</style></head><body>",
        f"<h1>Model comparison on the test fold ({len(gt)} images)</h1>",
        f"<p>Ground truth: {html.escape(str(data_root))}. Each model's score scale is explained with its examples "
        "below; detectors' and SAM's boxes and masks are counted at score &ge; "
        f"{conf}, anomaly models' masks at the threshold they chose on the val fold.</p>",
        _md_table_html(md),
    ]
    for title, b64 in _plots(results, gt, data_root, conf):
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    parts.append("<h2>Examples per model: its worst and best defect images, and its highest-scored good image</h2>")
    for name, scale, b64 in _examples(results, groups, gt, data_root, conf):
        parts.append(f"<section class='examples' data-model='{html.escape(name)}'><h3>{html.escape(name)}</h3>"
                     f"<p>Scores: {html.escape(scale)}</p>"
                     f"<figure><img alt='examples of {html.escape(name)}' src='data:image/png;base64,{b64}'></figure>"
                     "</section>")
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
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
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:] if r != rows[0]
    )
    return f"<table><tr>{head}</tr>{body}</table>"
