"""FiftyOne review sessions: ground truth and every run's predictions on the same images.

    python -m defectkit.review.fiftyone_dataset --gt .../ground_truth.jsonl --runs work/runs/yolo/<run> ... \\
        --name defectkit-<data>-<category> [--launch --port 5151]
    make app                                  # the demo's runs, App on http://127.0.0.1:5151

The dataset is persistent and rebuilt on every call (a rerun refreshes it).  Fields:

* ``ground_truth``: instance detections with masks; ``gt_segmentation``: class-id masks;
  ``category``, ``defect_type``, ``fold`` fields and tags (the fold and the defect type);
* per run, ``<run>``: its detections (boxes, confidences, instance masks when it has them) at or above
  the box confidence the comparison scores it at (the run's own, chosen on its val fold, else
  ``--conf``): the boxes a detector keeps, not the thousands below its operating point;
  anomaly runs add ``<run>_heatmap`` (``fo.Heatmap`` with an explicit ``range``, so the raw map
  values render) and ``<run>_mask`` (the thresholded map as a segmentation);
* ``evaluate_detections`` per run with eval key ``eval_<run>`` (class-agnostic for anomaly
  runs), and saved views ``missed defects: <run>`` and ``false alarms on good images: <run>``.

The database lives in ``work/fiftyone/db`` (``FIFTYONE_DATABASE_DIR``), the App binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import ImageRecord, read_records
from defectkit.converters.instances import decode_rle
from defectkit.core.cli import HelpFormatter, run_cli
from defectkit.core.errors import ConfigError, DataError, DefectkitError
from defectkit.core.paths import WORK
from defectkit.review.predictions import DEFAULT_BOX_CONF, load_runs, run_box_conf


class DatabaseError(DefectkitError):
    """FiftyOne's database (mongod) did not start."""


def configure_fiftyone() -> None:
    """Keep FiftyOne's database inside the project and quiet, before ``import fiftyone``."""
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(WORK / "fiftyone" / "db"))
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")


def field_name(name: str) -> str:
    f = re.sub(r"[^0-9a-zA-Z_]+", "_", name).strip("_").lower()
    return f if f and not f[0].isdigit() else f"run_{f}"


def _detections(rec: ImageRecord, labels: list[str] | None = None, conf: float = -np.inf):
    import fiftyone as fo

    dets = []
    for k, (x0, y0, x1, y1) in enumerate(rec.boxes_xyxy):
        if rec.scores is not None and rec.scores[k] < conf:
            continue
        kw = {}
        if rec.masks is not None:
            m = decode_rle(rec.masks[k])
            ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
            ix1, iy1 = max(int(np.ceil(x1)), ix0 + 1), max(int(np.ceil(y1)), iy0 + 1)
            kw["mask"] = m[iy0:iy1, ix0:ix1]
            x0, y0, x1, y1 = ix0, iy0, ix1, iy1
        if rec.scores is not None:
            kw["confidence"] = float(rec.scores[k])
        dets.append(
            fo.Detection(
                label=(labels or rec.labels)[k],
                bounding_box=[x0 / rec.width, y0 / rec.height, (x1 - x0) / rec.width, (y1 - y0) / rec.height],
                **kw,
            )
        )
    return fo.Detections(detections=dets)


def _import_fiftyone():
    """``import fiftyone`` (which starts its database), with a clear error when mongod cannot start."""
    configure_fiftyone()
    try:
        import fiftyone as fo

        fo.list_datasets()
    except Exception as e:  # FiftyOne's ServiceListenTimeout and kin: the database did not start
        if "failed to bind" not in str(e) and "ServiceListenTimeout" not in type(e).__name__:
            raise
        db = os.environ["FIFTYONE_DATABASE_DIR"]
        raise DatabaseError(
            f"FiftyOne's database did not start ({e}). Usually a mongod left over from a killed "
            f"session still holds {db}: stop it with  pkill -f 'mongod --dbpath {db}'  and rerun."
        ) from e
    return fo


def _gt_sample(fo, g: ImageRecord, data_root: Path, cid: dict[str, int], images: dict):
    s = fo.Sample(
        filepath=str(data_root / g.image),
        tags=[g.fold or "", g.defect_type or ""],
        category=g.category,
        defect_type=g.defect_type,
        fold=g.fold,
    )
    s["ground_truth"] = _detections(g)
    seg = np.zeros((g.height, g.width), np.uint8)
    if g.masks:
        for m, lab in zip(g.decode_masks(), g.labels, strict=True):
            seg[m] = cid[lab]
    images.setdefault("gt_segmentation", {})[s.filepath] = fo.Segmentation(mask=seg)
    return s


