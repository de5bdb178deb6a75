"""A conversion job: its config, the error it raises, and what one image contributes (picklable, so
images can run in worker processes)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectkit.core.errors import ConfigError, DataError
from defectkit.datasets.split import ManifestEntry

FORMATS = ("yolo", "yolo_seg", "coco", "voc", "label_maps")


LICENSES = {
    "mvtec_ad": {"id": 1, "name": "CC BY-NC-SA 4.0", "url": "https://creativecommons.org/licenses/by-nc-sa/4.0/"},
    "synthetic": {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
}


class ConversionError(DataError):
    """Bad input for a conversion; the message names the file."""


@dataclass(frozen=True)
class ConvertConfig:
    formats: tuple[str, ...] = FORMATS
    scheme: str = "defect"
    min_area: int = 0
    copy_images: bool = False
    train_good: int = 0  # how many of the dataset's train/good images to add as train backgrounds
    coco_polygons: bool = False
    workers: int = 1  # processes; with 1, ``threads`` threads share the per-image work
    threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    license: str = "mvtec_ad"
    verify: bool = True  # redraw what was written and compare with the source masks

    def __post_init__(self):
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise ConfigError(f"unknown formats {bad}; choose from {FORMATS}")


@dataclass
class ImageResult:
    """What one image contributes to every format, computed in a worker (picklable)."""

    name: str
    fold: str
    entry: dict
    image_abs: str
    image_hw: tuple[int, int]
    channels: int
    labels: list[str] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    areas: list[int] = field(default_factory=list)
    rles: list[dict] = field(default_factory=list)
    yolo: str = ""
    yolo_seg: str = ""
    voc: str = ""
    coco: list[dict] = field(default_factory=list)
    coco_kept_rle: int = 0
    fidelity: dict = field(default_factory=dict)
    skipped: str | None = None
    dropped_small: int = 0
    crops: list[np.ndarray] = field(default_factory=list)  # instance masks inside their boxes, for verification


def flat_name(e: ManifestEntry) -> str:
    """``<category>__<defect type>__<stem>`` (``train_good`` for train images): unique across defect types."""
    group = "train_good" if e.source_split == "train" else e.defect_type
    return f"{e.category}__{group}__{Path(e.image).stem}"
