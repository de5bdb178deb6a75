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
import csv
import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectkit.anomaly.config import (
    CROP_MODELS,
    FEATURE_MODELS,
    LOSSES,
    RECON_MODELS,
    THRESHOLDS,
    RunConfig,
    TrainConfig,
)
from defectkit.core.atomic import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
)
from defectkit.core.errors import ConfigError, MissingFileError, TrainingError
from defectkit.core.paths import WORK

log = logging.getLogger("defectkit.anomaly")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="MVTec-layout root (default: embedded synthetic set)")
    p.add_argument("--category", default="washer", help="a category of the manifest, or 'all'")
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
    p.add_argument("--augment", action="store_true", help="random flips of training images (rotation-invariant parts)")
    p.add_argument("--train-crop", type=int, default=0, metavar="N",
                   help="train on random NxN crops of the --imgsz input, score whole images (fully convolutional "
                        f"models: {', '.join(CROP_MODELS)}): detail of --imgsz at the step cost of N; 0: whole images")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (AdamW, cosine schedule)")
    p.add_argument("--patience", type=int, default=10, help="validations without improvement before stopping")
    p.add_argument("--val-every", type=int, default=1, metavar="N",
                   help="validate (select best.pt, early-stop) every N epochs and after the last one; "
                        "validation at large --imgsz can cost more than the epoch's training")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of train/good held out for validation")
    p.add_argument("--cutpaste-per-image", type=int, default=2)
    p.add_argument("--val-fold", action=argparse.BooleanOptionalAction, default=True,
                   help="also validate on the manifest's val fold (real defects)")
    p.add_argument("--scales", default=None,
                   help="sliding-window sizes in model pixels, e.g. 64,128 (default: whole image)")
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of maps, in model pixels")
    p.add_argument("--topk", default=None,
                   help="image score: mean of the top-k %% pixels, or 'max' (default 1; draem: max, as DRAEM)")
    p.add_argument("--threshold", choices=THRESHOLDS, default="f1",
                   help="image and pixel thresholds, chosen on the val fold")
    p.add_argument("--false-alarm-rate", type=float, default=0.01, help="for --threshold percentile / false_alarm")
    p.add_argument("--max-false-alarm", type=float, default=None, metavar="RATE",
                   help="operating point: the image threshold flags at most RATE of good val images "
                        "(= --threshold false_alarm --false-alarm-rate RATE); says when the val fold is too small")
    p.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help="operating point for --threshold recall: flag R of the val fold's defects")
    p.add_argument("--backbone", choices=("resnet18", "resnet50", "wide_resnet50_2"), default="resnet18")
    p.add_argument("--backbone-weights", type=Path, default=None, help="local torchvision checkpoint (.pth)")
    p.add_argument("--random-init", action="store_true", help="feature models: untrained backbone (tests only)")
    p.add_argument("--coreset", type=float, default=0.1, help="patchcore: memory-bank fraction kept")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue <out>/last.pt")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


# -------------------------------------------------------------------------------------- data


def _holdout(entries, fraction: float, seed: int):
    """Deterministic hold-out of good training images (by a hash of their key)."""
    ranked = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}:{e.key}".encode()).hexdigest())
    n = max(2, int(round(len(ranked) * fraction))) if len(ranked) >= 6 else 1
    return ranked[n:], ranked[:n]


@dataclass
class CategoryData:
    """One category's model inputs, with the labels and original-size masks they are scored on."""

    root: Path
    manifest: dict
    fit_x: np.ndarray  # train/good minus the hold-out
    hold_x: np.ndarray  # held-out good images
    cp_x: np.ndarray  # CutPaste made from them
    cp_masks: np.ndarray
    val_e: list  # manifest val fold (real defects)
    val_x: np.ndarray
    test_e: list
    test_x: np.ndarray

    @property
    def val_y(self) -> np.ndarray:
        return np.array([e.defect_type != "good" for e in self.val_e], bool)

    @property
    def test_y(self) -> np.ndarray:
        return np.array([e.defect_type != "good" for e in self.test_e], bool)