def _add_run(fo, samples: dict, fld: str, header: dict, preds: list[ImageRecord], dirs: dict[str, Path],
             images: dict, conf: float = -np.inf) -> None:
    """One run's detections scored at least ``conf`` into ``samples``, and for anomaly runs its heatmaps (one
    value range for the run) and masks into ``images`` ({field: {filepath: label}}, set by the caller)."""
    anomaly = header.get("kind_of_model") == "anomaly"
    maps = {
        r.image: np.load(dirs[r.image] / r.anomaly_map).astype(np.float32)
        for r in preds
        if r.image in samples and r.anomaly_map
    }
    lo = float(min((m.min() for m in maps.values()), default=0.0))
    hi = float(max((m.max() for m in maps.values()), default=1.0))
    for r in preds:
        s = samples.get(r.image)
        if s is None:
            continue
        s[fld] = _detections(r, ["defect"] * len(r) if anomaly else None, conf)
        if r.image in maps:
            images.setdefault(f"{fld}_heatmap", {})[s.filepath] = fo.Heatmap(map=maps[r.image], range=[lo, hi])
            if r.masks is not None:
                union = np.zeros((r.height, r.width), np.uint8)
                for rle in r.masks:
                    union[decode_rle(rle)] = 1
                images.setdefault(f"{fld}_mask", {})[s.filepath] = fo.Segmentation(mask=union)


def _set_image_labels(ds, images: dict[str, dict]) -> None:
    """The image-sized labels ({field: {filepath: label}}) in one write per field, once the samples are saved:
    FiftyOne re-serializes (zlib) every array of a sample each time the sample is saved, and evaluations save
    every sample once per run (24 of the demo's 33 s)."""
    for fld, by_path in images.items():
        ds.set_values(fld, by_path, key_field="filepath")


def _evaluate_runs(ds, run_fields: dict[str, dict]) -> None:
    """``evaluate_detections`` per run (class-agnostic for anomaly runs) and the saved review views."""
    from fiftyone import ViewField as F

    for fld, rh in run_fields.items():
        anomaly = rh.get("kind_of_model") == "anomaly"
        gt_field = "ground_truth"
        if anomaly:  # class-agnostic: compare with every ground-truth defect as "defect"
            gt_field = "gt_defect"
            if not ds.has_field(gt_field):
                ds.clone_sample_field("ground_truth", gt_field)
                ds.set_values(
                    f"{gt_field}.detections.label", [["defect"] * len(d) for d in ds.values(f"{gt_field}.detections")]
                )
        key = f"eval_{fld}"
        # on a view of the two fields: each sample's save then writes those two, not every run's labels and masks
        ds.select_fields([fld, gt_field]).evaluate_detections(fld, gt_field=gt_field, eval_key=key,
                                                              classwise=not anomaly, compute_mAP=False)
        ds.save_view(f"missed defects: {fld}", ds.match(F(f"{key}_fn") > 0))
        ds.save_view(
            f"false alarms on good images: {fld}", ds.match(F("defect_type") == "good").match(F(f"{key}_fp") > 0)
        )


def build_dataset(name: str, gt_path: Path, runs: list[Path], fold: str | None = "test", overwrite: bool = True,
                  conf: float = DEFAULT_BOX_CONF):
    """Create (or replace) the persistent FiftyOne dataset ``name``; returns it.  Detectors' boxes below
    their run's box confidence (``conf`` where the run chose none) are left out, as in the comparison."""
    header, gt = read_records(gt_path)
    groups = load_runs(runs)
    fo = _import_fiftyone()
    classes = header["classes"]
    data_root = Path(header["data_root"])
    gt = [g for g in gt if fold is None or g.fold == fold]
    if overwrite and name in fo.list_datasets():
        fo.delete_dataset(name)
    ds = fo.Dataset(name, persistent=True)
    ds.default_mask_targets = {i + 1: c for i, c in enumerate(classes)}
    cid = {c: i + 1 for i, c in enumerate(classes)}
    images: dict[str, dict] = {}  # segmentations and heatmaps, set after the evaluations (_set_image_labels)
    samples = {g.image: _gt_sample(fo, g, data_root, cid, images) for g in gt}
    run_fields = {}
    for rname, (paths, rh, preds, dirs) in groups.items():
        fld = field_name(rname)
        run_fields[fld] = rh
        _add_run(fo, samples, fld, rh, preds, dirs, images, run_box_conf(paths[0], rh, conf))
    ds.add_samples(list(samples.values()))
    _evaluate_runs(ds, run_fields)
    _set_image_labels(ds, images)
    ds.info = {"ground_truth": str(gt_path), "runs": {f: h.get("model") for f, h in run_fields.items()}, "fold": fold}
    ds.save()
    return ds


REVIEW_TAGS = ("missed defect", "false alarm")  # what a reviewer tags in the App; `harvest` lists them


