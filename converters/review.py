"""FiftyOne review sessions: ground truth and every run's predictions on the same images.

    python -m defectkit.converters.review --gt .../ground_truth.jsonl --runs work/runs/yolo/<run> ... \\
        --name defectkit-<data>-<category> [--launch --port 5151]
    make app                                  # the demo's runs, App on http://127.0.0.1:5151

The dataset is persistent and rebuilt on every call (a rerun refreshes it).  Fields:

* ``ground_truth``: instance detections with masks; ``gt_segmentation``: class-id masks;
  ``category``, ``defect_type``, ``fold`` fields and tags (the fold and the defect type);
* per run, ``<run>``: its detections (boxes, confidences, instance masks when it has them);
  anomaly runs add ``<run>_heatmap`` (``fo.Heatmap`` with an explicit ``range``, so the raw map
  values render) and ``<run>_mask`` (the thresholded map as a segmentation);
* ``evaluate_detections`` per run with eval key ``eval_<run>`` (class-agnostic for anomaly
  runs), and saved views ``missed defects: <run>`` and ``false alarms on good images: <run>``.

The database lives in ``work/fiftyone/db`` (``FIFTYONE_DATABASE_DIR``), the App binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

from defectkit.converters.canonical import ImageRecord, read_records
from defectkit.converters.compare import load_runs

REPO = Path(__file__).resolve().parents[1]


def configure_fiftyone() -> None:
    """Keep FiftyOne's database inside the project and quiet, before ``import fiftyone``."""
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(REPO / "work" / "fiftyone" / "db"))
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")


def field_name(name: str) -> str:
    f = re.sub(r"[^0-9a-zA-Z_]+", "_", name).strip("_").lower()
    return f if f and not f[0].isdigit() else f"run_{f}"


def _detections(rec: ImageRecord, labels: list[str] | None = None):
    import fiftyone as fo

    from defectkit.converters.instances import decode_rle

    dets = []
    for k, (x0, y0, x1, y1) in enumerate(rec.boxes_xyxy):
        kw = {}
        if rec.masks is not None:
            m = decode_rle(rec.masks[k])
            ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
            ix1, iy1 = max(int(np.ceil(x1)), ix0 + 1), max(int(np.ceil(y1)), iy0 + 1)
            kw["mask"] = m[iy0:iy1, ix0:ix1]
            x0, y0, x1, y1 = ix0, iy0, ix1, iy1
        if rec.scores is not None:
            kw["confidence"] = float(rec.scores[k])
        dets.append(fo.Detection(label=(labels or rec.labels)[k],
                                 bounding_box=[x0 / rec.width, y0 / rec.height, (x1 - x0) / rec.width, (y1 - y0) / rec.height],
                                 **kw))
    return fo.Detections(detections=dets)


