"""Images for the anomaly models: loading, the FFT input, CutPaste pseudo-anomalies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from defectkit.core.errors import ConfigError
from defectkit.datasets.image_files import read_image, read_mask

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


def cutpaste(img: np.ndarray, rng: np.random.Generator, scar: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste (Li et al. 2021): copy a patch of the image, jitter its brightness, paste it
    elsewhere.  ``img`` ``(C, H, W)`` float in [0, 1].  Returns the image and the pasted mask.
    ``scar=True`` makes a thin rotated strip instead of a rectangle (random when None)."""
    c, h, w = img.shape
    scar = bool(rng.random() < 0.5) if scar is None else scar
    if scar:
        ph, pw = int(rng.integers(max(2, h // 4), max(3, h // 2))), int(rng.integers(2, max(3, w // 16) + 1))
    else:
        area = rng.uniform(0.02, 0.15) * h * w
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        ph = int(np.clip(np.sqrt(area * aspect), 2, h - 2))
        pw = int(np.clip(np.sqrt(area / aspect), 2, w - 2))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = img[:, y0 : y0 + ph, x0 : x0 + pw].copy()
    patch = np.clip(patch * rng.uniform(0.6, 1.4) + rng.uniform(-0.15, 0.15), 0, 1)
    mask = np.zeros((h, w), np.uint8)
    if scar:
        angle = rng.uniform(-45, 45)
        big = np.zeros((h, w), np.uint8)
        cy, cx = int(rng.integers(ph // 2, h - ph // 2 + 1)), int(rng.integers(pw // 2, w - pw // 2 + 1))
        box = cv2.boxPoints(((cx, cy), (pw, ph), angle)).astype(np.int32)
        cv2.fillPoly(big, [box], 1)
        mask = big
        fill = np.full((c, h, w), patch.mean(axis=(1, 2), keepdims=True), np.float32)
        out = np.where(mask[None] > 0, fill, img)
    else:
        y1, x1 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        out = img.copy()
        out[:, y1 : y1 + ph, x1 : x1 + pw] = patch
        mask[y1 : y1 + ph, x1 : x1 + pw] = 1
    return out.astype(np.float32), mask.astype(bool)
