"""Export a trained run for a runtime without the training stack, checked in the same command.

* anomaly runs: the :class:`~defectkit.anomaly.scoring.AnomalyHead` (map, smoothing, normalisation and
  score in one graph) to ``<run>/export/model.onnx`` + ``model.json`` (threshold, preprocessing);
* YOLO runs: Ultralytics' own exporter to ``<run>/weights/best.onnx`` + ``<run>/export/model.json``;
* SAM cascade runs: segment-anything's ``SamOnnxModel`` (prompt encoder + mask decoder) and the image
  encoder, separately, to ``<run>/export/``.

Each export runs onnxruntime and PyTorch on the same batch of real images (``--images``, default: the
run's own test images) and fails, writing nothing, when they differ by more than the stated tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from defectkit.core.errors import ConfigError


def sample_images(run: Path, images: str | None, n: int = 8):
    """Up to ``n`` readable images: from ``--images``, else the run's own predictions' images."""
    from defectkit.deploy.predict import find_images, read_images

    if images is None:
        from defectkit.converters.canonical import read_records

        header, recs = read_records(Path(run) / "predictions.jsonl")
        files = [Path(header["data_root"]) / r.image for r in recs]
        step = max(1, len(files) // n)
        files = files[::step][:n]
    else:
        files = find_images(images)[1][:n]
    return [im for _, im in read_images(files)[0]]


def main(args: argparse.Namespace) -> dict:
    from defectkit.deploy.predict import run_kind

    if args.format != "onnx":
        raise ConfigError(f"unknown export format {args.format!r}; onnx is supported")
    kind = run_kind(args.run)
    imgs = sample_images(args.run, args.images)
    if kind == "anomaly":
        from defectkit.anomaly.deploy import export_onnx

        report = export_onnx(args.run, imgs)
        if args.quantize == "int8":
            from defectkit.anomaly.quantize import quantize_int8

            report["int8"] = quantize_int8(args.run)
            print(f"INT8: {report['int8']['onnx']} (test-fold AUROC change {report['int8']['max_auroc_change']:.4f})")
    elif args.quantize:
        raise ConfigError(f"--quantize is for anomaly runs; {args.run} is a {kind} run")
    elif kind == "yolo":
        from defectkit.finetune.yolo_deploy import export_onnx

        report = export_onnx(args.run, imgs)
    else:
        from defectkit.finetune.sam_deploy import export_onnx

        report = export_onnx(args.run, imgs)
    print(json.dumps(report, indent=1))
    print(f"exported {args.run} -> {report['onnx']} (onnxruntime vs PyTorch on {report['images']} images: max |diff| "
          f"{report['max_abs_diff_maps' if kind == 'anomaly' else 'max_abs_diff']:.2g} <= {report['atol']})")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--format", default="onnx")
    p.add_argument("--images", help="images to check the export on (default: the run's own test images)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="anomaly runs: also an INT8 graph (onnxruntime static quantization, calibrated on the run's "
                        "good training images), refused unless its test-fold image and pixel AUROC stay within 0.002 "
                        "of float32's")
