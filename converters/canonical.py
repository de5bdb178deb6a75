"""The canonical per-image format for ground truth and for every model's predictions.

One JSON Lines file per run.  The first line is a header, every other line one image::

    {"format": "defectkit.predictions/1", "kind": "ground_truth" | "predictions",
     "model": "<name>", "classes": ["crack", ...], "data_root": "<abs path>",
     "manifest": "<path or null>", "created": "<ISO time>", ...free-form extras...}
    {"image": "bottle/test/crack/000.png",      # relative to data_root
     "key": "bottle/test/crack/000", "height": 900, "width": 900,
     "category": "bottle", "defect_type": "crack", "fold": "test",
     "boxes_xyxy": [[x0, y0, x1, y1], ...],     # pixels, half-open edges
     "labels": ["crack", ...],                  # names from the header's classes
     "scores": [0.93, ...] | null,              # null for ground truth
     "masks": [{"size": [h, w], "counts": "..."}, ...] | null,   # COCO RLE, one per box
     "anomaly_map": "maps/bottle__crack__000.npy" | null,        # relative to the file
     "image_score": 0.87 | null,
     "decision": "OK" | "NG", "uncertain": false}           # only in the output of predict

Detectors write boxes, labels and scores; SAM adds masks; anomaly models write an anomaly map,
an image score and (thresholded) boxes and masks.  The comparison and FiftyOne read only this.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectkit.converters.instances import decode_rle
from defectkit.core.atomic import atomic_write_text
from defectkit.core.errors import DataError, MissingFileError

FORMAT = "defectkit.predictions/1"
KINDS = ("ground_truth", "predictions")


class PredictionsFormatError(DataError):
    """A predictions file breaks the canonical format; the message names file, line and field."""


@dataclass
class ImageRecord:
    """One image's boxes, labels, optional scores, masks, anomaly map and image score."""

    image: str
    height: int
    width: int
    boxes_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    labels: list[str] = field(default_factory=list)
    scores: np.ndarray | None = None
    masks: list[dict] | None = None
    anomaly_map: str | None = None
    image_score: float | None = None
    key: str | None = None
    category: str | None = None
    defect_type: str | None = None
    fold: str | None = None
    decision: str | None = None  # predict on new images: "OK" | "NG" (written only when set)
    uncertain: bool | None = None  # predict: score within the review band around the threshold

    def __post_init__(self) -> None:
        self.boxes_xyxy = np.asarray(self.boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)

    def __len__(self) -> int:
        return len(self.boxes_xyxy)

    def decode_masks(self) -> np.ndarray:
        """``(N, H, W)`` bool; raises ``ValueError`` if the record has no masks."""
        if self.masks is None:
            raise ValueError(f"{self.image}: record has no masks")
        if not self.masks:
            return np.zeros((0, self.height, self.width), bool)
        return np.stack([decode_rle(r) for r in self.masks])

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "key": self.key,
            "height": int(self.height),
            "width": int(self.width),
            "category": self.category,
            "defect_type": self.defect_type,
            "fold": self.fold,
            "boxes_xyxy": [[round(float(v), 3) for v in b] for b in self.boxes_xyxy],
            "labels": list(self.labels),
            "scores": None if self.scores is None else [round(float(s), 6) for s in self.scores],
            "masks": self.masks,
            "anomaly_map": self.anomaly_map,
            "image_score": None if self.image_score is None else float(self.image_score),
        } | ({"decision": self.decision, "uncertain": bool(self.uncertain)} if self.decision is not None else {})


@dataclass
class Prediction:
    """One image's result of ``predict`` on new images, at the image's original size (written as an
    :class:`ImageRecord` with ``decision``; the anomaly map, if any, as a ``.npy`` beside it)."""

    image: str  # relative to the images root
    height: int
    width: int
    score: float
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    labels: list[str] = field(default_factory=list)
    box_scores: list[float] = field(default_factory=list)
    masks: list[dict] | None = None
    amap: np.ndarray | None = None  # anomaly map at (height, width)
    decision: str = ""
    uncertain: bool = False