def load_category(cfg: RunConfig) -> CategoryData:
    from defectkit.anomaly.data import cutpaste, load_inputs
    from defectkit.datasets.split import entries, resolve_manifest

    d, size, mode = cfg.data, cfg.model.imgsz, cfg.model.input
    root, manifest = resolve_manifest(d.data, d.manifest, d.seed, d.category)
    goods = entries(manifest, category=d.category, source_split="train")
    fit_e, hold_e = _holdout(goods, d.holdout, d.seed)
    val_e = [e for e in entries(manifest, category=d.category, fold="val") if e.source_split == "test"]
    test_e = [e for e in entries(manifest, category=d.category, fold="test") if e.source_split == "test"]
    t0 = time.perf_counter()
    fit_x = load_inputs([root / e.image for e in fit_e], size, mode, progress=not cfg.train.quiet)
    hold_x = load_inputs([root / e.image for e in hold_e], size, mode)
    rng = np.random.default_rng(d.seed)
    cp = [cutpaste(x, rng) for x in hold_x for _ in range(d.cutpaste_per_image)]
    empty = np.zeros((0, *fit_x.shape[1:]), np.float32)
    val_x = load_inputs([root / e.image for e in val_e], size, mode) if val_e else empty
    test_x = load_inputs([root / e.image for e in test_e], size, mode, progress=not cfg.train.quiet)
    data = CategoryData(root, manifest, fit_x, hold_x, np.stack([c[0] for c in cp]), np.stack([c[1] for c in cp]),
                        val_e, val_x, test_e, test_x)
    log.info("%s: %d train, %d held-out good (+%d CutPaste), %d val-fold, %d test images (%.1fs to load)",
             d.category, len(fit_x), len(hold_x), len(data.cp_x), len(val_e), len(test_e), time.perf_counter() - t0)
    return data


