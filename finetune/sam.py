"""Fine-tune SAM's mask decoder on defect masks, prompted by boxes; then detect-then-segment.

    python finetune/sam.py --data work/out/<data>/converted/<cat>-defect --model vit_b \\
        --checkpoint work/weights/sam_vit_b_01ec64.pth --epochs 20
    python finetune/sam.py --data ... --model vit_b --checkpoint ... \\
        --yolo-predictions work/runs/yolo/<run>/predictions.jsonl     # + the cascade
    python finetune/sam.py --data ... --anomaly-predictions work/runs/anomaly/<run>   # anomaly regions -> SAM
    python finetune/sam.py --data ... --model tiny --epochs 30        # offline: a 2-block ViT from scratch
    torchrun --nproc_per_node 2 finetune/sam.py --data ... --model vit_b --checkpoint ... --device cuda

``--data`` is a conversion folder written by ``make convert`` (its ``ground_truth.jsonl`` holds
instance masks and the split manifest's folds): training uses fold ``train``, model selection
fold ``val``, results fold ``test``.

Recipe (MedSAM, lightning-sam): image encoder frozen, prompt encoder frozen
(``--train-prompt-encoder`` to train it), mask decoder trained with Dice + BCE and AdamW; prompts
are ground-truth instance boxes with random jitter, plus ``--points N`` positive points sampled
inside the region.  ``--augment K`` adds K albumentations-augmented copies of every training
image (flips, rotations by 90 degrees, brightness/contrast), transforming image, mask and box
together; their embeddings are cached like the originals.  Image embeddings are computed once
and cached on disk (``--cache``, keyed by image content and model weights).

Checkpoints (``<run>/last.pt``, ``best.pt``) hold only what is trained (the mask decoder, and
the prompt encoder when trained) plus the base model's name and weights hash; ``--resume``
continues ``last.pt``.  ``metrics.json`` compares the base model (zero-shot) with the fine-tuned
one on the test fold (per-instance IoU and Dice, per defect type), and the cascade: YOLO boxes as
prompts, scored as instance segmentation (mask AP, pycocotools) and as pixel masks (IoU per
image, pixel AUROC of the mask scores).  ``--anomaly-predictions`` adds a second, class-agnostic
cascade: an anomaly model's thresholded regions as the prompts (``cascade_anomaly_predictions.jsonl``),
so SAM draws the masks of what the anomaly model found.  Every predictions file uses the canonical format.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from defectkit.converters.instances import iou_dice
from defectkit.core.atomic import atomic_torch_save, atomic_write_json, load_checkpoint
from defectkit.core.errors import ConfigError, DataError, MissingFileError, TrainingError
from defectkit.core.paths import WORK

log = logging.getLogger("defectkit.finetune.sam")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from defectkit.finetune.sam_core import MODEL_NAMES

    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="conversion folder of make convert (default: the demo's)")
    p.add_argument("--category", default=None, help="only this category's images")
    p.add_argument("--model", choices=MODEL_NAMES, default="vit_b")
    p.add_argument("--checkpoint", type=Path, default=None, help="SAM checkpoint (.pth), required except for tiny")
    p.add_argument("--imgsz", "--tiny-size", dest="imgsz", type=int, default=256,
                   help="input size of the tiny model (SAM checkpoints fix their own: 1024)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="instances per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--jitter", type=float, default=0.1, help="box jitter, fraction of the box side")
    p.add_argument("--points", type=int, default=0, help="positive points per prompt, sampled inside the region")
    p.add_argument("--crop", type=float, default=0.0,
                   help="segment each box on its own square crop, CROP times the box's longer side, resized to the "
                        "encoder's input (small defects at many times the resolution; one encoder pass per box); "
                        "0: the whole image, SAM's own way")
    p.add_argument("--augment", type=int, default=0, help="augmented copies of each training image")
    p.add_argument("--train-prompt-encoder", action="store_true")
    p.add_argument("--train-encoder", action="store_true",
                   help="train the image encoder too (MedSAM-style full fine-tuning; from scratch for the tiny "
                        "model); embeddings are then computed live, the cache serves frozen encoders only")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--synthetic-pretrain", type=int, default=0, metavar="N",
                   help="first train on N synthetic defects painted on the data's good images (exact masks, "
                        "<run>/pretrain), then fine-tune on the real train fold from there")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the synthetic stage (default --epochs)")
    p.add_argument(
        "--yolo-predictions", type=Path, default=None, help="canonical predictions of a YOLO run: the cascade"
    )
    p.add_argument(
        "--anomaly-predictions", type=Path, default=None,
        help="an anomaly run (folder, one predictions file per category, or a file): its thresholded regions "
             "prompt SAM, a class-agnostic anomaly -> SAM cascade (cascade_anomaly_predictions.jsonl)",
    )
    p.add_argument("--cascade-conf", type=float, default=None,
                   help="box confidence the YOLO cascade keeps boxes at (default: the YOLO run's own, the peak of its "
                        "val fold's F1 curve, in its deploy.json; 0.25 when it has none)")
    p.add_argument("--cache", type=Path, default=WORK / "cache" / "sam", help="image-embedding cache folder")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run folder (default work/runs/sam/<data>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue <out>/last.pt")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


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
    seed: int = 0
    resume: bool = False
    quiet: bool = False
    model: str = "vit_b"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamTrainConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# -------------------------------------------------------------------------------------- data


class Item:
    """One image with its instances (original resolution)."""

    def __init__(self, record, rgb: np.ndarray, masks: np.ndarray):
        self.record, self.rgb, self.masks = record, rgb, masks
        self.hw = rgb.shape[:2]
        self.boxes = np.asarray(record.boxes_xyxy, float)


def load_items(gt_records, data_root: Path, fold: str, category: str | None) -> list[Item]:
    from defectkit.datasets.image_files import read_image

    out = []
    for r in gt_records:
        if r.fold != fold or (category and r.category != category):
            continue
        out.append(Item(r, read_image(data_root / r.image), r.decode_masks()))
    return out


def augmented(items: list[Item], k: int, seed: int) -> list[Item]:
    """``k`` albumentations copies of each item with instances; image, masks and boxes move together."""
    import albumentations as A

    from defectkit.converters.instances import masks_to_boxes

    if k <= 0:
        return []
    tf = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomBrightnessContrast(0.15, 0.15, p=0.7),
        ],
        seed=seed,
    )
    out = []
    for it in items:
        if not len(it.masks):
            continue
        for _ in range(k):
            res = tf(image=it.rgb, masks=list(it.masks.astype(np.uint8)))
            masks = np.stack(res["masks"]).astype(bool)
            keep = masks.reshape(len(masks), -1).any(1)
            rec = copy.copy(it.record)
            rec.boxes_xyxy = masks_to_boxes(masks[keep])
            new = Item(rec, np.ascontiguousarray(res["image"]), masks[keep])
            out.append(new)
    return out


# -------------------------------------------------------------------------------------- train / evaluate


def sam_loss_module(sam, items, cache, cfg: SamTrainConfig, low: int, device: str):
    """The training loss as one module around ``sam``, so that DistributedDataParallel sees the
    encoder (``--train-encoder``) and the decoder run in its forward.  ``forward(chunk, epoch)``:
    ``chunk`` is ``[(position in the epoch, image index, instance index)]``; each instance's box
    jitter and points come from its own generator (seed, epoch, position), so a sample is the same
    in one process or across DDP processes.  Returns the *sum* of the instances' losses (an empty
    chunk gives a zero that still touches every trained parameter, so DDP's all-reduce runs)."""
    import torch

    from defectkit.finetune.sam_core import (
        decode,
        dice_bce_loss,
        in_window,
        jitter_boxes,
        low_res_targets,
        prompt_groups,
        sample_points,
    )

    def groups(it, ks):
        """Instances that share an encoder pass (:func:`prompt_groups`, windows around the un-jittered GT
        boxes, so a frozen encoder's crops are cached), as indices into the item's instances."""
        return [(w, [ks[j] for j in idx]) for w, idx in prompt_groups(it.boxes[ks], it.hw, cfg.crop)]

    class SamLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sam = sam

        def forward(self, chunk, epoch: int):
            if not chunk:  # the last step of an epoch can leave a process nothing
                return 0.0 * sum(p.reshape(-1)[0] for p in self.parameters() if p.requires_grad)
            by_image: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for pos, i, k in chunk:
                by_image[i].append((pos, k))
            losses = []
            for i, pk in by_image.items():
                it, rng_of = items[i], {k: np.random.default_rng([cfg.seed, epoch, 11, pos]) for pos, k in pk}
                for window, ks in groups(it, [k for _, k in pk]):
                    y0, y1, x0, x1 = window
                    rgb, masks = np.ascontiguousarray(it.rgb[y0:y1, x0:x1]), it.masks[ks][:, y0:y1, x0:x1]
                    hw, rngs = rgb.shape[:2], [rng_of[k] for k in ks]
                    emb = cache.encode(rgb, grad=True) if cfg.train_encoder else cache.get(rgb).to(device)
                    boxes = in_window(it.boxes[ks], window)
                    boxes = np.concatenate([jitter_boxes(boxes[[j]], hw, r, cfg.jitter) for j, r in enumerate(rngs)])
                    pts = (np.concatenate([sample_points(masks[[j]], cfg.points, r) for j, r in enumerate(rngs)])
                           if cfg.points else None)
                    logits, _ = decode(self.sam, emb, boxes, hw, cache, pts, cfg.train_prompt_encoder)
                    target = low_res_targets(masks, hw, cache, low).to(device)
                    losses.append(dice_bce_loss(logits, target) * len(ks))
            return torch.stack(losses).sum()

    return SamLoss()