def make_header(kind: str, model: str, classes: Sequence[str], data_root: str | Path,
                manifest: str | Path | None = None, **extra) -> dict:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"format": FORMAT, "kind": kind, "model": model, "classes": list(classes),
            "data_root": str(Path(data_root).resolve()), "manifest": None if manifest is None else str(manifest),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **extra}


def validate_record(rec: ImageRecord, header: dict, where: str = "") -> None:
    """Raise :class:`PredictionsFormatError` (prefixed with ``where``) if ``rec`` is inconsistent."""

    def bad(msg: str):
        raise PredictionsFormatError(f"{where}{rec.image}: {msg}")

    if rec.height <= 0 or rec.width <= 0:
        bad(f"height/width must be positive, got {rec.height}x{rec.width}")
    n = len(rec.boxes_xyxy)
    if len(rec.labels) != n:
        bad(f"{n} boxes but {len(rec.labels)} labels")
    unknown = sorted(set(rec.labels) - set(header["classes"]))
    if unknown:
        bad(f"labels {unknown} are not in the header's classes {header['classes']}")
    b = rec.boxes_xyxy
    if n and not np.isfinite(b).all():
        bad("boxes contain NaN or inf")
    if n and ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any():
        bad("a box has x1 < x0 or y1 < y0 (boxes are xyxy)")
    tol = 1e-3
    if n and ((b[:, :2] < -tol).any() or (b[:, 2] > rec.width + tol).any() or (b[:, 3] > rec.height + tol).any()):
        bad(f"a box lies outside the {rec.width}x{rec.height} image")
    if header["kind"] == "predictions" and rec.scores is None and n:
        bad("predictions need scores")
    if rec.scores is not None and len(rec.scores) != n:
        bad(f"{n} boxes but {len(rec.scores)} scores")
    if rec.masks is not None:
        if len(rec.masks) != n:
            bad(f"{n} boxes but {len(rec.masks)} masks")
        for m in rec.masks:
            if list(m.get("size", [])) != [rec.height, rec.width]:
                bad(f"mask size {m.get('size')} differs from the image's [{rec.height}, {rec.width}]")
    if rec.image_score is not None and not np.isfinite(rec.image_score):
        bad("image_score is not finite")


def write_records(path: str | Path, header: dict, records: Iterable[ImageRecord]) -> Path:
    """Validate every record and write the file atomically."""
    path = Path(path)
    lines = [json.dumps(header)]
    for i, r in enumerate(records, start=2):
        validate_record(r, header, f"{path}:{i}: ")
        lines.append(json.dumps(r.to_json(), separators=(",", ":")))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_records(path: str | Path) -> tuple[dict, list[ImageRecord]]:
    """Read and validate a canonical file.  Raises :class:`PredictionsFormatError` naming
    the file and line of the first problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MissingFileError(f"predictions file {path} does not exist") from None
    lines = text.splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError as e:
        raise PredictionsFormatError(f"{path}:1: header is not JSON: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PredictionsFormatError(f"{path}:1: not a {FORMAT} file (header format is "
                                     f"{None if not isinstance(header, dict) else header.get('format')!r})")
    if header.get("kind") not in KINDS or not isinstance(header.get("classes"), list):
        raise PredictionsFormatError(f"{path}:1: header needs kind in {KINDS} and a classes list")
    fields = set(ImageRecord.__dataclass_fields__)
    records = []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise PredictionsFormatError(f"{path}:{i}: not JSON: {e}") from e
        missing = {"image", "height", "width", "boxes_xyxy", "labels"} - set(d)
        if missing:
            raise PredictionsFormatError(f"{path}:{i}: missing fields {sorted(missing)}")
        rec = ImageRecord(**{k: v for k, v in d.items() if k in fields})
        validate_record(rec, header, f"{path}:{i}: ")
        records.append(rec)
    return header, records
