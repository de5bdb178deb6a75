"""Fine-tune YOLO-World (and plain YOLO) on the defect classes written by ``make convert``.

Pretrained YOLO-World, offline (weights and CLIP copied to this machine beforehand)::

    python finetune/yolo.py --data work/out/<data>/converted/<cat>-defect/yolo/data.yaml \\
        --model yolov8s-worldv2 --weights-dir work/weights --text-embeddings clip \\
        --clip-model work/weights/clip/ViT-B-32.pt --epochs 50 --imgsz 640 --device 0

Plain YOLO detect / segment (segment models read the sibling ``yolo_seg/data.yaml``)::

    python finetune/yolo.py --data .../yolo/data.yaml --model yolo11n --epochs 50
    python finetune/yolo.py --data .../yolo/data.yaml --model yolo11n-seg --epochs 50

Offline from scratch (tests, the embedded demo; no pretrained weights, class embeddings are
deterministic hashes, so results are *not* a pretrained YOLO-World's and are labelled so)::

    python finetune/yolo.py --data .../yolo/data.yaml --model yolov8n-worldv2 --from-scratch \\
        --text-embeddings hash --epochs 30 --imgsz 256

Several GPUs: ``--device 0,1`` (Ultralytics' own DDP; the offline trainer is importable by the
workers).  ``--resume`` continues an interrupted run from ``<run>/weights/last.pt``.
``--epochs 0`` evaluates the untrained model (the baseline a from-scratch run must beat).

Each run folder (``--out``, or Ultralytics-style ``--project``/``--name``; default
``work/runs/yolo/<data>-<model>``) holds
Ultralytics' files (``args.yaml``, ``weights/best.pt``, ``weights/last.pt``, ``results.csv``)
plus ``run_args.json``, ``classes.json`` (trained names, order, prompts, embedding provider),
``metrics.json`` (test fold: Ultralytics' validator, pycocotools, image AUROC, speed) and
``predictions.jsonl`` in the canonical format.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from defectkit.core.atomic import atomic_write_json
from defectkit.core.cli import HelpFormatter, run_cli
from defectkit.core.config import apply_defaults, recipe, rename_flag
from defectkit.core.errors import MissingFileError
from defectkit.core.paths import WORK, claim_run_dir
from defectkit.core.training import mark_stage_done, share_time, stage_done, write_run_args
from defectkit.finetune.synthetic_pretrain import prepare
from defectkit.finetune.text_embeddings import PROVIDERS
from defectkit.finetune.yolo_core import (
    MODELS,
    YoloConfig,
    class_names,
    class_prompts,
    conversion_dir,
    data_for,
    default_data,
    prepare_text_embeddings,
    resolve_weights,
    run_dir_for,
    setup_env,
    train,
    untrained,
    write_text_embeddings,
)
from defectkit.finetune.yolo_deploy import write_spec
from defectkit.finetune.yolo_eval import evaluate
from defectkit.review.metrics import THRESHOLDS
from defectkit.review.summary import finish_run

log = logging.getLogger("defectkit.finetune.yolo")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="the conversion: make convert's folder or its yolo/data.yaml (default: the embedded demo's "
                        "conversion of --category)")
    p.add_argument("--category", default="all", help="with no --data: the conversion of this category")
    p.add_argument("--model", choices=sorted(MODELS), default="yolov8s-worldv2")
    p.add_argument("--weights", type=Path, default=None, help="pretrained .pt to start from (overrides --weights-dir)")
    p.add_argument(
        "--weights-dir", type=Path, default=WORK / "weights", help="where pretrained .pt files are looked up"
    )
    p.add_argument("--from-scratch", action=argparse.BooleanOptionalAction, default=False,
                   help="build the model from its yaml; no pretrained weights (--weights PATH overrides it)")
    p.add_argument(
        "--text-embeddings",
        choices=PROVIDERS,
        default="clip",
        help="YOLO-World class embeddings: local CLIP, a prepared file, or offline hashes (from scratch only)",
    )
    p.add_argument("--clip-model", type=Path, default=WORK / "weights" / "clip" / "ViT-B-32.pt")
    p.add_argument("--text-embeddings-file", type=Path, default=None)
    p.add_argument("--prompt-template", default="{defect}", help='e.g. "a {defect} on a {category}"')
    p.add_argument(
        "--make-text-embeddings",
        type=Path,
        default=None,
        metavar="OUT.pt",
        help="only write {name and prompt: embedding} for --data's classes with CLIP, then exit",
    )
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="'cpu', '0', '0,1' (DDP); default: GPU 0 if present")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers (Ultralytics' dataloader)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for training and inference (default: OMP_NUM_THREADS if set, else every core; "
                        "Ultralytics' own choice is cores - 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time", type=float, default=None, metavar="HOURS",
                   help="hours of training: the epoch count becomes what fits, as Ultralytics' time= "
                        "(with --synthetic-pretrain shared by the two stages in proportion to their epochs)")
    p.add_argument("--patience", type=int, default=50, help="early stopping on val fitness (Ultralytics)")
    p.add_argument("--optimizer", default="auto")
    p.add_argument(
        "--lr",
        "--lr0",
        dest="lr",
        type=float,
        default=None,
        help="initial learning rate (Ultralytics' lr0; default: Ultralytics' choice for --optimizer)",
    )
    p.add_argument("--close-mosaic", type=int, default=10)
    p.add_argument(
        "--nbs",
        type=int,
        default=64,
        help="Ultralytics' nominal batch: gradients are accumulated over nbs/batch batches per optimizer step; "
        "--nbs equal to --batch steps after every batch (small data on a CPU: 8x the optimizer steps at batch 8)",
    )
    p.add_argument("--val-begin", type=int, default=1, metavar="EPOCH",
                   help="validate from this epoch on (MMEngine's val_begin; the last epoch always is): the epochs "
                        "before it are never chosen as best.pt and cost no validation time")
    p.add_argument("--warmup-epochs", type=float, default=3.0, help="Ultralytics' warmup (lr and accumulation ramp)")
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ultralytics' training augmentation (mosaic, flips, HSV); --no-augment turns it off",
    )
    p.add_argument("--cache", action="store_true", help="cache decoded images in RAM")
    p.add_argument("--out", type=Path, default=None, help="run folder (default work/runs/yolo/<data>-<model>)")
    p.add_argument("--project", type=Path, default=None, help="Ultralytics-style: the run folder is PROJECT/NAME")
    p.add_argument("--name", default=None, help="Ultralytics-style run name (default <data>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue <out>/weights/last.pt")
    p.add_argument("--exist-ok", action="store_true", help="train over a finished run in --out (default: refused)")
    p.add_argument("--conf", type=float, default=0.001, help="confidence floor of the test predictions")
    p.add_argument("--threshold-rule", choices=THRESHOLDS, default="f1",
                   help="how the image threshold (on the highest box confidence) is chosen on the val fold")
    p.add_argument("--false-alarm-rate", type=float, default=0.01, help="for --threshold-rule percentile / false_alarm")
    p.add_argument("--max-false-alarm", type=float, default=None, metavar="RATE",
                   help="operating point: the image threshold rejects at most RATE of the good val images "
                        "(= --threshold-rule false_alarm --false-alarm-rate RATE)")
    p.add_argument("--synthetic-pretrain", type=int, default=0, metavar="N",
                   help="first pretrain on N synthetic defect images painted on the data's good images "
                        "(one class, 'defect'), then fine-tune on the real train fold from that checkpoint")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the synthetic stage (default --epochs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch output from Ultralytics")
    rename_flag(p, "--threshold", "--threshold-rule", choices=THRESHOLDS)  # --threshold T is a score in predict
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="Ultralytics training arguments passed through as they are, e.g. mosaic=0.5 hsv_v=0.2")
    # the recommended offline recipe is the default: `python finetune/yolo.py` with no flag runs it (--help shows it)
    apply_defaults(p, recipe("demo/yolo"), "configs/demo/yolo.yaml")
    return p


def main(args: argparse.Namespace) -> dict:
    setup_env(args.threads)
    cfg = YoloConfig.from_args(args)
    spec = MODELS[cfg.model]
    data_yaml = data_for(spec, (args.data or default_data(args.category)))
    if not data_yaml.is_file():
        raise MissingFileError(f"{data_yaml} does not exist; run `make convert` first (or pass --data)")
    names = class_names(data_yaml)
    conv = conversion_dir(data_yaml)
    prompts = class_prompts(names, conv, args.prompt_template)
    if args.make_text_embeddings:
        return write_text_embeddings(names, prompts, cfg.clip_model, args.make_text_embeddings)
    run_dir = claim_run_dir(run_dir_for(args.out, args.project, args.name, conv, cfg.model), cfg.resume,
                            args.exist_ok)
    source = resolve_weights(cfg, spec)
    info: dict = {
        "names": names,
        "prompts": prompts,
        "model": cfg.model,
        "start": source,
        "from_scratch": cfg.from_scratch,
        "pretrained": not cfg.from_scratch,
    }
    if spec["family"] == "world":
        import yaml

        train_dir = Path(yaml.safe_load(data_yaml.read_text())["path"]) / "images" / "train"
        info["text_embeddings"] = prepare_text_embeddings(cfg, names, prompts, train_dir)
    if args.synthetic_pretrain > 0:
        pre_epochs = args.pretrain_epochs or cfg.epochs
        source, info["synthetic_pretrain"] = synthetic_stage(
            dataclasses.replace(cfg, time=share_time(cfg.time, pre_epochs, pre_epochs + cfg.epochs)), spec, conv,
            run_dir, args.synthetic_pretrain, pre_epochs)
        cfg = dataclasses.replace(cfg, time=share_time(cfg.time, cfg.epochs, pre_epochs + cfg.epochs))
        info["start"] = source
        cfg = dataclasses.replace(cfg, recipe=f"synthetic pretrain {args.synthetic_pretrain}")
    write_run_args(run_dir, args)
    atomic_write_json(run_dir / "classes.json", info)
    metrics = train_and_evaluate(dataclasses.replace(cfg, resume=cfg.resume and (run_dir / "weights" / "last.pt")
                                                     .is_file()), spec, data_yaml, run_dir, source, names)
    if "synthetic_pretrain" in info:
        metrics["synthetic_pretrain"] = info["synthetic_pretrain"]
    metrics.update(
        {
            "model": cfg.model,
            "from_scratch": cfg.from_scratch,
            "data": str(data_yaml),
            "text_embeddings": info.get("text_embeddings", {}).get("provider"),
        }
    )
    if cfg.from_scratch:
        metrics["note"] = (
            metrics.get("note", "")
            + ("; " if metrics.get("note") else "")
            + (
                "trained from scratch"
                + (" with hash class embeddings" if spec["family"] == "world" else "")
                + (f", first on {args.synthetic_pretrain} synthetic defect images" if args.synthetic_pretrain else "")
                + ": not a pretrained model's result"
            )
        )
    metrics = finish_run(run_dir, "yolo", metrics)
    _print_summary(metrics, run_dir)
    return metrics


def synthetic_stage(cfg: YoloConfig, spec: dict, conv: Path, run_dir: Path, n: int, epochs: int) -> tuple[str, dict]:
    """Pretrain on synthetic defects (``<run>/pretrain``); returns its best weights and what was used.

    Resumable: a finished stage (``pretrain/done.json``) is reused; with ``--resume`` an interrupted
    one continues from ``pretrain/weights/last.pt``."""
    formats = ("yolo", "yolo_seg", "coco") if spec["task"] == "segment" else ("yolo", "coco")
    data = prepare(conv, n, cfg.seed, formats, progress=not cfg.quiet)
    pre_dir = run_dir / "pretrain"
    info = {**data.info, "conversion": str(data.conversion), "epochs": epochs, "weights": str(pre_dir / "weights"
                                                                                            / "best.pt")}
    if stage_done(pre_dir, info):
        return info["weights"], info
    pre_yaml = data_for(spec, data.conversion / "yolo" / "data.yaml")
    if spec["family"] == "world":
        import yaml

        train_dir = Path(yaml.safe_load(pre_yaml.read_text())["path"]) / "images" / "train"
        prepare_text_embeddings(cfg, ["defect"], ["defect"], train_dir)
    resume = cfg.resume and (pre_dir / "weights" / "last.pt").is_file()
    log.info("synthetic pretraining: %d images of %s, %d epochs -> %s", n, ", ".join(data.info["categories"]),
             epochs, pre_dir)
    train(dataclasses.replace(cfg, epochs=epochs, resume=resume), spec, pre_yaml, pre_dir, resolve_weights(cfg, spec))
    mark_stage_done(pre_dir, info)
    return info["weights"], info


def train_and_evaluate(
    cfg: YoloConfig, spec: dict, data_yaml: Path, run_dir: Path, source: str, names: list[str]
) -> dict:
    """Train (or, with 0 epochs, take the untrained model) and score ``weights/best.pt`` on the test fold."""
    t0 = time.perf_counter()
    if cfg.epochs == 0 and not cfg.resume:
        model = untrained(cfg, spec, data_yaml, names)
        metrics = evaluate(model, data_yaml, run_dir, cfg, spec, names, ultralytics_val=False)
        metrics["note"] = "untrained model (epochs 0): the baseline a from-scratch run must beat"
    else:
        train(cfg, spec, data_yaml, run_dir, source)
        train_s = time.perf_counter() - t0
        from ultralytics import YOLO, YOLOWorld

        best = run_dir / "weights" / "best.pt"
        model = (YOLOWorld if spec["family"] == "world" else YOLO)(str(best))
        metrics = {**evaluate(model, data_yaml, run_dir, cfg, spec, names), "train_seconds": train_s,
                   "weights": str(best)}
    if "thresholds" in metrics:  # chosen on the val fold: what predict on new images uses
        write_spec(run_dir, cfg, spec, names, metrics["thresholds"])
    return metrics


def _print_summary(m: dict, run_dir: Path) -> None:
    u, c = m.get("ultralytics", {}), m.get("pycocotools", {}).get("bbox", {})
    print(
        f"{m['model']} on the test fold ({m.get('test_images', '?')} images): "
        f"mAP50 {u.get('map50', float('nan')):.3f} / mAP50-95 {u.get('map50_95', float('nan')):.3f} (Ultralytics), "
        f"{c.get('map50', float('nan')):.3f} / {c.get('map50_95', float('nan')):.3f} (pycocotools), "
        f"image AUROC {m.get('image_auroc', float('nan')):.3f}, {m.get('images_per_s', float('nan')):.1f} images/s"
    )
    op, thr = m.get("at_threshold"), m.get("thresholds", {})
    if op:
        print(f"at the image threshold chosen on validation ({thr.get('rule')}): {op['fp']} of {op['fp'] + op['tn']} "
              f"good test images rejected (false-alarm rate {op['false_alarm_rate']:.3f}), {op['fn']} of "
              f"{op['fn'] + op['tp']} defective ones passed (miss rate {op['miss_rate']:.3f})")
    if m.get("note"):
        print(f"note: {m['note']}")
    print(f"run folder: {run_dir}")


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