def train_one_epoch(step, items, opt, cfg: SamTrainConfig, rng, epoch: int = 0, dist=None) -> float:
    """One epoch of ``step`` (:func:`sam_loss_module`, in DDP under torchrun).  Each optimizer step
    takes a window of ``world * batch`` instances (``--batch`` per process); process ``r`` takes
    ``window[r::world]`` and scales its loss sum by ``world / len(window)``, so that DDP's gradient
    average is the mean over the whole window even when the last window is uneven: the same step a
    single process takes with ``--batch world*batch``.  Returns the mean loss over all instances."""
    import torch

    sam = step.module.sam if hasattr(step, "module") else step.sam
    sam.mask_decoder.train()
    sam.image_encoder.train(cfg.train_encoder)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    pairs = [(i, k) for i, it in enumerate(items) for k in range(len(it.boxes))]
    order = [(pos, *pairs[j]) for pos, j in enumerate(rng.permutation(len(pairs)))]  # the same on every rank
    total, n = 0.0, 0
    width = cfg.batch * world
    for s in range(0, len(order), width):
        window = order[s : s + width]
        chunk = window[rank::world]
        loss_sum = step(chunk, epoch)
        if not math.isfinite(float(loss_sum.detach())):
            raise TrainingError(
                f"the training loss became {float(loss_sum)} at epoch {epoch + 1}, step "
                f"{s // width + 1}: lower the learning rate (--lr, now {cfg.lr:g})"
            )
        opt.zero_grad(set_to_none=True)
        (loss_sum * (world / len(window))).backward()
        opt.step()
        total += float(loss_sum.detach())
        n += len(chunk)
    if world > 1:
        t = torch.tensor([total, float(n)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        total, n = float(t[0]), int(t[1])
    return total / max(n, 1)


def mask_confidence(prob: np.ndarray) -> np.ndarray:
    """A score per mask from its own logits: the mean probability inside the predicted mask (0 for
    an empty mask).  SAM's IoU head is not trained by the decoder loss here, so its output is
    not used as a confidence."""
    inside = prob > 0.5
    n = inside.reshape(len(prob), -1).sum(1)
    total = (prob * inside).reshape(len(prob), -1).sum(1)
    return np.where(n > 0, total / np.maximum(n, 1), 0.0)


def predict(sam, items, cache, device: str, boxes_of=None, crop: float = 0.0):
    """For each item: masks (N, H, W) bool, mask probabilities, mask confidences
    (:func:`mask_confidence`), for box prompts (the item's GT boxes unless ``boxes_of(item)``
    gives others), each segmented on its own crop when ``crop`` > 0 (``--crop``)."""
    import torch

    from defectkit.finetune.sam_core import segment_boxes

    sam.eval()
    out = []
    with torch.no_grad():
        for it in items:
            boxes = it.boxes if boxes_of is None else boxes_of(it)
            if not len(boxes):
                out.append((np.zeros((0, *it.hw), bool), np.zeros((0, *it.hw), np.float32), np.zeros(0)))
                continue
            prob = segment_boxes(sam, it.rgb, boxes, cache, crop, encode=lambda rgb: cache.get(rgb).to(device))
            out.append((prob > 0.5, prob, mask_confidence(prob)))
    return out


def instance_scores(items, preds) -> dict:
    """Per-instance IoU and Dice of predicted vs GT masks (same order), overall and per type
    (``converters.instances.iou_dice``, the suite's one definition)."""
    ious, dices, types = [], [], []
    for it, (masks, _, _) in zip(items, preds, strict=True):
        for m, g in zip(masks, it.masks, strict=True):
            iou, dice = iou_dice(m, g)
            ious.append(iou)
            dices.append(dice)
            types.append(it.record.defect_type)
    t, ious, dices = np.asarray(types), np.asarray(ious), np.asarray(dices)
    per = {
        d: {
            "iou": float(np.nanmean(ious[t == d])),
            "dice": float(np.nanmean(dices[t == d])),
            "instances": int((t == d).sum()),
        }
        for d in sorted(set(types))
    }
    return {
        "iou": float(np.nanmean(ious)) if len(ious) else float("nan"),
        "dice": float(np.nanmean(dices)) if len(dices) else float("nan"),
        "instances": len(ious),
        "per_type": per,
    }


def box_as_mask(items) -> list:
    """The baseline every box-prompted segmenter must beat: each prompt box, filled, as the mask
    (in :func:`predict`'s form, for :func:`instance_scores`)."""
    out = []
    for it in items:
        m = np.zeros((len(it.boxes), *it.hw), bool)
        for j, (x0, y0, x1, y1) in enumerate(np.asarray(it.boxes, float)):
            m[j, int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
        out.append((m, m.astype(np.float32), np.ones(len(m))))
    return out


def _state(sam, cfg: SamTrainConfig) -> dict:
    s = {"mask_decoder": sam.mask_decoder.state_dict()}
    if cfg.train_prompt_encoder:
        s["prompt_encoder"] = sam.prompt_encoder.state_dict()
    if cfg.train_encoder:
        s["image_encoder"] = sam.image_encoder.state_dict()
    return s


def _load_trained(sam, path: Path, key: str, device: str) -> dict:

    ck = load_checkpoint(path, device)
    if ck["base_key"] != key:
        raise ConfigError(f"{path} was trained on base {ck['base_key']}, not {key}: pass the same --model/--checkpoint")
    sam.mask_decoder.load_state_dict(ck["mask_decoder"])
    if "prompt_encoder" in ck:
        sam.prompt_encoder.load_state_dict(ck["prompt_encoder"])
    if "image_encoder" in ck:
        sam.image_encoder.load_state_dict(ck["image_encoder"])
    return ck


def fit(sam, key: str, train_items, val_items, cache, cfg: SamTrainConfig, run: Path, device: str,
        dist=None) -> list[dict]:
    """Train the decoder with per-epoch checkpoints, resume and early stopping on val mean IoU.

    With no val instance, selection falls back to the training loss, so ``best.pt`` always exists.
    Under torchrun: DDP; rank 0 validates and decides for all, and alone writes checkpoints."""
    import torch

    from defectkit.core.distributed import Dist
    from defectkit.core.progress import progress

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
    start, best, stale, history = 0, -math.inf, 0, []
    last = run / "last.pt"
    if cfg.resume:
        if not last.is_file():
            raise MissingFileError(f"--resume: {last} does not exist; nothing to resume")
        ck = _load_trained(sam, last, key, device)
        opt.load_state_dict(ck["optimizer"])
        start, best, stale, history = ck["epoch"] + 1, ck["best_val_iou"], ck["stale"], ck["history"]
    bar = progress(range(start, cfg.epochs), desc="SAM decoder", disable=cfg.quiet or not dist.is_main,
                   initial=start, total=cfg.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])  # per epoch: a resumed run replays the same draws
        loss = train_one_epoch(step, train_items, opt, cfg, rng, epoch, dist)
        val = loss
        if dist.is_main:
            if val_items:
                val = instance_scores(val_items, predict(sam, val_items, cache, device, crop=cfg.crop))["iou"]
            else:
                val = -loss
        val = dist.broadcast(val)
        improved = val > best + 1e-4
        best, stale = (val, 0) if improved else (best, stale + 1)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss,
                "val_iou": val if val_items else None,
                "seconds": time.perf_counter() - t0,
            }
        )
        meta = {
            "base": cfg.model,
            "base_key": key,
            "epoch": epoch,
            "best_val_iou": best,
            "stale": stale,
            "history": history,
            "selected_on": "val mean IoU" if val_items else "train loss (no val instance)",
        }
        if dist.is_main:
            if improved:
                atomic_torch_save({**_state(sam, cfg), **meta}, run / "best.pt")
            atomic_torch_save({**_state(sam, cfg), "optimizer": opt.state_dict(), **meta}, last)
        bar.set_postfix(loss=f"{loss:.3f}", val_iou=f"{val:.3f}")
        if stale >= cfg.patience:
            log.info("early stop at epoch %d", epoch + 1)
            break
    if dist.is_main:
        atomic_write_json(run / "history.json", history)
        _load_trained(sam, run / "best.pt", key, device)
    return history


