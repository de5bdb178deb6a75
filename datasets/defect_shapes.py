"""The shapes and fillings of painted defects, as pure functions over arrays (float32 ``(H, W, C)``
images in [0, 1], bool masks): Perlin blobs, scratches, CutPaste patches and scars, procedural and
foreign textures, opacity blending; and CutPaste itself (Li et al. 2021) for the anomaly models'
validation pseudo-anomalies."""

from __future__ import annotations

import cv2
import numpy as np

SHAPES = ("blob", "scratch", "patch", "scar")


PROCEDURAL = ("noise", "stripes", "checks", "gradient")


def perlin_noise(hw: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1] with ``res`` lattice cells per axis; any ``hw``."""
    h, w = hw
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    ys = np.linspace(0, ry, h, endpoint=False)
    xs = np.linspace(0, rx, w, endpoint=False)
    yi, xi = ys.astype(int), xs.astype(int)
    yf, xf = (ys - yi)[:, None], (xs - xi)[None, :]

    def dot(dy, dx):
        g = grad[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(xf), fade(yf)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (np.sqrt(2) * (top * (1 - v) + bottom * v)).astype(np.float32)


def blob_mask(hw: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """DRAEM's shape: Perlin noise at a random scale per axis (2^0..2^6 cells, so round, long
    and many small blobs all occur), rotated, thresholded."""
    scale = 2 ** rng.integers(0, 7, 2)
    noise = perlin_noise(hw, (int(scale[0]), int(scale[1])), rng)
    angle = float(rng.uniform(-90, 90))
    rot = cv2.getRotationMatrix2D((hw[1] / 2, hw[0] / 2), angle, 1.0)
    noise = cv2.warpAffine(noise, rot, (hw[1], hw[0]), borderMode=cv2.BORDER_REFLECT)
    return noise > threshold


def scratch_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """1-3 thin curves (quadratic Bezier), 1 to ~1 % of the image side thick."""
    h, w = hw
    m = np.zeros(hw, np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        p = rng.uniform([0, 0], [w, h], (3, 2))
        t = np.linspace(0, 1, 64)[:, None]
        pts = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]
        thick = int(rng.integers(1, max(2, min(h, w) // 100) + 1))
        cv2.polylines(m, [np.round(pts).astype(np.int32)], False, 1, thick)
    return m > 0


def patch_box(hw: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(y0, x0, ph, pw)`` of a CutPaste rectangle: 0.5-8 % of the image, aspect 0.3-3.3."""
    h, w = hw
    area = rng.uniform(0.005, 0.08) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    ph = int(np.clip(np.sqrt(area * aspect), 2, h - 1))
    pw = int(np.clip(np.sqrt(area / aspect), 2, w - 1))
    return int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1)), ph, pw


def scar_mask(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A thin rotated strip (CutPaste-scar)."""
    h, w = hw
    length = rng.uniform(0.1, 0.4) * min(h, w)
    width = rng.uniform(0.01, 0.04) * min(h, w) + 1
    c = (float(rng.uniform(0, w)), float(rng.uniform(0, h)))
    box = cv2.boxPoints((c, (width, length), float(rng.uniform(0, 180)))).astype(np.int32)
    m = np.zeros(hw, np.uint8)
    cv2.fillPoly(m, [box], 1)
    return m > 0


def procedural_texture(hw: tuple[int, int], channels: int, rng: np.random.Generator) -> np.ndarray:
    """Noise, stripes, checks or a smooth gradient, in random colours: ``(H, W, C)`` float32."""
    h, w = hw
    kind = PROCEDURAL[int(rng.integers(len(PROCEDURAL)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "noise":
        t = cv2.GaussianBlur(rng.random(hw).astype(np.float32), (0, 0), float(rng.uniform(0.5, 3)))
    elif kind == "stripes":
        period, ang = rng.uniform(3, 20), rng.uniform(0, np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period)
    elif kind == "checks":
        s = int(rng.integers(3, 16))
        t = (((yy // s) + (xx // s)) % 2).astype(np.float32)
    else:
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / max(h, w)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    lo, hi = rng.random(channels), rng.random(channels)
    return (lo + (hi - lo) * t[..., None]).astype(np.float32)


def foreign_texture(other: np.ndarray, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Another image as a filling: random crop, rotation by 90 degrees, flip, colour shift."""
    img = np.rot90(other, int(rng.integers(4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    oh, ow = img.shape[:2]
    s = rng.uniform(0.3, 1.0)
    ch, cw = max(2, int(oh * s)), max(2, int(ow * s))
    y0, x0 = int(rng.integers(0, oh - ch + 1)), int(rng.integers(0, ow - cw + 1))
    crop = cv2.resize(np.ascontiguousarray(img[y0 : y0 + ch, x0 : x0 + cw]), (hw[1], hw[0]),
                      interpolation=cv2.INTER_LINEAR)
    crop = crop.reshape(*hw, -1).astype(np.float32)
    gain = rng.uniform(0.5, 1.5, crop.shape[-1])
    shift = rng.uniform(-0.3, 0.3, crop.shape[-1])
    if rng.random() < 0.5:
        crop = 1.0 - crop  # inverted contrast: dark defects on bright parts and the other way round
    return np.clip(crop * gain + shift, 0, 1).astype(np.float32)


def blend(img: np.ndarray, fill: np.ndarray, mask: np.ndarray, opacity: float) -> np.ndarray:
    """``img`` with ``fill`` blended at ``opacity`` inside ``mask``; outside it ``img``'s own pixels."""
    m = mask[..., None]
    mixed = (1.0 - opacity) * img + opacity * fill
    return np.where(m, mixed, img).astype(np.float32)


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
