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
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

from defectkit.core.atomic import atomic_write_json
from defectkit.core.errors import ConfigError, DataError, MissingFileError, TrainingError
from defectkit.core.paths import WORK
from defectkit.core.progress import plain_ultralytics_bars

log = logging.getLogger("defectkit.finetune.yolo")

# name -> family (world | yolo), task, model yaml, pretrained weights file (Ultralytics names)
MODELS: dict[str, dict[str, str]] = {
    **{f"yolov8{s}-world": {"family": "world", "task": "detect", "yaml": f"yolov8{s}-world.yaml",
                            "weights": f"yolov8{s}-world.pt"} for s in "sml"},
    **{f"yolov8{s}-worldv2": {"family": "world", "task": "detect", "yaml": f"yolov8{s}-worldv2.yaml",
                              "weights": f"yolov8{s}-worldv2.pt"} for s in "nsmlx"},
    **{f"yolov8{s}": {"family": "yolo", "task": "detect", "yaml": f"yolov8{s}.yaml", "weights": f"yolov8{s}.pt"}
       for s in "nsm"},
    **{f"yolov8{s}-seg": {"family": "yolo", "task": "segment", "yaml": f"yolov8{s}-seg.yaml",
                          "weights": f"yolov8{s}-seg.pt"} for s in "nsm"},
    **{f"yolo11{s}": {"family": "yolo", "task": "detect", "yaml": f"yolo11{s}.yaml", "weights": f"yolo11{s}.pt"}
       for s in "nsm"},
    **{f"yolo11{s}-seg": {"family": "yolo", "task": "segment", "yaml": f"yolo11{s}-seg.yaml",
                          "weights": f"yolo11{s}-seg.pt"} for s in "nsm"},
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from defectkit.finetune.text_embeddings import PROVIDERS

    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="data.yaml written by make convert (default: the embedded demo's conversion of --category)")
    p.add_argument("--category", default="all", help="with no --data: the conversion of this category (default all)")
    p.add_argument("--model", choices=sorted(MODELS), default="yolov8s-worldv2")
    p.add_argument("--weights", type=Path, default=None, help="pretrained .pt to start from (overrides --weights-dir)")
    p.add_argument(
        "--weights-dir", type=Path, default=WORK / "weights", help="where pretrained .pt files are looked up"
    )
    p.add_argument("--from-scratch", action="store_true", help="build the model from its yaml; no pretrained weights")
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
    p.add_argument("--workers", type=int, default=2, help="dataloader workers")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--conf", type=float, default=0.001, help="confidence floor of the test predictions")
    p.add_argument("--synthetic-pretrain", type=int, default=0, metavar="N",
                   help="first pretrain on N synthetic defect images painted on the data's good images "
                        "(one class, 'defect'), then fine-tune on the real train fold from that checkpoint")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the synthetic stage (default --epochs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch output from Ultralytics")
    return p


@dataclass(frozen=True)
class YoloConfig:
    """Everything the trainer, the evaluation and the predictions need (only ``main()`` reads args)."""

    model: str = "yolov8s-worldv2"
    weights: Path | None = None
    weights_dir: Path = WORK / "weights"
    from_scratch: bool = False
    text_embeddings: str = "clip"
    clip_model: Path | None = None
    text_embeddings_file: Path | None = None
    epochs: int = 50
    imgsz: int = 640
    batch: int = 16
    device: str | None = None
    workers: int = 2
    seed: int = 0
    patience: int = 50
    optimizer: str = "auto"
    lr: float | None = None
    close_mosaic: int = 10
    nbs: int = 64
    warmup_epochs: float = 3.0
    augment: bool = True
    cache: bool = False
    resume: bool = False
    conf: float = 0.001
    quiet: bool = False
    recipe: str = ""  # e.g. "synthetic pretrain 400": shown beside the model name in comparisons

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> YoloConfig:
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})