def synthetic_stage(sam, key: str, conv: Path, cache, cfg: SamTrainConfig, n: int, epochs: int, run: Path,
                    device: str, dist) -> dict:
    """Train on ``n`` synthetic defects first (``<run>/pretrain``, selected on their own val split) and
    leave ``sam`` holding that stage's best weights; returns what was used.

    Rerun-safe: a finished stage (``pretrain/done.json``) is reloaded, not retrained; with ``--resume``
    an interrupted one continues from ``pretrain/last.pt``.  Rank 0 alone synthesizes and writes."""
    from defectkit.finetune.synthetic_pretrain import prepare

    if dist.is_main:
        prepare(conv, n, cfg.seed, ("coco",), progress=not cfg.quiet)
    dist.barrier()
    data = prepare(conv, n, cfg.seed, ("coco",))  # every rank: reuses what rank 0 wrote (its stamp matches)
    pre = run / "pretrain"
    pre.mkdir(exist_ok=True)
    info = {**data.info, "conversion": str(data.conversion), "epochs": epochs, "crop": cfg.crop,
            "train_encoder": cfg.train_encoder, "checkpoint": str(pre / "best.pt")}
    done = pre / "done.json"
    if done.is_file() and json.loads(done.read_text()) == info:
        log.info("synthetic pretraining already done: %s", done)
        _load_trained(sam, pre / "best.pt", key, device)
        return info
    pd = load_sam_data(data.conversion, None, 0, cfg.seed)
    log.info("synthetic pretraining: %d images (%d instances), %d epochs -> %s", len(pd.train),
             sum(len(i.boxes) for i in pd.train), epochs, pre)
    resume = cfg.resume and (pre / "last.pt").is_file()
    history = fit(sam, key, pd.train, pd.val, cache, replace(cfg, epochs=epochs, resume=resume), pre, device, dist)
    info_out = {**info, "val_iou": max((h["val_iou"] or 0) for h in history) if history else None}
    if dist.is_main:
        atomic_write_json(done, info)
    return info_out


