"""Training the anomaly networks on good images, on the suite's training core
(:mod:`defectkit.core.training`): the epoch's samples (drawn with replacement, sharded across torchrun
processes), flips and crops, one epoch of optimizer steps, and the fit with checkpoints / resume /
early stopping on validation AUROC.  Feature models (``ocsvm``, ``patchcore``) fit without a loop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from defectkit.anomaly.config import RECON_MODELS, RunConfig, TrainConfig
from defectkit.anomaly.data import CategoryData, selection_set
from defectkit.anomaly.draem import DraemObjective, DraemScorer, build_synthesizer
from defectkit.anomaly.features import build_feature_model
from defectkit.anomaly.objectives import loss_fn, reconstruction_objective
from defectkit.anomaly.registry import build_model
from defectkit.anomaly.scoring import Scorer
from defectkit.core.distributed import Dist
from defectkit.core.training import (
    Checkpointer,
    LoopConfig,
    LossModule,
    RunState,
    amp_enabled,
    backward_step,
    check_finite,
    epoch_generator,
    fit_loop,
    mean_over_processes,
    rng,
)
from defectkit.review.metrics import auroc

log = logging.getLogger("defectkit.anomaly")


def train_one_epoch(step, loader, optimizer, device, epoch: int, cfg: TrainConfig, scaler=None,
                    progress=None, dist=None) -> float:
    """One epoch of ``step`` (a :class:`~defectkit.core.training.LossModule`, in DDP under torchrun);
    the mean loss over every process's samples."""
    import torch

    step.train()
    total, n = 0.0, 0
    for i, (x, keys) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        with torch.autocast(device_type="cuda", enabled=scaler is not None):
            value = step(x, keys)
        check_finite(value.detach(), epoch + 1, i + 1, cfg.lr)
        backward_step(value, optimizer, scaler)
        total += value.item() * len(x)
        n += len(x)
        if progress is not None:
            progress.set_postfix(loss=f"{total / n:.4f}")
    return mean_over_processes(total, n, dist)


def validation_auroc(scorer, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC of the scorer on (validation) inputs."""
    return auroc(scorer.image_scores(scorer.maps(inputs)), labels)


def epoch_order(n: int, cfg: TrainConfig, epoch: int, world: int = 1) -> list[int]:
    """The epoch's training samples, drawn with replacement (small sets): ``steps_per_epoch`` steps
    of the global batch ``world * batch``.  It depends on (seed, epoch) only, so a resumed run draws
    exactly the batches the uninterrupted run would have drawn, and every process draws the same."""
    import torch

    g = epoch_generator(cfg.seed, epoch)
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
    return torch.utils.data.DataLoader(Keyed(dataset, mine), batch_size=cfg.batch, shuffle=False,
                                       num_workers=cfg.workers)


class Keyed:
    """``(position, index)`` pairs over a dataset: item ``j`` is ``dataset.item(index, position)``."""

    def __init__(self, dataset, pairs):
        self.dataset, self.pairs = dataset, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j):
        pos, idx = self.pairs[j]
        return self.dataset.item(idx, pos), pos


class Augmented:
    """Training images, optionally flipped at random and cut to a random ``crop`` x ``crop`` square: the
    draw for a sample comes from its ``flip`` / ``crop`` streams (seed, epoch, its position in the epoch),
    the same in one process or many."""

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
            flip_h, flip_v = rng(self.seed, self.epoch, "flip", pos).random(2) < 0.5
            if flip_h:
                a = a[:, :, ::-1]
            if flip_v:
                a = a[:, ::-1, :]
        h, w = a.shape[1:]
        if 0 < self.crop < max(h, w):
            top, left = rng(self.seed, self.epoch, "crop", pos).integers(
                0, [max(1, h - self.crop + 1), max(1, w - self.crop + 1)])
            a = a[:, top : top + self.crop, left : left + self.crop]
        return torch.from_numpy(np.ascontiguousarray(a))


def fit_reconstruction(cfg: RunConfig, run: Path, train_x: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                       device: str, dist=None):
    """Train with checkpoints, resume and early stopping on validation AUROC; returns the best model.

    Under torchrun (``dist`` active) every process trains its share of each global batch in DDP;
    rank 0 validates, decides early stopping for all, and alone writes checkpoints.  Other ranks
    return ``(None, history)``."""
    import torch

    dist = dist or Dist(device=device)
    m, t, s = cfg.model, cfg.train, cfg.score
    torch.manual_seed(t.seed)
    model = build_model(m.model, train_x.shape[1], m.imgsz, m.base, m.depth, m.latent, m.skips).to(device)
    if m.model == "draem":
        objective = DraemObjective(build_synthesizer(train_x), 1.0, t.seed)
        scorer = DraemScorer(model, m.imgsz, s.topk, device)
    else:
        objective = reconstruction_objective(loss_fn(t.loss, t.ssim_lambda), m.kl_weight if m.model == "vae" else 0)
        scorer = Scorer(model, s.map, s.ssim_lambda, None, s.sigma, s.topk, device)
    step = dist.wrap(LossModule(model, objective))  # DDP + SyncBatchNorm under torchrun, else as is
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t.epochs))
    scaler = torch.amp.GradScaler("cuda") if amp_enabled(device) else None
    ckpt = Checkpointer(run, {"model": model}, {"optimizer": opt, "scheduler": sched}, writer=dist.is_main)
    state = ckpt.resume(device) if t.resume else RunState()
    dataset = Augmented(train_x, t.augment, t.train_crop)

    def train_epoch(epoch: int) -> float:
        if hasattr(objective, "reseed"):
            objective.reseed(t.seed, epoch)  # the epoch's synthetic defects depend on (seed, epoch) only
        loss = train_one_epoch(step, epoch_loader(dataset, t, epoch, dist), opt, device, epoch, t, scaler, None, dist)
        sched.step()
        return loss

    def validate(epoch: int, loss: float) -> tuple[float, float]:
        v = validation_auroc(scorer, val_x, val_y)
        return v, v

    def stretch(epochs: int) -> None:  # --time changed the epoch count: the cosine now ends there
        sched.T_max = max(1, epochs)

    loop = LoopConfig(t.epochs, t.patience, t.val_every, "val_auroc", desc=f"{m.model} {cfg.data.category}",
                      quiet=t.quiet, time=t.time)
    state = fit_loop(loop, state, train_epoch, validate, ckpt, dist, on_epochs=stretch)
    if not dist.is_main:
        return None, state.history
    ckpt.load_best(device)
    return model.eval(), state.history


def build_scorer(cfg: RunConfig, data: CategoryData, run: Path, device: str, dist=None):
    """Train (reconstruction) or fit (features) the model; returns ``(scorer, model, history)``
    (``(None, None, history)`` on the ranks other than 0 of a torchrun job)."""
    if cfg.model.model in RECON_MODELS:
        sel_x, sel_y = selection_set(data, cfg.data.val_fold)
        model, history = fit_reconstruction(cfg, run, data.fit_x, sel_x, sel_y, device, dist)
        if model is None:
            return None, None, history
        s = cfg.score
        if cfg.model.model == "draem":
            return DraemScorer(model, cfg.model.imgsz, s.topk, device), model, history
        scorer = Scorer(model, s.map, s.ssim_lambda, s.scales, s.sigma, s.topk, device)
        if len(scorer.scales) > 1:
            scorer.calibrate(data.hold_x)
        return scorer, model, history
    scorer = build_feature_model(cfg.features, device)
    scorer.fit(data.fit_x)
    return scorer, None, []
