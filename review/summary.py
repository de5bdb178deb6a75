"""Per-category figures and their mean, in the layout of the papers (one row per category, a mean row).

    summarize({"bottle": {"image AUROC": 0.99}, "screw": {"image AUROC": 0.91}}, ["image AUROC"])

:func:`summarize` is pure (tested with hand-computed means); :func:`write_summary` writes
``summary.md``, ``summary.json`` and ``summary.png`` (a grouped bar chart) for a family of runs.
A category without a figure (a failed run, a metric the model has no way to compute) shows ``-``
and is left out of the mean, whose row says over how many categories it was taken.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from defectkit.core.atomic import atomic_write_json, atomic_write_text

# the figures each family reports, and where they sit in its metrics file
COLUMNS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "anomaly": [("image AUROC", ("image", "auroc")), ("pixel AUROC", ("pixel", "auroc")),
                ("AUPRO", ("pixel", "aupro")), ("pixel AP", ("pixel", "ap")), ("train s", ("train_seconds",))],
    "yolo": [("mAP50", ("ultralytics", "map50")), ("mAP50-95", ("ultralytics", "map50_95")),
             ("mAP50 (pycocotools)", ("pycocotools", "bbox", "map50")), ("image AUROC", ("image_auroc",)),
             ("train s", ("train_seconds",))],
    "sam": [("mask IoU (GT boxes)", ("fine_tuned", "iou")), ("zero-shot IoU", ("zero_shot", "iou")),
            ("cascade pixel IoU", ("cascade", "pixel_iou_per_image")),
            ("cascade mask AP50", ("cascade", "mask_ap", "map50")),
            ("anomaly->SAM pixel IoU", ("anomaly_cascade", "pixel_iou_per_image")), ("train s", ("train_seconds",))],
}
# per model in a comparison (comparison.json's runs)
COMPARE_COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("image AUROC", ("image_auroc",)), ("pixel AUROC", ("pixel_auroc",)),
    ("mAP50 (agnostic)", ("det_class_agnostic", "map50")), ("pixel IoU", ("pixel_iou",)),
]
#: published MVTec AD figures (in %) under the papers' protocol, for the reference column of a ``--protocol paper``
#: summary: DRAEM (Zavrtanik, Kristan, Skocaj, ICCV 2021, Tables 1-2; trained from scratch, as here) and the SSIM
#: autoencoder (Bergmann et al., VISAPP 2019, as tabulated by DRAEM).  Only figures read from those tables;
#: a category missing here shows "-".
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "DRAEM": {"mean (15)": {"image AUROC": 98.0, "pixel AUROC": 97.3, "pixel AP": 68.4},
              "bottle": {"image AUROC": 99.2, "pixel AUROC": 99.1, "pixel AP": 86.5}},
    "AE-SSIM": {"mean (15)": {"pixel AUROC": 87.0, "AUPRO": 69.4}, "bottle": {"pixel AUROC": 93.0}},
}
METRICS_FILE = {"anomaly": "metrics.json", "yolo": "metrics.json", "sam": "metrics.json",
                "compare": "comparison.json"}


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return None if math.isnan(v) else float(v)


def lookup(metrics: Mapping, path: Sequence[str]) -> float | None:
    """``metrics[path[0]][path[1]]...`` as a float; None where missing or not a number (NaN included)."""
    v = metrics
    for k in path:
        if not isinstance(v, Mapping) or k not in v:
            return None
        v = v[k]
    return _number(v)


def summarize(per_category: Mapping[str, Mapping[str, float | None]], columns: Sequence[str]) -> dict:
    """Rows per category (in the given order) and the mean of each column over the categories that
    have it: ``{"columns", "rows": {cat: {col: v}}, "mean": {col: v}, "n": {col: k}}``."""
    rows = {c: {col: _number(vals.get(col)) for col in columns} for c, vals in per_category.items()}
    mean, n = {}, {}
    for col in columns:
        got = [r[col] for r in rows.values() if r[col] is not None]
        n[col] = len(got)
        mean[col] = sum(got) / len(got) if got else None
    return {"columns": list(columns), "rows": rows, "mean": mean, "n": n}


def family_values(family: str, metrics: Mapping) -> dict[str, float | None]:
    """The columns of one run's metrics file (``comparison.json`` for ``compare``: one column per
    model and figure, ``"<model>: <figure>"``)."""
    if family == "compare":
        return {f"{r['name']}: {label}": lookup(r, path) for r in metrics.get("runs", []) for label, path in
                COMPARE_COLUMNS}
    return {label: lookup(metrics, path) for label, path in COLUMNS[family]}


def _fmt(v: float | None, col: str) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if col.endswith(" s") else f"{v:.3f}"


def markdown(summary: Mapping, title: str = "") -> str:
    cols = summary["columns"]
    lines = [f"{title}\n" if title else "", "| category | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for cat, row in summary["rows"].items():
        lines.append(f"| {cat} | " + " | ".join(_fmt(row[c], c) for c in cols) + " |")
    k = len(summary["rows"])
    mean_cells = [_fmt(summary["mean"][c], c) + ("" if summary["n"][c] in (0, k) else f" (of {summary['n'][c]})")
                  for c in cols]
    lines.append(f"| **mean ({k})** | " + " | ".join(mean_cells) + " |")
    return "\n".join(line for line in lines if line != "") + "\n"


def by_figure(summary: Mapping) -> dict[str, dict]:
    """A comparison's summary (columns ``"<model>: <figure>"``) as one summary per figure whose
    columns are the models: the readable layout when several models are compared."""
    figures = list(dict.fromkeys(c.rsplit(": ", 1)[1] for c in summary["columns"]))
    out = {}
    for fig in figures:
        cols = [c for c in summary["columns"] if c.endswith(f": {fig}")]
        models = [c.rsplit(": ", 1)[0] for c in cols]
        per_cat = {cat: {m: row[c] for m, c in zip(models, cols, strict=True)} for cat, row in summary["rows"].items()}
        out[fig] = summarize(per_cat, models)
    return out


def plot(tables: Mapping[str, Mapping], path: Path, title: str = "") -> None:
    """One panel per table: grouped bars, a group per category (and the mean), a bar per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(tables), figsize=(max(6.0, 4.5 * len(tables)), 4), squeeze=False)
    for ax, (name, summary) in zip(axes[0], tables.items(), strict=True):
        cols = [c for c in summary["columns"] if not c.endswith(" s")]
        cats = [*summary["rows"], "mean"]
        rows = [*summary["rows"].values(), summary["mean"]]
        x = np.arange(len(cats))
        width = 0.8 / max(len(cols), 1)
        for i, col in enumerate(cols):
            ax.bar(x + (i - (len(cols) - 1) / 2) * width, [r[col] or 0.0 for r in rows], width, label=col)
        ax.set_xticks(x, cats, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def published_table(categories: Sequence[str]) -> str:
    """The published figures (:data:`PUBLISHED`) for the categories run and the papers' 15-category mean, as a
    reference table (in %; a mean is comparable only when all 15 MVTec AD categories were run)."""
    cols = ["image AUROC", "pixel AUROC", "AUPRO", "pixel AP"]
    lines = ["Published (MVTec AD, the papers' protocol, %; DRAEM: Zavrtanik et al. ICCV 2021; AE-SSIM: Bergmann "
             "et al. 2019):", "", "| method | category | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, table in PUBLISHED.items():
        for cat in [*categories, "mean (15)"]:
            row = table.get(cat, {})
            lines.append(f"| {method} | {cat} | " + " | ".join(f"{row[c]:.1f}" if c in row else "-" for c in cols)
                         + " |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, family: str, runs: Mapping[str, Path | None], title: str = "") -> dict:
    """Read each category's run (``None``: not run / failed) and write the summary files to ``out``.
    A comparison gets one table per figure (image AUROC, pixel AUROC, ...) with a column per model."""
    per_category, sources, protocols = {}, {}, set()
    for cat, run in runs.items():
        f = Path(run) / METRICS_FILE[family] if run is not None else None
        metrics = json.loads(f.read_text()) if f is not None and f.is_file() else {}
        per_category[cat] = family_values(family, metrics)
        sources[cat] = str(f) if metrics else None
        if metrics:
            protocols.add(metrics.get("protocol", "manifest"))
    columns = list(dict.fromkeys(c for vals in per_category.values() for c in vals))
    summary = summarize(per_category, columns)
    title = title or f"{family}: {len(runs)} categories"
    tables = by_figure(summary) if family == "compare" else {family: summary}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", {"family": family, "title": title, **summary, "tables": tables,
                                             "sources": sources})
    text = f"**{title}**\n\n" + "\n".join(
        (f"{name}:\n\n" if family == "compare" else "") + markdown(t) for name, t in tables.items())
    if family == "anomaly":
        text += f"\nprotocol: {', '.join(sorted(protocols)) or '-'}\n"
        if protocols == {"paper"}:
            text += "\n" + published_table(list(runs))
    atomic_write_text(out / "summary.md", text)
    plot(tables, out / "summary.png", title)
    return summary


def finish_run(run: Path, family: str, metrics: dict) -> dict:
    """Write a trained run's ``metrics.json`` and ``results.md`` (what a person reads first).

    Adds the keys every family shares (``family``, ``protocol``, and for detectors the ``image`` block the
    anomaly models have: ``auroc`` and ``at_threshold``), keeping each family's own keys unchanged."""
    metrics = {"family": family, "protocol": metrics.get("protocol", "manifest"), **metrics}
    if "image" not in metrics and "image_auroc" in metrics:
        metrics["image"] = {"auroc": metrics["image_auroc"], "at_threshold": metrics.get("at_threshold")}
    atomic_write_json(run / "metrics.json", metrics)
    atomic_write_text(run / "results.md", results_markdown(family, metrics))
    return metrics


def results_markdown(family: str, metrics: Mapping) -> str:
    """A run's headline figures as a short page: what ran, on what, under which protocol, and where the rest is."""
    what = metrics.get("category") or Path(str(metrics.get("data", ""))).name
    n = metrics.get("test_images", metrics.get("test_instances"))
    scored = ("the whole official test split" if metrics.get("protocol") == "paper" else "the manifest's test fold")
    lines = [f"# {metrics.get('model')} ({family}) on {what}", "",
             f"- data: `{metrics.get('data')}`",
             f"- scored on {scored}" + (f" ({n} {'images' if 'test_images' in metrics else 'instances'})" if n else ""),
             f"- protocol: {metrics.get('protocol')}"]
    if metrics.get("train_seconds") is not None:
        lines.append(f"- training time: {metrics['train_seconds']:.0f} s")
    if metrics.get("note"):
        lines.append(f"- note: {metrics['note']}")
    op = (metrics.get("image") or {}).get("at_threshold")
    if op and op.get("false_alarm_rate") is not None:
        lines.append(f"- at the threshold chosen on validation: false alarms {op['false_alarm_rate']:.3f}, "
                     f"misses {op.get('miss_rate', float('nan')):.3f}")
    values = {k: v for k, v in family_values(family, metrics).items() if k != "train s" and v is not None}
    if values:
        lines += ["", "| figure | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in values.items()]
    lines += ["", "Files: `metrics.json` (every figure), `config.yaml` (`--config` reproduces the run), "
              "`predictions.jsonl` (canonical predictions), `deploy.json` (what predict and export read)."]
    return "\n".join(lines) + "\n"