def _records(items, preds, classes_of):
    from defectkit.converters.canonical import ImageRecord
    from defectkit.converters.instances import encode_rle, masks_to_boxes

    recs = []
    for it, (masks, _prob, _iou), (labels, _boxes, box_scores) in zip(items, preds, classes_of, strict=True):
        recs.append(
            ImageRecord(
                image=it.record.image,
                height=it.hw[0],
                width=it.hw[1],
                boxes_xyxy=masks_to_boxes(masks) if len(masks) else np.zeros((0, 4)),
                labels=list(labels),
                scores=np.asarray(box_scores, float),
                masks=[encode_rle(m) for m in masks],
                image_score=float(np.max(box_scores)) if len(box_scores) else 0.0,
                key=it.record.key,
                category=it.record.category,
                defect_type=it.record.defect_type,
                fold=it.record.fold,
            )
        )
    return recs


def resolve_cascade_conf(conf: float | None, predictions: Path) -> tuple[float, str]:
    """The box confidence of the YOLO cascade and where it came from: ``--cascade-conf``, else the YOLO run's
    val-chosen ``thresholds.box_conf`` (its ``deploy.json``, beside the predictions file), else 0.25."""
    from defectkit.review.compare import deploy_threshold

    if conf is not None:
        return conf, "--cascade-conf"
    c = deploy_threshold(Path(predictions), "box_conf")
    if c is not None:
        return c, f"{Path(predictions).parent / 'deploy.json'}: the peak of the val fold's box F1"
    return 0.25, "default 0.25 (the YOLO run has no val-chosen box confidence)"


