"""Train an unsupervised anomaly model on good images only, and score it on the test fold.

    python anomaly/train.py --category washer --model conv_ae --loss mse_ssim --size 128 --epochs 40
    python anomaly/train.py --data /data/mvtec_anomaly_detection --category bottle --model unet_ae \\
        --skips 2 --size 256 --scales 128,256 --epochs 100 --device cuda
    python anomaly/train.py --category weave --model patchcore --backbone resnet18 \\
        --backbone-weights /path/resnet18-f37072fd.pth
    make anomaly DATA=... CATEGORY=... MODEL=...

Models (``--model``): reconstruction models ``conv_ae``, ``unet_ae``, ``fc_ae``, ``vae`` trained
with ``--loss`` ``mse``, ``ssim`` or ``mse_ssim`` (MSE + lambda * (1 - SSIM), lambda 0.84), on
``--input`` ``rgb``, ``gray`` or ``fft`` (log-magnitude spectrum; image-level scores only); and
frozen-feature models ``ocsvm`` (pooled ResNet features + One-Class SVM, image level) and
``patchcore`` (ResNet patch features, coreset memory bank, nearest-neighbour distance maps).

Training uses the dataset's ``train/good`` images only.  A few of them are held out: with
CutPaste pseudo-anomalies made from them, and the split manifest's ``val`` fold when
``--val-fold`` is on (default), they give the validation AUROC that selects the best epoch and
stops training early.  Thresholds come from the ``val`` fold (or CutPaste when it has no defect
image), never from ``test``.  A checkpoint is written every epoch; ``--resume`` continues it.

Run folder (``--out``, default ``work/runs/anomaly/<data>-<category>-<model>``): ``run_args.json``,
``checkpoint.pt`` / ``best.pt``, ``history.json``, ``metrics.json`` (image AUROC / AP / F1-max
per defect type, pixel AUROC, AUPRO@30%, pixel AP, F1-max, latent kNN / PCA AUROC, thresholds,
timing), ``scores.csv``, ``maps/*.npy`` (float16, test fold, model resolution),
``predictions.jsonl`` (canonical: thresholded maps as masks and boxes) and ``plots/``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from defectkit import WORK  # noqa: E402

log = logging.getLogger("defectkit.anomaly")

RECON_MODELS = ("conv_ae", "unet_ae", "fc_ae", "vae")
FEATURE_MODELS = ("ocsvm", "patchcore")
LOSSES = ("mse", "ssim", "mse_ssim")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="MVTec-layout root (default: embedded synthetic set)")
    p.add_argument("--category", default="washer")
    p.add_argument("--manifest", type=Path, default=None, help="split manifest (default work/out/<data>/manifest.json)")
    p.add_argument("--model", choices=[*RECON_MODELS, *FEATURE_MODELS], default="conv_ae")
    p.add_argument("--loss", choices=LOSSES, default="mse_ssim")
    p.add_argument("--ssim-lambda", type=float, default=0.84)
    p.add_argument("--map", choices=LOSSES, default=None, help="anomaly map kind (default: same as --loss)")
    p.add_argument("--input", choices=("rgb", "gray", "fft"), default="rgb")
    p.add_argument("--size", type=int, default=128, help="model input size (square)")
    p.add_argument("--base", type=int, default=16, help="first-stage channels")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--latent", type=int, default=None)
    p.add_argument("--skips", default=None, help="unet_ae: comma-separated levels that keep skips (0 = shallowest); "
                                                  "default drops levels 0 and 1")
    p.add_argument("--kl-weight", type=float, default=1e-3, help="vae: weight of the KL term")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps-per-epoch", type=int, default=25,
                   help="optimizer steps per epoch, sampling train images with replacement (small sets)")
    p.add_argument("--augment", action="store_true", help="random flips of training images (rotation-invariant parts)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patience", type=int, default=10, help="epochs without validation improvement before stopping")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of train/good held out for validation")
    p.add_argument("--cutpaste-per-image", type=int, default=2)
    p.add_argument("--val-fold", action=argparse.BooleanOptionalAction, default=True,
                   help="also validate on the manifest's val fold (real defects)")
    p.add_argument("--scales", default=None, help="sliding-window sizes in model pixels, e.g. 64,128 (default: whole image)")
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of maps, in model pixels")
    p.add_argument("--topk", default="1", help="image score: mean of the top-k %% pixels, or 'max'")
    p.add_argument("--threshold", choices=("f1", "otsu", "percentile"), default="f1",
                   help="image and pixel thresholds, chosen on the val fold")
    p.add_argument("--false-alarm-rate", type=float, default=0.01, help="for --threshold percentile")
    p.add_argument("--backbone", choices=("resnet18", "resnet50", "wide_resnet50_2"), default="resnet18")
    p.add_argument("--backbone-weights", type=Path, default=None, help="local torchvision checkpoint (.pth)")
    p.add_argument("--random-init", action="store_true", help="feature models: untrained backbone (tests only)")
    p.add_argument("--coreset", type=float, default=0.1, help="patchcore: memory-bank fraction kept")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


# -------------------------------------------------------------------------------------- data


def _manifest(args) -> tuple[Path, dict]:
    from defectkit.datasets import synthetic
    from defectkit.datasets.split import load_or_build_manifest

    root = args.data or synthetic.generate(progress=False)
    path = args.manifest or WORK / "out" / Path(root).resolve().name / "manifest.json"
    manifest = load_or_build_manifest(root, path, "all", args.seed)
    if args.category is not None and args.category not in manifest["categories"]:
        raise ValueError(f"category {args.category!r} is not in {path} (has {manifest['categories']})")
    return Path(root), manifest


def _holdout(entries, fraction: float, seed: int):
    """Deterministic hold-out of good training images (by a hash of their key)."""
    ranked = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}:{e.key}".encode()).hexdigest())
    n = max(2, int(round(len(ranked) * fraction))) if len(ranked) >= 6 else 1
    return ranked[n:], ranked[:n]


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


def train_one_epoch(model, loader, optimizer, loss, device, scaler=None, kl_weight: float = 0.0, progress=None) -> float:
    import torch

    model.train()
    total, n = 0.0, 0
    for (x,) in loader:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device_type="cuda", enabled=scaler is not None):
            recon = model(x)
            value = loss(x.float(), recon.float())
            if kl_weight and hasattr(model, "kl"):
                value = value + kl_weight * model.kl
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
    return total / max(n, 1)


def evaluate(scorer, inputs: np.ndarray, labels: np.ndarray) -> dict:
    """Image AUROC of the scorer on (validation) inputs."""
    from defectkit.anomaly.metrics import auroc

    scores = scorer.image_scores(scorer.maps(inputs))
    return {"auroc": auroc(scores, labels), "scores": scores}


def _save(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def fit_reconstruction(args, run: Path, train_x: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, device: str):
    """Train with checkpoints, resume and early stopping on validation AUROC; returns the best model."""
    import torch
    from tqdm.auto import tqdm

    from defectkit.anomaly.models import build_model
    from defectkit.anomaly.scoring import Scorer

    torch.manual_seed(args.seed)
    skips = None if args.skips is None else tuple(int(s) for s in str(args.skips).split(",") if s != "")
    model = build_model(args.model, train_x.shape[1], args.size, args.base, args.depth, args.latent, skips).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.epochs))
    scaler = torch.amp.GradScaler("cuda") if device.startswith("cuda") else None
    loss = loss_fn(args.loss, args.ssim_lambda)
    start, best, stale, history = 0, -1.0, 0, []
    ckpt = run / "checkpoint.pt"
    if args.resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume: {ckpt} does not exist")
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best, stale, history = state["epoch"] + 1, state["best"], state["stale"], state["history"]
        log.info("resumed from %s at epoch %d (best val AUROC %.4f)", ckpt, start + 1, best)
    g = torch.Generator().manual_seed(args.seed)
    sampler = torch.utils.data.RandomSampler(range(len(train_x)), replacement=True,
                                             num_samples=args.steps_per_epoch * args.batch, generator=g)
    dataset = _Augmented(train_x, args.augment, args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers)
    scorer = Scorer(model, args.map or args.loss, args.ssim_lambda, None, args.sigma, _topk(args.topk), device)
    bar = tqdm(range(start, args.epochs), desc=f"{args.model} {args.category}", disable=args.quiet, initial=start,
               total=args.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        train_loss = train_one_epoch(model, loader, opt, loss, device, scaler, args.kl_weight if args.model == "vae" else 0.0, bar)
        sched.step()
        val = evaluate(scorer, val_x, val_y)
        improved = val["auroc"] > best + 1e-4 or best < 0
        if improved:
            best, stale = val["auroc"], 0
            _save(run / "best.pt", {"model": model.state_dict(), "epoch": epoch, "val_auroc": best})
        else:
            stale += 1
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_auroc": val["auroc"],
                        "seconds": time.perf_counter() - t0})
        _save(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch, "best": best, "stale": stale, "history": history})
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auroc=f"{val['auroc']:.3f}", best=f"{best:.3f}")
        if stale >= args.patience:
            log.info("early stop at epoch %d: no validation gain for %d epochs", epoch + 1, stale)
            break
    (run / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    model.load_state_dict(torch.load(run / "best.pt", map_location=device, weights_only=False)["model"])
    return model.eval(), history


class _Augmented:
    """Training images as a map-style dataset, optionally flipped at random."""

    def __init__(self, x: np.ndarray, augment: bool, seed: int):
        self.x, self.augment = x, augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        import torch

        a = self.x[i]
        if self.augment:
            if self.rng.random() < 0.5:
                a = a[:, :, ::-1]
            if self.rng.random() < 0.5:
                a = a[:, ::-1, :]
        return (torch.from_numpy(np.ascontiguousarray(a)),)


def _topk(v: str) -> float | str:
    return "max" if str(v) == "max" else float(v)


# -------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict:
    """Train and score one category; ``--category all`` runs every category of the manifest."""
    if args.category == "all":
        _, manifest = _manifest(argparse.Namespace(**{**vars(args), "category": None}))
        out = {}
        for cat in manifest["categories"]:
            sub = argparse.Namespace(**{**vars(args), "category": cat,
                                        "out": args.out / cat if args.out else None})
            out[cat] = main(sub)
        return out
    return _main_one(args)


def _main_one(args: argparse.Namespace) -> dict:
    import torch

    from defectkit.anomaly import metrics as M
    from defectkit.anomaly.data import cutpaste, downsample_mask, load_inputs, load_masks
    from defectkit.anomaly.scoring import Scorer, knn_scores, latents, pca_scores, reconstruct
    from defectkit.datasets.split import entries

    torch.manual_seed(args.seed)
    device = _device(args.device)
    root, manifest = _manifest(args)
    run = (args.out or WORK / "runs" / "anomaly" / f"{root.resolve().name}-{args.category}-{args.model}").resolve()
    run.mkdir(parents=True, exist_ok=True)
    (run / "run_args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                                  indent=1) + "\n")
    if args.input == "fft" and args.model in FEATURE_MODELS:
        raise ValueError("--input fft is for the reconstruction models")
    goods = entries(manifest, category=args.category, source_split="train")
    fit_e, hold_e = _holdout(goods, args.holdout, args.seed)
    val_e = [e for e in entries(manifest, category=args.category, fold="val") if e.source_split == "test"]
    test_e = [e for e in entries(manifest, category=args.category, fold="test") if e.source_split == "test"]
    mode = args.input
    t_load = time.perf_counter()
    fit_x = load_inputs([root / e.image for e in fit_e], args.size, mode, progress=not args.quiet)
    hold_x = load_inputs([root / e.image for e in hold_e], args.size, mode)
    rng = np.random.default_rng(args.seed)
    cp = [cutpaste(x, rng) for x in hold_x for _ in range(args.cutpaste_per_image)]
    cp_x = np.stack([c[0] for c in cp])
    cp_masks = np.stack([c[1] for c in cp])
    val_x = np.concatenate([hold_x, cp_x])
    val_y = np.r_[np.zeros(len(hold_x)), np.ones(len(cp_x))]
    vf_x = load_inputs([root / e.image for e in val_e], args.size, mode) if val_e else np.zeros((0, *fit_x.shape[1:]), np.float32)
    vf_y = np.array([e.defect_type != "good" for e in val_e], float)
    if args.val_fold and len(val_e) and vf_y.min() != vf_y.max():
        sel_x, sel_y = np.concatenate([val_x, vf_x]), np.r_[val_y, vf_y]
    else:
        sel_x, sel_y = val_x, val_y
    test_x = load_inputs([root / e.image for e in test_e], args.size, mode, progress=not args.quiet)
    log.info("%s: %d train, %d held-out good (+%d CutPaste), %d val-fold, %d test images (%.1fs to load)", args.category,
             len(fit_x), len(hold_x), len(cp_x), len(val_e), len(test_e), time.perf_counter() - t_load)

    t0 = time.perf_counter()
    history: list = []
    if args.model in RECON_MODELS:
        model, history = fit_reconstruction(args, run, fit_x, sel_x, sel_y, device)
        scorer = Scorer(model, args.map or args.loss, args.ssim_lambda,
                        [int(s) for s in args.scales.split(",")] if args.scales else None, args.sigma, _topk(args.topk), device)
        if len(scorer.scales) > 1:
            scorer.calibrate(hold_x)
    else:
        from defectkit.anomaly.features import build_feature_model

        scorer = build_feature_model(args, device)
        scorer.fit(fit_x)
        model = None
    train_s = time.perf_counter() - t0

    # thresholds from the val fold (real defects when it has them, CutPaste otherwise)
    t_inf = time.perf_counter()
    test_maps = scorer.maps(test_x)
    infer_s = time.perf_counter() - t_inf
    has_vf_defects = len(val_e) and vf_y.max() == 1
    thr_x = vf_x if has_vf_defects else val_x
    thr_y = vf_y if has_vf_defects else val_y
    thr_maps = scorer.maps(thr_x)
    thr_scores = scorer.image_scores(thr_maps)
    if has_vf_defects:
        thr_masks = np.stack([downsample_mask(m, args.size) for m in
                              load_masks([root / e.mask if e.mask else None for e in val_e],
                                         [_hw(root / e.image) for e in val_e])])
    else:
        thr_masks = np.concatenate([np.zeros((len(hold_x), args.size, args.size), bool), cp_masks])
    image_thr = _threshold(args, thr_scores, thr_y)
    pixel_thr = _threshold(args, thr_maps[::max(1, len(thr_maps) // 50)].ravel(), thr_masks[::max(1, len(thr_maps) // 50)].ravel())

    # test metrics
    y = np.array([e.defect_type != "good" for e in test_e])
    types = [e.defect_type for e in test_e]
    scores = scorer.image_scores(test_maps)
    hws = [_hw(root / e.image) for e in test_e]
    masks = load_masks([root / e.mask if e.mask else None for e in test_e], hws)
    gt_small = np.stack([downsample_mask(m, args.size) for m in masks])
    metrics: dict = {"model": args.model, "category": args.category, "data": str(root), "input": mode,
                     "loss": args.loss if model is not None else None, "size": args.size,
                     "image": M.image_metrics(scores, y, types), "train_images": len(fit_x),
                     "test_images": len(test_e), "train_seconds": train_s,
                     "images_per_s": len(test_x) / infer_s if infer_s > 0 else float("nan"),
                     "epochs_run": len(history), "best_val_auroc": max((h["val_auroc"] for h in history), default=None),
                     "thresholds": {"method": args.threshold, "image": image_thr, "pixel": pixel_thr,
                                    "source": "val fold" if has_vf_defects else "CutPaste on held-out good images"}}
    pixel_level = mode != "fft" and (args.model != "ocsvm")
    if pixel_level:
        metrics["pixel"] = M.pixel_metrics(test_maps, gt_small)
        metrics["pixel"]["eval_size"] = args.size
    pred = scores >= image_thr
    metrics["image"]["at_threshold"] = {"precision": float((pred & y).sum() / max(pred.sum(), 1)),
                                        "recall": float((pred & y).sum() / max(y.sum(), 1)),
                                        "false_alarm_rate": float((pred & ~y).sum() / max((~y).sum(), 1))}
    if model is not None:  # encoder-latent scoring on the same model
        tr_lat, te_lat = latents(model, fit_x, device), latents(model, test_x, device)
        metrics["latent_knn_auroc"] = M.auroc(knn_scores(tr_lat, te_lat), y)
        metrics["latent_pca_auroc"] = M.auroc(pca_scores(tr_lat, te_lat), y)
    # outputs
    _write_scores(run, test_e, scores, y)
    _write_predictions(run, root, manifest, test_e, test_maps, scores, hws, pixel_thr, args, pixel_level)
    if not args.no_plots:
        from defectkit.anomaly.plots import write_plots

        recon = reconstruct(model, test_x, device) if model is not None else None
        lat = latents(model, test_x, device) if model is not None else None
        write_plots(run / "plots", test_x, recon, test_maps, gt_small, scores, y, types, lat,
                    pixel=pixel_level, title=f"{args.model} on {args.category}")
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    _print(metrics, run)
    return metrics


def _hw(path: Path) -> tuple[int, int]:
    from defectkit.datasets.image_files import read_header

    return read_header(path)[0]


def _threshold(args, scores: np.ndarray, labels: np.ndarray) -> float:
    from defectkit.anomaly import metrics as M

    labels = np.asarray(labels, bool)
    if args.threshold == "otsu":
        return M.otsu_threshold(scores)
    if args.threshold == "percentile" or not labels.any():
        return M.percentile_threshold(np.asarray(scores)[~labels], args.false_alarm_rate)
    return M.f1_threshold(scores, labels)


def _write_scores(run: Path, test_e, scores, y) -> None:
    with (run / "scores.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "defect_type", "label", "score"])
        for e, s, lab in zip(test_e, scores, y, strict=True):
            w.writerow([e.image, e.defect_type, int(lab), f"{s:.6g}"])


def _write_predictions(run, root, manifest, test_e, maps, scores, hws, pixel_thr, args, pixel_level) -> None:
    """Canonical predictions: maps saved once (float16), thresholded maps as masks and boxes."""
    from defectkit.anomaly.scoring import upsample
    from defectkit.converters.canonical import ImageRecord, make_header, write_records
    from defectkit.converters.instances import encode_rle, mask_to_instances

    (run / "maps").mkdir(exist_ok=True)
    records = []
    for e, m, s, hw in zip(test_e, maps, scores, hws, strict=True):
        name = f"{e.category}__{e.defect_type}__{Path(e.image).stem}.npy"
        np.save(run / "maps" / name, m.astype(np.float16))
        boxes, labels, box_scores, rles = np.zeros((0, 4)), [], [], []
        if pixel_level:
            full = upsample(m[None], hw)[0]
            inst = mask_to_instances(full >= pixel_thr)
            boxes = inst.boxes_xyxy
            labels = ["anomaly"] * len(inst)
            box_scores = [float(full[k].max()) for k in inst.masks]
            rles = [encode_rle(k, b) for k, b in zip(inst.masks, inst.boxes_xyxy, strict=True)]
        records.append(ImageRecord(image=e.image, height=hw[0], width=hw[1], boxes_xyxy=boxes, labels=labels,
                                   scores=box_scores, masks=rles, anomaly_map=f"maps/{name}", image_score=float(s),
                                   key=e.key, category=e.category, defect_type=e.defect_type, fold=e.fold))
    header = make_header("predictions", args.model, ["anomaly"], root, manifest=manifest.get("path"), fold="test",
                         map_resolution=args.size, pixel_threshold=float(pixel_thr), kind_of_model="anomaly",
                         note="box/mask scores are raw anomaly-map values, not probabilities")
    write_records(run / "predictions.jsonl", header, records)


def _print(m: dict, run: Path) -> None:
    px = m.get("pixel", {})
    print(f"{m['model']} on {m['category']} test fold ({m['test_images']} images): image AUROC {m['image']['auroc']:.3f}"
          + (f", pixel AUROC {px['auroc']:.3f}, AUPRO@30% {px['aupro']:.3f}" if px else "")
          + (f", latent kNN AUROC {m['latent_knn_auroc']:.3f}" if "latent_knn_auroc" in m else "")
          + f"; trained in {m['train_seconds']:.0f}s, {m['images_per_s']:.1f} images/s")
    print(f"run folder: {run}")


def cli(argv: list[str] | None = None) -> int:
    from defectkit.datasets.cli_runner import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
