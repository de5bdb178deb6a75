"""Benchmark and comparison table of the anomaly models (``make bench-anomaly``).

    python -m defectkit.anomaly.bench_models --data ROOT --category C --models conv_ae,unet_ae,vae,fc_ae \\
        -- --size 128 --epochs 12 --augment

Runs ``anomaly/train.py`` once per model with the same arguments (everything after ``--``) and
prints a Markdown table: image AUROC, pixel AUROC, AUPRO@30 %, training time and inference
images/s, with each model's time and throughput also as a ratio to the first model's, measured in
the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from defectkit.core.atomic import atomic_write_json, atomic_write_text
from defectkit.core.cli import HelpFormatter


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--category", default="washer")
    p.add_argument("--models", default="draem,conv_ae,unet_ae,vae,fc_ae")
    p.add_argument("--out", type=Path, default=None, help="runs go to OUT/<model>; the table to OUT/table.md")
    a = p.parse_args(own)
    from defectkit.anomaly import train as T

    rows = []
    for model in a.models.split(","):
        args = T.get_args_parser().parse_args(
            [*(["--data", a.data] if a.data else []), "--category", a.category, "--model", model, "-q", *extra,
             *(["--out", str(a.out / model)] if a.out else [])])
        m = T.main(args)
        rows.append({"model": model, "image_auroc": m["image"]["auroc"], "pixel_auroc": m.get("pixel", {}).get("auroc"),
                     "aupro": m.get("pixel", {}).get("aupro"),
                     "pixel_ap": m.get("pixel", {}).get("ap"), "latent_knn": m.get("latent_knn_auroc"),
                     "train_s": m["train_seconds"], "images_per_s": m["images_per_s"], "epochs": m["epochs_run"]})
    ref = rows[0]
    lines = [
        f"{a.category} ({a.data or 'embedded synthetic'}), args: {' '.join(extra) or '(defaults)'}",
        "",
        "| model | image AUROC | pixel AUROC | AUPRO@30% | pixel AP | latent kNN AUROC | epochs | train s | x ref "
        "| images/s | x ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['model']} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | {f(r['aupro'])} | {f(r['pixel_ap'])} "
            f"| {f(r['latent_knn'])} "
            f"| {r['epochs']} | {r['train_s']:.0f} | {r['train_s'] / ref['train_s']:.2f} | {r['images_per_s']:.0f} "
            f"| {r['images_per_s'] / ref['images_per_s']:.2f} |"
        )
    print("\n".join(lines))
    if a.out:
        atomic_write_text(a.out / "table.md", "\n".join(lines) + "\n")
        atomic_write_json(a.out / "table.json", rows)
    return rows


if __name__ == "__main__":
    main()
