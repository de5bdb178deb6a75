"""Index MVTec AD-layout roots into frozen sample records.

Layouts understood (one *category* per folder under the root):

* MVTec AD, and VisA after its split script, and users' own data::

    <root>/<category>/train/good/<stem>.<ext>
    <root>/<category>/test/<good|defect>/<stem>.<ext>
    <root>/<category>/ground_truth/<defect>/<stem>_mask.<ext>   (or <stem>.<ext>)

* MVTec 3D-AD (RGB only; depth ``xyz/`` folders are ignored)::

    <root>/<category>/{train,validation,test}/<good|defect>/rgb/<stem>.png
    <root>/<category>/test/<defect>/gt/<stem>.png

Images may be png, jpg, jpeg, bmp or tif(f), grayscale or RGB, any size.  A mask pixel is a
defect wherever its value is > 0.

The indexer reads file headers only (sizes, channels): fast enough for all of MVTec AD.  Pixel
level checks (all-zero masks, stray mask values, corrupt image data) are done by
:func:`defectkit.datasets.scan.scan_category`, which decodes every mask (and every image when ``deep=True``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from defectkit.core.errors import DataError, MissingFileError
from defectkit.datasets.image_files import ImageReadError, read_header

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
SPLITS = ("train", "validation", "test")  # "validation" exists only in MVTec 3D-AD


class DatasetLayoutError(DataError):
    """The dataset on disk is not usable as it is.  The message names the files and the fix."""

    def __init__(self, problems: Sequence[Problem], root: Path):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"{len(self.problems)} layout problem(s) under {root}:\n{shown}{more}\n"
            "Expected MVTec AD layout: <category>/train/good/*, <category>/test/<defect>/*, "
            "<category>/ground_truth/<defect>/<stem>_mask.png for every defect image."
        )


@dataclass(frozen=True)
class Problem:
    """One finding about one file.  ``severity`` is ``"error"`` or ``"warning"``."""

    kind: str
    path: Path
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Sample:
    """One image of an MVTec-layout dataset.

    ``split`` is the split the *dataset* puts the image in (``train``, ``test`` or, for MVTec
    3D-AD, ``validation``); the suite's own train/val/test folds live in the split manifest.
    ``image_hw`` and ``channels`` come from the file header.
    """

    root: Path
    category: str
    split: str
    defect_type: str
    image_path: Path
    mask_path: Path | None
    image_hw: tuple[int, int]
    channels: int

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != GOOD

    @property
    def stem(self) -> str:
        return self.image_path.stem

    @property
    def key(self) -> str:
        """A stable id: ``<category>/<split>/<defect_type>/<stem>``."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.stem}"

    @property
    def relpath(self) -> str:
        return self.image_path.relative_to(self.root).as_posix()

    @property
    def mask_relpath(self) -> str | None:
        return None if self.mask_path is None else self.mask_path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class CategoryIndex:
    """All samples of one category, sorted by key, plus warnings found while indexing."""

    root: Path
    category: str
    layout: str  # "mvtec_ad" or "mvtec_3d"
    samples: tuple[Sample, ...]
    warnings: tuple[Problem, ...] = field(default=())

    def select(self, split: str | None = None, defect_type: str | None = None) -> list[Sample]:
        return [
            s
            for s in self.samples
            if (split is None or s.split == split)
            and (defect_type is None or s.defect_type == defect_type)
        ]

    @property
    def defect_types(self) -> list[str]:
        """Defect types (``good`` excluded), sorted: the default class order of the suite."""
        return sorted({s.defect_type for s in self.samples if s.is_anomalous})


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p)) if folder.is_dir() else []


def looks_like_category(folder: Path) -> bool:
    return folder.is_dir() and any((folder / s).is_dir() for s in ("train", "test"))


