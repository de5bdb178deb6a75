"""``python -m defectkit.converters``: MVTec masks to YOLO, YOLO-seg, COCO, VOC and label maps.

    python -m defectkit.converters --data ROOT --category bottle [--formats yolo,coco]
        [--scheme defect|single|category_defect] [--min-area 0] [--workers 2] [--out DIR]

Uses the split manifest (``--manifest``, default ``work/out/<data name>/manifest.json``, written
with ``--seed`` when absent).  Prints and saves a fidelity report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from defectkit.converters.convert import (
    FORMATS,
    ConvertConfig,
    convert,
    format_report,
)
from defectkit.converters.instances import CLASS_SCHEMES
from defectkit.core.cli import HelpFormatter
from defectkit.core.paths import WORK
from defectkit.datasets import synthetic
from defectkit.datasets.split import load_or_build_manifest


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m defectkit.converters", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="MVTec-layout root (default: embedded synthetic set)")
    p.add_argument("--category", default="all", help="category name or 'all' (default)")
    p.add_argument("--manifest", type=Path, default=None, help="split manifest (default <data out>/manifest.json)")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default work/out/<data>/converted/<cat>-<scheme>)"
    )
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of %(default)s")
    p.add_argument(
        "--scheme",
        choices=CLASS_SCHEMES,
        default="defect",
        help="class per defect type (default), one 'defect' class, or <category>_<defect>",
    )
    p.add_argument(
        "--min-area", type=int, default=0, help="drop regions smaller than this many pixels (default 0: keep all)"
    )
    p.add_argument(
        "--train-good", type=int, default=0, help="add this many train/good images per category as train backgrounds"
    )
    p.add_argument(
        "--coco-polygons", action="store_true", help="COCO polygons instead of RLE (RLE kept for regions with holes)"
    )
    p.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    p.add_argument("--workers", type=int, default=1, help="workers converting images (processes)")
    p.add_argument("--seed", type=int, default=0, help="split seed when the manifest has to be written")
    p.add_argument(
        "--license",
        choices=["mvtec_ad", "synthetic"],
        default=None,
        help="licence written into COCO (default: synthetic for the embedded set, else MVTec AD's)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(args: argparse.Namespace) -> dict:
    root = args.data or synthetic.generate(progress=not args.quiet)
    base = WORK / "out" / Path(root).resolve().name
    manifest_path = args.manifest or base / "manifest.json"
    categories = None if args.category == "all" else [args.category]
    manifest = load_or_build_manifest(root, manifest_path, args.category, args.seed)
    license_ = args.license or ("synthetic" if (Path(root) / synthetic.STAMP).is_file() else "mvtec_ad")
    cfg = ConvertConfig(
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        scheme=args.scheme,
        min_area=args.min_area,
        copy_images=args.copy,
        train_good=args.train_good,
        coco_polygons=args.coco_polygons,
        workers=args.workers,
        license=license_,
    )
    out = args.out or base / "converted" / f"{args.category}-{args.scheme}"
    report = convert(root, manifest, out, cfg, categories=categories, progress=not args.quiet)
    print(format_report(report))
    print(f"-> {out}  (YOLO: {out / 'yolo' / 'data.yaml'}, fidelity: {out / 'fidelity.json'})")
    return report


def cli(argv: list[str] | None = None) -> int:
    from defectkit.core.cli import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