def build_predict_dataset(name: str, outputs: list[Path], band_views: bool = True):
    """A dataset of new (production) images from ``predict`` output folders: each model's boxes, masks,
    heatmaps and decision; the first model's decision as tags (``ng``/``ok``, plus ``uncertain``) and the
    saved views "NG" and "uncertain, review first".  No ground truth: reviewers add tags in the App
    (``missed defect``, ``false alarm``) and :func:`harvest` lists the tagged images."""
    from fiftyone import ViewField as F

    groups = load_runs(outputs)
    fo = _import_fiftyone()
    if name in fo.list_datasets():
        fo.delete_dataset(name)
    ds = fo.Dataset(name, persistent=True)
    samples: dict[str, object] = {}
    images: dict[str, dict] = {}
    first = None
    for rname, (paths, rh, preds, dirs) in groups.items():
        if "run_kind" not in rh:
            raise DataError(f"{paths[0]} is not the output of predict (no run_kind in its header)")
        fld = field_name(rname)
        first = first or fld
        root = Path(rh["data_root"])
        for r in preds:
            if r.image not in samples:
                samples[r.image] = fo.Sample(filepath=str(root / r.image), tags=[])
        _add_run(fo, samples, fld, rh, preds, dirs, images)
        for r in preds:
            s = samples[r.image]
            s[f"{fld}_decision"] = r.decision
            s[f"{fld}_score"] = r.image_score
            if fld == first:
                s.tags = [r.decision.lower()] + (["uncertain"] if r.uncertain else [])
    ds.add_samples(list(samples.values()))
    _set_image_labels(ds, images)
    ds.save_view("NG", ds.match_tags("ng"))
    ds.save_view("uncertain, review first", ds.match_tags("uncertain").sort_by(F(f"{first}_score"), reverse=True))
    ds.info = {"predict_outputs": [str(p) for p in outputs], "models": list(groups), "review_tags": list(REVIEW_TAGS)}
    ds.save()
    return ds


def harvest(name: str, out: Path, tags: tuple[str, ...] = REVIEW_TAGS) -> Path:
    """The images a reviewer tagged in the App (``missed defect``, ``false alarm``, ...) as a CSV
    (image path, tags, the model's decision and score) to add to the dataset by hand."""
    import csv
    import io

    from defectkit.core.atomic import atomic_write_text

    fo = _import_fiftyone()
    if name not in fo.list_datasets():
        raise DataError(f"no FiftyOne dataset {name!r}: build it first (make app PREDICTIONS=...)")
    ds = fo.load_dataset(name)
    view = ds.match_tags(list(tags))
    first = field_name(ds.info.get("models", [""])[0]) if ds.info.get("models") else None
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["filepath", "review_tags", "decision", "score"])
    for s in view.iter_samples():
        review = [t for t in s.tags if t in tags]
        w.writerow([s.filepath, ";".join(review), s[f"{first}_decision"] if first else "",
                    s[f"{first}_score"] if first else ""])
    atomic_write_text(out, buf.getvalue())
    print(f"{len(view)} tagged image(s) ({', '.join(tags)}) -> {out}")
    return out


def launch(name: str, port: int = 5151, address: str = "127.0.0.1", wait: bool = True):
    configure_fiftyone()
    import fiftyone as fo

    session = fo.launch_app(fo.load_dataset(name), port=port, address=address, remote=True)
    print(f"FiftyOne App: http://{address}:{port}/datasets/{name}  (Ctrl-C to stop)")
    if wait:
        session.wait(-1)
    return session


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m defectkit.review.fiftyone_dataset",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--gt", type=Path, help="ground_truth.jsonl of a conversion (a test-fold review)")
    p.add_argument("--runs", type=Path, nargs="*", default=[])
    p.add_argument("--predictions", type=Path, nargs="+",
                   help="predict output folders instead of --gt/--runs: review new images (no ground truth)")
    p.add_argument("--harvest", type=Path, metavar="CSV",
                   help="write the images tagged in the App (missed defect, false alarm) to CSV and stop")
    p.add_argument("--name", required=True)
    p.add_argument("--fold", default="test", help="fold to load ('all' for every fold)")
    p.add_argument("--conf", type=float, default=DEFAULT_BOX_CONF,
                   help="box confidence detectors' boxes are kept at when their run chose none on val (as compare)")
    p.add_argument("--launch", action="store_true")
    p.add_argument("--port", type=int, default=5151)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(args: argparse.Namespace):
    for name in ("fiftyone", "eta"):  # they print through their own handlers; ours would print each line twice
        logging.getLogger(name).propagate = False
    if args.harvest:
        return harvest(args.name, args.harvest)
    if args.predictions:
        ds = build_predict_dataset(args.name, args.predictions)
    elif args.gt:
        ds = build_dataset(args.name, args.gt, args.runs, None if args.fold == "all" else args.fold, conf=args.conf)
    else:
        raise ConfigError("pass --gt (with --runs) for a test-fold review, or --predictions for predict outputs")
    print(f"FiftyOne dataset {args.name!r}: {len(ds)} samples, {len(ds.get_field_schema())} fields")
    for view in ds.list_saved_views():
        print(f"  saved view: {view}")
    if args.launch:
        launch(args.name, args.port)
    return ds


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
