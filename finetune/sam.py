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
inside the region.  ``--augment-copies K`` adds K albumentations-augmented copies of every training
image (flips, rotations by 90 degrees, brightness/contrast), transforming image, mask and box
together; their embeddings are cached like the originals.  Image embeddings are computed once
and cached on disk (``--cache-dir``, keyed by image content and model weights).

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
import time
from dataclasses import replace
from pathlib import Path

from defectkit.core.cli import HelpFormatter, run_cli
from defectkit.core.config import apply_defaults, recipe, rename_flag
from defectkit.core.deploy_spec import read_deploy_spec
from defectkit.core.distributed import process_group
from defectkit.core.errors import ConfigError
from defectkit.core.paths import WORK, claim_run_dir
from defectkit.core.training import resolve_device, share_time, write_run_args
from defectkit.finetune.sam_cascade import MAX_DET, CascadeConfig, cascade, resolve_cascade_conf
from defectkit.finetune.sam_core import MODEL_NAMES, EmbeddingCache, load_sam
from defectkit.finetune.sam_data import conversion_folder, load_sam_data
from defectkit.finetune.sam_deploy import load_sam_run, write_spec
from defectkit.finetune.sam_eval import box_as_mask, instance_scores, predict, score_fine_tuned
from defectkit.finetune.sam_train import SamTrainConfig, fit, synthetic_stage
from defectkit.review.predictions import DEFAULT_BOX_CONF
from defectkit.review.summary import finish_run