@dataclass(frozen=True)
class CascadeConfig:
    predictions: Path  # a predictions file, or a run folder (an anomaly run: one file per category)
    conf: float = 0.25
    sam_model: str = "tiny"
    crop: float = 0.0
    out_name: str = "cascade_predictions.jsonl"


def read_prompt_predictions(src: Path, classes: list[str]) -> tuple[dict, list, bool]:
    """The boxes a cascade prompts SAM with: ``(header, records, class_aware)``.  Every predictions file
    of ``src`` (an anomaly run trained with ``--category all`` has one per category) is read; a detector
    of the data's classes gives a class-aware cascade, an anomaly model (or a one-class ``defect``
    detector) a class-agnostic one.  Anything else is refused with the reason."""
    from defectkit.converters.canonical import read_records
    from defectkit.review.compare import find_prediction_files

    files = [f for f in find_prediction_files([src]) if not f.name.startswith("cascade")]
    header, recs = None, []
    for f in files:
        h, r = read_records(f)
        if header is not None and h["classes"] != header["classes"]:
            raise DataError(f"{f}: classes {h['classes']} differ from {files[0]}'s {header['classes']}")
        header = header or h
        recs += r
    if header["classes"] == classes:
        return header, recs, True
    if header.get("kind_of_model") == "anomaly" or header["classes"] == ["defect"]:
        return header, recs, False
    raise DataError(
        f"{files[0]} has classes {header['classes']}, the data has {classes}: use a detector trained on the "
        "same conversion, or an anomaly model (or a one-class `defect` detector) for a class-agnostic cascade"
    )


