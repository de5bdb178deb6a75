"""Command line for datasets/: ``python -m defectkit.datasets <command> [--data ROOT] [--category C]``.

Commands::

    generate   write the embedded synthetic dataset (reused when already complete)
    validate   index + decode every mask (``--deep``: every image too); list layout problems
    stats      statistics table (printed), JSON and defect-size plot per category
    split      the seeded, stratified train/val/test split manifest
    synth-defects  paint --n defects with exact masks on each category's good images (an
               MVTec-layout root in --out, default work/data/<data>-synth-s<seed>-n<n>)
    demo       generate (when no --data) -> validate -> stats -> split

Without ``--data`` the embedded synthetic dataset is used (and generated on first use).
Outputs go to ``--out`` (default ``work/out/<name of the data root>``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from defectkit.core.cli import HelpFormatter
from defectkit.core.paths import WORK
from defectkit.datasets import synthetic
from defectkit.datasets.mvtec import index_dataset
from defectkit.datasets.scan import scan_category
from defectkit.datasets.split import DEFAULT_FRACTIONS, build_manifest, merge_into
from defectkit.datasets.stats import compute_stats, format_table, write_stats

log = logging.getLogger("defectkit.datasets")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m defectkit.datasets", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("command", choices=["generate", "validate", "stats", "split", "synth-defects", "demo"])
    p.add_argument("--data", type=Path, default=None, help="MVTec-layout root (default: embedded synthetic set)")
    p.add_argument("--category", default="all", help="category name or 'all' (default)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default work/out/<data name>)")
    p.add_argument("--seed", type=int, default=0, help="split seed (and generator seed for generate)")
    p.add_argument("--fractions", default=",".join(str(DEFAULT_FRACTIONS[f]) for f in ("train", "val", "test")),
                   help="train,val,test fractions of each category's test images (default %(default)s)")
    p.add_argument("--deep", action="store_true", help="validate: decode every image too")
    p.add_argument("--workers", type=int, default=2, help="workers decoding images (threads)")
    p.add_argument("--force", action="store_true", help="generate: replace an existing root")
    p.add_argument("--n", type=int, default=200, help="synth-defects: synthetic defect images per category")
    p.add_argument("--anomaly-source", type=Path, default=None,
                   help="synth-defects: a folder of texture images to fill defects with (e.g. DTD)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _fractions(text: str) -> dict[str, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 3:
        raise SystemExit(f"--fractions needs three numbers train,val,test; got {text!r}")
    return dict(zip(("train", "val", "test"), parts, strict=True))


def synth_defects(root: Path, args: argparse.Namespace) -> dict:
    """Synthetic defects on each category's good images, as an MVTec-layout root."""
    from defectkit.datasets.defect_synth import summary, write_synthetic_root
    from defectkit.datasets.mvtec import resolve_categories

    out = args.out or WORK / "data" / f"{Path(root).resolve().name}-synth-s{args.seed}-n{args.n}"
    result = {}
    for cat in resolve_categories(Path(root), args.category):
        info = write_synthetic_root(Path(root), cat, out, args.n, args.seed, args.anomaly_source,
                                    progress=not args.quiet)
        print(summary(info))
        print(f"  -> {out / cat}  (montage: {out / cat / 'montage.png'})")
        result[cat] = info
    return {"root": str(out), "categories": result}


def main(args: argparse.Namespace) -> dict:
    if args.command == "generate":
        root = synthetic.generate(args.out or synthetic.DEFAULT_ROOT, seed=args.seed, force=args.force,
                                  progress=not args.quiet)
        print(f"synthetic dataset: {root}")
        return {"root": str(root)}

    root = args.data
    if root is None:
        root = synthetic.generate(progress=not args.quiet)
    if args.command == "synth-defects":
        return synth_defects(Path(root), args)
    out = args.out or WORK / "out" / Path(root).resolve().name
    indexes = index_dataset(root, args.category)
    result: dict = {"root": str(root), "out": str(out), "categories": {}}
    deep = args.deep or args.command == "demo"
    for idx in indexes:
        scans, warnings = scan_category(idx, deep=deep, workers=args.workers, progress=not args.quiet)
        stats = compute_stats(idx, scans, [*idx.warnings, *warnings])
        result["categories"][idx.category] = stats
        if args.command == "validate":
            print(
                f"{idx.category}: {len(idx.samples)} images OK"
                + (f"; {len(warnings)} warning(s), e.g.\n  " + "\n  ".join(map(str, warnings[:3])) if warnings else "")
            )
        if args.command in ("stats", "demo"):
            paths = write_stats(stats, out / "stats")
            print(format_table(stats))
            print(f"  -> {paths['json']}\n  -> {paths['plot']}\n")
    if args.command in ("split", "demo"):
        manifest = build_manifest(indexes, seed=args.seed, fractions=_fractions(args.fractions))
        path = out / "manifest.json"
        manifest = merge_into(path, manifest)  # other categories already split there are kept
        for cat, counts in manifest["counts"].items():
            line = ", ".join(f"{t} {c['train']}/{c['val']}/{c['test']}" for t, c in counts.items())
            print(f"split {cat} (train/val/test of test images): {line}")
        print(f"split manifest (seed {args.seed}): {path}")
        result["manifest"] = str(path)
    if args.command == "demo":
        print(f"data stage done: statistics and split manifest in {out}")
    return result


def cli(argv: list[str] | None = None) -> int:
    from defectkit.core.cli import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
