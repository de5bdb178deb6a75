"""Dataset statistics: the first table a user asks for.

:func:`compute_stats` is pure (scans in, dict out); :func:`format_table`, :func:`write_stats`
and :func:`plot_defect_sizes` are the thin presentation layer.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from defectkit.core.atomic import atomic_write_text
from defectkit.datasets.mvtec import GOOD, SPLITS, CategoryIndex, Problem
from defectkit.datasets.scan import SampleScan


def _summary(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    a = np.asarray(values, dtype=float)
    return {
        "min": float(a.min()),
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "max": float(a.max()),
    }


def compute_stats(index: CategoryIndex, scans: Sequence[SampleScan], warnings: Sequence[Problem] = ()) -> dict:
    """Statistics of one category from its scans (see :func:`defectkit.datasets.scan.scan_category`).

    Per defect type: images per split, masks with no defect pixel, 8-connected regions per mask,
    defect area in pixels and in % of the image.  Per category: image sizes and channels.
    """
    per_split: dict[str, Counter] = defaultdict(Counter)
    sizes: Counter = Counter()
    channels: Counter = Counter()
    by_type: dict[str, list[SampleScan]] = defaultdict(list)
    for sc in scans:
        s = sc.sample
        per_split[s.split][s.defect_type] += 1
        sizes[f"{s.image_hw[0]}x{s.image_hw[1]}"] += 1
        channels[str(s.channels)] += 1
        by_type[s.defect_type].append(sc)

    types: dict[str, dict] = {}
    for t in sorted(by_type, key=lambda t: (t != GOOD, t)):
        items = by_type[t]
        with_mask = [sc for sc in items if sc.mask is not None]
        areas = [sc.mask.area for sc in with_mask]
        pct = [100.0 * sc.mask.area / (sc.sample.image_hw[0] * sc.sample.image_hw[1]) for sc in with_mask]
        regions = [sc.mask.n_regions for sc in with_mask]
        region_areas = [a for sc in with_mask for a in sc.mask.region_areas]
        types[t] = {
            "images": len(items),
            "splits": {sp: per_split[sp][t] for sp in sorted(per_split) if per_split[sp][t]},
            "masks": len(with_mask),
            "empty_masks": sum(1 for a in areas if a == 0),
            "masks_with_stray_values": sum(1 for sc in with_mask if sc.mask.stray_pixels),
            "regions": {
                "total": int(sum(regions)),
                "per_mask": _summary(regions),
                "histogram": {str(k): v for k, v in sorted(Counter(regions).items())},
            },
            "area_px": _summary(areas),
            "area_pct": _summary(pct),
            "region_area_px": _summary(region_areas),
            "area_pct_values": [round(p, 5) for p in pct],
        }
    return {
        "category": index.category,
        "root": str(index.root),
        "layout": index.layout,
        "n_images": len(scans),
        "defect_types": [t for t in types if t != GOOD],
        "images_per_split": {sp: dict(sorted(c.items())) for sp, c in sorted(per_split.items())},
        "image_sizes_hw": dict(sizes.most_common()),
        "channels": dict(sorted(channels.items())),
        "per_type": types,
        "warnings": dict(sorted(Counter(w.kind for w in warnings).items())),
    }


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _sizes_line(sizes: dict[str, int], show: int = 4) -> str:
    items = list(sizes.items())
    if len(items) <= show:
        return ", ".join(f"{k} x{v}" for k, v in items)
    hs, ws = zip(*(map(int, k.split("x")) for k in sizes), strict=True)
    common = ", ".join(f"{k} x{v}" for k, v in items[:show])
    return f"{len(items)} distinct, H {min(hs)}-{max(hs)}, W {min(ws)}-{max(ws)} (most common: {common})"


def format_table(stats: dict) -> str:
    """A plain-text table: one row per defect type, then sizes, channels and warnings."""
    from tabulate import tabulate

    present = {sp for t in stats["per_type"].values() for sp in t["splits"]}
    splits = [sp for sp in SPLITS if sp in present]
    rows = []
    for name, t in stats["per_type"].items():
        a, p, r = t["area_px"], t["area_pct"], t["regions"]["per_mask"]
        rows.append(
            [name, t["images"], *[t["splits"].get(sp, 0) for sp in splits],
             r and f"{r['mean']:.2f} / {r['max']:.0f}",
             a and f"{_fmt(a['median'])} ({_fmt(a['min'])}-{_fmt(a['max'])})",
             p and f"{p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f})",
             t["empty_masks"] if t["masks"] else "-"]
        )
    head = ["defect type", "images", *splits, "regions/mask mean/max", "area px median (min-max)",
            "area % median (min-max)", "empty masks"]
    out = [f"{stats['category']}: {stats['n_images']} images, {len(stats['defect_types'])} defect "
           f"types ({', '.join(stats['defect_types']) or 'none'}), layout {stats['layout']}",
           tabulate(rows, head, tablefmt="github", missingval="-"),
           "image sizes (HxW): " + _sizes_line(stats["image_sizes_hw"]),
           "channels: " + ", ".join(f"{k}ch x{v}" for k, v in stats["channels"].items())]
    if stats["warnings"]:
        out.append("warnings: " + ", ".join(f"{v} {k}" for k, v in stats["warnings"].items()))
    return "\n".join(out)


def plot_defect_sizes(stats: dict, path: str | Path) -> Path:
    """Histogram of defect area (% of image, log scale) per defect type, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = [t for t in stats["defect_types"] if stats["per_type"][t]["area_pct_values"]]
    n = max(1, len(types))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    values = [v for t in types for v in stats["per_type"][t]["area_pct_values"] if v > 0]
    lo = min(values) if values else 1e-3
    hi = max(values) if values else 100.0
    bins = np.logspace(np.log10(lo / 1.5), np.log10(hi * 1.5), 20)
    for ax, t in zip(axes.flat, types, strict=False):
        v = [x for x in stats["per_type"][t]["area_pct_values"] if x > 0]
        empty = len(stats["per_type"][t]["area_pct_values"]) - len(v)
        ax.hist(v, bins=bins, color="tab:red", alpha=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{t} (n={len(v)}{f', {empty} empty' if empty else ''})", fontsize=9)
        ax.set_xlabel("defect area, % of image", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    if not types:
        axes[0, 0].text(0.5, 0.5, "no defect masks", ha="center", va="center")
    fig.suptitle(f"{stats['category']}: defect size per type", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_stats(stats: dict, out_dir: str | Path) -> dict[str, Path]:
    """``<out_dir>/<category>.json``, ``.txt`` (the table) and ``_defect_sizes.png``."""
    out_dir = Path(out_dir)
    cat = stats["category"]
    return {
        "json": atomic_write_text(out_dir / f"{cat}.json", json.dumps(stats, indent=1) + "\n"),
        "table": atomic_write_text(out_dir / f"{cat}.txt", format_table(stats) + "\n"),
        "plot": plot_defect_sizes(stats, out_dir / f"{cat}_defect_sizes.png"),
    }