def cascade(sam, cache, test_items, gt_test, header, classes, cfg: CascadeConfig, run: Path, device: str) -> dict:
    """Boxes of another model (YOLO, or an anomaly model's thresholded regions) as prompts: instance masks
    scored by mask AP (class-agnostic when the prompts carry no defect class), pixel IoU and pixel
    AUROC/AUPRO (the suite's metrics: images with neither a defect nor a kept box have no IoU and are
    left out).  An anomaly model's regions were already thresholded on its val fold: all are kept."""
    from defectkit.converters.canonical import make_header, write_records
    from defectkit.review.compare import _agnostic, pixel_score_map
    from defectkit.review.detection import coco_evaluate
    from defectkit.review.metrics import mean_defined, pixel_metrics

    yh, ypreds, class_aware = read_prompt_predictions(cfg.predictions, classes)
    anomaly = yh.get("kind_of_model") == "anomaly"
    conf = -np.inf if anomaly else cfg.conf
    by_image = {r.image: r for r in ypreds}
    none = ([], np.zeros((0, 4)), np.zeros(0))
    meta = [
        (r.labels, r.boxes_xyxy, r.scores) if (r := by_image.get(it.record.image)) is not None else none
        for it in test_items
    ]
    boxes_by_item = {id(it): m[1] for it, m in zip(test_items, meta, strict=True)}
    preds = predict(sam, test_items, cache, device, lambda it: boxes_by_item[id(it)], cfg.crop)
    recs = _records(test_items, preds, meta)
    extra = {"kind_of_model": "anomaly", "note": f"{yh['model']} regions (thresholded on its val fold) as "
             "prompts; mask scores are its raw map values"} if anomaly else {}
    write_records(
        run / cfg.out_name,
        make_header(
            "predictions",
            f"{yh['model']}+sam-{cfg.sam_model}",
            yh["classes"],
            header["data_root"],
            manifest=header.get("manifest"),
            fold="test",
            prompts_from=str(cfg.predictions),
            **({"yolo_run": str(cfg.predictions), "box_conf": cfg.conf} if not anomaly else {}),
            **extra,
        ),
        recs,
    )
    ious, score_maps, gts = [], [], []
    for it, rec, (masks, _prob, _), (_labels, _boxes, scores) in zip(test_items, recs, preds, meta, strict=True):
        keep = np.asarray(scores) >= conf
        pred_union = masks[keep].any(0) if keep.any() else np.zeros(it.hw, bool)
        gt_union = it.masks.any(0) if len(it.masks) else np.zeros(it.hw, bool)
        ious.append(iou_dice(pred_union, gt_union)[0])
        score_maps.append(pixel_score_map(rec, run, it.hw))  # from what was written, as the comparison does
        gts.append(gt_union)
    px = pixel_metrics(score_maps, gts)
    if class_aware:
        ap = {"mask_ap": coco_evaluate(gt_test, recs, classes, "segm"),
              "box_ap_after_sam": coco_evaluate(gt_test, recs, classes, "bbox")}
    else:
        ap = {"mask_ap_class_agnostic": coco_evaluate(_agnostic(gt_test), _agnostic(recs), ["defect"], "segm"),
              "box_ap_after_sam_class_agnostic": coco_evaluate(_agnostic(gt_test), _agnostic(recs), ["defect"],
                                                               "bbox")}
    return {
        **ap,
        "prompts": str(cfg.predictions),
        "prompt_model": yh["model"],
        "class_aware": class_aware,
        "predictions": cfg.out_name,
        "pixel_iou_per_image": mean_defined(ious),
        "cascade_conf": None if anomaly else cfg.conf,
        "pixel_auroc": px["auroc"],
        "pixel_aupro": px["aupro"],
    }


