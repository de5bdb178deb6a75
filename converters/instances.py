"""Masks to instances, boxes, polygons and RLE: the pure core of every converter.

Conventions (one internal format, formats only at the edges):

* an image's defects are ``(N, H, W)`` bool masks, ``(N, 4)`` float pixel ``xyxy`` boxes and
  class ids;
* boxes have **half-open pixel edges**: a region covering columns 3..5 has ``x0 = 3``,
  ``x1 = 6``, so a one-pixel region is 1 wide, as ``pycocotools.mask.toBbox`` gives;
* polygons are in continuous image coordinates through **pixel centres** (pixel ``(r, c)`` has
  its centre at ``(c + 0.5, r + 0.5)``), so a polygon lies inside its box and is centred on it;
  ``floor`` turns a vertex back into a pixel index.
* an *instance* is one 8-connected region of a mask; its holes belong to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from defectkit.core.errors import ConfigError, DataError

CLASS_SCHEMES = ("defect", "single", "category_defect")


@dataclass(frozen=True)
class Instances:
    """The defects of one image.  ``masks`` ``(N, H, W)`` bool, ``boxes_xyxy`` ``(N, 4)``,
    ``areas`` ``(N,)`` pixel counts, ``class_ids`` ``(N,)`` int."""

    masks: np.ndarray
    boxes_xyxy: np.ndarray
    areas: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes_xyxy)

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])


def mask_to_instances(mask: np.ndarray, class_id: int = 0, min_area: int = 0) -> Instances:
    """Split a ``(H, W)`` mask (defect where > 0) into 8-connected regions, largest first.

    Regions smaller than ``min_area`` pixels are dropped (``0``: keep all, the default: tiny
    real defects are defects).  Holes inside a region stay holes.  Labelling runs on the
    bounding box of the defect pixels only, so the cost follows the defects, not the image.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise DataError(f"expected a (H, W) mask, got shape {m.shape}")
    h, w = m.shape
    if m.dtype == bool:
        binary = m.view(np.uint8)
    elif m.dtype == np.uint8:
        binary = cv2.threshold(m, 0, 1, cv2.THRESH_BINARY)[1]  # one SIMD pass
    else:
        binary = (m > 0).astype(np.uint8)
    bx, by, bw, bh = cv2.boundingRect(binary)
    if bw == 0 or bh == 0:
        return Instances(np.zeros((0, h, w), bool), np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, np.int64))
    crop = binary[by : by + bh, bx : bx + bw]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= max(1, min_area)]
    keep.sort(key=lambda i: (-stats[i, cv2.CC_STAT_AREA], stats[i, cv2.CC_STAT_TOP], stats[i, cv2.CC_STAT_LEFT]))
    masks = np.zeros((len(keep), h, w), bool)  # calloc'd: only the boxes below are touched
    boxes = np.zeros((len(keep), 4), np.float64)
    for k, i in enumerate(keep):
        x, y, ww, hh = stats[i, :4]
        masks[k, by + y : by + y + hh, bx + x : bx + x + ww] = labels[y : y + hh, x : x + ww] == i
        boxes[k] = [bx + x, by + y, bx + x + ww, by + y + hh]
    areas = np.array([stats[i, cv2.CC_STAT_AREA] for i in keep], dtype=np.int64)
    return Instances(masks, boxes, areas, np.full(len(keep), class_id, dtype=np.int64))