def selection_set(data: CategoryData, use_val_fold: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validation inputs and labels for model selection: held-out good + CutPaste, plus the val
    fold when it has both good and defect images."""
    x = np.concatenate([data.hold_x, data.cp_x])
    y = np.r_[np.zeros(len(data.hold_x)), np.ones(len(data.cp_x))]
    vy = data.val_y
    if use_val_fold and len(vy) and vy.min() != vy.max():
        x, y = np.concatenate([x, data.val_x]), np.r_[y, vy]
    return x, y


# -------------------------------------------------------------------------------------- training


def loss_fn(kind: str, ssim_lambda: float):
    import kornia
    import torch

    def loss(x, recon):
        mse = torch.mean((x - recon) ** 2)
        if kind == "mse":
            return mse
        dssim = 2 * kornia.losses.ssim_loss(recon, x, window_size=11)  # kornia gives (1 - SSIM) / 2
        return dssim if kind == "ssim" else mse + ssim_lambda * dssim

    return loss


def check_finite(value, epoch: int, step: int, lr: float) -> None:
    """Stop on a NaN/inf loss: continuing would only write a broken checkpoint."""
    import math

    v = float(value)
    if not math.isfinite(v):
        raise TrainingError(f"the training loss became {v} at epoch {epoch}, step {step}: lower the learning "
                            f"rate (--lr, now {lr:g}) or check the training images")


def reconstruction_objective(loss, kl_weight: float = 0.0):
    """The autoencoders' step loss: reconstruct the good image (plus the VAE's KL term)."""

    def objective(model, x, keys=None):
        value = loss(x.float(), model(x).float())
        if kl_weight and hasattr(model, "kl"):
            value = value + kl_weight * model.kl
        return value

    return objective


def train_step(model, objective):
    """The training objective as one module around ``model``, so that DistributedDataParallel sees
    every forward (DRAEM runs two subnetworks) and synchronises the gradients of all of them."""
    import torch

    class TrainStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, keys):
            return objective(self.model, x, keys)

    return TrainStep()


def train_one_epoch(step, loader, optimizer, device, epoch: int, cfg: TrainConfig, scaler=None,
                    progress=None, dist=None) -> float:
    """One epoch of ``step`` (:func:`train_step`, in DDP under torchrun); the mean loss over
    every process's samples."""
    import torch

    step.train()
    total, n = 0.0, 0
    for i, (x, keys) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        with torch.autocast(device_type="cuda", enabled=scaler is not None):
            value = step(x, keys)
        check_finite(value.detach(), epoch + 1, i + 1, cfg.lr)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            optimizer.step()
        total += value.item() * len(x)
        n += len(x)
        if progress is not None:
            progress.set_postfix(loss=f"{total / n:.4f}")
    if dist is not None and dist.active:
        t = torch.tensor([total, float(n)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        total, n = float(t[0]), int(t[1])
    return total / max(n, 1)


def evaluate(scorer, inputs: np.ndarray, labels: np.ndarray) -> dict:
    """Image AUROC of the scorer on (validation) inputs."""
    from defectkit.review.metrics import auroc

    scores = scorer.image_scores(scorer.maps(inputs))
    return {"auroc": auroc(scores, labels), "scores": scores}


def device_for(arg: str | None) -> str:
    """``arg``, or CUDA when present, else CPU."""
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def epoch_order(n: int, cfg: TrainConfig, epoch: int, world: int = 1) -> list[int]:
    """The epoch's training samples, drawn with replacement (small sets): ``steps_per_epoch`` steps
    of the global batch ``world * batch``.  It depends on (seed, epoch) only, so a resumed run draws
    exactly the batches the uninterrupted run would have drawn, and every process draws the same."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return torch.randint(n, (cfg.steps_per_epoch * cfg.batch * world,), generator=g).tolist()


def epoch_loader(dataset, cfg: TrainConfig, epoch: int, dist=None):
    """This process's loader for the epoch: its share of :func:`epoch_order` (all of it in a single
    process), each sample keyed by its position in the epoch so that its augmentation and synthetic
    defect are the same whichever process draws it.  DistributedSampler has no sampling with
    replacement, hence the explicit shard (:meth:`~defectkit.core.distributed.Dist.shard`)."""
    import torch

    world = dist.world if dist is not None else 1
    order = list(enumerate(epoch_order(len(dataset), cfg, epoch, world)))
    mine = dist.shard(order) if dist is not None else order
    dataset.reseed(cfg.seed, epoch)
    return torch.utils.data.DataLoader(_Keyed(dataset, mine), batch_size=cfg.batch, shuffle=False,
                                       num_workers=cfg.workers)


class _Keyed:
    """``(position, index)`` pairs over a dataset: item ``j`` is ``dataset.item(index, position)``."""

    def __init__(self, dataset, pairs):
        self.dataset, self.pairs = dataset, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j):
        pos, idx = self.pairs[j]
        return self.dataset.item(idx, pos), pos


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights (plain values only)."""

    epoch: int = -1  # last finished epoch (0-based)
    best: float = -1.0
    stale: int = 0
    history: list = dataclasses.field(default_factory=list)


def fit_reconstruction(cfg: RunConfig, run: Path, train_x: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                       device: str, dist=None):
    """Train with checkpoints, resume and early stopping on validation AUROC; returns the best model.

    Under torchrun (``dist`` active) every process trains its share of each global batch in DDP;
    rank 0 validates, decides early stopping for all, and alone writes checkpoints.  Other ranks
    return ``(None, history)``."""
    import torch

    from defectkit.anomaly.registry import build_model
    from defectkit.anomaly.scoring import Scorer
    from defectkit.core.distributed import Dist
    from defectkit.core.progress import progress

    dist = dist or Dist(device=device)
    m, t, s = cfg.model, cfg.train, cfg.score
    torch.manual_seed(t.seed)
    model = build_model(m.model, train_x.shape[1], m.imgsz, m.base, m.depth, m.latent, m.skips).to(device)
    if m.model == "draem":
        from defectkit.anomaly.draem import DraemObjective, DraemScorer, build_synthesizer

        objective = DraemObjective(build_synthesizer(train_x), 1.0, t.seed)
        scorer = DraemScorer(model, m.imgsz, s.topk, device)
    else:
        objective = reconstruction_objective(loss_fn(t.loss, t.ssim_lambda), m.kl_weight if m.model == "vae" else 0)
        scorer = Scorer(model, s.map, s.ssim_lambda, None, s.sigma, s.topk, device)
    step = dist.wrap(train_step(model, objective))  # DDP + SyncBatchNorm under torchrun, else as is
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t.epochs))
    scaler = torch.amp.GradScaler("cuda") if amp_enabled(device) else None
    state = _resume(run, model, opt, sched, device) if t.resume else TrainState()
    dataset = _Augmented(train_x, t.augment, t.train_crop)
    bar = progress(range(state.epoch + 1, t.epochs), desc=f"{m.model} {cfg.data.category}",
                   disable=t.quiet or not dist.is_main, initial=state.epoch + 1, total=t.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        if hasattr(objective, "reseed"):
            objective.reseed(t.seed, epoch)  # the epoch's synthetic defects depend on (seed, epoch) only
        train_loss = train_one_epoch(step, epoch_loader(dataset, t, epoch, dist), opt, device, epoch, t, scaler,
                                     bar, dist)
        sched.step()
        val = None
        if (epoch + 1) % max(1, t.val_every) == 0 or epoch == t.epochs - 1:
            val = dist.broadcast(evaluate(scorer, val_x, val_y)["auroc"] if dist.is_main else None)
        _step_state(state, epoch, train_loss, val, time.perf_counter() - t0, model, run, dist.is_main)
        if dist.is_main:
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), **dataclasses.asdict(state)}, run / "last.pt")
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auroc="-" if val is None else f"{val:.3f}",
                        best=f"{state.best:.3f}")
        if state.stale >= t.patience:
            log.info("early stop at epoch %d: no validation gain for %d epochs", epoch + 1, state.stale)
            break
    if not dist.is_main:
        return None, state.history
    atomic_write_json(run / "history.json", state.history)
    model.load_state_dict(load_checkpoint(run / "best.pt", device)["model"])
    return model.eval(), state.history