# -------------------------------------------------------------------------------------- main


def default_data() -> Path:
    return WORK / "out" / "defectkit_synth" / "converted" / "all-defect"


@dataclass
class SamData:
    header: dict
    gt: list
    classes: list[str]
    data_root: Path
    train: list
    val: list
    test: list


def load_sam_data(conv: Path, category: str | None, augment: int, seed: int) -> SamData:
    from defectkit.converters.canonical import read_records

    gt_path = conv / "ground_truth.jsonl"
    if not gt_path.is_file():
        raise MissingFileError(f"{gt_path} not found: --data must be a conversion folder written by make convert")
    header, gt = read_records(gt_path)
    data_root = Path(header["data_root"])
    train = [it for it in load_items(gt, data_root, "train", category) if len(it.boxes)]
    train += augmented(train, augment, seed)
    val = [it for it in load_items(gt, data_root, "val", category) if len(it.boxes)]
    return SamData(header, gt, header["classes"], data_root, train, val, load_items(gt, data_root, "test", category))


def score_fine_tuned(sam, cache, test_items, d: SamData, key: str, model: str, run: Path, device: str,
                     crop: float = 0.0) -> dict:
    """GT-box-prompted masks of the trained decoder on the test fold: scores, speed, predictions file.

    Every test image gets a record (an image without a defect has no prompt and no mask), so the
    comparison sees the same test images for SAM as for every other model."""
    from defectkit.converters.canonical import make_header, write_records

    t0 = time.perf_counter()
    preds = predict(sam, test_items, cache, device, crop=crop)
    infer_s = time.perf_counter() - t0
    meta = [(list(it.record.labels), it.boxes, conf) for it, (_, _, conf) in zip(test_items, preds, strict=True)]
    write_records(run / "predictions.jsonl",
                  make_header("predictions", f"sam-{model}", d.classes, d.data_root,
                              manifest=d.header.get("manifest"), fold="test", prompts="ground-truth boxes", base=key,
                              crop=crop),
                  _records(test_items, preds, meta))
    return {"fine_tuned": instance_scores(test_items, preds), "test_images": len(test_items),
            "images_per_s": len(test_items) / infer_s if infer_s else float("nan")}


def main(args: argparse.Namespace) -> dict:
    import torch

    from defectkit.core.distributed import process_group

    with process_group(args.device or ("cuda" if torch.cuda.is_available() else "cpu")) as dist:
        return _main(args, dist)