def select(inst: Instances, keep: np.ndarray) -> Instances:
    """The instances where ``keep`` (bool ``(N,)``) is true."""
    keep = np.asarray(keep, bool)
    return Instances(inst.masks[keep], inst.boxes_xyxy[keep], inst.areas[keep], inst.class_ids[keep])


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` masks to ``(N, 4)`` half-open ``xyxy`` boxes (all zeros for an empty mask)."""
    masks = np.asarray(masks, bool)
    out = np.zeros((len(masks), 4), np.float64)
    for k, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if len(rows):
            out[k] = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes -> ``(N, M)``."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def iou_dice(a: np.ndarray, b: np.ndarray, empty: float = float("nan")) -> tuple[float, float]:
    """IoU and Dice of two bool masks of one size: the suite's one definition.

    When both are empty there is no overlap to score and both are ``empty``: NaN by default, so
    an image with no defect and no prediction is left out of means (evaluation); a fidelity check
    of a redraw against its source passes ``empty=1.0`` (nothing was redrawn as nothing).
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise DataError(f"masks differ in size: {a.shape} vs {b.shape}")
    inter = int(np.count_nonzero(a & b))
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return empty, empty
    return inter / (total - inter), 2 * inter / total


def mask_iou(a: np.ndarray, b: np.ndarray, empty: float = float("nan")) -> float:
    """IoU of two bool masks of one size (``empty`` when both are empty; see :func:`iou_dice`)."""
    return iou_dice(a, b, empty)[0]


# ------------------------------------------------------------------------------ polygons


def _bridge(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Join ``hole`` into ``outer`` through their closest vertices by a zero-width cut."""
    d = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    hole_loop = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([outer[: i + 1], hole_loop, outer[i:]])


def region_to_polygon(region: np.ndarray) -> np.ndarray:
    """One connected region (``(H, W)`` bool) to one polygon, ``(K, 2)`` float ``xy``.

    The outer contour is traced through boundary pixel centres; each hole's contour is joined
    to it by a zero-width cut between their nearest vertices, so that one polygon (what YOLO-seg
    allows per object) redraws the region with its holes under an even-odd fill
    (:func:`polygon_to_mask`).  Degenerate contours (one or two pixels) repeat vertices to reach
    the three points Ultralytics expects.  Raises ``ValueError`` on an empty region.
    """
    m = np.ascontiguousarray(region, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise ValueError("empty region has no polygon")
    hier = hierarchy[0]
    outers = [k for k in range(len(contours)) if hier[k][3] < 0]
    # one region -> one outer contour; if several (should not happen for 8-connected input),
    # keep the largest: callers pass single regions from mask_to_instances.
    outer_k = max(outers, key=lambda k: len(contours[k]))
    poly = contours[outer_k].reshape(-1, 2).astype(np.float64)
    for k in range(len(contours)):
        if hier[k][3] == outer_k:
            poly = _bridge(poly, contours[k].reshape(-1, 2).astype(np.float64))
    while len(poly) < 3:
        poly = np.concatenate([poly, poly[:1]])
    return poly + 0.5


def polygon_to_mask(poly: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Redraw a polygon from :func:`region_to_polygon` (pixel-centre coordinates) as a mask.

    Uses OpenCV's scan-line fill, whose alternating edge pairs make the bridged holes empty.
    """
    pts = np.floor(np.asarray(poly, float)).astype(np.int32).reshape(-1, 1, 2)
    out = np.zeros(image_hw, np.uint8)
    cv2.fillPoly(out, [pts], 1, lineType=cv2.LINE_8)
    return out.astype(bool)


def region_to_coco_polygon(region: np.ndarray) -> np.ndarray:
    """A hole-free region to a polygon that pycocotools rasterises back exactly.

    pycocotools fills a pixel when its centre is inside the polygon.  Tracing the region at 2x
    (nearest) resolution and mapping back gives an outline a quarter pixel inside the region's
    pixel edges: every region pixel centre is inside with 0.25 px to spare, every neighbour's
    centre outside with 0.75 px, and one-pixel lines keep a width.  ``(K, 2)`` float ``xy``.
    """
    up = cv2.resize(np.asarray(region, np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise ValueError("empty region has no polygon")
    return (max(contours, key=len).reshape(-1, 2).astype(np.float64) + 0.5) / 2


# ------------------------------------------------------------------------------ RLE


def encode_rle(mask: np.ndarray, box_xyxy: Sequence[float] | None = None) -> dict:
    """``(H, W)`` mask -> COCO compressed RLE ``{"size": [H, W], "counts": str}`` (pycocotools).

    With ``box_xyxy`` (the mask is known to be empty outside it) the run lengths are counted on the
    box's columns only and the image around them is added as two zero runs: pycocotools' own
    ``encode`` would scan a column-major copy of the whole image (a 1024x1024 mask with a 30 px
    defect: ~0.5 ms against ~0.02 ms).  pycocotools still writes the compressed string, so the
    result is the same bytes as ``mask_utils.encode`` (tested on random masks).
    """
    from pycocotools import mask as mask_utils

    m = np.asarray(mask)
    h, w = m.shape
    if box_xyxy is None:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8, copy=False)))
        return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    cols = np.zeros((max(x1 - x0, 0), h), bool)  # the box's columns, full height, column-major order
    cols[:, y0:y1] = m[y0:y1, x0:x1].T != 0
    seq = cols.ravel()
    edges = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    bounds = np.concatenate([[0], edges, [seq.size]])
    runs = np.diff(bounds).tolist() if seq.size else []
    if runs and seq[0]:
        runs.insert(0, 0)  # RLE starts with a run of zeros
    before, after = x0 * h, (w - x1) * h
    if not runs:
        runs = [before + after]
    else:
        runs[0] += before
        if len(runs) % 2:  # ends on a zero run
            runs[-1] += after
        elif after:
            runs.append(after)
    rle = mask_utils.frPyObjects({"counts": runs, "size": [h, w]}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts, or uncompressed list counts) -> ``(H, W)`` bool."""
    from pycocotools import mask as mask_utils

    r = dict(rle)
    if isinstance(r["counts"], list):
        r = mask_utils.frPyObjects(r, *r["size"])
    elif isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(bool)


# ------------------------------------------------------------------------------ classes


def class_name(category: str, defect_type: str, scheme: str) -> str:
    """The class a defect belongs to under ``scheme`` (see :data:`CLASS_SCHEMES`)."""
    if scheme == "defect":
        return defect_type
    if scheme == "single":
        return "defect"
    if scheme == "category_defect":
        return f"{category}_{defect_type}"
    raise ConfigError(f"unknown class scheme {scheme!r}; choose one of {CLASS_SCHEMES}")


def class_names(pairs: Sequence[tuple[str, str]], scheme: str) -> list[str]:
    """Sorted class names for ``(category, defect_type)`` pairs; ``good`` is never a class."""
    return sorted({class_name(c, d, scheme) for c, d in pairs if d != "good"})