def build_dataset(name: str, gt_path: Path, runs: list[Path], fold: str | None = "test", overwrite: bool = True):
    """Create (or replace) the persistent FiftyOne dataset ``name``; returns it."""
    configure_fiftyone()
    import fiftyone as fo
    from fiftyone import ViewField as F

    header, gt = read_records(gt_path)
    classes = header["classes"]
    data_root = Path(header["data_root"])
    gt = [g for g in gt if fold is None or g.fold == fold]
    groups = load_runs(runs)

    if overwrite and name in fo.list_datasets():
        fo.delete_dataset(name)
    ds = fo.Dataset(name, persistent=True)
    ds.default_mask_targets = {i + 1: c for i, c in enumerate(classes)}
    cid = {c: i + 1 for i, c in enumerate(classes)}
    samples = {}
    for g in gt:
        s = fo.Sample(filepath=str(data_root / g.image), tags=[g.fold or "", g.defect_type or ""],
                      category=g.category, defect_type=g.defect_type, fold=g.fold)
        s["ground_truth"] = _detections(g)
        seg = np.zeros((g.height, g.width), np.uint8)
        if g.masks:
            for m, lab in zip(g.decode_masks(), g.labels, strict=True):
                seg[m] = cid[lab]
        s["gt_segmentation"] = fo.Segmentation(mask=seg)
        samples[g.image] = s

    run_fields = {}
    for rname, (_, rh, preds, dirs) in groups.items():
        fld = field_name(rname)
        run_fields[fld] = rh
        anomaly = rh.get("kind_of_model") == "anomaly"
        maps = {}
        for r in preds:
            if r.image in samples and r.anomaly_map:
                maps[r.image] = np.load(dirs[r.image] / r.anomaly_map).astype(np.float32)
        lo = float(min((m.min() for m in maps.values()), default=0.0))
        hi = float(max((m.max() for m in maps.values()), default=1.0))
        for r in preds:
            s = samples.get(r.image)
            if s is None:
                continue
            s[fld] = _detections(r, ["defect"] * len(r) if anomaly else None)
            if r.image in maps:
                s[f"{fld}_heatmap"] = fo.Heatmap(map=maps[r.image], range=[lo, hi])
                if r.masks is not None:
                    from defectkit.converters.instances import decode_rle

                    union = np.zeros((r.height, r.width), np.uint8)
                    for rle in r.masks:
                        union[decode_rle(rle)] = 1
                    s[f"{fld}_mask"] = fo.Segmentation(mask=union)
    ds.add_samples(list(samples.values()))

    for fld, rh in run_fields.items():
        anomaly = rh.get("kind_of_model") == "anomaly"
        gt_field = "ground_truth"
        if anomaly:  # class-agnostic: compare with every ground-truth defect as "defect"
            gt_field = "gt_defect"
            if not ds.has_field(gt_field):
                ds.clone_sample_field("ground_truth", gt_field)
                ds.set_values(f"{gt_field}.detections.label", [["defect"] * len(d) for d in ds.values(f"{gt_field}.detections")])
        key = f"eval_{fld}"
        ds.evaluate_detections(fld, gt_field=gt_field, eval_key=key, classwise=not anomaly, compute_mAP=False)
        ds.save_view(f"missed defects: {fld}", ds.match(F(f"{key}_fn") > 0))
        ds.save_view(f"false alarms on good images: {fld}", ds.match(F("defect_type") == "good").match(F(f"{key}_fp") > 0))
    ds.info = {"ground_truth": str(gt_path), "runs": {f: h.get("model") for f, h in run_fields.items()}, "fold": fold}
    ds.save()
    return ds


def launch(name: str, port: int = 5151, address: str = "127.0.0.1", wait: bool = True):
    configure_fiftyone()
    import fiftyone as fo

    session = fo.launch_app(fo.load_dataset(name), port=port, address=address, remote=True)
    print(f"FiftyOne App: http://{address}:{port}/datasets/{name}  (Ctrl-C to stop)")
    if wait:
        session.wait(-1)
    return session


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectkit.converters.review", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", type=Path, required=True)
    p.add_argument("--runs", type=Path, nargs="*", default=[])
    p.add_argument("--name", required=True)
    p.add_argument("--fold", default="test", help="fold to load ('all' for every fold)")
    p.add_argument("--launch", action="store_true")
    p.add_argument("--port", type=int, default=5151)
    a = p.parse_args(argv)
    try:
        ds = build_dataset(a.name, a.gt, a.runs, None if a.fold == "all" else a.fold)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # FiftyOne's ServiceListenTimeout and kin: the database did not start
        if "failed to bind" not in str(e):
            raise
        db = os.environ["FIFTYONE_DATABASE_DIR"]
        print(f"error: FiftyOne's database did not start ({e}). Usually a mongod left over from a killed "
              f"session still holds {db}: stop it with  pkill -f 'mongod --dbpath {db}'  and rerun.",
              file=sys.stderr)
        return 2
    print(f"FiftyOne dataset {a.name!r}: {len(ds)} samples, fields {sorted(ds.get_field_schema())}")
    print(f"saved views: {ds.list_saved_views()}")
    if a.launch:
        launch(a.name, a.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
