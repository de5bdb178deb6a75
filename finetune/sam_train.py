"""Training SAM on box prompts, on the suite's training core (:mod:`defectkit.core.training`): the
Dice + BCE objective over instances, one epoch of optimizer steps over windows of instances, the fit
with checkpoints / resume / early stopping on val mean IoU, and the synthetic-pretraining stage."""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from defectkit.core.training import (
    Checkpointer,
    LoopConfig,
    LossModule,
    RunState,
    check_finite,
    config_from_args,
    fit_loop,
    load_weights,
    mark_stage_done,
    mean_over_processes,
    rng,
    stage_done,
)
from defectkit.finetune.sam_core import (
    decode,
    dice_bce_loss,
    in_window,
    jitter_boxes,
    low_res_targets,
    prompt_groups,
    sample_points,
)
from defectkit.finetune.sam_data import load_sam_data
from defectkit.finetune.sam_eval import instance_scores, predict
from defectkit.finetune.synthetic_pretrain import prepare

log = logging.getLogger("defectkit.finetune.sam")


@dataclass(frozen=True)
class SamTrainConfig:
    """How the decoder is trained (only ``main()`` reads args)."""

    epochs: int = 20
    batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    jitter: float = 0.1
    points: int = 0
    crop: float = 0.0
    train_prompt_encoder: bool = False
    train_encoder: bool = False
    patience: int = 10
    time: float | None = None  # hours: the epoch count becomes what fits (Ultralytics' ``time``)
    seed: int = 0
    resume: bool = False
    quiet: bool = False
    model: str = "vit_b"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamTrainConfig:
        return config_from_args(cls, args)


def sam_loss_module(sam, items, cache, cfg: SamTrainConfig, low: int, device: str):
    """The training loss as one module around ``sam`` (:class:`~defectkit.core.training.LossModule`), so
    that DistributedDataParallel sees the encoder (``--train-encoder``) and the decoder run in its forward.
    ``forward(chunk, epoch)``: ``chunk`` is ``[(position in the epoch, image index, instance index)]``;
    each instance's box jitter and points come from its own ``prompt`` stream (seed, epoch, position), so
    a sample is the same in one process or across DDP processes.  Returns the *sum* of the instances'
    losses (an empty chunk gives a zero that still touches every trained parameter, so DDP's all-reduce
    runs)."""
    import torch

    def groups(it, ks):
        """Instances that share an encoder pass (:func:`prompt_groups`, windows around the un-jittered GT
        boxes, so a frozen encoder's crops are cached), as indices into the item's instances."""
        return [(w, [ks[j] for j in idx]) for w, idx in prompt_groups(it.boxes[ks], it.hw, cfg.crop)]

    def objective(model, chunk, epoch: int):
        if not chunk:  # the last step of an epoch can leave a process nothing
            return 0.0 * sum(p.reshape(-1)[0] for p in model.parameters() if p.requires_grad)
        by_image: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for pos, i, k in chunk:
            by_image[i].append((pos, k))
        losses = []
        for i, pk in by_image.items():
            it, rng_of = items[i], {k: rng(cfg.seed, epoch, "prompt", pos) for pos, k in pk}
            for window, ks in groups(it, [k for _, k in pk]):
                y0, y1, x0, x1 = window
                rgb, masks = np.ascontiguousarray(it.rgb[y0:y1, x0:x1]), it.masks[ks][:, y0:y1, x0:x1]
                hw, rngs = rgb.shape[:2], [rng_of[k] for k in ks]
                emb = cache.encode(rgb, grad=True) if cfg.train_encoder else cache.get(rgb).to(device)
                boxes = in_window(it.boxes[ks], window)
                boxes = np.concatenate([jitter_boxes(boxes[[j]], hw, r, cfg.jitter) for j, r in enumerate(rngs)])
                pts = (np.concatenate([sample_points(masks[[j]], cfg.points, r) for j, r in enumerate(rngs)])
                       if cfg.points else None)
                logits, _ = decode(model, emb, boxes, hw, cache, pts, cfg.train_prompt_encoder)
                target = low_res_targets(masks, hw, cache, low).to(device)
                losses.append(dice_bce_loss(logits, target) * len(ks))
        return torch.stack(losses).sum()

    return LossModule(sam, objective)


