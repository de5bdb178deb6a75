"""``python -m defectkit.deploy {predict,export}``: use a trained run on new images, or export it.

    python -m defectkit.deploy predict --run RUN --images DIR --out OUT [--threshold T] [--backend onnx]
    python -m defectkit.deploy export --run RUN [--format onnx] [--images DIR]
"""

from __future__ import annotations

import argparse
import sys

from defectkit.core.cli import HelpFormatter, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    from defectkit.deploy import export, predict

    p = argparse.ArgumentParser(prog="python -m defectkit.deploy", description=__doc__,
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("predict", help="OK/NG, maps, boxes, overlays and a CSV for new images")
    predict.add_arguments(pp)
    pe = sub.add_parser("export", help="ONNX export checked against PyTorch on real images")
    export.add_arguments(pe)
    for q in (pp, pe):
        q.add_argument("-q", "--quiet", action="store_true")
    return p


def main(args: argparse.Namespace):
    from defectkit.deploy import export, predict

    return (predict if args.command == "predict" else export).main(args)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