# the Ultralytics hyper-parameters --no-augment sets to 0
NO_AUGMENT = {
    "mosaic": 0.0,
    "mixup": 0.0,
    "copy_paste": 0.0,
    "fliplr": 0.0,
    "flipud": 0.0,
    "hsv_h": 0.0,
    "hsv_s": 0.0,
    "hsv_v": 0.0,
    "degrees": 0.0,
    "translate": 0.0,
    "scale": 0.0,
    "erasing": 0.0,
}


# ---------------------------------------------------------------------------------------- helpers


def _setup_env() -> None:
    """Ultralytics writes settings to a config dir and goes online unless told not to."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(WORK / "ultralytics"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    plain_ultralytics_bars()


def resolve_weights(cfg: YoloConfig, spec: dict) -> str:
    """The .pt (or .yaml when training from scratch) the model starts from.

    Raises ``FileNotFoundError`` with what to do: Ultralytics would download the weights by
    name, which these machines cannot.
    """
    if cfg.from_scratch:
        return spec["yaml"]
    if cfg.weights is not None:
        if not cfg.weights.is_file():
            raise MissingFileError(f"--weights {cfg.weights} does not exist")
        return str(cfg.weights)
    local = cfg.weights_dir / spec["weights"]
    if local.is_file():
        return str(local)
    raise MissingFileError(
        f"pretrained weights {spec['weights']} not found in {cfg.weights_dir}. Ultralytics would download "
        f"them by name, which this machine cannot: fetch {spec['weights']} from the Ultralytics assets "
        f"releases on a machine with internet and copy it to {local}, pass --weights PATH, or train with "
        "--from-scratch (no pretraining; the run is labelled as such)."
    )


def conversion_dir(data_yaml: Path) -> Path:
    return data_yaml.resolve().parent.parent


def class_prompts(names: list[str], conv_dir: Path, template: str) -> list[str]:
    """One prompt per class; ``{category}`` comes from the ground truth of that class."""
    from defectkit.finetune.text_embeddings import prompt_for

    cats: dict[str, str] = {}
    gt = conv_dir / "ground_truth.jsonl"
    if gt.is_file():
        from defectkit.converters.canonical import read_records

        for r in read_records(gt)[1]:
            for lab in r.labels:
                cats.setdefault(lab, r.category or "")
    return [prompt_for(n, template, cats.get(n, "")) for n in names]


def _data_for(spec: dict, data: Path) -> Path:
    if spec["task"] == "segment" and data.parent.name == "yolo":
        seg = data.parent.parent / "yolo_seg" / "data.yaml"
        if not seg.is_file():
            raise MissingFileError(
                f"{spec['task']} models need YOLO-seg labels; {seg} is missing (make convert FORMATS=yolo_seg,...)"
            )
        log.info("segment model: using %s", seg)
        return seg
    return data


def _names(data_yaml: Path) -> list[str]:
    import yaml

    d = yaml.safe_load(data_yaml.read_text())
    names = d["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    bad = [n for n in names if "/" in n]
    if bad:
        raise DataError(
            f"{data_yaml}: class names {bad} contain '/', which Ultralytics' YOLO-World evaluation cuts at; rename them"
        )
    return names


def _device(arg: str | None) -> str:
    if arg:
        return arg
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def prepare_text_embeddings(cfg: YoloConfig, names: list[str], prompts: list[str], train_dir: Path) -> dict:
    """Compute class embeddings and write them where Ultralytics' WorldTrainer reads them."""
    import numpy as np

    from defectkit.finetune.text_embeddings import embed, write_cache

    if cfg.text_embeddings == "hash" and not cfg.from_scratch:
        raise ConfigError(
            "--text-embeddings hash carries no language: use it only with --from-scratch; "
            "a pretrained YOLO-World needs CLIP embeddings (clip or file)"
        )
    device = "cuda" if _device(cfg.device) != "cpu" else "cpu"
    emb = embed(
        names,
        prompts,
        cfg.text_embeddings,
        clip_model=cfg.clip_model,
        embeddings_file=cfg.text_embeddings_file,
        device=device,
    )
    cache = write_cache(names, emb, train_dir.parent)
    return {
        "provider": cfg.text_embeddings,
        "cache": str(cache),
        "sha256": hashlib.sha256(np.ascontiguousarray(emb, np.float32).tobytes()).hexdigest()[:16],
        "clip_model": str(cfg.clip_model) if cfg.text_embeddings == "clip" else None,
        "file": str(cfg.text_embeddings_file) if cfg.text_embeddings == "file" else None,
    }