def train_one_epoch(step, items, opt, cfg: SamTrainConfig, order_rng, epoch: int = 0, dist=None) -> float:
    """One epoch of ``step`` (:func:`sam_loss_module`, in DDP under torchrun).  Each optimizer step
    takes a window of ``world * batch`` instances (``--batch`` per process); process ``r`` takes
    ``window[r::world]`` and scales its loss sum by ``world / len(window)``, so that DDP's gradient
    average is the mean over the whole window even when the last window is uneven: the same step a
    single process takes with ``--batch world*batch``.  Returns the mean loss over all instances."""
    sam = step.module.model if hasattr(step, "module") else step.model
    sam.mask_decoder.train()
    sam.image_encoder.train(cfg.train_encoder)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    pairs = [(i, k) for i, it in enumerate(items) for k in range(len(it.boxes))]
    order = [(pos, *pairs[j]) for pos, j in enumerate(order_rng.permutation(len(pairs)))]  # the same on every rank
    total, n = 0.0, 0
    width = cfg.batch * world
    for s in range(0, len(order), width):
        window = order[s : s + width]
        chunk = window[rank::world]
        loss_sum = step(chunk, epoch)
        check_finite(loss_sum.detach(), epoch + 1, s // width + 1, cfg.lr)
        opt.zero_grad(set_to_none=True)
        (loss_sum * (world / len(window))).backward()
        opt.step()
        total += float(loss_sum.detach())
        n += len(chunk)
    return mean_over_processes(total, n, dist if world > 1 else None)


def trained_modules(sam, cfg: SamTrainConfig) -> dict:
    """The parts of ``sam`` a run trains, by checkpoint name (a checkpoint holds only these)."""
    parts = {"mask_decoder": sam.mask_decoder}
    if cfg.train_prompt_encoder:
        parts["prompt_encoder"] = sam.prompt_encoder
    if cfg.train_encoder:
        parts["image_encoder"] = sam.image_encoder
    return parts


def load_trained(sam, path: Path, key: str, device: str) -> dict:
    """Load a SAM run's checkpoint (whichever parts it trained) into ``sam``, refusing one trained on
    another base model."""
    parts = {"mask_decoder": sam.mask_decoder, "prompt_encoder": sam.prompt_encoder,
             "image_encoder": sam.image_encoder}
    return load_weights(path, parts, device, {"base_key": key})


def fit(sam, key: str, train_items, val_items, cache, cfg: SamTrainConfig, run: Path, device: str,
        dist=None) -> list[dict]:
    """Train with per-epoch checkpoints, resume and early stopping on val mean IoU; ``sam`` ends holding
    the best weights.

    With no val instance, selection falls back to the training loss, so ``best.pt`` always exists.
    Under torchrun: DDP; rank 0 validates and decides for all, and alone writes checkpoints."""
    import torch

    from defectkit.core.distributed import Dist

    dist = dist or Dist(device=device)
    for p in sam.image_encoder.parameters():
        p.requires_grad_(cfg.train_encoder)
    cache.live = cfg.train_encoder  # a trained encoder's embeddings change every step: never cached
    for p in sam.prompt_encoder.parameters():
        p.requires_grad_(cfg.train_prompt_encoder)
    low = sam.image_encoder.img_size // 4
    # the IoU head is not trained (masks are scored from their own logits): DDP must allow unused parameters
    step = dist.wrap(sam_loss_module(sam, train_items, cache, cfg, low, device), find_unused=True)
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = {"base": cfg.model, "base_key": key,
            "selected_on": "val mean IoU" if val_items else "train loss (no val instance)"}
    ckpt = Checkpointer(run, trained_modules(sam, cfg), {"optimizer": opt}, meta, dist.is_main, check=("base_key",))
    state = ckpt.resume(device) if cfg.resume else RunState()

    def train_epoch(epoch: int) -> float:
        # the epoch's own stream: a resumed run replays the same draws
        return train_one_epoch(step, train_items, opt, cfg, rng(cfg.seed, epoch, "epoch"), epoch, dist)

    def validate(epoch: int, loss: float) -> tuple[float, float | None]:
        if not val_items:
            return -loss, None
        iou = instance_scores(val_items, predict(sam, val_items, cache, device, crop=cfg.crop))["iou"]
        return iou, iou

    loop = LoopConfig(cfg.epochs, cfg.patience, val_name="val_iou", desc="SAM decoder", quiet=cfg.quiet,
                      time=cfg.time)
    state = fit_loop(loop, state, train_epoch, validate, ckpt, dist)
    if dist.is_main:
        ckpt.load_best(device)
    return state.history


def synthetic_stage(sam, key: str, conv: Path, cache, cfg: SamTrainConfig, n: int, epochs: int, run: Path,
                    device: str, dist) -> dict:
    """Train on ``n`` synthetic defects first (``<run>/pretrain``, selected on their own val split) and
    leave ``sam`` holding that stage's best weights; returns what was used.

    Rerun-safe: a finished stage (``pretrain/done.json``) is reloaded, not retrained; with ``--resume``
    an interrupted one continues from ``pretrain/last.pt``.  Rank 0 alone synthesizes and writes."""
    if dist.is_main:
        prepare(conv, n, cfg.seed, ("coco",), progress=not cfg.quiet)
    dist.barrier()
    data = prepare(conv, n, cfg.seed, ("coco",))  # every rank: reuses what rank 0 wrote (its stamp matches)
    pre = run / "pretrain"
    pre.mkdir(exist_ok=True)
    info = {**data.info, "conversion": str(data.conversion), "epochs": epochs, "crop": cfg.crop,
            "train_encoder": cfg.train_encoder, "checkpoint": str(pre / "best.pt")}
    if stage_done(pre, info):
        load_trained(sam, pre / "best.pt", key, device)
        return info
    pd = load_sam_data(data.conversion, None, 0, cfg.seed)
    log.info("synthetic pretraining: %d images (%d instances), %d epochs -> %s", len(pd.train),
             sum(len(i.boxes) for i in pd.train), epochs, pre)
    resume = cfg.resume and (pre / "last.pt").is_file()
    history = fit(sam, key, pd.train, pd.val, cache, replace(cfg, epochs=epochs, resume=resume), pre, device, dist)
    info_out = {**info, "val_iou": max((h["val_iou"] or 0) for h in history) if history else None}
    if dist.is_main:
        mark_stage_done(pre, info)
    return info_out
