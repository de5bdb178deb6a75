"""YOLO and YOLO-World through Ultralytics: the model registry (Ultralytics' names), weights resolution
that never downloads, the offline class embeddings, and a pure function from a config to Ultralytics'
training arguments.  Ultralytics keeps its own training loop."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from defectkit.converters.canonical import read_records
from defectkit.core.atomic import atomic_torch_save
from defectkit.core.errors import ConfigError, DataError, MissingFileError, TrainingError
from defectkit.core.paths import WORK
from defectkit.core.progress import plain_ultralytics_bars
from defectkit.core.training import require_resumable, resolve_device
from defectkit.finetune.text_embeddings import clip_embeddings, embed, prompt_for, read_cache, write_cache

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
    val_begin: int = 1  # the first epoch validated (MMEngine's val_begin); the last one always is
    time: float | None = None  # hours (Ultralytics' time=: overrides epochs)
    augment: bool = True
    cache: bool = False
    resume: bool = False
    conf: float = 0.001
    threshold: str = "f1"  # how the image threshold is chosen on the val fold
    overrides: tuple[str, ...] = ()  # Ultralytics' own training arguments, key=value
    false_alarm_rate: float = 0.01
    quiet: bool = False
    recipe: str = ""  # e.g. "synthetic pretrain 400": shown beside the model name in comparisons

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> YoloConfig:
        cfg = cls(**{f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls)})
        cfg = dataclasses.replace(cfg, threshold=getattr(args, "threshold_rule", cfg.threshold))
        cfg = dataclasses.replace(cfg, overrides=tuple(cfg.overrides))
        if getattr(args, "max_false_alarm", None) is not None:  # the operating point, as the anomaly models'
            cfg = dataclasses.replace(cfg, threshold="false_alarm", false_alarm_rate=args.max_false_alarm)
        if cfg.weights is not None:  # a start point given: the offline recipe's from-scratch default yields to it
            cfg = dataclasses.replace(cfg, from_scratch=False)
        return cfg


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


def setup_env(threads: int | None = None) -> None:
    """Ultralytics writes settings to a config dir and goes online unless told not to; on CPU it trains on
    ``min(8, cores - 1)`` threads (one on a 2-core machine) and sets ``OMP_NUM_THREADS=1`` on import:
    ``threads`` (default: ``OMP_NUM_THREADS`` where the user set it, else every core) replaces both."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(WORK / "ultralytics"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    from ultralytics.utils import torch_utils

    torch_utils.NUM_THREADS = n  # what select_device hands to torch.set_num_threads on CPU
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
    cats: dict[str, str] = {}
    gt = conv_dir / "ground_truth.jsonl"
    if gt.is_file():
        for r in read_records(gt)[1]:
            for lab in r.labels:
                cats.setdefault(lab, r.category or "")
    return [prompt_for(n, template, cats.get(n, "")) for n in names]


def data_for(spec: dict, data: Path) -> Path:
    """The labels a model trains on, from ``--data``: a conversion folder (as ``finetune/sam.py`` takes it) or its
    ``yolo/data.yaml``; a segment model takes the conversion's YOLO-seg ``data.yaml``."""
    data = Path(data)
    if data.is_dir() and (data / "yolo" / "data.yaml").is_file():  # the conversion folder itself
        data = data / "yolo" / "data.yaml"
    if spec["task"] == "segment" and data.parent.name == "yolo":
        seg = data.parent.parent / "yolo_seg" / "data.yaml"
        if not seg.is_file():
            raise MissingFileError(
                f"{spec['task']} models need YOLO-seg labels; {seg} is missing (make convert FORMATS=yolo_seg,...)"
            )
        log.info("segment model: using %s", seg)
        return seg
    return data


def class_names(data_yaml: Path) -> list[str]:
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


def device(cfg) -> str:
    """Ultralytics' device string for the run (``"0"`` is its first GPU)."""
    return resolve_device(cfg.device, "ultralytics")


def prepare_text_embeddings(cfg: YoloConfig, names: list[str], prompts: list[str], train_dir: Path) -> dict:
    """Compute class embeddings and write them where Ultralytics' WorldTrainer reads them."""
    import numpy as np

    if cfg.text_embeddings == "hash" and not cfg.from_scratch:
        raise ConfigError(
            "--text-embeddings hash carries no language: use it only with --from-scratch; "
            "a pretrained YOLO-World needs CLIP embeddings (clip or file)"
        )
    on = "cuda" if device(cfg) != "cpu" else "cpu"
    emb = embed(
        names,
        prompts,
        cfg.text_embeddings,
        clip_model=cfg.clip_model,
        embeddings_file=cfg.text_embeddings_file,
        device=on,
    )
    cache = write_cache(names, emb, train_dir.parent)
    return {
        "provider": cfg.text_embeddings,
        "cache": str(cache),
        "sha256": hashlib.sha256(np.ascontiguousarray(emb, np.float32).tobytes()).hexdigest()[:16],
        "clip_model": str(cfg.clip_model) if cfg.text_embeddings == "clip" else None,
        "file": str(cfg.text_embeddings_file) if cfg.text_embeddings == "file" else None,
    }