def list_categories(root: str | Path) -> list[str]:
    """Category folders under ``root`` (those with a ``train/`` or ``test/`` folder), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(
            f"dataset root {root} does not exist; point DATA at the folder that holds the "
            "category folders (e.g. the extracted mvtec_anomaly_detection/)"
        )
    return sorted(p.name for p in root.iterdir() if looks_like_category(p))


def resolve_categories(root: str | Path, category: str | Iterable[str]) -> list[str]:
    """Turn ``"all"``, one name or several names into a checked list of category names.

    Raises:
        DatasetLayoutError: an unknown category, or a root with no category at all.
    """
    root = Path(root)
    available = list_categories(root)
    if not available:
        raise DatasetLayoutError(
            [Problem("no_category", root, "no category folder (none has train/ or test/)")], root
        )
    wanted = available if category == "all" else [category] if isinstance(category, str) else list(category)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DatasetLayoutError(
            [
                Problem("unknown_category", root / c, f"unknown category {c!r}; available: {', '.join(available)}")
                for c in unknown
            ],
            root,
        )
    return wanted


def _detect_layout(cat_dir: Path) -> str:
    return "mvtec_3d" if (cat_dir / "train" / GOOD / "rgb").is_dir() or (
        cat_dir / "test" / GOOD / "rgb"
    ).is_dir() else "mvtec_ad"


def _mask_candidates(gt_dir: Path, stem: str) -> list[Path]:
    names = [f"{stem}_mask", stem]
    return [gt_dir / f"{n}{ext}" for n in names for ext in IMAGE_EXTENSIONS]


def _index_image(img: Path, cat_dir: Path, type_dir: Path, layout: str, defect: str,
                 problems: list[Problem], used_masks: set[Path]) -> tuple[tuple[int, int], int, Path | None] | None:
    """Header size, channels and mask of one image; ``None`` (and a problem recorded) when unusable."""
    try:
        hw, ch = read_header(img)
    except ImageReadError as e:
        problems.append(Problem("unreadable_image", img, str(e)))
        return None
    if defect == GOOD:
        return hw, ch, None
    gt_dir = type_dir / "gt" if layout == "mvtec_3d" else cat_dir / "ground_truth" / defect
    found = [m for m in _mask_candidates(gt_dir, img.stem) if m.is_file()]
    if not found:
        problems.append(Problem("missing_mask", img, f"defect image has no mask; expected "
                                f"{gt_dir / (img.stem + '_mask.png')}"))
        return None
    mask_path = found[0]
    used_masks.add(mask_path)
    try:
        mhw, _ = read_header(mask_path)
    except ImageReadError as e:
        problems.append(Problem("unreadable_mask", mask_path, str(e)))
        return None
    if mhw != hw:
        problems.append(Problem("size_mismatch", mask_path, f"mask is {mhw[1]}x{mhw[0]} (WxH) but its image {img} "
                                f"is {hw[1]}x{hw[0]}; masks must match their image"))
        return None
    return hw, ch, mask_path


def _index_split(root: Path, category: str, split: str, layout: str, problems: list[Problem],
                 warnings: list[Problem], used_masks: set[Path]) -> list[Sample]:
    cat_dir = root / category
    split_dir = cat_dir / split
    samples: list[Sample] = []
    if not split_dir.is_dir():
        return samples
    for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect = type_dir.name
        images = _images_in(type_dir / "rgb" if layout == "mvtec_3d" else type_dir)
        if split == "train" and defect != GOOD and images:
            warnings.append(Problem("defect_in_train", type_dir, f"train split holds defect type {defect!r}; "
                                    "MVTec's train split is defect-free, so these are indexed but anomaly "
                                    "models will not train on them", "warning"))
        for img in images:
            found = _index_image(img, cat_dir, type_dir, layout, defect, problems, used_masks)
            if found is not None:
                samples.append(Sample(root, category, split, defect, img, found[2], found[0], found[1]))
    return samples


def _orphan_masks(cat_dir: Path, layout: str, used_masks: set[Path]) -> list[Problem]:
    """Masks that no image claims: usually a renamed or deleted image."""
    gt_dirs = (
        [d / "gt" for d in (cat_dir / "test").iterdir() if (d / "gt").is_dir()]
        if layout == "mvtec_3d" and (cat_dir / "test").is_dir()
        else sorted(p for p in (cat_dir / "ground_truth").iterdir() if p.is_dir())
        if (cat_dir / "ground_truth").is_dir()
        else []
    )
    out = []
    for gt_dir in gt_dirs:
        for m in _images_in(gt_dir):
            if m not in used_masks and gt_dir.name != GOOD:
                stem = m.stem.removesuffix("_mask")
                where = cat_dir / "test" / gt_dir.name if layout == "mvtec_ad" else gt_dir.parent / "rgb"
                out.append(Problem("orphan_mask", m, f"mask has no image; expected an image named {stem}.* in {where}"))
    return out


def index_category(root: str | Path, category: str) -> CategoryIndex:
    """Index one category: every image with its defect type, mask and header size.

    Raises:
        DatasetLayoutError: listing *every* problem found (defect image without a mask, mask
            without an image, mask size differing from its image, unreadable file, empty or
            unknown category), each naming its file.
    """
    root = Path(root)
    resolve_categories(root, category)
    cat_dir = root / category
    layout = _detect_layout(cat_dir)
    problems: list[Problem] = []
    warnings: list[Problem] = []
    used_masks: set[Path] = set()
    samples = [s for split in SPLITS for s in _index_split(root, category, split, layout, problems, warnings,
                                                           used_masks)]
    problems += _orphan_masks(cat_dir, layout, used_masks)
    if not samples and not problems:
        problems.append(Problem("empty_category", cat_dir, "category holds no image; expected train/good/*.png "
                                "and test/<defect>/*.png"))
    if problems:
        raise DatasetLayoutError(problems, root)
    samples.sort(key=lambda s: s.key)
    for w in warnings:
        log.warning("%s", w)
    return CategoryIndex(root, category, layout, tuple(samples), tuple(warnings))


def index_dataset(root: str | Path, category: str | Iterable[str] = "all") -> list[CategoryIndex]:
    """Index several categories (``"all"`` by default); see :func:`index_category`."""
    return [index_category(root, c) for c in resolve_categories(root, category)]