def amp_enabled(device: str) -> bool:
    """Mixed precision (autocast + GradScaler) on CUDA only; on CPU it is off."""
    return str(device).startswith("cuda")


def _step_state(state: TrainState, epoch: int, train_loss: float, val: float | None, seconds: float, model,
                run: Path, writer: bool = True):
    """Record the epoch; on a validated epoch (``val`` not None) keep ``best.pt`` and count patience."""
    if val is not None and (val > state.best + 1e-4 or state.best < 0):
        state.best, state.stale = val, 0
        if writer:
            atomic_torch_save({"model": model.state_dict(), "epoch": epoch, "val_auroc": val}, run / "best.pt")
    elif val is not None:
        state.stale += 1
    state.epoch = epoch
    state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_auroc": val, "seconds": seconds})


def _resume(run: Path, model, opt, sched, device: str) -> TrainState:
    last = run / "last.pt"
    if not last.is_file():
        raise MissingFileError(f"--resume: {last} does not exist; nothing to resume")
    ck = load_checkpoint(last, device)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    state = TrainState(ck["epoch"], ck["best"], ck["stale"], ck["history"])
    log.info("resumed from %s after epoch %d (best val AUROC %.4f)", last, state.epoch + 1, state.best)
    return state


class _Augmented:
    """Training images, optionally flipped at random and cut to a random ``crop`` x ``crop`` square: the
    draw for a sample depends on (seed, epoch, its position in the epoch) only, the same in one process
    or many."""

    def __init__(self, x: np.ndarray, augment: bool, crop: int = 0):
        self.x, self.augment, self.crop = x, augment, crop
        self.seed, self.epoch = 0, 0

    def reseed(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.x)

    def item(self, i: int, pos: int):
        import torch

        a = self.x[i]
        if self.augment:
            flip_h, flip_v = np.random.default_rng([self.seed, self.epoch, pos]).random(2) < 0.5
            if flip_h:
                a = a[:, :, ::-1]
            if flip_v:
                a = a[:, ::-1, :]
        h, w = a.shape[1:]
        if 0 < self.crop < max(h, w):
            top, left = np.random.default_rng([self.seed, self.epoch, pos, 3]).integers(
                0, [max(1, h - self.crop + 1), max(1, w - self.crop + 1)])
            a = a[:, top : top + self.crop, left : left + self.crop]
        return torch.from_numpy(np.ascontiguousarray(a))


