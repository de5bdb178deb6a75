"""Synthetic-defect pretraining data for the supervised models (YOLO, SAM).

From a conversion folder (``make convert``), paint ``n`` defects with exact masks on the good
training images of its categories (``datasets/defect_synth.py``), split them train/val, and convert
them with the suite's own converters into a second conversion folder with one class, ``defect``.
Rerun-safe: an existing pretraining conversion written with the same source, seed and size is reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from defectkit.converters.canonical import read_records
from defectkit.converters.convert import ConvertConfig, convert
from defectkit.core.errors import MissingFileError
from defectkit.core.paths import WORK
from defectkit.core.training import mark_stage_done, stage_done
from defectkit.datasets.defect_synth import write_synthetic_root
from defectkit.datasets.mvtec import index_dataset
from defectkit.datasets.split import build_manifest, write_manifest

log = logging.getLogger("defectkit.finetune.synthetic_pretrain")

PRETRAIN_FRACTIONS = {"train": 0.8, "val": 0.2, "test": 0.0}
STAMP = "pretrain.json"  # in the conversion folder: what was synthesized, so a rerun reuses it


@dataclass(frozen=True)
class PretrainData:
    conversion: Path  # the synthetic conversion folder (yolo/, yolo_seg/, coco/, ground_truth.jsonl)
    info: dict  # what was synthesized: source, categories, images, seed


def source_of(conversion: Path) -> tuple[Path, list[str]]:
    """The data root and categories a conversion folder was made from (its ground_truth.jsonl)."""
    gt = conversion / "ground_truth.jsonl"
    if not gt.is_file():
        raise MissingFileError(f"{gt} not found: --synthetic-pretrain needs a conversion folder of make convert")
    header, records = read_records(gt)
    return Path(header["data_root"]), sorted({r.category for r in records if r.category})


def prepare(conversion: Path, n: int, seed: int = 0, formats: tuple[str, ...] = ("yolo", "coco"),
            out: Path | None = None, progress: bool = False) -> PretrainData:
    """Synthesize ``n`` defect images (split evenly over the categories) and convert them."""
    data_root, categories = source_of(conversion)
    tag = f"{data_root.resolve().name}-synth-s{seed}-n{n}"
    out = out or WORK / "data" / tag
    conv = out / "converted" / "all-single"
    want = {"source": str(data_root.resolve()), "categories": categories, "images": n, "seed": seed,
            "formats": list(formats)}
    if stage_done(conv, want, STAMP):
        return PretrainData(conv, want)
    per_cat = max(1, n // len(categories))
    for cat in categories:
        write_synthetic_root(data_root, cat, out / "root", per_cat, seed, progress=progress)
    manifest = build_manifest(index_dataset(out / "root", categories), seed=seed, fractions=PRETRAIN_FRACTIONS)
    manifest["path"] = str(write_manifest(manifest, out / "manifest.json"))
    license_ = "synthetic"
    convert(out / "root", manifest, conv, ConvertConfig(formats=formats, scheme="single", license=license_),
            progress=progress)
    mark_stage_done(conv, want, STAMP)
    return PretrainData(conv, want)