# ---------------------------------------------------------------------------------------- train / evaluate


def train(cfg: YoloConfig, spec: dict, data_yaml: Path, run_dir: Path, source: str):
    """Run Ultralytics' trainer; returns the Ultralytics model wrapper (weights in run_dir/weights)."""
    from ultralytics import YOLO, YOLOWorld

    from defectkit.finetune.world_offline import OfflineWorldTrainer

    cls = YOLOWorld if spec["family"] == "world" else YOLO
    trainer = OfflineWorldTrainer if spec["family"] == "world" else None
    last = run_dir / "weights" / "last.pt"
    if cfg.resume:
        if not last.is_file():
            raise MissingFileError(f"--resume: {last} does not exist; nothing to resume")
        model = cls(str(last))
        _train_or_explain(model, resume=True, trainer=trainer)
        return model
    model = cls(source)
    overrides = dict(
        data=str(data_yaml),
        epochs=cfg.epochs,
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        device=_device(cfg.device),
        workers=cfg.workers,
        seed=cfg.seed,
        deterministic=True,
        project=str(run_dir.parent),
        name=run_dir.name,
        exist_ok=True,
        patience=cfg.patience,
        optimizer=cfg.optimizer,
        close_mosaic=cfg.close_mosaic,
        nbs=cfg.nbs,
        warmup_epochs=cfg.warmup_epochs,
        cache=cfg.cache,
        plots=True,
        pretrained=not cfg.from_scratch or str(source).endswith(".pt"),
        verbose=False,
    )
    if cfg.lr is not None:
        overrides["lr0"] = cfg.lr
    if cfg.optimizer.lower() not in ("auto", "sgd", "musgd"):
        # Ultralytics' bias warmup starts at lr 0.1, tuned for SGD; an Adam-family step at 0.1 wrecks a
        # from-scratch start (Ultralytics sets it to 0 itself only for optimizer=auto)
        overrides["warmup_bias_lr"] = 0.0
    if not cfg.augment:
        overrides.update(NO_AUGMENT)
    _train_or_explain(model, trainer=trainer, **overrides)
    return model


def _train_or_explain(model, **kw) -> None:
    """Ultralytics' trainer; its NaN-loss give-up (after reloading last.pt up to 3 times) becomes a
    clear user error."""
    try:
        model.train(**kw)
    except RuntimeError as e:
        if "NaN" not in str(e):
            raise
        raise TrainingError(
            f"training stopped on a non-finite loss ({e}): lower the learning rate (--lr) or check the labels"
        ) from e


def _untrained(cfg: YoloConfig, spec: dict, data_yaml: Path, names: list[str]):
    """The model as training would start it, unchanged: the baseline for --epochs 0."""
    import torch
    from ultralytics import YOLO, YOLOWorld
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel, WorldModel

    from defectkit.finetune.text_embeddings import read_cache
    from defectkit.finetune.world_offline import set_world_classes

    torch.manual_seed(cfg.seed)
    if spec["family"] == "world":
        wrapper = YOLOWorld(spec["yaml"])
        net = WorldModel(spec["yaml"], nc=min(len(names), 80), verbose=False)
        import yaml as _yaml

        train_dir = Path(_yaml.safe_load(data_yaml.read_text())["path"]) / "images"
        feats = torch.from_numpy(read_cache(train_dir / "text_embeddings_clip_ViT-B_32.pt", names))
        set_world_classes(net, names, feats)
    else:
        wrapper = YOLO(spec["yaml"])
        net = (SegmentationModel if spec["task"] == "segment" else DetectionModel)(
            spec["yaml"], nc=len(names), verbose=False
        )
        net.names = dict(enumerate(names))
    net.args = {"imgsz": cfg.imgsz}
    wrapper.model = net.eval()
    return wrapper