# --------------------------------------------------------------------------------------- scoring


def build_scorer(cfg: RunConfig, data: CategoryData, run: Path, device: str, dist=None):
    """Train (reconstruction) or fit (features) the model; returns ``(scorer, model, history)``
    (``(None, None, history)`` on the ranks other than 0 of a torchrun job)."""
    from defectkit.anomaly.scoring import Scorer

    if cfg.model.model in RECON_MODELS:
        sel_x, sel_y = selection_set(data, cfg.data.val_fold)
        model, history = fit_reconstruction(cfg, run, data.fit_x, sel_x, sel_y, device, dist)
        if model is None:
            return None, None, history
        s = cfg.score
        if cfg.model.model == "draem":
            from defectkit.anomaly.draem import DraemScorer

            return DraemScorer(model, cfg.model.imgsz, s.topk, device), model, history
        scorer = Scorer(model, s.map, s.ssim_lambda, s.scales, s.sigma, s.topk, device)
        if len(scorer.scales) > 1:
            scorer.calibrate(data.hold_x)
        return scorer, model, history
    from defectkit.anomaly.features import build_feature_model

    scorer = build_feature_model(cfg.features, device)
    scorer.fit(data.fit_x)
    return scorer, None, []


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float | None
    rule: str
    source: str


def choose_thresholds(cfg: RunConfig, scorer, data: CategoryData, pixel_level: bool) -> Thresholds:
    """Image and pixel thresholds from the val fold (at the ground truth's resolution), or from
    held-out good images + CutPaste when the val fold has no defect image; never from test."""
    from defectkit.review.metrics import choose_threshold, resize_map

    s = cfg.score
    vy = data.val_y
    if len(vy) and vy.any():
        maps = scorer.maps(data.val_x)
        image, rule = choose_threshold(s.threshold, scorer.image_scores(maps), vy, s.false_alarm_rate,
                                       s.target_recall)
        pixel = None
        if pixel_level:
            masks = _masks(data.root, data.val_e)
            flat = np.concatenate([resize_map(a, m.shape).ravel() for a, m in zip(maps, masks, strict=True)])
            pixel = choose_threshold(_pixel_method(s.threshold), flat, np.concatenate([m.ravel() for m in masks]),
                                     s.false_alarm_rate)[0]
        return Thresholds(image, pixel, rule, "val fold")
    x = np.concatenate([data.hold_x, data.cp_x])
    y = np.r_[np.zeros(len(data.hold_x)), np.ones(len(data.cp_x))]
    maps = scorer.maps(x)
    image, rule = choose_threshold(s.threshold, scorer.image_scores(maps), y, s.false_alarm_rate, s.target_recall)
    masks = np.concatenate([np.zeros((len(data.hold_x), *maps.shape[1:]), bool), data.cp_masks])
    pixel = (choose_threshold(_pixel_method(s.threshold), maps.ravel(), masks.ravel(), s.false_alarm_rate)[0]
             if pixel_level else None)
    return Thresholds(image, pixel, rule, "CutPaste on held-out good images (the val fold has no defect image)")


def _pixel_method(image_method: str) -> str:
    """The pixel threshold (region masks) stays F1-optimal when the image threshold is an operating point."""
    return "f1" if image_method in ("false_alarm", "recall") else image_method


def _masks(root: Path, es) -> list[np.ndarray]:
    """Original-size bool masks of manifest entries (all-false for good images)."""
    from defectkit.anomaly.data import load_masks
    from defectkit.datasets.image_files import read_header

    return load_masks([root / e.mask if e.mask else None for e in es], [read_header(root / e.image)[0] for e in es])


