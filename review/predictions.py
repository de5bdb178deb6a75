"""The predictions-file API other packages use: find a run's files, read them grouped by model, the
class-agnostic view, union masks, per-pixel score maps, and the thresholds a run chose on its val fold
(read through :mod:`defectkit.core.deploy_spec`, the one reader of ``deploy.json``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectkit.converters.canonical import ImageRecord, read_records
from defectkit.converters.instances import decode_rle
from defectkit.core.deploy_spec import NAME as DEPLOY_NAME
from defectkit.core.deploy_spec import read_deploy_spec
from defectkit.core.errors import DataError, MissingFileError
from defectkit.review.metrics import resize_map

PRED_FILES = ("predictions.jsonl", "cascade_predictions.jsonl", "cascade_anomaly_predictions.jsonl")


def find_prediction_files(runs: list[Path]) -> list[Path]:
    files = []
    for r in runs:
        r = Path(r)
        if r.is_file():
            files.append(r)
            continue
        found = [r / f for f in PRED_FILES if (r / f).is_file()]
        if not found:  # a run per category (anomaly/train.py --category all)
            found = sorted(p for f in PRED_FILES for p in r.glob(f"*/{f}"))
        if not found:
            raise MissingFileError(f"{r} has no predictions.jsonl: is it a run folder of this suite?")
        files += found
    return files


def agnostic(records: list[ImageRecord]) -> list[ImageRecord]:
    """Copies of ``records`` with every label ``defect``: the class-agnostic view every model can be scored in."""
    out = []
    for r in records:
        c = ImageRecord(**{**r.__dict__})
        c.labels = ["defect"] * len(r)
        out.append(c)
    return out


def union_mask(rec: ImageRecord | None, hw, conf: float) -> np.ndarray | None:
    """The union of a record's masks scored at least ``conf`` (None when it has no masks)."""
    if rec is None or rec.masks is None:
        return None
    m = np.zeros(hw, bool)
    for k, rle in enumerate(rec.masks):
        if rec.scores is None or rec.scores[k] >= conf:
            m |= decode_rle(rle)
    return m


def pixel_score_map(rec: ImageRecord, run_dir: Path, hw) -> np.ndarray | None:
    """A per-pixel score map at image size: the anomaly map if any, else max(score x mask): the one
    definition every pixel AUROC of a predictions file uses (the comparison, the SAM cascade)."""
    if rec.anomaly_map:
        path = run_dir / rec.anomaly_map
        if not path.is_file():
            raise MissingFileError(f"{path} (anomaly map of {rec.image}) does not exist")
        return resize_map(np.load(path).astype(np.float32), hw)
    if rec.masks is None:
        return None
    s = np.zeros(hw, np.float32)
    for k, rle in enumerate(rec.masks):
        s = np.maximum(s, decode_rle(rle) * float(rec.scores[k] if rec.scores is not None else 1.0))
    return s


def run_name(path: Path, header: dict) -> str:
    return header.get("model", path.parent.name) + (" (cascade)" if path.name.startswith("cascade") else "")


def load_runs(runs: list[Path]) -> dict[str, tuple[list[Path], dict, list[ImageRecord], dict[str, Path]]]:
    """Every prediction file of ``runs``, read once, grouped by model: several files of one model
    (one anomaly run per category) become one run.  ``{name: (paths, header, records, run folder
    per image)}``."""
    out: dict[str, tuple[list[Path], dict, list[ImageRecord], dict[str, Path]]] = {}
    for p in find_prediction_files(runs):
        h, recs = read_records(p)
        name = run_name(p, h)
        if name not in out:
            out[name] = ([], h, [], {})
        paths, header, preds, dirs = out[name]
        if h["classes"] != header["classes"]:
            raise DataError(f"{p}: classes {h['classes']} differ from {paths[0]}'s {header['classes']}")
        paths.append(p)
        preds += recs
        dirs.update({r.image: p.parent for r in recs})
        thr = run_threshold(p, h)
        header.setdefault("_image_thresholds", {}).update({r.image: thr for r in recs if thr is not None})
    return out


def deploy_threshold(path: Path, key: str) -> float | None:
    """``thresholds[key]`` of the ``deploy.json`` beside a run's own predictions file (what the run chose on
    its val fold), None when there is none; a cascade file's neighbour is the SAM run's, not its detector's."""
    if path.name.startswith("cascade") or not (path.parent / DEPLOY_NAME).is_file():
        return None
    t = read_deploy_spec(path.parent).get("thresholds", {}).get(key)
    return None if t is None else float(t)


def run_threshold(path: Path, header: dict) -> float | None:
    """The image threshold a run chose on its val fold: in its predictions header (anomaly runs, one per
    category file) or its ``deploy.json`` (YOLO runs); None when it has none (SAM, the cascade)."""
    if header.get("image_threshold") is not None:
        return float(header["image_threshold"])
    return deploy_threshold(path, "image")


#: the box confidence a detector's boxes are kept at when its run chose none on the val fold (``--conf``)
DEFAULT_BOX_CONF = 0.25


def run_box_conf(path: Path, header: dict, default: float = DEFAULT_BOX_CONF) -> float:
    """The box confidence a run's masks and boxes are kept at: the one its run chose on the val fold
    (the cascade's header ``box_conf``; a YOLO run's ``deploy.json`` ``thresholds.box_conf``), else
    ``default`` (``--conf``); ``-inf`` for an anomaly run (its regions were thresholded already)."""
    if header.get("kind_of_model") == "anomaly":
        return -np.inf
    if header.get("box_conf") is not None:
        return float(header["box_conf"])
    c = deploy_threshold(path, "box_conf")
    return default if c is None else c
