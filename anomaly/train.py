"""Train an unsupervised anomaly model on good images only, and score it on the test fold.

    python anomaly/train.py --category washer --model conv_ae --loss mse_ssim --imgsz 128 --epochs 40
    python anomaly/train.py --data /data/mvtec_anomaly_detection --category bottle --model unet_ae \\
        --skips 2 --imgsz 256 --scales 128,256 --epochs 100 --device cuda
    python anomaly/train.py --category weave --model patchcore --backbone resnet18 \\
        --backbone-weights /path/resnet18-f37072fd.pth
    make anomaly DATA=... CATEGORY=... MODEL=...

Models (``--model``): ``draem`` (reconstruct-and-discriminate on synthesized defects, see
``anomaly/draem.py``); reconstruction models ``conv_ae``, ``unet_ae``, ``fc_ae``, ``vae`` trained
with ``--loss`` ``mse``, ``ssim`` or ``mse_ssim`` (MSE + lambda * (1 - SSIM), lambda 0.84), on
``--input`` ``rgb``, ``gray`` or ``fft`` (log-magnitude spectrum; image-level scores only); and
frozen-feature models ``ocsvm`` (pooled ResNet features + One-Class SVM, image level) and
``patchcore`` (ResNet patch features, coreset memory bank, nearest-neighbour distance maps).

Training uses the dataset's ``train/good`` images only.  A few of them are held out: with
CutPaste pseudo-anomalies made from them, and the split manifest's ``val`` fold when
``--val-fold`` is on (default), they give the validation AUROC that selects the best epoch and
stops training early.  Thresholds come from the ``val`` fold (or CutPaste when it has no defect
image), never from ``test``.  A checkpoint is written every epoch; ``--resume`` continues it.
A non-finite loss stops the run with an error naming the epoch and step.

Run folder (``--out``, default ``work/runs/anomaly/<data>-<category>-<model>``): ``run_args.json``,
``last.pt`` / ``best.pt`` (tensors and plain values only: loaded with ``weights_only=True``),
``history.json``, ``metrics.json`` (image AUROC / AP / F1-max, AUROC per defect type; pixel AUROC,
AUPRO@30%, pixel AP and F1-max computed exactly at the ground truth's resolution, pixel AUROC per
defect type; latent kNN /
PCA AUROC, thresholds, timing), ``scores.csv``, ``maps/*.npy`` (float16, test fold, model
resolution), ``predictions.jsonl`` (canonical: thresholded maps as masks and boxes) and ``plots/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from defectkit.anomaly.config import CROP_MODELS, FEATURE_MODELS, LOSSES, PROTOCOLS, RECON_MODELS, RunConfig
from defectkit.anomaly.data import entry_masks, load_category
from defectkit.anomaly.deploy import write_spec
from defectkit.anomaly.evaluate import (
    choose_thresholds,
    print_metrics,
    score_test_fold,
    write_predictions,
    write_run_plots,
    write_scores,
)
from defectkit.anomaly.trainer import build_scorer
from defectkit.core.cli import HelpFormatter, run_cli
from defectkit.core.config import apply_defaults, recipe, rename_flag, write_run_config
from defectkit.core.distributed import Dist, process_group
from defectkit.core.errors import ConfigError
from defectkit.core.paths import WORK, claim_run_dir
from defectkit.core.training import resolve_device, write_run_args
from defectkit.datasets.split import resolve_manifest
from defectkit.review.metrics import THRESHOLDS
from defectkit.review.summary import finish_run, write_summary

log = logging.getLogger("defectkit.anomaly")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="MVTec-layout root (default: embedded synthetic set)")
    p.add_argument("--category", default="all", help="a category of the manifest, or all (each into <out>/<category>)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="split manifest (default work/out/<data>/manifest.json)")
    p.add_argument("--model", choices=[*RECON_MODELS, *FEATURE_MODELS], default="conv_ae")
    p.add_argument("--loss", choices=LOSSES, default="mse_ssim")
    p.add_argument("--ssim-lambda", type=float, default=0.84)
    p.add_argument("--map", choices=LOSSES, default=None, help="anomaly map kind (default: same as --loss)")
    p.add_argument("--input", choices=("rgb", "gray", "fft"), default="rgb")
    p.add_argument("--imgsz", "--size", dest="imgsz", type=int, default=128, help="model input size (square)")
    p.add_argument("--base", type=int, default=16, help="first-stage channels")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--latent", type=int, default=None)
    p.add_argument("--skips", default=None, help="unet_ae: comma-separated levels that keep skips "
                                                  "(0 = shallowest); default drops levels 0 and 1")
    p.add_argument("--kl-weight", type=float, default=1e-3, help="vae: weight of the KL term")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps-per-epoch", type=int, default=25,
                   help="optimizer steps per epoch, sampling train images with replacement (small sets)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="random flips of training images (rotation-invariant parts)")
    p.add_argument("--train-crop", type=int, default=0, metavar="N",
                   help="train on random NxN crops of the --imgsz input, score whole images (fully convolutional "
                        f"models: {', '.join(CROP_MODELS)}): detail of --imgsz at the step cost of N; 0: whole images")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (AdamW, cosine schedule)")
    p.add_argument("--time", type=float, default=None, metavar="HOURS",
                   help="hours of training: the epoch count becomes what fits, as Ultralytics' time=")
    p.add_argument("--patience", type=int, default=10, help="validations without improvement before stopping")
    p.add_argument("--val-every", type=int, default=1, metavar="N",
                   help="validate (select best.pt, early-stop) every N epochs and after the last one; "
                        "validation at large --imgsz can cost more than the epoch's training")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of train/good held out for validation")
    p.add_argument("--cutpaste-per-image", type=int, default=2)
    p.add_argument("--val-fold", action=argparse.BooleanOptionalAction, default=None,
                   help="also validate on the manifest's val fold (real defects); default: on under --protocol "
                        "manifest, refused under --protocol paper")
    p.add_argument("--protocol", choices=PROTOCOLS, default="manifest",
                   help="manifest: select on the manifest's val fold, score its test fold (the images every model "
                        "family is compared on); paper: select on held-out good images + CutPaste only and score "
                        "the whole official test split, as published tables do")
    p.add_argument("--scales", default=None,
                   help="sliding-window sizes in model pixels, e.g. 64,128 (default: whole image)")
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of maps, in model pixels")
    p.add_argument("--topk", default=None,
                   help="image score: mean of the top-k %% pixels, or 'max' (default 1; draem: max, as DRAEM)")
    p.add_argument("--threshold-rule", choices=THRESHOLDS, default="f1",
                   help="image and pixel thresholds, chosen on the val fold")
    p.add_argument("--false-alarm-rate", type=float, default=0.01, help="for --threshold-rule percentile / false_alarm")
    p.add_argument("--max-false-alarm", type=float, default=None, metavar="RATE",
                   help="operating point: the image threshold flags at most RATE of good val images "
                        "(= --threshold-rule false_alarm --false-alarm-rate RATE); says when the val fold is too small")
    p.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help="operating point for --threshold-rule recall: flag R of the val fold's defects")
    p.add_argument("--backbone", choices=("resnet18", "resnet50", "wide_resnet50_2"), default="resnet18")
    p.add_argument("--backbone-weights", type=Path, default=None, help="local torchvision checkpoint (.pth)")
    p.add_argument("--random-init", action="store_true", help="feature models: untrained backbone (tests only)")
    p.add_argument("--coreset", type=float, default=0.1, help="patchcore: memory-bank fraction kept")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0, help="data-loading workers (0: in the main process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue <out>/last.pt")
    p.add_argument("--exist-ok", action="store_true", help="train over a finished run in --out (default: refused)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    rename_flag(p, "--threshold", "--threshold-rule", choices=THRESHOLDS)  # --threshold T is a score in predict
    # the recommended offline recipe is the default: `python anomaly/train.py` with no flag runs it (--help shows it)
    apply_defaults(p, recipe("demo/anomaly"), "configs/demo/anomaly.yaml")
    return p


def run_folder(cfg: RunConfig, root: Path) -> Path:
    default = WORK / "runs" / "anomaly" / f"{Path(root).resolve().name}-{cfg.data.category}-{cfg.model.model}"
    return (cfg.out or default).resolve()


def run_category(cfg: RunConfig, dist=None, flags: argparse.Namespace | None = None) -> dict:
    """Train and score one category; writes the run folder and returns its metrics.  In a torchrun
    job every process trains; rank 0 alone scores and writes (the others return ``{}``)."""
    import torch

    if cfg.model.input == "fft" and cfg.model.model in FEATURE_MODELS:
        raise ConfigError("--input fft is for the reconstruction models")
    crop, step = cfg.train.train_crop, 2 ** cfg.model.depth
    if crop and (cfg.model.model not in CROP_MODELS or crop % step or not step <= crop <= cfg.model.imgsz):
        raise ConfigError(f"--train-crop {crop}: for {', '.join(CROP_MODELS)} only, a multiple of 2**depth "
                          f"({step}) between {step} and --imgsz ({cfg.model.imgsz}); got --model {cfg.model.model}")
    dist = dist or Dist(device=resolve_device(cfg.device))
    if dist.active and cfg.model.model in FEATURE_MODELS:
        raise ConfigError(f"--model {cfg.model.model} fits no network: run it without torchrun")
    torch.manual_seed(cfg.train.seed)
    device = dist.device
    data = load_category(cfg)
    run = claim_run_dir(run_folder(cfg, data.root), cfg.train.resume, bool(getattr(flags, "exist_ok", False)))
    if dist.is_main:
        write_run_args(run, cfg)
        if flags is not None:  # the flags of this category's run: --config <run>/config.yaml reruns it
            write_run_config(run, argparse.Namespace(**{**vars(flags), "category": cfg.data.category,
                                                        "out": str(run)}))
    t0 = time.perf_counter()
    scorer, model, history = build_scorer(cfg, data, run, device, dist)
    train_s = time.perf_counter() - t0
    if not dist.is_main:
        return {}
    t_inf = time.perf_counter()
    test_maps = scorer.maps(data.test_x)
    infer_s = time.perf_counter() - t_inf
    pixel_level = cfg.model.input != "fft" and cfg.model.model != "ocsvm"
    thr = choose_thresholds(cfg, scorer, data, pixel_level)
    masks = entry_masks(data.root, data.test_e)
    metrics = {"model": cfg.model.model, "category": cfg.data.category, "data": str(data.root),
               "protocol": cfg.data.protocol,
               "input": cfg.model.input, "loss": cfg.train.loss if model is not None else None,
               "size": cfg.model.imgsz, "train_images": len(data.fit_x), "test_images": len(data.test_e),
               "train_seconds": train_s, "images_per_s": len(data.test_x) / infer_s if infer_s > 0 else float("nan"),
               "epochs_run": len(history),
               "best_val_auroc": max((h["val_auroc"] for h in history if h["val_auroc"] is not None), default=None),
               "thresholds": {"method": cfg.score.threshold, "rule": thr.rule, "image": thr.image,
                              "pixel": thr.pixel, "source": thr.source},
               **score_test_fold(cfg, scorer, model, data, test_maps, masks, thr, device)}
    scores = scorer.image_scores(test_maps)
    write_scores(run, data.test_e, scores, data.test_y)
    write_predictions(run, data, test_maps, scores, [m.shape for m in masks], thr, cfg.model.model,
                      cfg.model.imgsz, cfg.data.protocol)
    if cfg.plots:
        write_run_plots(run, cfg, model, data, test_maps, masks, scores, device, pixel_level)
    if hasattr(scorer, "head"):  # the map head predict and export run (feature models have none)
        write_spec(run, cfg, scorer.head, thr)
    metrics = finish_run(run, "anomaly", metrics)
    print_metrics(metrics, run)
    return metrics


def main(args: argparse.Namespace) -> dict:
    """Train and score one category; ``--category all`` runs every category of the manifest into
    ``OUT/<category>``, skips those already finished with the same arguments, and writes
    ``OUT/summary.{md,json,png}`` (per category and the mean).  Under torchrun every process runs
    this; the process group lives as long as the call."""
    cfg = RunConfig.from_args(args)
    with process_group(resolve_device(cfg.device)) as dist:
        if cfg.data.category != "all":
            return run_category(cfg, dist, args)
        root, manifest = resolve_manifest(cfg.data.data, cfg.data.manifest, cfg.data.seed, None)
        out, runs = {}, {}
        for cat in manifest["categories"]:
            sub = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, category=cat),
                                      out=cfg.out / cat if cfg.out else None)
            runs[cat] = run_folder(sub, root)
            out[cat] = _finished(sub, runs[cat]) or run_category(sub, dist, args)
        if dist.is_main:
            top = cfg.out.resolve() if cfg.out else run_folder(cfg, root)
            write_summary(top, "anomaly", runs, f"{cfg.model.model} on {len(runs)} categories of {Path(root).name}")
            print(f"summary (per category and the mean): {top / 'summary.md'}")
        return out


def _finished(cfg: RunConfig, run: Path) -> dict | None:
    """The metrics of a finished run of exactly this configuration (``--category all`` reruns skip it)."""
    metrics, args = run / "metrics.json", run / "run_args.json"
    if cfg.train.resume or not (metrics.is_file() and args.is_file()):
        return None
    if json.loads(args.read_text()) != json.loads(json.dumps(dataclasses.asdict(cfg), default=str)):
        return None
    log.info("%s: finished with the same arguments in %s, skipped", cfg.data.category, run)
    return json.loads(metrics.read_text())


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
