"""The pixel-level scan of an indexed category: one decode per mask (and per image with ``deep``),
shared by validation and statistics: all-zero masks, stray mask values, corrupt files."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectkit.core.errors import DataError
from defectkit.core.progress import progress as bar
from defectkit.datasets.image_files import ImageReadError, read_image, read_mask
from defectkit.datasets.mvtec import CategoryIndex, DatasetLayoutError, Problem, Sample

log = logging.getLogger("defectkit.datasets.mvtec")


@dataclass(frozen=True)
class MaskFacts:
    """What a mask says, computed by :func:`analyze_mask` (pure)."""

    area: int  # defect pixels (value > 0)
    region_areas: tuple[int, ...]  # 8-connected regions, largest first
    stray_pixels: int  # pixels whose value is neither 0 nor the mask's maximum
    values: tuple[int, ...]  # distinct values, at most 8 listed

    @property
    def n_regions(self) -> int:
        return len(self.region_areas)


def mask_to_bool(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` mask of any dtype to ``(H, W)`` bool: defect wherever > 0."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.ndim != 2:
        raise DataError(f"expected a (H, W) or (H, W, C) mask, got shape {m.shape}")
    return m > 0


def analyze_mask(mask: np.ndarray) -> MaskFacts:
    """Area, 8-connected region areas and stray values of a raw mask array."""
    import cv2

    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    binary = (m > 0).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    areas = tuple(sorted((int(a) for a in stats[1:, cv2.CC_STAT_AREA]), reverse=True))
    top = m.max() if m.size else 0
    stray = int(np.count_nonzero((m > 0) & (m != top)))
    values = tuple(int(v) for v in np.unique(m)[:8])
    return MaskFacts(int(binary.sum()), areas, stray, values)


@dataclass(frozen=True)
class SampleScan:
    """A sample and what its mask says (None for a good image)."""

    sample: Sample
    mask: MaskFacts | None


def scan_one(sample: Sample, deep: bool) -> tuple[SampleScan | None, list[Problem]]:
    """One sample's scan and the problems it shows."""
    found: list[Problem] = []
    if deep:
        try:
            read_image(sample.image_path)
        except ImageReadError as e:
            return None, [Problem("corrupt_image", sample.image_path, str(e))]
    if sample.mask_path is None:
        return SampleScan(sample, None), found
    try:
        raw = read_mask(sample.mask_path, binary=False)
    except ImageReadError as e:
        return None, [Problem("corrupt_mask", sample.mask_path, str(e))]
    facts = analyze_mask(raw)
    if facts.area == 0:
        found.append(Problem("empty_mask", sample.mask_path, f"all-zero mask on defect image "
                             f"{sample.image_path.name} ({sample.defect_type}); kept as an image-level "
                             "defect with no pixel label", "warning"))
    if facts.stray_pixels:
        found.append(Problem("stray_mask_values", sample.mask_path, f"{facts.stray_pixels} pixel(s) "
                             f"with values other than 0 and {max(facts.values)} (values {list(facts.values)}); "
                             "every value > 0 counts as defect", "warning"))
    return SampleScan(sample, facts), found


def scan_category(
    index: CategoryIndex, *, deep: bool = False, workers: int = 2, progress: bool = True
) -> tuple[list[SampleScan], list[Problem]]:
    """Decode every mask (and every image if ``deep``) of ``index`` once.

    Returns the per-sample scans and the warnings (all-zero masks, stray values), counted by the
    caller.  Raises :class:`DatasetLayoutError` for corrupt files.
    """
    todo = [s for s in index.samples if deep or s.mask_path is not None]
    results: dict[Path, tuple[SampleScan | None, list[Problem]]] = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2/PIL decoding releases the GIL
        it = pool.map(lambda s: (s.image_path, scan_one(s, deep)), todo)
        for path, res in bar(it, total=len(todo), desc=f"scan {index.category}", disable=not progress, leave=False):
            results[path] = res
    scans, problems = [], []
    for s in index.samples:
        scan, found = results.get(s.image_path, (SampleScan(s, None), []))
        problems.extend(found)
        if scan is not None:
            scans.append(scan)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DatasetLayoutError(errors, index.root)
    warnings = [p for p in problems if p.severity == "warning"]
    counts = Counter(p.kind for p in warnings)
    if counts:
        log.warning("%s: %s", index.category, ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return scans, warnings