def ultralytics_overrides(pairs) -> dict:
    """``key=value`` arguments as Ultralytics' ``model.train`` takes them (values read as YAML: numbers,
    booleans, lists); a key Ultralytics does not know is refused, as ``yolo train`` refuses it."""
    import yaml
    from ultralytics.cfg import DEFAULT_CFG_DICT

    out = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise ConfigError(f"{pair!r}: pass Ultralytics arguments as key=value, e.g. mosaic=0.5")
        if key not in DEFAULT_CFG_DICT:
            raise ConfigError(f"{key}={value}: {key!r} is not an Ultralytics training argument "
                              "(see `yolo cfg` or ultralytics/cfg/default.yaml)")
        out[key] = yaml.safe_load(value) if value else None
    return out


def train_overrides(cfg: YoloConfig, data_yaml: Path, run_dir: Path, source: str) -> dict:
    """Ultralytics' ``model.train(**kwargs)`` for a run: a pure function of the config."""
    overrides = dict(
        data=str(data_yaml),
        epochs=cfg.epochs,
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        device=device(cfg),
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
    if cfg.time is not None:
        overrides["time"] = cfg.time
    if cfg.optimizer.lower() not in ("auto", "sgd", "musgd"):
        # Ultralytics' bias warmup starts at lr 0.1, tuned for SGD; an Adam-family step at 0.1 wrecks a
        # from-scratch start (Ultralytics sets it to 0 itself only for optimizer=auto)
        overrides["warmup_bias_lr"] = 0.0
    if not cfg.augment:
        overrides.update(NO_AUGMENT)
    overrides.update(ultralytics_overrides(cfg.overrides))
    return overrides


def train(cfg: YoloConfig, spec: dict, data_yaml: Path, run_dir: Path, source: str):
    """Run Ultralytics' trainer; returns the Ultralytics model wrapper (weights in run_dir/weights)."""
    from ultralytics import YOLO, YOLOWorld

    from defectkit.finetune.world_offline import OfflineWorldTrainer  # imports Ultralytics

    cls = YOLOWorld if spec["family"] == "world" else YOLO
    trainer = OfflineWorldTrainer if spec["family"] == "world" else None
    last = run_dir / "weights" / "last.pt"
    if cfg.resume:
        model = cls(str(require_resumable(last)))
        validate_from(model, cfg.val_begin)
        train_or_explain(model, resume=True, trainer=trainer)
        return model
    model = cls(source)
    validate_from(model, cfg.val_begin)
    train_or_explain(model, trainer=trainer, **train_overrides(cfg, data_yaml, run_dir, source))
    return model


def validate_from(model, first: int) -> None:
    """Ultralytics validates after every epoch (or, with ``val=False``, after the last only): validate from
    epoch ``first`` on (1-based; the last epoch and Ultralytics' early-stopping checks always validate).
    Earlier epochs are never chosen as ``best.pt``; a from-scratch run saves their validation time.  Set after
    every epoch, also when 1: a resumed run restores ``val`` as it was saved, i.e. False before ``first``.

    A validation draws one number from Python's ``random`` per val image (Ultralytics' ``Format`` transform,
    its ``bgr`` draw, in this process when the loader has no workers), which the next epochs' augmentation
    then continues from: a skipped validation makes the same draws, so the schedule changes the time a run
    takes and never its training."""

    def on_epoch_end(trainer) -> None:
        trainer.args.val = trainer.epoch + 1 >= first
        loader = getattr(trainer, "test_loader", None)
        if not trainer.args.val and loader is not None and loader.num_workers == 0:
            for _ in range(len(loader.dataset)):
                random.uniform(0, 1)

    model.add_callback("on_train_epoch_end", on_epoch_end)


def train_or_explain(model, **kw) -> None:
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


def untrained(cfg: YoloConfig, spec: dict, data_yaml: Path, names: list[str]):
    """The model as training would start it, unchanged: the baseline for --epochs 0."""
    import torch
    from ultralytics import YOLO, YOLOWorld
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel, WorldModel

    from defectkit.finetune.world_offline import set_world_classes  # imports Ultralytics

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

    emb = clip_embeddings(prompts, clip_model, "cpu")
    table = {k: torch.from_numpy(e) for n, p, e in zip(names, prompts, emb, strict=True) for k in (n, p)}
    atomic_torch_save(table, out)
    print(f"wrote {len(names)} class embeddings ({', '.join(prompts)}) to {out}")
    return {"text_embeddings": str(out)}
