"""Fine-tune SAM's mask decoder on defect masks, prompted by boxes; then detect-then-segment.

    python finetune/sam.py --data work/out/<data>/converted/<cat>-defect --model vit_b \\
        --checkpoint work/weights/sam_vit_b_01ec64.pth --epochs 20
    python finetune/sam.py --data ... --model vit_b --checkpoint ... \\
        --yolo-predictions work/runs/yolo/<run>/predictions.jsonl     # + the cascade
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
image, pixel AUROC of the mask scores).  ``predictions.jsonl`` and ``cascade_predictions.jsonl``
use the canonical format.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from defectkit import WORK  # noqa: E402

log = logging.getLogger("defectkit.finetune.sam")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from defectkit.finetune.sam_core import MODEL_NAMES

    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="conversion folder of make convert (default: the demo's)")
    p.add_argument("--category", default=None, help="only this category's images")
    p.add_argument("--model", choices=MODEL_NAMES, default="vit_b")
    p.add_argument("--checkpoint", type=Path, default=None, help="SAM checkpoint (.pth), required except for tiny")
    p.add_argument("--tiny-size", type=int, default=256, help="input size of the tiny model")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="instances per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--jitter", type=float, default=0.1, help="box jitter, fraction of the box side")
    p.add_argument("--points", type=int, default=0, help="positive points per prompt, sampled inside the region")
    p.add_argument("--augment", type=int, default=0, help="augmented copies of each training image")
    p.add_argument("--train-prompt-encoder", action="store_true")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--yolo-predictions", type=Path, default=None, help="canonical predictions of a YOLO run: the cascade")
    p.add_argument("--cascade-conf", type=float, default=0.25, help="box confidence for the cascade's pixel masks")
    p.add_argument("--cache", type=Path, default=WORK / "cache" / "sam", help="image-embedding cache folder")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run folder (default work/runs/sam/<data>-<model>)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


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
    tf = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5),
                    A.RandomBrightnessContrast(0.15, 0.15, p=0.7)], seed=seed)
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


def train_one_epoch(sam, items, cache, opt, args, rng, low: int, device: str, train_prompt: bool) -> float:
    import torch

    from defectkit.finetune.sam_core import (
        decode,
        dice_bce_loss,
        jitter_boxes,
        low_res_targets,
        sample_points,
    )

    sam.mask_decoder.train()
    pairs = [(i, k) for i, it in enumerate(items) for k in range(len(it.boxes))]
    order = rng.permutation(len(pairs))  # the same on every rank (same seed)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist:  # each rank takes its share of every step's instances; gradients are averaged below
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        order = order[: len(order) - len(order) % world].reshape(-1, world)[:, rank]
    total, n = 0.0, 0
    for s in range(0, len(order), args.batch):
        chunk = [pairs[j] for j in order[s : s + args.batch]]
        by_image: dict[int, list[int]] = defaultdict(list)
        for i, k in chunk:
            by_image[i].append(k)
        losses = []
        for i, ks in by_image.items():
            it = items[i]
            emb = cache.get(it.rgb).to(device)
            boxes = jitter_boxes(it.boxes[ks], it.hw, rng, args.jitter)
            pts = sample_points(it.masks[ks], args.points, rng) if args.points else None
            logits, _ = decode(sam, emb, boxes, it.hw, cache, pts, train_prompt)
            target = low_res_targets(it.masks[ks], it.hw, cache, low).to(device)
            losses.append(dice_bce_loss(logits, target) * len(ks))
        loss = torch.stack(losses).sum() / len(chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if dist:
            for p in (p for g in opt.param_groups for p in g["params"] if p.grad is not None):
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        total += loss.item() * len(chunk)
        n += len(chunk)
    return total / max(n, 1)


def predict(sam, items, cache, device: str, boxes_of=None, scores_of=None):
    """For each item: masks (N, H, W) bool, mask probabilities, IoU predictions, for box prompts
    (the item's GT boxes unless ``boxes_of(item)`` gives others)."""
    import torch

    from defectkit.finetune.sam_core import decode, full_res

    sam.eval()
    out = []
    with torch.no_grad():
        for it in items:
            boxes = it.boxes if boxes_of is None else boxes_of(it)
            if not len(boxes):
                out.append((np.zeros((0, *it.hw), bool), np.zeros((0, *it.hw), np.float32), np.zeros(0)))
                continue
            emb = cache.get(it.rgb).to(device)
            logits, iou = decode(sam, emb, boxes, it.hw, cache)
            prob = full_res(sam, logits, it.hw, cache).cpu().numpy()
            out.append((prob > 0.5, prob, iou[:, 0].cpu().numpy()))
    return out


def instance_scores(items, preds) -> dict:
    """Per-instance IoU and Dice of predicted vs GT masks (same order), overall and per type."""
    ious, dices, types = [], [], []
    for it, (masks, _, _) in zip(items, preds, strict=True):
        for m, g in zip(masks, it.masks, strict=True):
            inter, union, s = (m & g).sum(), (m | g).sum(), m.sum() + g.sum()
            ious.append(inter / union if union else 1.0)
            dices.append(2 * inter / s if s else 1.0)
            types.append(it.record.defect_type)
    t = np.asarray(types)
    per = {d: {"iou": float(np.mean(np.asarray(ious)[t == d])), "dice": float(np.mean(np.asarray(dices)[t == d])),
               "instances": int((t == d).sum())} for d in sorted(set(types))}
    return {"iou": float(np.mean(ious)) if ious else float("nan"), "dice": float(np.mean(dices)) if dices else float("nan"),
            "instances": len(ious), "per_type": per}


def _state(sam, train_prompt: bool) -> dict:
    s = {"mask_decoder": sam.mask_decoder.state_dict()}
    if train_prompt:
        s["prompt_encoder"] = sam.prompt_encoder.state_dict()
    return s


def _save(path: Path, obj: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_trained(sam, path: Path, key: str, device: str) -> dict:
    import torch

    ck = torch.load(path, map_location=device, weights_only=False)
    if ck["base_key"] != key:
        raise ValueError(f"{path} was trained on base {ck['base_key']}, not {key}: pass the same --model/--checkpoint")
    sam.mask_decoder.load_state_dict(ck["mask_decoder"])
    if "prompt_encoder" in ck:
        sam.prompt_encoder.load_state_dict(ck["prompt_encoder"])
    return ck


def fit(sam, key: str, train_items, val_items, cache, args, run: Path, device: str) -> list[dict]:
    """Train the decoder with per-epoch checkpoints, resume and early stopping on val mean IoU."""
    import torch
    from tqdm.auto import tqdm

    for p in sam.image_encoder.parameters():
        p.requires_grad_(False)
    for p in sam.prompt_encoder.parameters():
        p.requires_grad_(args.train_prompt_encoder)
    params = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    low = sam.image_encoder.img_size // 4
    start, best, stale, history = 0, -1.0, 0, []
    last = run / "last.pt"
    if args.resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: {last} does not exist")
        ck = _load_trained(sam, last, key, device)
        opt.load_state_dict(ck["optimizer"])
        start, best, stale, history = ck["epoch"] + 1, ck["best_val_iou"], ck["stale"], ck["history"]
    rng = np.random.default_rng(args.seed + start)
    bar = tqdm(range(start, args.epochs), desc="SAM decoder", disable=args.quiet, initial=start, total=args.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        loss = train_one_epoch(sam, train_items, cache, opt, args, rng, low, device, args.train_prompt_encoder)
        val = instance_scores(val_items, predict(sam, val_items, cache, device))["iou"] if val_items else -loss
        improved = val > best + 1e-4
        if improved:
            best, stale = val, 0
        else:
            stale += 1
        history.append({"epoch": epoch + 1, "train_loss": loss, "val_iou": val, "seconds": time.perf_counter() - t0})
        meta = {"base": args.model, "base_key": key, "epoch": epoch, "best_val_iou": best, "stale": stale, "history": history}
        if improved:
            _save(run / "best.pt", {**_state(sam, args.train_prompt_encoder), **meta})
        _save(last, {**_state(sam, args.train_prompt_encoder), "optimizer": opt.state_dict(), **meta})
        bar.set_postfix(loss=f"{loss:.3f}", val_iou=f"{val:.3f}")
        if stale >= args.patience:
            log.info("early stop at epoch %d", epoch + 1)
            break
    (run / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    _load_trained(sam, run / "best.pt", key, device)
    return history


def _records(items, preds, classes_of):
    from defectkit.converters.canonical import ImageRecord
    from defectkit.converters.instances import encode_rle, masks_to_boxes

    recs = []
    for it, (masks, _prob, _iou), (labels, _boxes, box_scores) in zip(items, preds, classes_of, strict=True):
        recs.append(ImageRecord(image=it.record.image, height=it.hw[0], width=it.hw[1],
                                boxes_xyxy=masks_to_boxes(masks) if len(masks) else np.zeros((0, 4)),
                                labels=list(labels), scores=np.asarray(box_scores, float),
                                masks=[encode_rle(m) for m in masks],
                                image_score=float(np.max(box_scores)) if len(box_scores) else 0.0,
                                key=it.record.key, category=it.record.category, defect_type=it.record.defect_type,
                                fold=it.record.fold))
    return recs


def cascade(sam, cache, test_items, gt_test, header, classes, args, run: Path, device: str) -> dict:
    """YOLO boxes as prompts: instance masks scored by mask AP, pixel IoU and pixel AUROC."""
    from defectkit.anomaly.metrics import auroc
    from defectkit.converters.canonical import make_header, read_records, write_records
    from defectkit.converters.detection_eval import coco_evaluate

    yh, ypreds = read_records(args.yolo_predictions)
    if yh["classes"] != classes:
        raise ValueError(f"{args.yolo_predictions} has classes {yh['classes']}, the data has {classes}: "
                         "use a YOLO run trained on the same conversion")
    by_image = {r.image: r for r in ypreds}
    boxes_of = lambda it: by_image[it.record.image].boxes_xyxy if it.record.image in by_image else np.zeros((0, 4))  # noqa: E731
    preds = predict(sam, test_items, cache, device, boxes_of)
    meta = []
    for it in test_items:
        r = by_image.get(it.record.image)
        meta.append((r.labels, r.boxes_xyxy, r.scores) if r is not None else ([], np.zeros((0, 4)), np.zeros(0)))
    recs = _records(test_items, preds, meta)
    write_records(run / "cascade_predictions.jsonl",
                  make_header("predictions", f"{yh['model']}+sam-{args.model}", classes, header["data_root"],
                              manifest=header.get("manifest"), fold="test", yolo_run=str(args.yolo_predictions)),
                  recs)
    ious, pix_scores, pix_labels = [], [], []
    for it, (masks, prob, _), (_labels, _boxes, scores) in zip(test_items, preds, meta, strict=True):
        keep = np.asarray(scores) >= args.cascade_conf
        pred_union = masks[keep].any(0) if keep.any() else np.zeros(it.hw, bool)
        gt_union = it.masks.any(0) if len(it.masks) else np.zeros(it.hw, bool)
        union = (pred_union | gt_union).sum()
        ious.append((pred_union & gt_union).sum() / union if union else 1.0)
        score_map = (prob * np.asarray(scores, np.float32)[:, None, None]).max(0) if len(prob) else np.zeros(it.hw, np.float32)
        step = max(1, score_map.size // 20000)
        pix_scores.append(score_map.ravel()[::step])
        pix_labels.append(gt_union.ravel()[::step])
    return {"mask_ap": coco_evaluate(gt_test, recs, classes, "segm"),
            "box_ap_after_sam": coco_evaluate(gt_test, recs, classes, "bbox"),
            "pixel_iou_per_image": float(np.mean(ious)), "cascade_conf": args.cascade_conf,
            "pixel_auroc": auroc(np.concatenate(pix_scores), np.concatenate(pix_labels))}


# -------------------------------------------------------------------------------------- main


def default_data() -> Path:
    return WORK / "out" / "defectkit_synth" / "converted" / "all-defect"


def main(args: argparse.Namespace) -> dict:
    import torch

    from defectkit.converters.canonical import make_header, read_records, write_records
    from defectkit.finetune.sam_core import EmbeddingCache, load_sam

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # torchrun: one process per GPU; the decoder's gradients are all-reduced
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank = torch.distributed.get_rank()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    conv = args.data or default_data()
    gt_path = conv / "ground_truth.jsonl"
    if not gt_path.is_file():
        raise FileNotFoundError(f"{gt_path} not found: --data must be a conversion folder written by make convert")
    header, gt = read_records(gt_path)
    classes = header["classes"]
    data_root = Path(header["data_root"])
    run = (args.out or WORK / "runs" / "sam" / f"{conv.name}-{args.model}").resolve()
    run.mkdir(parents=True, exist_ok=True)
    (run / "run_args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                                  indent=1) + "\n")
    sam, key = load_sam(args.model, args.checkpoint, args.tiny_size, args.seed)
    sam.to(device)
    cache = EmbeddingCache(sam, args.cache, key, device)

    train_items = load_items(gt, data_root, "train", args.category)
    train_items = [it for it in train_items if len(it.boxes)]
    train_items += augmented(train_items, args.augment, args.seed)
    val_items = [it for it in load_items(gt, data_root, "val", args.category) if len(it.boxes)]
    test_items = load_items(gt, data_root, "test", args.category)
    test_inst = [it for it in test_items if len(it.boxes)]
    t0 = time.perf_counter()
    for it in [*train_items, *val_items, *test_items]:  # fill the cache once, with a progress bar
        cache.get(it.rgb)
    embed_s = time.perf_counter() - t0
    log.info("embeddings: %d computed, %d from the cache (%.1fs)", cache.misses, cache.hits, embed_s)

    base_state = copy.deepcopy(sam.mask_decoder.state_dict())
    zero_shot = instance_scores(test_inst, predict(sam, test_inst, cache, device))
    t1 = time.perf_counter()
    history = fit(sam, key, train_items, val_items, cache, args, run, device) if args.epochs > 0 else []
    train_s = time.perf_counter() - t1
    if distributed and rank != 0:
        return {}
    t2 = time.perf_counter()
    preds = predict(sam, test_inst, cache, device)
    infer_s = time.perf_counter() - t2
    tuned = instance_scores(test_inst, preds)
    meta = [(list(it.record.labels), it.boxes, ious) for it, (_, _, ious) in zip(test_inst, preds, strict=True)]
    write_records(run / "predictions.jsonl",
                  make_header("predictions", f"sam-{args.model}", classes, data_root, manifest=header.get("manifest"),
                              fold="test", prompts="ground-truth boxes", base=key),
                  _records(test_inst, preds, meta))
    metrics = {"model": args.model, "base": key, "data": str(conv), "train_instances": sum(len(i.boxes) for i in train_items),
               "test_instances": zero_shot["instances"], "zero_shot": zero_shot, "fine_tuned": tuned,
               "epochs_run": len(history), "train_seconds": train_s, "embedding_seconds": embed_s,
               "embeddings_computed": cache.misses, "images_per_s": len(test_inst) / infer_s if infer_s else float("nan"),
               "base_decoder_changed": any(not torch.equal(base_state[k].cpu(), v.cpu())
                                           for k, v in sam.mask_decoder.state_dict().items())}
    if args.model == "tiny":
        metrics["note"] = "tiny SAM (2-block ViT) trained from scratch with a random frozen encoder: not SAM's results"
    if args.yolo_predictions:
        gt_test = [r for r in gt if r.fold == "test" and (not args.category or r.category == args.category)]
        metrics["cascade"] = cascade(sam, cache, test_items, gt_test, header, classes, args, run, device)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    c = metrics.get("cascade")
    print(f"SAM {args.model} on the test fold ({zero_shot['instances']} instances, GT-box prompts): mean IoU "
          f"{zero_shot['iou']:.3f} zero-shot -> {tuned['iou']:.3f} fine-tuned (Dice {zero_shot['dice']:.3f} -> {tuned['dice']:.3f})"
          + (f"; cascade mask AP50 {c['mask_ap']['map50']:.3f}, pixel IoU {c['pixel_iou_per_image']:.3f}, "
             f"pixel AUROC {c['pixel_auroc']:.3f}" if c else ""))
    if metrics.get("note"):
        print(f"note: {metrics['note']}")
    print(f"run folder: {run}")
    return metrics


def cli(argv: list[str] | None = None) -> int:
    from defectkit.datasets.cli_runner import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
