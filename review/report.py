"""The self-contained HTML report of a comparison: metric bars, ROC curves, examples."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path

import numpy as np

from defectkit.core.atomic import atomic_write_text
from defectkit.review.compare import _fmt, _union, table


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

    fig, ax = plt.subplots(figsize=(4.5, 4))
    y = np.array([g.defect_type != "good" for g in gt])
    for i, r in enumerate(results):
        s = np.array([r["image_scores"].get(g.image) or 0.0 for g in gt])
        if y.any() and (~y).any() and not np.isnan(r["image_auroc"]):
            f, t, _ = roc_curve(y, s)
            ax.plot(f, t, color=f"C{i}", label=f"{r['name']} ({_fmt(r['image_auroc'])})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.5)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image-level ROC")
    ax.legend(fontsize=7, loc="lower right")
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
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>defectkit comparison</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px} img{max-width:100%}</style></head><body>",
        f"<h1>Model comparison on the test fold ({len(gt)} images)</h1>",
        f"<p>Ground truth: {html.escape(str(data_root))}; masks and boxes counted at score &ge; {conf}.</p>",
        _md_table_html(md),
    ]
    for title, b64 in _plots(results, gt, data_root, conf):
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    parts.append("<h2>Examples, worst cases first</h2>")
    for name, b64 in _examples(results, groups, gt, data_root, conf):
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'></figure>")
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
