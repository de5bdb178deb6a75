"""Benchmark: is conversion bound by decoding the PNG masks?  (``make bench-convert``)

    python -m defectkit.converters.bench_convert [--data ROOT --category C] [--scale 4] [--repeat 3] [--tmp DIR]

Measures, in one run and on the same masks (copied and converted under ``--tmp``): decoding the masks
alone (OpenCV), our converter writing every format (with and without its fidelity verification, one process, then
``--workers 2``), and Ultralytics' ``convert_segment_masks_to_yolo_seg`` (masks remapped to
class value 1 beforehand, untimed, so that it can run).  Prints masks/s and ratios against the
decode time.  ``--scale`` upsamples the embedded 256 px masks to MVTec AD's ~1024 px.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from defectkit.converters.convert import FORMATS, ConvertConfig, convert
from defectkit.core.cli import HelpFormatter
from defectkit.core.machine import describe
from defectkit.datasets import synthetic
from defectkit.datasets.mvtec import index_dataset
from defectkit.datasets.split import build_manifest, entries


def _scaled_copy(root: Path, manifest: dict, dst: Path, scale: int) -> None:
    """Copy the manifest's images and masks, upsampled by ``scale`` (nearest for masks)."""
    for e in entries(manifest):
        if e.source_split != "test":
            continue
        for rel, interp in ((e.image, cv2.INTER_LINEAR), (e.mask, cv2.INTER_NEAREST)):
            if rel is None:
                continue
            a = cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst / rel), cv2.resize(a, None, fx=scale, fy=scale, interpolation=interp))


def _filesystem(path: str | Path) -> str:
    """``/tmp (ext4)``: the mount point holding ``path`` and its file system type (psutil, which Ultralytics
    installs)."""
    import psutil

    real = str(Path(path).resolve())
    parts = [p for p in psutil.disk_partitions(all=True)
             if real == p.mountpoint or real.startswith(p.mountpoint.rstrip("/") + "/")]
    best = max(parts, key=lambda p: len(p.mountpoint), default=None)
    return f"{best.mountpoint} ({best.fstype})" if best else str(path)


def _best(fn, repeat: int, before=None) -> float:
    """The shortest of ``repeat`` timed calls of ``fn``, each after an untimed ``before()``."""
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(args: argparse.Namespace) -> dict:
    logging.disable(logging.INFO)
    root = args.data or synthetic.generate(progress=False)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.tmp))
    try:
        manifest = build_manifest(index_dataset(root, args.category), seed=0)
        if args.scale > 1:
            _scaled_copy(Path(root), manifest, work / "data", args.scale)
            root = work / "data"
            manifest = build_manifest(index_dataset(root, args.category), seed=0)
        masks = [Path(root) / e.mask for e in entries(manifest) if e.mask]
        n = len(masks)
        hw = cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE).shape

        def decode():
            for m in masks:
                cv2.imdecode(np.fromfile(m, np.uint8), cv2.IMREAD_UNCHANGED)

        def ours(workers: int, verify: bool, formats=FORMATS, threads: int | None = None):
            def run():
                cfg = ConvertConfig(workers=workers, verify=verify, formats=formats)
                if threads is not None:
                    cfg = dataclasses.replace(cfg, threads=threads)
                convert(root, manifest, work / "out", cfg, progress=False)
            return run

        def fresh():  # each timed conversion writes a new folder, as a first `make convert` does (untimed removal)
            shutil.rmtree(work / "out", ignore_errors=True)

        ul_in = work / "ul_masks"
        ul_in.mkdir()
        for k, m in enumerate(masks):  # untimed: remap 255 -> 1 (class 0) and make names unique
            cv2.imwrite(str(ul_in / f"{k:05d}.png"), (cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8))

        def ultralytics():
            from ultralytics.data.converter import convert_segment_masks_to_yolo_seg
            from ultralytics.utils import LOGGER

            level = LOGGER.level
            LOGGER.setLevel(logging.WARNING)
            try:
                convert_segment_masks_to_yolo_seg(str(ul_in), str(work / "ul_out"), classes=1)
            finally:
                LOGGER.setLevel(level)

        rows = [("decode masks only (reference)", _best(decode, args.repeat))]
        no_maps = tuple(f for f in FORMATS if f != "label_maps")
        rows.append(
            ("ours, all but PNG label maps, verify off, 1 process", _best(ours(1, False, no_maps), args.repeat, fresh))
        )
        rows.append(("ours, all formats, verify off, 1 process", _best(ours(1, False), args.repeat, fresh)))
        rows.append(("ours, all formats + fidelity check, 1 thread",
                     _best(ours(1, True, threads=1), args.repeat, fresh)))
        default = f"ours, all formats + fidelity check, 1 process, {ConvertConfig().threads} threads (the default)"
        rows.append((default, _best(ours(1, True), args.repeat, fresh)))
        if (os.cpu_count() or 1) >= 2:
            rows.append(("ours, all formats + fidelity check, --workers 2", _best(ours(2, True), args.repeat, fresh)))
        rows.append(("ultralytics convert_segment_masks_to_yolo_seg (YOLO-seg only)", _best(ultralytics, args.repeat)))
        ref = rows[0][1]
        print(f"{n} masks of {hw[1]}x{hw[0]} from {root} (best of {args.repeat}) on {describe()}, written to "
              f"{_filesystem(work)}")
        print(f"{'what':80s} {'masks/s':>9s} {'x decode time':>14s}")
        for name, t in rows:
            print(f"{name:80s} {n / t:9.1f} {t / ref:14.2f}")
        times = dict(rows)
        print(f"per mask, the default (five formats + fidelity) is {rows[-1][1] / times[default]:.2f}x as fast as "
              f"Ultralytics' single format")
        return {name: {"seconds": t, "masks_per_s": n / t, "ratio_to_decode": t / ref} for name, t in rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--category", default="all")
    p.add_argument("--scale", type=int, default=4, help="upsample masks and images by this factor (default 4)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tmp", type=Path, default=None,
                   help="folder the copies and outputs are written in (default: the system's temporary folder); "
                        "/dev/shm takes the disk out of the figures")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