log = logging.getLogger("defectkit.finetune.sam")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="the conversion (make convert's folder, or its yolo/data.yaml) (default: the demo's)")
    p.add_argument("--category", default="all",
                   help="with no --data: the conversion of this category; with --data: only its images")
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
    p.add_argument("--box-prior", type=float, default=0.0, metavar="S",
                   help="the decoder's logits are a residual on S inside the prompt box and -S outside it: an "
                        "untrained decoder draws the box, training learns where the defect departs from it; "
                        "0: SAM's own decoder")
    p.add_argument("--crop", type=float, default=0.0,
                   help="segment each box on its own square crop, CROP times the box's longer side, resized to the "
                        "encoder's input (small defects at many times the resolution; one encoder pass per box); "
                        "0: the whole image, SAM's own way")
    p.add_argument("--augment-copies", type=int, default=0, metavar="K",
                   help="albumentations-augmented copies of each training image")
    p.add_argument("--train-prompt-encoder", action="store_true")
    p.add_argument("--train-encoder", action=argparse.BooleanOptionalAction, default=False,
                   help="train the image encoder too (MedSAM-style full fine-tuning; from scratch for the tiny "
                        "model); embeddings are then computed live, the cache serves frozen encoders only")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--time", type=float, default=None, metavar="HOURS",
                   help="hours of training: the epoch count becomes what fits, as Ultralytics' time= "
                        "(with --synthetic-pretrain shared by the two stages in proportion to their epochs)")
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
    p.add_argument("--cascade-max-det", type=int, default=MAX_DET, metavar="N",
                   help="the most boxes per image a cascade segments, highest confidence first (Ultralytics' "
                        "max_det); scored, the rest keep their box as the mask; deployed, only boxes >= the "
                        "cascade confidence are segmented")
    p.add_argument("--cache-dir", type=Path, default=WORK / "cache" / "sam", help="image-embedding cache folder")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run folder (default work/runs/sam/<data>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue <out>/last.pt")
    p.add_argument("--score-only", action="store_true",
                   help="no training: add the cascades given now (--yolo-predictions, --anomaly-predictions) to the "
                        "finished run in --out, with its own trained weights and settings (make demo trains SAM "
                        "beside YOLO, then runs the cascades on YOLO's predictions)")
    p.add_argument("--exist-ok", action="store_true", help="train over a finished run in --out (default: refused)")
    p.add_argument("-q", "--quiet", action="store_true")
    # spellings of 0.2, where --augment and --cache meant other things than in the other commands
    rename_flag(p, "--augment", "--augment-copies", type=int)
    rename_flag(p, "--cache", "--cache-dir", type=Path)
    # the recommended offline recipe is the default: `python finetune/sam.py` with no flag runs it (--help shows it)
    apply_defaults(p, recipe("demo/sam"), "configs/demo/sam.yaml")
    return p


def main(args: argparse.Namespace) -> dict:
    with process_group(resolve_device(args.device)) as dist:
        return _main(args, dist)


def _main(args: argparse.Namespace, dist) -> dict:
    """Train and score; under torchrun every process trains its share, rank 0 alone scores and writes."""
    import torch

    cfg = SamTrainConfig.from_args(args)
    torch.manual_seed(cfg.seed)
    device = dist.device
    conv = conversion_folder(args.data, args.category)
    only = None if args.category in (None, "all") else args.category  # None: every category of the conversion
    if args.score_only:
        return _add_cascades(args, conv, only, dist) if dist.is_main else {}
    d = load_sam_data(conv, only, args.augment_copies, cfg.seed)
    run = claim_run_dir((args.out or WORK / "runs" / "sam" / f"{conv.name}-{cfg.model}").resolve(), cfg.resume,
                        args.exist_ok)
    if dist.is_main:
        write_run_args(run, args)
    sam, key = load_sam(cfg.model, args.checkpoint, args.imgsz, cfg.seed)
    sam.box_prior = args.box_prior  # read by sam_core.decode: the decoder learns a residual on its prompt box
    sam.to(device)
    cache = EmbeddingCache(sam, args.cache_dir, key, device)
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
        pre_epochs = args.pretrain_epochs if args.pretrain_epochs is not None else cfg.epochs
        pretrain = synthetic_stage(sam, key, conv, cache,
                                   replace(cfg, time=share_time(cfg.time, pre_epochs, pre_epochs + cfg.epochs)),
                                   args.synthetic_pretrain, pre_epochs, run, device, dist)
        cfg = replace(cfg, time=share_time(cfg.time, cfg.epochs, pre_epochs + cfg.epochs))
        label = _label(cfg.model, args.synthetic_pretrain)
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
    conf = _cascades(args, metrics, sam, cache, d, only, label, cfg.crop, run, device)
    write_spec(run, args, key, Path(args.yolo_predictions).resolve().parent if args.yolo_predictions else None,
               conf, args.cascade_max_det)  # what predict on new images uses
    metrics = finish_run(run, "sam", metrics)
    _print(metrics, run)
    return metrics


def _cascades(args, metrics: dict, sam, cache, d, only, label: str, crop: float, run: Path, device) -> float:
    """The YOLO -> SAM and anomaly -> SAM cascades asked for, into ``metrics``; returns the box confidence."""
    gt_test = [r for r in d.gt if r.fold == "test" and (not only or r.category == only)]
    # the anomaly cascade keeps all its regions; the confidence is the YOLO cascade's
    conf, conf_source = (resolve_cascade_conf(args.cascade_conf, args.yolo_predictions) if args.yolo_predictions
                         else (args.cascade_conf or DEFAULT_BOX_CONF, "no YOLO cascade"))
    if args.yolo_predictions:
        metrics["cascade"] = cascade(
            sam, cache, d.test, gt_test, d.header, d.classes,
            CascadeConfig(args.yolo_predictions, conf, label, crop, max_det=args.cascade_max_det), run, device,
        ) | {"cascade_conf_source": conf_source}
    if args.anomaly_predictions:
        metrics["anomaly_cascade"] = cascade(
            sam, cache, d.test, gt_test, d.header, d.classes,
            CascadeConfig(args.anomaly_predictions, conf, label, crop,
                          "cascade_anomaly_predictions.jsonl", args.cascade_max_det),
            run, device,
        )
    return conf


def _add_cascades(args: argparse.Namespace, conv: Path, only: str | None, dist) -> dict:
    """``--score-only``: the finished run in ``--out`` (its deploy.json, best.pt, metrics.json) gets the
    cascades given now; its training record, test-fold scores and other cascades are kept as they are."""
    run = (args.out or WORK / "runs" / "sam" / f"{conv.name}-{args.model}").resolve()
    if not (run / "metrics.json").is_file():
        raise ConfigError(f"{run}: no finished SAM run to score (metrics.json missing); train it first, "
                          "without --score-only")
    spec = read_deploy_spec(run, ["sam", "sam_cascade"], "train the run first, without --score-only")
    sam, cache = load_sam_run(run, spec, dist.device)  # embeddings as after training: the scores of one run
    s = spec["sam"]
    prior = json.loads((run / "metrics.json").read_text())
    # the cascades given now replace their earlier scores; the others stay as they were
    metrics = {k: v for k, v in prior.items() if k not in ("family", "protocol")}
    pre = prior.get("synthetic_pretrain")
    label = _label(s["model"], pre["images"] if pre else 0)
    d = load_sam_data(conv, only, 0, s["seed"])
    conf = _cascades(args, metrics, sam, cache, d, only, label, s.get("crop", 0.0), run, dist.device)
    yolo_run = Path(args.yolo_predictions).resolve().parent if args.yolo_predictions else None
    if yolo_run is None and spec.get("yolo_run"):  # a YOLO cascade scored before stays the deployed one
        yolo_run, conf = (run / spec["yolo_run"]).resolve(), spec["cascade_conf"]
    write_spec(run, argparse.Namespace(**s), spec["base"], yolo_run, conf, args.cascade_max_det)
    metrics = finish_run(run, "sam", metrics)
    _print(metrics, run)
    return metrics


def _label(model: str, synthetic_pretrain: int) -> str:
    """The SAM run's name in its predictions and the comparison."""
    return f"{model} (synthetic pretrain {synthetic_pretrain})" if synthetic_pretrain else model


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
    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
