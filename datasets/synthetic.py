"""The embedded default dataset: a deterministic synthetic MVTec-layout root.

Two categories, sized so that the whole pipeline runs in minutes on 2 CPU cores:

* ``washer`` (object, RGB, 256x256): a machined bronze washer on a dark belt, position and
  shading jittered.  Defects: ``scratch`` (thin bright curves), ``hole`` (round punch-throughs),
  ``contamination`` (2-4 separate dark-green blobs: several regions per mask), ``stain``
  (ring-shaped discolouration: a region with a hole in it).
* ``weave`` (texture, grayscale, 224x320, non-square): a woven fabric.  Defects: ``cut`` (thin
  dark line running in from an image border), ``tear`` (large bright patch torn in at an image
  border), ``speck`` (1-6 tiny dark specks, down to one pixel), ``stain`` (soft dark blob).

Every image is drawn from its own RNG seeded by ``(seed, category, split, defect, index)``, so
content does not depend on generation order, and NumPy's PCG64 makes it the same on any
machine.  Masks are exact: defects are painted *through* the mask that is saved (0/255 PNG).
The root is written to a temporary folder and renamed into place; a stamp file records the
generator version and seed so that a rerun reuses a complete root and never touches user data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from defectkit.core.atomic import atomic_dir
from defectkit.core.errors import ConfigError, OutputError, OutputExistsError
from defectkit.core.paths import WORK

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
STAMP = ".defectkit_synthetic.json"
DEFAULT_ROOT = WORK / "data" / "defectkit_synth"


@dataclass(frozen=True)
class CategorySpec:
    name: str
    kind: str  # "object" or "texture"
    hw: tuple[int, int]
    defects: tuple[str, ...]
    n_train_good: int = 40
    n_test_good: int = 16
    n_per_defect: int = 16


CATEGORIES: dict[str, CategorySpec] = {
    "washer": CategorySpec("washer", "object", (256, 256), ("contamination", "hole", "scratch", "stain")),
    "weave": CategorySpec("weave", "texture", (224, 320), ("cut", "speck", "stain", "tear")),
}


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# ------------------------------------------------------------------------------ good images


def _washer(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """RGB washer image, the washer's part mask, and its geometry (cx, cy, r_out, r_in)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    belt = 45 + 6 * np.sin(xx / 3.0 + rng.uniform(0, 6)) + rng.normal(0, 3, (h, w))
    img = np.repeat(belt[..., None], 3, axis=2)
    cx, cy = w / 2 + rng.uniform(-8, 8), h / 2 + rng.uniform(-8, 8)
    r_out, r_in = rng.uniform(96, 104), rng.uniform(30, 36)
    r = np.hypot(xx - cx, yy - cy)
    part = (r <= r_out) & (r >= r_in)
    light = np.deg2rad(rng.uniform(0, 360))
    ang = np.arctan2(yy - cy, xx - cx)
    shade = 0.85 + 0.15 * np.cos(ang - light) + 0.04 * np.sin(r / 2.2)  # machining grooves
    base = np.array([176, 128, 72], np.float32) * rng.uniform(0.95, 1.05)
    metal = shade[..., None] * base + rng.normal(0, 2.5, (h, w, 1))
    img[part] = metal[part]
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    return img, part, (cx, cy, r_out, r_in)


