"""``defectkit val``: re-score a trained run with its own weights and the threshold it chose on validation,
on a fold of the data it was trained on or on other data, as Ultralytics' ``yolo val`` does.

    defectkit val --run work/runs/anomaly/<run>/<category>             # an anomaly run: its test fold again
    defectkit val --run RUN --split all                                # every test image (anomaly: as papers)
    defectkit val --run RUN --data /data/other_line --category bottle  # anomaly: another MVTec-layout root
    defectkit val --run work/runs/yolo/<run>                           # a YOLO run: its conversion's test fold
    defectkit val --run work/runs/sam/<run> --data <conversion>        # the YOLO -> SAM cascade, other labels

``--data`` means what it means to the run's trainer: an MVTec-layout root for an anomaly run, a conversion
(``make convert``'s folder or its ``yolo/data.yaml``) for a YOLO or SAM run.  A YOLO or SAM run predicts the
split's images as ``defectkit predict`` would (a SAM run through its YOLO -> SAM cascade, prompted by the
detector's boxes, not the ground truth's) and is scored by ``defectkit compare``: ``--out`` (default
``<run>/val/<data>-<split>``) holds ``predictions/``, ``comparison.{md,json}`` and ``report.html``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from defectkit.core.cli import HelpFormatter, run_cli
from defectkit.core.errors import DataError, MissingFileError

SPLITS = ("test", "val", "all")  # a fold of the split manifest, or every test image


def run_conversion(run: Path) -> Path:
    """The conversion a YOLO or SAM run was trained on (its ``metrics.json`` ``data``)."""
    from defectkit.finetune.sam_data import conversion_folder

    m = Path(run) / "metrics.json"
    if not m.is_file():
        raise MissingFileError(f"{m} does not exist: the run did not finish (pass --data <conversion>)")
    data = json.loads(m.read_text()).get("data")
    if not data:
        raise DataError(f"{m} names no data: pass --data <conversion>")
    return conversion_folder(Path(data))


def validate_supervised(run: Path, kind: str, conversion: Path | None, split: str, out: Path | None,
                        backend: str = "torch") -> dict:
    """Predict ``split`` of the conversion with the run as deployed, then score it as the comparison does."""
    from defectkit.converters.canonical import read_records
    from defectkit.datasets.image_files import read_image
    from defectkit.deploy.predict import PREDICTORS, decide, write_outputs
    from defectkit.finetune.sam_data import conversion_folder
    from defectkit.review.compare import compare

    conv = conversion_folder(conversion) if conversion is not None else run_conversion(run)
    gt_path = conv / "ground_truth.jsonl"
    if not gt_path.is_file():
        raise MissingFileError(f"{gt_path} does not exist: --data must be a conversion (make convert's folder)")
    header, gt = read_records(gt_path)
    chosen = [g for g in gt if split == "all" or g.fold == split]
    if not chosen:
        raise DataError(f"{gt_path}: no image in the {split} fold")
    root = Path(header["data_root"])
    out = Path(out) if out is not None else Path(run) / "val" / f"{conv.name}-{split}"
    images = [(g.image, read_image(root / g.image)) for g in chosen]
    info, preds = PREDICTORS[kind](Path(run), images, backend)
    decide(preds, info["threshold"], 0.1)
    spec = json.loads((Path(run) / "deploy.json").read_text())
    box_conf = spec.get("thresholds", {}).get("box_conf", spec.get("conf"))
    write_outputs(out / "predictions", root, info, preds, dict(images), [],
                  {"run": str(Path(run).resolve()), "run_kind": kind, "image_threshold": info["threshold"],
                   "box_conf": box_conf, "backend": backend})
    (row,) = compare(gt_path, [out / "predictions"], out, fold=None if split == "all" else split)
    mask_ap = row.get("mask_ap") or row.get("mask_ap_class_agnostic") or {}
    return {"model": row["name"], "split": split, "data": str(conv), "images": row["images"],
            "map50": row.get("det_class_aware", {}).get("map50"),
            "map50_agnostic": row["det_class_agnostic"]["map50"], "mask_ap50": mask_ap.get("map50"),
            "image_auroc": row.get("image_auroc"), "pixel_iou": row.get("pixel_iou"),
            "operating_point": row.get("operating_point"), "out": str(out)}


def main(args: argparse.Namespace) -> dict:
    from defectkit.deploy.predict import run_kind

    kind = run_kind(args.run)
    if kind == "anomaly":
        from defectkit.anomaly import validate as anomaly_validate

        return anomaly_validate.main(args)
    m = validate_supervised(args.run, kind, args.data, args.split, args.out, args.backend)
    figures = ", ".join(f"{k} {m[k]:.3f}" for k in ("map50", "map50_agnostic", "mask_ap50", "image_auroc",
                                                     "pixel_iou") if isinstance(m.get(k), float))
    op = m.get("operating_point") or {}
    alarms = (f"; at the run's threshold {op['fp']} of {op['fp'] + op['tn']} good images rejected"
              if "fp" in op else "")
    print(f"{m['model']} on the {m['split']} split of {m['data']} ({m['images']} images): {figures}{alarms}")
    print(f"-> {m['out']}/comparison.md, {m['out']}/report.html")
    return m


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="defectkit val", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run", type=Path, required=True,
                   help="a trained run: an anomaly run's category folder, a YOLO run, or a SAM cascade run")
    p.add_argument("--data", type=Path, default=None,
                   help="anomaly: an MVTec-layout root; YOLO / SAM: a conversion (default: the run's own)")
    p.add_argument("--category", default=None, help="anomaly: default the run's category")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test / val: the split manifest's fold; all: every image of the official test/ split")
    p.add_argument("--manifest", type=Path, default=None, help="anomaly: the split manifest (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="anomaly: split seed when a manifest has to be written")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