def predict_records(model, gt_records, data_root: Path, classes: list[str], cfg: YoloConfig, task: str):
    """Canonical prediction records for ``gt_records``' images, and images/s."""
    import numpy as np

    from defectkit.converters.canonical import ImageRecord
    from defectkit.converters.instances import encode_rle

    records, t0 = [], time.perf_counter()
    paths = [str(data_root / r.image) for r in gt_records]
    results = model.predict(
        source=paths,
        imgsz=cfg.imgsz,
        conf=cfg.conf,
        iou=0.7,
        max_det=100,
        device=_device(cfg.device),
        stream=True,
        verbose=False,
        retina_masks=task == "segment",
    )
    for r, res in zip(gt_records, results, strict=True):
        b = res.boxes
        boxes = b.xyxy.cpu().numpy() if len(b) else np.zeros((0, 4))
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, r.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, r.height)
        scores = b.conf.cpu().numpy() if len(b) else np.zeros(0)
        labels = [res.names[int(c)] for c in b.cls.cpu().numpy()] if len(b) else []
        masks = None
        if task == "segment":
            data = (
                res.masks.data.cpu().numpy() > 0.5 if res.masks is not None else np.zeros((0, r.height, r.width), bool)
            )
            masks = [encode_rle(m) for m in data]
        records.append(
            ImageRecord(
                image=r.image,
                height=r.height,
                width=r.width,
                boxes_xyxy=boxes,
                labels=labels,
                scores=scores,
                masks=masks,
                image_score=float(scores.max()) if len(scores) else 0.0,
                key=r.key,
                category=r.category,
                defect_type=r.defect_type,
                fold=r.fold,
            )
        )
    seconds = time.perf_counter() - t0
    unknown = {lab for rec in records for lab in rec.labels} - set(classes)
    if unknown:
        raise DataError(f"model predicts classes {sorted(unknown)} that the data does not have")
    return records, len(records) / seconds if seconds > 0 else float("nan")


def evaluate(
    model, data_yaml: Path, run_dir: Path, cfg: YoloConfig, spec: dict, names: list[str], ultralytics_val: bool = True
) -> dict:
    """Test-fold metrics: Ultralytics' validator, pycocotools on canonical predictions, image AUROC."""
    from defectkit.converters.canonical import make_header, read_records, write_records
    from defectkit.finetune.yolo_deploy import image_threshold, write_spec
    from defectkit.review.detection import box_f1_conf, coco_evaluate, image_auroc

    metrics: dict = {}
    if ultralytics_val:
        v = model.val(
            data=str(data_yaml),
            split="test",
            imgsz=cfg.imgsz,
            batch=cfg.batch,
            device=_device(cfg.device),
            plots=True,
            project=str(run_dir),
            name="test",
            exist_ok=True,
            verbose=False,
        )
        part = v.seg if spec["task"] == "segment" else v.box
        per = {
            names[int(c)]: {
                "precision": float(part.p[i]),
                "recall": float(part.r[i]),
                "ap50": float(part.ap50[i]),
                "ap50_95": float(part.ap[i]),
            }
            for i, c in enumerate(v.ap_class_index)
        }
        metrics["ultralytics"] = {
            "map50": float(v.box.map50),
            "map50_95": float(v.box.map),
            "precision": float(v.box.mp),
            "recall": float(v.box.mr),
            "per_class": per,
        }
        if spec["task"] == "segment":
            metrics["ultralytics"]["mask_map50"] = float(v.seg.map50)
            metrics["ultralytics"]["mask_map50_95"] = float(v.seg.map)
    gt_path = conversion_dir(data_yaml) / "ground_truth.jsonl"
    if not gt_path.is_file():
        log.warning("%s not found: no canonical predictions or pycocotools cross-check", gt_path)
        return metrics
    header, gt = read_records(gt_path)
    test = [r for r in gt if r.fold == "test"]
    preds, ips = predict_records(model, test, Path(header["data_root"]), names, cfg, spec["task"])
    pred_header = make_header(
        "predictions",
        cfg.model + (f" ({cfg.recipe})" if cfg.recipe else ""),
        names,
        header["data_root"],
        manifest=header.get("manifest"),
        run=str(run_dir),
        fold="test",
        from_scratch=cfg.from_scratch,
        text_embeddings=cfg.text_embeddings if spec["family"] == "world" else None,
    )
    write_records(run_dir / "predictions.jsonl", pred_header, preds)
    metrics["pycocotools"] = {"bbox": coco_evaluate(test, preds, names, "bbox")}
    if spec["task"] == "segment":
        metrics["pycocotools"]["segm"] = coco_evaluate(test, preds, names, "segm")
    metrics["image_auroc"] = image_auroc(test, preds)
    metrics["test_images"] = len(test)
    metrics["images_per_s"] = ips
    val = [r for r in gt if r.fold == "val"]
    val_preds = predict_records(model, val, Path(header["data_root"]), names, cfg, spec["task"])[0] if val else []
    metrics["thresholds"] = image_threshold(val, val_preds)
    # the box confidence a detect-then-segment cascade keeps boxes at: the peak of the val fold's F1 curve
    box = box_f1_conf(val, val_preds) if val_preds else None
    metrics["thresholds"]["box_conf"] = None if box is None else box["conf"]
    metrics["thresholds"]["box_at_conf"] = box
    write_spec(run_dir, cfg, spec, names, metrics["thresholds"])  # what predict on new images uses
    return metrics


