"""The comparison's Markdown table and the cell formatting the report shares with it."""

from __future__ import annotations

import numpy as np


def fmt(v) -> str:
    """A table cell: 3 decimals for floats, ``-`` for a missing or undefined value."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def rate(op: dict | None, bad: str, other: str) -> str:
    """``0.125 (2/16)``: a rate at the run's own threshold, with the counts it rests on."""
    if not op:
        return "-"
    n = op[bad] + op[other]
    return f"{op[bad] / max(n, 1):.3f} ({op[bad]}/{n})"


def table(results: list[dict]) -> str:
    """The comparison table (Markdown) of :func:`defectkit.review.compare.score_run` results."""
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
            rate(r.get("operating_point"), "fp", "tn"),
            rate(r.get("operating_point"), "fn", "tp"),
            r.get("images_per_s"),
        ]
        lines.append("| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |")
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
                f"{fmt(r['per_type'].get(t, {}).get('image_auroc'))} / "
                f"{fmt(r['per_type'].get(t, {}).get('pixel_iou'))}"
                for t in types
            ]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    notes = ["- false alarms / misses: good test images rejected / defective ones passed, at the image threshold "
             "each run chose on its val fold (- : the run has none)"]
    notes += [f"- {r['name']}: {r['note']}" for r in results if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)
