"""Inference speed of trained runs through PyTorch and through their ONNX export (onnxruntime, CPU), in
one process: images/s and the ratio to the first run's PyTorch figure.  ``--images``: the same images for
every run; without it, each run's own test images.

    python -m defectkit.deploy.bench_predict --run RUN [RUN ...] [--images DIR] [--n 32] [--repeat 3]

Several runs (e.g. DRAEM at full and half width) are timed one after the other in one process, each row a
ratio to the first run's PyTorch float32 row.

Timed: the model call on prepared batches (anomaly: the map head, maps and scores; YOLO: Ultralytics'
predict, letterbox and NMS included), best of ``--repeat`` passes.  The run is exported first if it
has no ONNX file; an anomaly run's INT8 graph (``defectkit export --quantize int8``) is timed too when it
exists.  Threads: torch's and onnxruntime's defaults (all cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from defectkit.core.cli import HelpFormatter, run_cli
from defectkit.core.machine import describe


def _best(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(run: Path, images: str | None, n: int, repeat: int, batch: int) -> list[dict]:
    from defectkit.deploy.export import sample_images
    from defectkit.deploy.predict import run_kind

    kind = run_kind(run)
    imgs = sample_images(run, images, n)
    if kind == "anomaly":
        from defectkit.anomaly.deploy import AnomalyRunner, export_onnx, prepare_batch

        if not (run / "export" / "model.onnx").is_file():
            export_onnx(run, imgs[:8])
        runners = {b: AnomalyRunner(run, b) for b in ("torch", "onnx")}
        if (run / "export" / "model.int8.onnx").is_file():  # made (and checked) by `export --quantize int8`
            runners["int8"] = AnomalyRunner(run, "onnx-int8")
        x = prepare_batch(imgs, runners["torch"].spec)
        size = runners["torch"].spec["preprocess"]["size"]

        def call(b):
            return lambda: [runners[b](x[i : i + batch]) for i in range(0, len(x), batch)]
    else:
        from defectkit.finetune import yolo_deploy as Y

        spec = Y.read_spec(run)
        if not (run / Path(spec["weights"]).with_suffix(".onnx")).is_file():
            Y.export_onnx(run, imgs[:8])
        models = {b: Y.load_model(run, spec, b) for b in ("torch", "onnx")}
        size = [spec["imgsz"]] * 2

        def call(b):
            return lambda: [list(Y._run(models[b], spec, imgs[i : i + batch])) for i in range(0, len(imgs), batch)]
    rows = []
    names = {"torch": "PyTorch", "onnx": "onnxruntime", "int8": "onnxruntime INT8"}
    for b in list(runners) if kind == "anomaly" else ["torch", "onnx"]:
        s = _best(call(b), repeat)
        rows.append({"backend": names[b], "images": len(imgs),
                     "input": f"{size[0]}x{size[1]}", "images_per_s": len(imgs) / s})
    for r in rows:
        r["ratio_vs_pytorch"] = r["images_per_s"] / rows[0]["images_per_s"]
    return rows


def main(args: argparse.Namespace) -> list[dict]:
    from tabulate import tabulate

    rows = []
    for run in args.run:
        rows += [{"run": str(run), **r} for r in bench(run, args.images, args.n, args.repeat, args.batch)]
    for r in rows:
        r["ratio_vs_pytorch"] = r["images_per_s"] / rows[0]["images_per_s"]
    print(f"{len(args.run)} run(s) on {describe()}, best of {args.repeat} passes, batch {args.batch}; "
          f"ratios against {args.run[0]} through PyTorch")
    print(tabulate([[r["run"], r["backend"], r["input"], r["images"], f"{r['images_per_s']:.1f}",
                     f"{r['ratio_vs_pytorch']:.2f}x"] for r in rows],
                   headers=["run", "backend", "input", "images", "images/s", "vs PyTorch"], tablefmt="github"))
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m defectkit.deploy.bench_predict", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--run", type=Path, nargs="+", required=True, help="one or more runs; the first is the reference")
    p.add_argument("--images")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


if __name__ == "__main__":
    raise SystemExit(run_cli(get_args_parser(), main))