# ---------------------------------------------------------------------------------------- main


def default_data(category: str = "all") -> Path:
    return WORK / "out" / "defectkit_synth" / "converted" / f"{category}-defect" / "yolo" / "data.yaml"


def run_dir_for(out: Path | None, project: Path | None, name: str | None, conv: Path, model: str) -> Path:
    """``--out``, or Ultralytics' ``--project/--name``, or ``work/runs/yolo/<data>-<model>``."""
    if out is not None and (project is not None or name is not None):
        raise ConfigError("give the run folder either as --out or as --project/--name, not both")
    if out is not None:
        return out.resolve()
    return ((project or WORK / "runs" / "yolo") / (name or f"{conv.name}-{model}")).resolve()


def write_text_embeddings(names: list[str], prompts: list[str], clip_model: Path, out: Path) -> dict:
    """``--make-text-embeddings``: {name and prompt: CLIP embedding} for a machine without CLIP."""
    import torch

    from defectkit.core.atomic import atomic_torch_save
    from defectkit.finetune.text_embeddings import clip_embeddings

    emb = clip_embeddings(prompts, clip_model, "cpu")
    table = {k: torch.from_numpy(e) for n, p, e in zip(names, prompts, emb, strict=True) for k in (n, p)}
    atomic_torch_save(table, out)
    print(f"wrote {len(names)} class embeddings ({', '.join(prompts)}) to {out}")
    return {"text_embeddings": str(out)}


def main(args: argparse.Namespace) -> dict:
    _setup_env()
    cfg = YoloConfig.from_args(args)
    spec = MODELS[cfg.model]
    data_yaml = _data_for(spec, (args.data or default_data(args.category)))
    if not data_yaml.is_file():
        raise MissingFileError(f"{data_yaml} does not exist; run `make convert` first (or pass --data)")
    names = _names(data_yaml)
    conv = conversion_dir(data_yaml)
    prompts = class_prompts(names, conv, args.prompt_template)
    if args.make_text_embeddings:
        return write_text_embeddings(names, prompts, cfg.clip_model, args.make_text_embeddings)
    run_dir = run_dir_for(args.out, args.project, args.name, conv, cfg.model)
    run_dir.mkdir(parents=True, exist_ok=True)
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
        source, info["synthetic_pretrain"] = synthetic_stage(cfg, spec, conv, run_dir, args.synthetic_pretrain,
                                                             args.pretrain_epochs or cfg.epochs)
        info["start"] = source
        cfg = dataclasses.replace(cfg, recipe=f"synthetic pretrain {args.synthetic_pretrain}")
    atomic_write_json(run_dir / "run_args.json", vars(args))
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
    atomic_write_json(run_dir / "metrics.json", metrics)
    _print_summary(metrics, run_dir)
    return metrics


