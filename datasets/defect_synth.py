"""Defects painted on good images with exact masks (as DRAEM, CutPaste and NSA do), for every model family.

Pure functions over arrays (float32 ``(H, W, C)`` images in [0, 1], bool masks), and one I/O
function that writes an MVTec-layout root (:func:`write_synthetic_root`), so the indexer, the
converters, YOLO and SAM consume synthetic defects unchanged.

* Shapes: ``blob`` (thresholded multi-octave Perlin noise: blobs of many sizes and aspect ratios,
  often several, often touching the border), ``scratch`` (1-3 thin curves), ``patch`` (CutPaste:
  a rectangle of the image itself, moved and colour-jittered) and ``scar`` (a thin rotated strip).
* Fillings: another good image of the dataset (rotated, flipped, colour-shifted: DRAEM's
  "foreign texture" without DTD), procedural textures (noise, stripes, checks, smooth gradients),
  or the user's own texture folder (``anomaly_source``, e.g. DTD).  Blended with an opacity drawn
  from (0.2, 1] as DRAEM does.
* The mask is exact: it is the set of pixels that were blended; every pixel outside it is the
  good image's, bit for bit.
* Objects vs textures: on objects (bottle, hazelnut, screw...) defects must land on the part, not
  on the background.  :func:`estimate_foreground` decides the mode from the good images (a median
  image clearly different from its border colour means an object on a background) and gives each
  image its own foreground mask; a defect is kept inside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from defectkit.core.errors import ConfigError
from defectkit.datasets.defect_shapes import (
    SHAPES,
    blend,
    blob_mask,
    foreign_texture,
    patch_box,
    procedural_texture,
    scar_mask,
    scratch_mask,
)

log = logging.getLogger("defectkit.datasets.defect_synth")


# ---------------------------------------------------------------------------------------- fillings


# ---------------------------------------------------------------------------------------- foreground


@dataclass(frozen=True)
class Foreground:
    """Where defects may go: ``object`` (the part, not the background) or ``texture`` (anywhere)."""

    mode: str
    border_color: tuple[float, ...] = ()
    threshold: float = 0.0
    object_fraction: float = 1.0

    def mask(self, img: np.ndarray) -> np.ndarray:
        """The foreground of one image (float ``(H, W, C)`` in [0, 1]): everywhere for textures."""
        if self.mode == "texture":
            return np.ones(img.shape[:2], bool)
        diff = np.abs(img - np.asarray(self.border_color, np.float32)).max(-1)
        diff = cv2.GaussianBlur(diff, (0, 0), max(1.0, min(img.shape[:2]) / 128))
        fg = (diff > self.threshold).astype(np.uint8)
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        fg = cv2.morphologyEx(cv2.morphologyEx(fg, cv2.MORPH_OPEN, k), cv2.MORPH_CLOSE, k)
        return fg > 0


def _border(img: np.ndarray, frac: float = 0.04) -> np.ndarray:
    h, w = img.shape[:2]
    b = max(1, int(round(min(h, w) * frac)))
    return np.concatenate([img[:b].reshape(-1, img.shape[-1]), img[-b:].reshape(-1, img.shape[-1]),
                           img[:, :b].reshape(-1, img.shape[-1]), img[:, -b:].reshape(-1, img.shape[-1])])


def estimate_foreground(goods: Sequence[np.ndarray], size: int = 128) -> Foreground:
    """Object or texture, from good images: an object category's border is one steady colour that
    the centre clearly differs from; a texture looks alike everywhere.

    ``goods``: float ``(H, W, C)`` images in [0, 1] (any sizes; at most 32 are used).
    """
    from skimage.filters import threshold_otsu

    small = [cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA).reshape(size, size, -1) for g in goods[:32]]
    borders = np.concatenate([_border(s) for s in small])
    color = np.median(borders, 0)
    border_spread = float(np.median(np.abs(borders - color).max(-1)))
    diffs = np.stack([np.abs(s - color).max(-1) for s in small])
    thr = float(threshold_otsu(diffs)) if np.ptp(diffs) > 0 else 1.0
    thr = max(thr, 3 * border_spread + 0.05)
    frac = float((diffs > thr).mean())
    # texture: no steady background colour, or "foreground" nearly everywhere / nowhere
    if border_spread > 0.08 or not 0.05 <= frac <= 0.85:
        return Foreground("texture", object_fraction=1.0)
    return Foreground("object", tuple(float(c) for c in color), thr, frac)


# ---------------------------------------------------------------------------------------- one image


@dataclass
class Synthesizer:
    """Paints one defect kind per call on a good image; deterministic for a given ``rng``.

    ``others``: good images to take foreign textures from; ``sources``: the user's textures.
    """

    foreground: Foreground = field(default_factory=lambda: Foreground("texture"))
    others: Sequence[np.ndarray] = ()
    sources: Sequence[np.ndarray] = ()
    shapes: tuple[str, ...] = SHAPES
    min_opacity: float = 0.2

    def shape_mask(self, kind: str, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """The defect's mask and, for CutPaste patches, their own filling."""
        hw = img.shape[:2]
        if kind == "blob":
            return blob_mask(hw, rng), None
        if kind == "scratch":
            return scratch_mask(hw, rng), None
        if kind == "scar":
            return scar_mask(hw, rng), None
        if kind == "patch":
            y0, x0, ph, pw = patch_box(hw, rng)
            y1, x1, _, _ = patch_box(hw, rng)
            y1, x1 = min(y1, hw[0] - ph), min(x1, hw[1] - pw)
            m = np.zeros(hw, bool)
            m[y1 : y1 + ph, x1 : x1 + pw] = True
            fill = img.copy()
            jitter = np.clip(img[y0 : y0 + ph, x0 : x0 + pw] * rng.uniform(0.6, 1.4) + rng.uniform(-0.15, 0.15), 0, 1)
            fill[y1 : y1 + ph, x1 : x1 + pw] = jitter
            return m, fill
        raise ConfigError(f"unknown defect shape {kind!r}; choose from {SHAPES}")

    def filling(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A foreign texture (user's folder or another good image) 70 % of the time, else procedural."""
        hw, c = img.shape[:2], img.shape[-1]
        pools = [p for p in (self.sources, self.others) if len(p)]
        if not pools or rng.random() >= 0.7:
            return procedural_texture(hw, c, rng)
        pool = pools[int(rng.integers(len(pools)))]
        tex = foreign_texture(pool[int(rng.integers(len(pool)))], hw, rng)
        if tex.shape[-1] != c:  # grey texture on an RGB part, or the other way round
            tex = tex.mean(-1, keepdims=True).repeat(c, -1)
        return tex

    def __call__(self, img: np.ndarray, rng: np.random.Generator, kind: str | None = None,
                 tries: int = 8) -> tuple[np.ndarray, np.ndarray, str]:
        """``(image with a defect, its exact bool mask, the shape kind)``.  On objects, the mask is
        cut to the foreground; a shape that misses it is drawn again (``tries`` times)."""
        kind = kind or self.shapes[int(rng.integers(len(self.shapes)))]
        fg = self.foreground.mask(img)
        for _ in range(tries):
            mask, fill = self.shape_mask(kind, img, rng)
            mask &= fg
            if mask.sum() >= 4:
                break
        else:  # nothing landed on the part: a small blob at its centre of mass
            ys, xs = np.nonzero(fg) if fg.any() else np.nonzero(np.ones_like(fg))
            cy, cx = int(np.mean(ys)), int(np.mean(xs))
            mask = np.zeros(fg.shape, bool)
            r = max(2, min(fg.shape) // 40)
            mask[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = True
            fill = None
        if fill is None:
            fill = self.filling(img, rng)
        opacity = float(rng.uniform(self.min_opacity, 1.0))
        return blend(img, fill, mask, opacity), mask, kind


# ---------------------------------------------------------------------------------------- I/O


def _to_float(rgb_or_gray: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb_or_gray)
    a = a[..., None] if a.ndim == 2 else a
    return a.astype(np.float32) / 255.0


def _to_uint8(img: np.ndarray) -> np.ndarray:
    a = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return a[..., 0] if a.shape[-1] == 1 else a


def load_sources(folder: Path | None, limit: int = 200) -> list[np.ndarray]:
    """The user's texture images (``--anomaly-source``), as float images, at most ``limit``."""
    from defectkit.core.errors import MissingFileError
    from defectkit.datasets.image_files import read_image
    from defectkit.datasets.mvtec import IMAGE_EXTENSIONS

    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"--anomaly-source {folder} is not a folder of texture images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    if not paths:
        raise MissingFileError(f"--anomaly-source {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return [_to_float(read_image(p)) for p in paths]


def _rng_for(seed: int, i: int) -> np.random.Generator:
    """Each synthetic image has its own stream: output i does not depend on how many came before."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "little"))


def write_synthetic_root(data_root: Path, category: str, out: Path, n: int, seed: int = 0,
                         anomaly_source: Path | None = None, good_fraction: float = 0.2,
                         shapes: tuple[str, ...] = SHAPES, progress: bool = True) -> dict:
    """Write ``out/<category>/`` in MVTec layout: ``train/good`` (the category's good images, linked),
    ``test/<shape>/`` with ``n`` synthetic defect images, ``ground_truth/<shape>/<stem>_mask.png``,
    ``test/good`` (``good_fraction * n`` unaltered good images), ``synthesis.json`` (mode, seed,
    counts) and ``montage.png``.  Written to a temporary folder and renamed: a rerun is safe.

    Raises:
        DataError: the category has no good training image.
    """
    from defectkit.core.atomic import atomic_dir, atomic_write_json
    from defectkit.core.errors import DataError
    from defectkit.core.progress import progress as bar
    from defectkit.datasets.image_files import read_image
    from defectkit.datasets.mvtec import index_category

    idx = index_category(data_root, category)
    goods = [s for s in idx.samples if s.split == "train" and s.defect_type == "good"]
    if not goods:
        raise DataError(f"{data_root / category}/train/good holds no image: nothing to paint defects on")
    gray = all(s.channels == 1 for s in goods)

    def load(s):
        a = read_image(s.image_path, rgb=not gray)
        return _to_float(a if not gray or a.ndim == 2 else a[..., 0])

    probe = [load(s) for s in goods[:32]]
    fg = estimate_foreground(probe)
    synth = Synthesizer(fg, probe, load_sources(anomaly_source), shapes)
    counts: dict[str, int] = {}
    examples = []
    with atomic_dir(Path(out) / category) as tmp:
        for s in goods:
            dst = tmp / "train" / "good" / s.image_path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(s.image_path.resolve())
        for i in bar(range(n), desc=f"synthesize {category}", disable=not progress):
            rng = _rng_for(seed, i)
            src = goods[int(rng.integers(len(goods)))]
            img, mask, kind = synth(load(src), rng)
            stem = f"{i:05d}"
            _write(tmp / "test" / kind / f"{stem}.png", _to_uint8(img))
            _write(tmp / "ground_truth" / kind / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
            counts[kind] = counts.get(kind, 0) + 1
            if len(examples) < 12:
                examples.append((img, mask, kind))
        n_good = max(1, int(round(good_fraction * n)))
        for j in range(n_good):
            src = goods[j % len(goods)]
            _write(tmp / "test" / "good" / f"good_{j:05d}.png", _to_uint8(load(src)))
        info = {"source": str(Path(data_root).resolve()), "category": category, "seed": seed, "images": n,
                "good_images": n_good, "per_shape": counts, "foreground_mode": fg.mode,
                "object_fraction": fg.object_fraction,
                "anomaly_source": str(anomaly_source) if anomaly_source else None,
                "note": "test/good and train/good share images: this root is for pretraining, not for scoring"}
        atomic_write_json(tmp / "synthesis.json", info)
        montage(examples, tmp / "montage.png")
    log.info("%d synthetic defect images of %s (%s mode) in %s", n, category, fg.mode, Path(out) / category)
    return info


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        from defectkit.core.errors import OutputError

        raise OutputError(f"cannot encode {path}")
    path.write_bytes(buf.tobytes())


def montage(examples: list[tuple[np.ndarray, np.ndarray, str]], path: Path, cols: int = 4) -> Path | None:
    """Examples with their mask outlines drawn in red, labelled by shape."""
    if not examples:
        return None
    tiles = []
    for img, mask, kind in examples:
        rgb = _to_uint8(img)
        rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB) if rgb.ndim == 2 else rgb.copy()
        rgb = cv2.resize(rgb, (192, 192), interpolation=cv2.INTER_AREA)
        m = cv2.resize(mask.astype(np.uint8), (192, 192), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, (255, 0, 0), 1)
        cv2.putText(rgb, kind, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(rgb)
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r : r + cols], 1) for r in range(0, len(tiles), cols)]
    _write(path, np.concatenate(rows, 0))
    return path


def summary(info: dict) -> str:
    return (f"{info['images']} synthetic defect images of {info['category']} ({info['foreground_mode']} mode: "
            + ("defects kept on the part" if info["foreground_mode"] == "object" else "defects anywhere")
            + f"), per shape {json.dumps(info['per_shape'])}, plus {info['good_images']} good images")