def _weave(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Grayscale woven fabric, float32."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(7.5, 8.5)
    phase = rng.uniform(0, 2 * np.pi, 2)
    warp = np.sin(2 * np.pi * xx / period + phase[0])
    weft = np.sin(2 * np.pi * yy / period + phase[1])
    checker = np.sign(np.sin(np.pi * xx / period + phase[0]) * np.sin(np.pi * yy / period + phase[1]))
    thread = np.where(checker > 0, warp, weft)
    light = 1 + 0.06 * np.sin(xx / w * np.pi + rng.uniform(0, 3)) * np.cos(yy / h * np.pi)
    img = (128 + 34 * thread) * light + rng.normal(0, 4, (h, w))
    return cv2.GaussianBlur(img.astype(np.float32), (3, 3), 0.7)


# ------------------------------------------------------------------------------ defect masks


def _polyline(rng, start, n, step, turn) -> np.ndarray:
    pts, angle = [np.asarray(start, float)], rng.uniform(0, 2 * np.pi)
    for _ in range(n):
        angle += rng.normal(0, turn)
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.round(pts).astype(np.int32)


def _point_in(rng, region: np.ndarray, margin: int = 0) -> tuple[int, int]:
    if margin:
        region = cv2.erode(region.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
    ys, xs = np.nonzero(region)
    i = rng.integers(len(ys))
    return int(xs[i]), int(ys[i])


def _washer_defect(rng, defect: str, hw, part: np.ndarray, geom) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    if defect == "scratch":
        x, y = _point_in(rng, part, margin=12)
        pts = _polyline(rng, (x, y), int(rng.integers(6, 14)), rng.uniform(5, 9), 0.25)
        cv2.polylines(m, [pts], False, 255, thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_8)
        m &= part.astype(np.uint8) * 255
    elif defect == "hole":
        x, y = _point_in(rng, part, margin=16)
        cv2.circle(m, (x, y), int(rng.integers(6, 16)), 255, -1, lineType=cv2.LINE_8)
    elif defect == "contamination":
        for _ in range(int(rng.integers(2, 5))):
            x, y = _point_in(rng, part, margin=8)
            axes = (int(rng.integers(4, 11)), int(rng.integers(2, 7)))
            cv2.ellipse(m, (x, y), axes, rng.uniform(0, 180), 0, 360, 255, -1, lineType=cv2.LINE_8)
    elif defect == "stain":
        x, y = _point_in(rng, part, margin=26)
        r = int(rng.integers(13, 24))
        cv2.circle(m, (x, y), r, 255, -1, lineType=cv2.LINE_8)
        cv2.circle(m, (x, y), r - int(rng.integers(4, 7)), 0, -1, lineType=cv2.LINE_8)
    else:
        raise ValueError(f"unknown washer defect {defect!r}")
    return m > 0


def _weave_defect(rng, defect: str, hw) -> np.ndarray:
    h, w = hw
    m = np.zeros(hw, np.uint8)
    if defect == "cut":
        side = int(rng.integers(4))
        start = [(rng.uniform(0.2, 0.8) * w, 0), (w - 1, rng.uniform(0.2, 0.8) * h),
                 (rng.uniform(0.2, 0.8) * w, h - 1), (0, rng.uniform(0.2, 0.8) * h)][side]
        inward = [np.pi / 2, np.pi, -np.pi / 2, 0][side] + rng.normal(0, 0.3)
        length = rng.uniform(0.3, 0.6) * min(h, w)
        end = (start[0] + length * np.cos(inward), start[1] + length * np.sin(inward))
        cv2.line(m, tuple(np.round(start).astype(int)), tuple(np.round(end).astype(int)), 255,
                 int(rng.integers(1, 3)), lineType=cv2.LINE_8)
    elif defect == "tear":
        side = int(rng.integers(4))
        c = [(rng.uniform(0.25, 0.75) * w, 0), (w - 1, rng.uniform(0.25, 0.75) * h),
             (rng.uniform(0.25, 0.75) * w, h - 1), (0, rng.uniform(0.25, 0.75) * h)][side]
        n = 12
        ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
        rad = rng.uniform(18, 34) * rng.uniform(0.6, 1.3, n)
        pts = np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], 1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 255, lineType=cv2.LINE_8)
    elif defect == "speck":
        for _ in range(int(rng.integers(1, 7))):
            x, y = int(rng.integers(4, w - 4)), int(rng.integers(4, h - 4))
            s = int(rng.integers(0, 3))  # 0 -> a single pixel
            m[y : y + s + 1, x : x + s + 1] = 255
    elif defect == "stain":
        x, y = int(rng.integers(30, w - 30)), int(rng.integers(30, h - 30))
        axes = (int(rng.integers(9, 22)), int(rng.integers(7, 16)))
        cv2.ellipse(m, (x, y), axes, rng.uniform(0, 180), 0, 360, 255, -1, lineType=cv2.LINE_8)
    else:
        raise ValueError(f"unknown weave defect {defect!r}")
    return m > 0


# ------------------------------------------------------------------------------ painting