def synthetic_stage(cfg: YoloConfig, spec: dict, conv: Path, run_dir: Path, n: int, epochs: int) -> tuple[str, dict]:
    """Pretrain on synthetic defects (``<run>/pretrain``); returns its best weights and what was used.

    Resumable: a finished stage (``pretrain/done.json``) is reused; with ``--resume`` an interrupted
    one continues from ``pretrain/weights/last.pt``."""
    from defectkit.core.atomic import atomic_write_json
    from defectkit.finetune.synthetic_pretrain import prepare

    formats = ("yolo", "yolo_seg", "coco") if spec["task"] == "segment" else ("yolo", "coco")
    data = prepare(conv, n, cfg.seed, formats, progress=not cfg.quiet)
    pre_dir = run_dir / "pretrain"
    done = pre_dir / "done.json"
    info = {**data.info, "conversion": str(data.conversion), "epochs": epochs, "weights": str(pre_dir / "weights"
                                                                                            / "best.pt")}
    if done.is_file() and json.loads(done.read_text()) == info:
        log.info("synthetic pretraining already done: %s", done)
        return info["weights"], info
    pre_yaml = _data_for(spec, data.conversion / "yolo" / "data.yaml")
    if spec["family"] == "world":
        import yaml

        train_dir = Path(yaml.safe_load(pre_yaml.read_text())["path"]) / "images" / "train"
        prepare_text_embeddings(cfg, ["defect"], ["defect"], train_dir)
    resume = cfg.resume and (pre_dir / "weights" / "last.pt").is_file()
    log.info("synthetic pretraining: %d images of %s, %d epochs -> %s", n, ", ".join(data.info["categories"]),
             epochs, pre_dir)
    train(dataclasses.replace(cfg, epochs=epochs, resume=resume), spec, pre_yaml, pre_dir, resolve_weights(cfg, spec))
    atomic_write_json(done, info)
    return info["weights"], info


def train_and_evaluate(
    cfg: YoloConfig, spec: dict, data_yaml: Path, run_dir: Path, source: str, names: list[str]
) -> dict:
    """Train (or, with 0 epochs, take the untrained model) and score ``weights/best.pt`` on the test fold."""
    t0 = time.perf_counter()
    if cfg.epochs == 0 and not cfg.resume:
        model = _untrained(cfg, spec, data_yaml, names)
        metrics = evaluate(model, data_yaml, run_dir, cfg, spec, names, ultralytics_val=False)
        metrics["note"] = "untrained model (epochs 0): the baseline a from-scratch run must beat"
        return metrics
    train(cfg, spec, data_yaml, run_dir, source)
    train_s = time.perf_counter() - t0
    from ultralytics import YOLO, YOLOWorld

    best = run_dir / "weights" / "best.pt"
    model = (YOLOWorld if spec["family"] == "world" else YOLO)(str(best))
    metrics = evaluate(model, data_yaml, run_dir, cfg, spec, names)
    return {**metrics, "train_seconds": train_s, "weights": str(best)}


def _print_summary(m: dict, run_dir: Path) -> None:
    u, c = m.get("ultralytics", {}), m.get("pycocotools", {}).get("bbox", {})
    print(
        f"{m['model']} on the test fold ({m.get('test_images', '?')} images): "
        f"mAP50 {u.get('map50', float('nan')):.3f} / mAP50-95 {u.get('map50_95', float('nan')):.3f} (Ultralytics), "
        f"{c.get('map50', float('nan')):.3f} / {c.get('map50_95', float('nan')):.3f} (pycocotools), "
        f"image AUROC {m.get('image_auroc', float('nan')):.3f}, {m.get('images_per_s', float('nan')):.1f} images/s"
    )
    if m.get("note"):
        print(f"note: {m['note']}")
    print(f"run folder: {run_dir}")


def cli(argv: list[str] | None = None) -> int:
    from defectkit.core.cli import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