def _main(args: argparse.Namespace, dist) -> dict:
    """Train and score; under torchrun every process trains its share, rank 0 alone scores and writes."""
    import torch

    from defectkit.finetune.sam_core import EmbeddingCache, load_sam

    cfg = SamTrainConfig.from_args(args)
    torch.manual_seed(cfg.seed)
    device = dist.device
    conv = args.data or default_data()
    d = load_sam_data(conv, args.category, args.augment, cfg.seed)
    run = (args.out or WORK / "runs" / "sam" / f"{conv.name}-{cfg.model}").resolve()
    run.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        atomic_write_json(run / "run_args.json", vars(args))
    sam, key = load_sam(cfg.model, args.checkpoint, args.imgsz, cfg.seed)
    sam.to(device)
    cache = EmbeddingCache(sam, args.cache, key, device)
    test_inst = [it for it in d.test if len(it.boxes)]
    t0 = time.perf_counter()
    # fill the cache once (frozen encoder, whole images; crops are cached as they are first met)
    for it in [] if cfg.train_encoder or cfg.crop > 0 else [*d.train, *d.val, *d.test]:
        cache.get(it.rgb)
    embed_s = time.perf_counter() - t0
    log.info("embeddings: %d computed, %d from the cache (%.1fs)", cache.misses, cache.hits, embed_s)
    base_state = copy.deepcopy(sam.mask_decoder.state_dict())
    zero_shot = (instance_scores(test_inst, predict(sam, test_inst, cache, device, crop=cfg.crop))
                 if dist.is_main else None)
    t1 = time.perf_counter()
    pretrain, label = None, cfg.model
    if args.synthetic_pretrain > 0:
        pretrain = synthetic_stage(sam, key, conv, cache, cfg, args.synthetic_pretrain,
                                   args.pretrain_epochs if args.pretrain_epochs is not None else cfg.epochs,
                                   run, device, dist)
        label = f"{cfg.model} (synthetic pretrain {args.synthetic_pretrain})"
        if dist.is_main:  # what the synthetic stage alone gives on the real test fold
            pretrain["test"] = instance_scores(test_inst, predict(sam, test_inst, cache, device, crop=cfg.crop))
        # --resume after a stop inside the synthetic stage: that stage continued, fine-tuning starts afresh
        cfg = replace(cfg, resume=cfg.resume and (run / "last.pt").is_file())
    history = fit(sam, key, d.train, d.val, cache, cfg, run, device, dist) if cfg.epochs > 0 else []
    train_s = time.perf_counter() - t1
    if not dist.is_main:
        return {}
    metrics = {"model": cfg.model, "base": key, "data": str(conv),
               "train_instances": sum(len(i.boxes) for i in d.train), "test_instances": zero_shot["instances"],
               "box_as_mask": instance_scores(test_inst, box_as_mask(test_inst)),
               "zero_shot": zero_shot, "epochs_run": len(history), "train_seconds": train_s,
               "embedding_seconds": embed_s, "embeddings_computed": cache.misses,
               **score_fine_tuned(sam, cache, d.test, d, key, label, run, device, cfg.crop),
               "base_decoder_changed": any(not torch.equal(base_state[k].cpu(), v.cpu())
                                           for k, v in sam.mask_decoder.state_dict().items())}
    if pretrain:
        metrics["synthetic_pretrain"] = pretrain
    if cfg.model == "tiny":
        how = "encoder included" if cfg.train_encoder else "with a random frozen encoder"
        metrics["note"] = f"tiny SAM (2-block ViT) trained from scratch, {how}: not SAM's results"
    gt_test = [r for r in d.gt if r.fold == "test" and (not args.category or r.category == args.category)]
    # the anomaly cascade keeps all its regions; the confidence is the YOLO cascade's
    conf, conf_source = (resolve_cascade_conf(args.cascade_conf, args.yolo_predictions) if args.yolo_predictions
                         else (args.cascade_conf or 0.25, "no YOLO cascade"))
    if args.yolo_predictions:
        metrics["cascade"] = cascade(
            sam,
            cache,
            d.test,
            gt_test,
            d.header,
            d.classes,
            CascadeConfig(args.yolo_predictions, conf, label, cfg.crop),
            run,
            device,
        ) | {"cascade_conf_source": conf_source}
    if args.anomaly_predictions:
        metrics["anomaly_cascade"] = cascade(
            sam, cache, d.test, gt_test, d.header, d.classes,
            CascadeConfig(args.anomaly_predictions, conf, label, cfg.crop,
                          "cascade_anomaly_predictions.jsonl"),
            run, device,
        )
    from defectkit.finetune.sam_deploy import write_spec

    write_spec(run, args, key, Path(args.yolo_predictions).resolve().parent if args.yolo_predictions else None,
               conf)  # what predict on new images uses
    atomic_write_json(run / "metrics.json", metrics)
    _print(metrics, run)
    return metrics


def _cascade_line(name: str, c: dict) -> str:
    ap = c.get("mask_ap") or c["mask_ap_class_agnostic"]
    agn = "" if c.get("class_aware", True) else " (class-agnostic)"
    return (f"; {name} cascade mask AP50{agn} {ap['map50']:.3f}, pixel IoU {c['pixel_iou_per_image'] or 0:.3f}, "
            f"pixel AUROC {c['pixel_auroc']:.3f}")


def _print(metrics: dict, run: Path) -> None:
    z, t = metrics["zero_shot"], metrics["fine_tuned"]
    print(
        f"SAM {metrics['model']} on the test fold ({z['instances']} instances, GT-box prompts): mean IoU "
        f"{z['iou']:.3f} zero-shot -> {t['iou']:.3f} fine-tuned (Dice {z['dice']:.3f} -> {t['dice']:.3f}; "
        f"the box itself as the mask: IoU {metrics['box_as_mask']['iou']:.3f})"
        + (_cascade_line("YOLO", metrics["cascade"]) if "cascade" in metrics else "")
        + (_cascade_line("anomaly", metrics["anomaly_cascade"]) if "anomaly_cascade" in metrics else "")
    )
    if (p := metrics.get("synthetic_pretrain")) and p.get("test"):
        print(f"after {p['images']} synthetic defects alone ({p['epochs']} epochs): mean IoU {p['test']['iou']:.3f} "
              f"on the same instances")
    if metrics.get("note"):
        print(f"note: {metrics['note']}")
    print(f"run folder: {run}")


def cli(argv: list[str] | None = None) -> int:
    from defectkit.core.cli import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