def _paint(img: np.ndarray, mask: np.ndarray, colour, rng, noise: float = 4.0) -> np.ndarray:
    out = img.copy()
    colour = np.asarray(colour, np.float32)
    val = colour + rng.normal(0, noise, (int(mask.sum()),) + colour.shape)
    out[mask] = val
    return out


def make_sample(spec: CategorySpec, defect: str, seed: int, split: str, i: int) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (uint8; RGB for objects, grayscale for textures) and its bool mask (or None)."""
    rng = _rng(seed, spec.name, split, defect, i)
    mask = None
    if spec.kind == "object":
        img, part, geom = _washer(rng, spec.hw)
        if defect != "good":
            mask = _washer_defect(rng, defect, spec.hw, part, geom)
            colour = {
                "scratch": (235, 215, 175), "hole": (42, 42, 42),
                "contamination": (48, 78, 40), "stain": (92, 58, 34),
            }[defect]
            img = _paint(img, mask, colour, rng)
    else:
        img = _weave(rng, spec.hw)
        if defect != "good":
            mask = _weave_defect(rng, defect, spec.hw)
            level = {"cut": 35.0, "tear": 215.0, "speck": 20.0, "stain": 70.0}[defect]
            img = _paint(img, mask, level, rng, noise=6.0)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def _write_png(path: Path, arr: np.ndarray) -> None:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), arr):
        raise OutputError(f"cannot write {path}")


def _stamp(seed: int, categories: list[str]) -> dict:
    return {"generator": "defectkit.datasets.synthetic", "version": GENERATOR_VERSION, "seed": seed,
            "categories": categories, "license": "CC0-1.0 (synthetic)"}


def generate(root: str | Path = DEFAULT_ROOT, *, seed: int = 0, categories: list[str] | None = None,
             force: bool = False, progress: bool = True) -> Path:
    """Write the synthetic dataset to ``root`` (if it is not there already) and return ``root``.

    Raises:
        FileExistsError: ``root`` exists but was not written by this generator with the same
            version, seed and categories (pass ``force=True`` to replace it).
    """
    from defectkit.core.progress import progress as bar

    root = Path(root)
    categories = sorted(categories or CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ConfigError(f"unknown synthetic categories {unknown}; available: {sorted(CATEGORIES)}")
    want = _stamp(seed, categories)
    stamp = root / STAMP
    if root.exists() and not force:
        if stamp.is_file() and json.loads(stamp.read_text()) == want:
            log.info("synthetic dataset already complete at %s (seed %d); reusing it", root, seed)
            return root
        if any(root.iterdir()):
            raise OutputExistsError(
                f"{root} exists and is not this generator's output (version {GENERATOR_VERSION}, "
                f"seed {seed}); remove it or pass --force to replace it"
            )
    jobs = [(spec, split, d, i)
            for spec in (CATEGORIES[c] for c in categories)
            for split, d, n in [("train", "good", spec.n_train_good), ("test", "good", spec.n_test_good)]
            + [("test", d, spec.n_per_defect) for d in spec.defects]
            for i in range(n)]
    with atomic_dir(root) as tmp:
        for spec, split, d, i in bar(jobs, desc="generate synthetic dataset", disable=not progress):
            img, mask = make_sample(spec, d, seed, split, i)
            img_dir = tmp / spec.name / split / d
            img_dir.mkdir(parents=True, exist_ok=True)
            _write_png(img_dir / f"{i:03d}.png", img)
            if mask is not None:
                gt_dir = tmp / spec.name / "ground_truth" / d
                gt_dir.mkdir(parents=True, exist_ok=True)
                _write_png(gt_dir / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
        (tmp / "README.txt").write_text(
            "defectkit synthetic MVTec-layout dataset. Regenerate with `make generate`.\n"
            + "\n".join(f"{c.name} ({c.kind}, {c.hw[1]}x{c.hw[0]}): {', '.join(c.defects)}"
                        for c in (CATEGORIES[n] for n in categories)) + "\n"
        )
        (tmp / STAMP).write_text(json.dumps(want, indent=1) + "\n")
    log.info("wrote synthetic dataset (%d images) to %s", len(jobs), root)
    return root
