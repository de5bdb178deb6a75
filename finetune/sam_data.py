"""SAM's data: a conversion's instances as items (image + masks + boxes, original resolution), and the
albumentations copies that move image, masks and boxes together."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import read_records
from defectkit.converters.instances import masks_to_boxes
from defectkit.core.errors import MissingFileError
from defectkit.core.paths import WORK
from defectkit.datasets.image_files import read_image


class Item:
    """One image with its instances (original resolution)."""

    def __init__(self, record, rgb: np.ndarray, masks: np.ndarray):
        self.record, self.rgb, self.masks = record, rgb, masks
        self.hw = rgb.shape[:2]
        self.boxes = np.asarray(record.boxes_xyxy, float)


def load_items(gt_records, data_root: Path, fold: str, category: str | None) -> list[Item]:
    out = []
    for r in gt_records:
        if r.fold != fold or (category and r.category != category):
            continue
        out.append(Item(r, read_image(data_root / r.image), r.decode_masks()))
    return out


def augmented(items: list[Item], k: int, seed: int) -> list[Item]:
    """``k`` albumentations copies of each item with instances; image, masks and boxes move together."""
    import albumentations as A

    if k <= 0:
        return []
    tf = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomBrightnessContrast(0.15, 0.15, p=0.7),
        ],
        seed=seed,
    )
    out = []
    for it in items:
        if not len(it.masks):
            continue
        for _ in range(k):
            res = tf(image=it.rgb, masks=list(it.masks.astype(np.uint8)))
            masks = np.stack(res["masks"]).astype(bool)
            keep = masks.reshape(len(masks), -1).any(1)
            rec = copy.copy(it.record)
            rec.boxes_xyxy = masks_to_boxes(masks[keep])
            new = Item(rec, np.ascontiguousarray(res["image"]), masks[keep])
            out.append(new)
    return out


def conversion_folder(data: Path | None, category: str = "all") -> Path:
    """``--data``: the conversion folder of ``make convert``, also when given as its ``yolo/data.yaml`` (the path
    ``finetune/yolo.py`` takes), so one path serves both trainers; with no ``--data``, the embedded set's
    conversion of ``--category`` (as ``finetune/yolo.py``)."""
    if data is None:
        return default_data(category)
    data = Path(data)
    if data.suffix in (".yaml", ".yml") and data.parent.name in ("yolo", "yolo_seg"):
        return data.parent.parent
    return data


def default_data(category: str = "all") -> Path:
    return WORK / "out" / "defectkit_synth" / "converted" / f"{category}-defect"


@dataclass
class SamData:
    header: dict
    gt: list
    classes: list[str]
    data_root: Path
    train: list
    val: list
    test: list


def load_sam_data(conv: Path, category: str | None, augment: int, seed: int) -> SamData:
    gt_path = conv / "ground_truth.jsonl"
    if not gt_path.is_file():
        raise MissingFileError(f"{gt_path} not found: --data must be a conversion folder written by make convert")
    header, gt = read_records(gt_path)
    data_root = Path(header["data_root"])
    train = [it for it in load_items(gt, data_root, "train", category) if len(it.boxes)]
    train += augmented(train, augment, seed)
    val = [it for it in load_items(gt, data_root, "val", category) if len(it.boxes)]
    return SamData(header, gt, header["classes"], data_root, train, val, load_items(gt, data_root, "test", category))