def score_test_fold(cfg: RunConfig, scorer, model, data: CategoryData, test_maps: np.ndarray, masks: list[np.ndarray],
                 thr: Thresholds, device: str) -> dict:
    """Image metrics, pixel metrics at the ground truth's resolution, latent scores, operating point."""
    from defectkit.anomaly.scoring import knn_scores, latents, pca_scores
    from defectkit.review import metrics as M

    y = data.test_y
    scores = scorer.image_scores(test_maps)
    out: dict = {"image": M.image_metrics(scores, y, [e.defect_type for e in data.test_e])}
    if thr.pixel is not None:
        out["pixel"] = M.pixel_metrics([M.resize_map(a, m.shape) for a, m in zip(test_maps, masks, strict=True)],
                                       masks, types=[e.defect_type for e in data.test_e])
        out["pixel"]["map_resolution"] = cfg.model.imgsz
    out["image"]["at_threshold"] = {**M.confusion_at(scores, y, thr.image), "rule": thr.rule}
    if model is not None:  # encoder-latent scoring on the same model
        tr_lat, te_lat = latents(model, data.fit_x, device), latents(model, data.test_x, device)
        out["latent_knn_auroc"] = M.auroc(knn_scores(tr_lat, te_lat), y)
        out["latent_pca_auroc"] = M.auroc(pca_scores(tr_lat, te_lat), y)
    return out


# -------------------------------------------------------------------------------------- main


def run_folder(cfg: RunConfig, root: Path) -> Path:
    default = WORK / "runs" / "anomaly" / f"{Path(root).resolve().name}-{cfg.data.category}-{cfg.model.model}"
    return (cfg.out or default).resolve()


def run_category(cfg: RunConfig, dist=None) -> dict:
    """Train and score one category; writes the run folder and returns its metrics.  In a torchrun
    job every process trains; rank 0 alone scores and writes (the others return ``{}``)."""
    import torch

    from defectkit.core.distributed import Dist

    if cfg.model.input == "fft" and cfg.model.model in FEATURE_MODELS:
        raise ConfigError("--input fft is for the reconstruction models")
    crop, step = cfg.train.train_crop, 2 ** cfg.model.depth
    if crop and (cfg.model.model not in CROP_MODELS or crop % step or not step <= crop <= cfg.model.imgsz):
        raise ConfigError(f"--train-crop {crop}: for {', '.join(CROP_MODELS)} only, a multiple of 2**depth "
                          f"({step}) between {step} and --imgsz ({cfg.model.imgsz}); got --model {cfg.model.model}")
    dist = dist or Dist(device=device_for(cfg.device))
    if dist.active and cfg.model.model in FEATURE_MODELS:
        raise ConfigError(f"--model {cfg.model.model} fits no network: run it without torchrun")
    torch.manual_seed(cfg.train.seed)
    device = dist.device
    data = load_category(cfg)
    run = run_folder(cfg, data.root)
    run.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        atomic_write_json(run / "run_args.json", dataclasses.asdict(cfg))
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
    masks = _masks(data.root, data.test_e)
    metrics = {"model": cfg.model.model, "category": cfg.data.category, "data": str(data.root),
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
                      cfg.model.imgsz)
    if cfg.plots:
        _plots(run, cfg, model, data, test_maps, masks, scores, device, pixel_level)
    if hasattr(scorer, "head"):  # the map head predict and export run (feature models have none)
        from defectkit.anomaly.deploy import write_spec

        write_spec(run, cfg, scorer.head, thr)
    atomic_write_json(run / "metrics.json", metrics)
    _print(metrics, run)
    return metrics


def _plots(run, cfg, model, data, test_maps, masks, scores, device, pixel_level) -> None:
    from defectkit.anomaly.data import downsample_mask
    from defectkit.anomaly.plots import write_plots
    from defectkit.anomaly.scoring import latents, reconstruct

    recon = reconstruct(model, data.test_x, device) if model is not None else None
    lat = latents(model, data.test_x, device) if model is not None else None
    small = np.stack([downsample_mask(m, cfg.model.imgsz) for m in masks])
    write_plots(run / "plots", data.test_x, recon, test_maps, small, scores, data.test_y,
                [e.defect_type for e in data.test_e], lat, pixel=pixel_level,
                title=f"{cfg.model.model} on {cfg.data.category}")


