"""Images for the anomaly models: loading, the FFT input, CutPaste pseudo-anomalies, and one category's
inputs assembled from the split manifest (training, hold-out, val fold, test fold)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from defectkit.anomaly.config import RunConfig
from defectkit.core.errors import ConfigError
from defectkit.datasets.defect_shapes import cutpaste
from defectkit.datasets.image_files import read_header, read_image, read_mask
from defectkit.datasets.split import entries, resolve_manifest

log = logging.getLogger("defectkit.anomaly")

INPUTS = ("rgb", "gray", "fft")


def fft_log_magnitude(gray: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """``20 * log10(|FFT| + eps)`` of a grayscale image, zero frequency centred, min-max to [0, 1]."""
    f = np.fft.fftshift(np.fft.fft2(np.asarray(gray, np.float64)))
    mag = 20 * np.log10(np.abs(f) + eps)
    lo, hi = mag.min(), mag.max()
    return ((mag - lo) / (hi - lo) if hi > lo else np.zeros_like(mag)).astype(np.float32)


def prepare(rgb: np.ndarray, size: int, mode: str) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 image to a ``(C, size, size)`` float32 model input in [0, 1]."""
    if mode not in INPUTS:
        raise ConfigError(f"unknown input {mode!r}; choose one of {INPUTS}")
    img = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    if mode == "rgb":
        return img.transpose(2, 0, 1).astype(np.float32) / 255.0
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return (fft_log_magnitude(gray) if mode == "fft" else gray)[None]


def load_inputs(paths: Sequence[str | Path], size: int, mode: str, progress: bool = False) -> np.ndarray:
    """``(N, C, size, size)`` float32 inputs."""
    from defectkit.core.progress import progress as bar

    return np.stack([prepare(read_image(p), size, mode) for p in bar(paths, desc="load images", disable=not progress,
                                                                       leave=False)])


def load_masks(paths: Sequence[str | Path | None], hws: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Original-size bool masks; an all-false mask for ``None`` (good images)."""
    return [read_mask(p) if p is not None else np.zeros(hw, bool) for p, hw in zip(paths, hws, strict=True)]


def downsample_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Ground truth at the evaluation resolution: a pixel is defect if any defect covers it,
    so that one-pixel defects survive downsampling."""
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0


def holdout(entries, fraction: float, seed: int):
    """Deterministic hold-out of good training images (by a hash of their key)."""
    ranked = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}:{e.key}".encode()).hexdigest())
    n = max(2, int(round(len(ranked) * fraction))) if len(ranked) >= 6 else 1
    return ranked[n:], ranked[:n]


@dataclass
class CategoryData:
    """One category's model inputs, with the labels and original-size masks they are scored on."""

    root: Path
    manifest: dict
    fit_x: np.ndarray  # train/good minus the hold-out
    hold_x: np.ndarray  # held-out good images
    cp_x: np.ndarray  # CutPaste made from them
    cp_masks: np.ndarray
    val_e: list  # manifest val fold (real defects)
    val_x: np.ndarray
    test_e: list
    test_x: np.ndarray

    @property
    def val_y(self) -> np.ndarray:
        return np.array([e.defect_type != "good" for e in self.val_e], bool)

    @property
    def test_y(self) -> np.ndarray:
        return np.array([e.defect_type != "good" for e in self.test_e], bool)


def load_category(cfg: RunConfig) -> CategoryData:
    """One category's inputs under the run's protocol (:data:`defectkit.anomaly.config.PROTOCOLS`)."""
    d, size, mode = cfg.data, cfg.model.imgsz, cfg.model.input
    root, manifest = resolve_manifest(d.data, d.manifest, d.seed, d.category)
    goods = entries(manifest, category=d.category, source_split="train")
    fit_e, hold_e = holdout(goods, d.holdout, d.seed)
    if d.protocol == "paper":  # no real defect before scoring; every image of the official test split scored
        val_e = []
        test_e = entries(manifest, category=d.category, source_split="test")
    else:
        val_e = [e for e in entries(manifest, category=d.category, fold="val") if e.source_split == "test"]
        test_e = [e for e in entries(manifest, category=d.category, fold="test") if e.source_split == "test"]
    t0 = time.perf_counter()
    fit_x = load_inputs([root / e.image for e in fit_e], size, mode, progress=not cfg.train.quiet)
    hold_x = load_inputs([root / e.image for e in hold_e], size, mode)
    rng = np.random.default_rng(d.seed)
    cp = [cutpaste(x, rng) for x in hold_x for _ in range(d.cutpaste_per_image)]
    empty = np.zeros((0, *fit_x.shape[1:]), np.float32)
    val_x = load_inputs([root / e.image for e in val_e], size, mode) if val_e else empty
    test_x = load_inputs([root / e.image for e in test_e], size, mode, progress=not cfg.train.quiet)
    data = CategoryData(root, manifest, fit_x, hold_x, np.stack([c[0] for c in cp]), np.stack([c[1] for c in cp]),
                        val_e, val_x, test_e, test_x)
    log.info("%s: %d train, %d held-out good (+%d CutPaste), %d val-fold, %d test images (%.1fs to load)",
             d.category, len(fit_x), len(hold_x), len(data.cp_x), len(val_e), len(test_e), time.perf_counter() - t0)
    return data


def selection_set(data: CategoryData, use_val_fold: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validation inputs and labels for model selection: held-out good + CutPaste, plus the val
    fold when it has both good and defect images."""
    x = np.concatenate([data.hold_x, data.cp_x])
    y = np.r_[np.zeros(len(data.hold_x)), np.ones(len(data.cp_x))]
    vy = data.val_y
    if use_val_fold and len(vy) and vy.min() != vy.max():
        x, y = np.concatenate([x, data.val_x]), np.r_[y, vy]
    return x, y


def entry_masks(root: Path, es) -> list[np.ndarray]:
    """Original-size bool masks of manifest entries (all-false for good images)."""
    return load_masks([root / e.mask if e.mask else None for e in es], [read_header(root / e.image)[0] for e in es])
