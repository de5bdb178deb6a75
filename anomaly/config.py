"""Small frozen configs for the anomaly models, trainers and scorers (only ``main()`` reads args)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from defectkit.core.errors import ConfigError

RECON_MODELS = ("conv_ae", "unet_ae", "fc_ae", "vae", "draem")
FEATURE_MODELS = ("ocsvm", "patchcore")
CROP_MODELS = ("conv_ae", "unet_ae", "draem")  # fully convolutional: train on crops, score whole images
LOSSES = ("mse", "ssim", "mse_ssim")


def _from(cls, args: argparse.Namespace, **override):
    return cls(**{f.name: override[f.name] if f.name in override else getattr(args, f.name) for f in fields(cls)})


class _FromArgs:
    """``from_args``: the fields of the dataclass read from the parsed arguments of the same name."""

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return _from(cls, args)


@dataclass(frozen=True)
class ModelConfig:
    """What network to build."""

    model: str = "conv_ae"
    input: str = "rgb"  # rgb | gray | fft
    imgsz: int = 128
    base: int = 16
    depth: int = 4
    latent: int | None = None
    skips: tuple[int, ...] | None = None  # unet_ae: levels that keep their skip connection
    kl_weight: float = 1e-3  # vae

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelConfig:
        skips = None if args.skips is None else tuple(int(s) for s in str(args.skips).split(",") if s != "")
        return _from(cls, args, skips=skips)


@dataclass(frozen=True)
class TrainConfig(_FromArgs):
    """How to train it (reconstruction models)."""

    loss: str = "mse_ssim"
    ssim_lambda: float = 0.84
    epochs: int = 40
    batch: int = 16
    steps_per_epoch: int = 25
    augment: bool = False
    train_crop: int = 0  # random square crops of the input for training (0: whole images)
    lr: float = 2e-3
    patience: int = 10
    val_every: int = 1  # validate every N epochs (and after the last); patience counts validations
    time: float | None = None  # hours: the epoch count becomes what fits (Ultralytics' ``time``)
    seed: int = 0
    workers: int = 0
    resume: bool = False
    quiet: bool = False



@dataclass(frozen=True)
class ScoreConfig:
    """How maps, image scores and thresholds are made."""

    map: str = "mse_ssim"
    ssim_lambda: float = 0.84
    scales: tuple[int, ...] | None = None
    sigma: float = 4.0
    topk: float | str = 1.0
    threshold: str = "f1"
    false_alarm_rate: float = 0.01
    target_recall: float = 0.95

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ScoreConfig:
        scales = tuple(int(s) for s in args.scales.split(",")) if args.scales else None
        topk_arg = args.topk if args.topk is not None else ("max" if args.model == "draem" else "1")
        topk = "max" if str(topk_arg) == "max" else float(topk_arg)
        threshold, rate, recall = args.threshold_rule, args.false_alarm_rate, getattr(args, "target_recall", None)
        if getattr(args, "max_false_alarm", None) is not None:
            threshold, rate = "false_alarm", args.max_false_alarm
        elif threshold == "recall" and recall is None:
            recall = 0.95
        return _from(cls, args, map=args.map or args.loss, scales=scales, topk=topk, threshold=threshold,
                     false_alarm_rate=rate, target_recall=recall if recall is not None else 0.95)


@dataclass(frozen=True)
class FeatureConfig(_FromArgs):
    """Frozen-backbone models (OC-SVM, PatchCore)."""

    model: str = "patchcore"
    backbone: str = "resnet18"
    backbone_weights: Path | None = None
    random_init: bool = False
    coreset: float = 0.1
    imgsz: int = 128
    sigma: float = 4.0
    seed: int = 0



#: ``manifest``: select and threshold on the split manifest's val fold (real defects), score its test fold,
#: the same images every model family is compared on; ``paper``: as the published tables (DRAEM, PatchCore,
#: anomalib's benchmark): select on held-out good images + CutPaste only, score the whole official test split
PROTOCOLS = ("manifest", "paper")


@dataclass(frozen=True)
class DataConfig:
    """Which images, and how validation is assembled."""

    data: Path | None = None
    category: str = "washer"
    manifest: Path | None = None
    seed: int = 0
    holdout: float = 0.1
    cutpaste_per_image: int = 2
    val_fold: bool = True
    protocol: str = "manifest"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataConfig:
        protocol = getattr(args, "protocol", "manifest")
        val_fold = getattr(args, "val_fold", None)
        if protocol == "paper" and val_fold:
            raise ConfigError("--protocol paper selects the model without any real defect image: drop --val-fold "
                              "(held-out good images and CutPaste select it)")
        return _from(cls, args, protocol=protocol, val_fold=(protocol != "paper") if val_fold is None else val_fold)



@dataclass(frozen=True)
class RunConfig:
    """Everything one ``anomaly/train.py`` run needs."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    score: ScoreConfig
    features: FeatureConfig
    out: Path | None = None
    device: str | None = None
    plots: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        return cls(DataConfig.from_args(args), ModelConfig.from_args(args), TrainConfig.from_args(args),
                   ScoreConfig.from_args(args), FeatureConfig.from_args(args), args.out, args.device,
                   not args.no_plots)