def main(args: argparse.Namespace) -> dict:
    """Train and score one category; ``--category all`` runs every category of the manifest into
    ``OUT/<category>``, skips those already finished with the same arguments, and writes
    ``OUT/summary.{md,json,png}`` (per category and the mean).  Under torchrun every process runs
    this; the process group lives as long as the call."""
    from defectkit.core.distributed import process_group
    from defectkit.datasets.split import resolve_manifest

    cfg = RunConfig.from_args(args)
    with process_group(device_for(cfg.device)) as dist:
        if cfg.data.category != "all":
            return run_category(cfg, dist)
        root, manifest = resolve_manifest(cfg.data.data, cfg.data.manifest, cfg.data.seed, None)
        out, runs = {}, {}
        for cat in manifest["categories"]:
            sub = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, category=cat),
                                      out=cfg.out / cat if cfg.out else None)
            runs[cat] = run_folder(sub, root)
            out[cat] = _finished(sub, runs[cat]) or run_category(sub, dist)
        if dist.is_main:
            from defectkit.review.summary import write_summary

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


def write_scores(run: Path, test_e, scores, y) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "defect_type", "label", "score"])
    for e, s, lab in zip(test_e, scores, y, strict=True):
        w.writerow([e.image, e.defect_type, int(lab), f"{s:.6g}"])
    atomic_write_text(run / "scores.csv", buf.getvalue())


def write_predictions(run: Path, data: CategoryData, maps: np.ndarray, scores: np.ndarray, hws, thr: Thresholds,
                      model_name: str, map_resolution: int) -> None:
    """Canonical predictions: maps saved once (float16), thresholded maps as masks and boxes."""
    from defectkit.anomaly.deploy import map_regions
    from defectkit.converters.canonical import ImageRecord, make_header, write_records
    from defectkit.review.metrics import resize_map

    (run / "maps").mkdir(exist_ok=True)
    records = []
    for e, m, s, hw in zip(data.test_e, maps, scores, hws, strict=True):
        name = f"{e.category}__{e.defect_type}__{Path(e.image).stem}.npy"
        buf = io.BytesIO()
        np.save(buf, m.astype(np.float16))
        atomic_write_bytes(run / "maps" / name, buf.getvalue())
        boxes, labels, box_scores, rles = map_regions(resize_map(m, hw), thr.pixel)
        records.append(ImageRecord(image=e.image, height=hw[0], width=hw[1], boxes_xyxy=boxes, labels=labels,
                                   scores=box_scores, masks=rles, anomaly_map=f"maps/{name}", image_score=float(s),
                                   key=e.key, category=e.category, defect_type=e.defect_type, fold=e.fold))
    header = make_header("predictions", model_name, ["anomaly"], data.root, manifest=data.manifest.get("path"),
                         fold="test", map_resolution=map_resolution, pixel_threshold=thr.pixel,
                         image_threshold=thr.image, kind_of_model="anomaly",
                         note="box/mask scores are raw anomaly-map values, not probabilities")
    write_records(run / "predictions.jsonl", header, records)


def _print(m: dict, run: Path) -> None:
    px = m.get("pixel", {})
    print(f"{m['model']} on {m['category']} test fold ({m['test_images']} images): "
          f"image AUROC {m['image']['auroc']:.3f}"
          + (f", pixel AUROC {px['auroc']:.3f}, AUPRO@30% {px['aupro']:.3f}" if px else "")
          + (f", latent kNN AUROC {m['latent_knn_auroc']:.3f}" if "latent_knn_auroc" in m else "")
          + f"; trained in {m['train_seconds']:.0f}s, {m['images_per_s']:.1f} images/s")
    if px.get("per_type_auroc"):
        print("per defect type, image / pixel AUROC against the good test images: " + ", ".join(
            f"{t} {m['image'].get('per_type_auroc', {}).get(t, float('nan')):.3f} / {a:.3f}"
            for t, a in px["per_type_auroc"].items()))
    op = m["image"].get("at_threshold")
    if op:
        print(f"at the threshold chosen on validation ({op['rule']}): {op['fp']} of {op['fp'] + op['tn']} good test "
              f"images rejected (false-alarm rate {op['false_alarm_rate']:.3f}), {op['fn']} of {op['fn'] + op['tp']} "
              f"defective ones passed (miss rate {op['miss_rate']:.3f})")
    print(f"run folder: {run}")


def cli(argv: list[str] | None = None) -> int:
    from defectkit.core.cli import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
