"""Fine-tune YOLO-World (and plain YOLO) on the defect classes written by ``make convert``.

Pretrained YOLO-World, offline (weights and CLIP copied to this machine beforehand)::

    python finetune/yolo.py --data work/out/<data>/converted/<cat>-defect/yolo/data.yaml \\
        --model yolov8s-worldv2 --weights-dir work/weights --text-embeddings clip \\
        --clip-model work/weights/clip/ViT-B-32.pt --epochs 50 --imgsz 640 --device 0

Plain YOLO detect / segment (segment models read the sibling ``yolo_seg/data.yaml``)::

    python finetune/yolo.py --data .../yolo/data.yaml --model yolo11n --epochs 50
    python finetune/yolo.py --data .../yolo/data.yaml --model yolo11n-seg --epochs 50

Offline from scratch (tests, the embedded demo; no pretrained weights, class embeddings are
deterministic hashes, so results are *not* a pretrained YOLO-World's and are labelled so)::

    python finetune/yolo.py --data .../yolo/data.yaml --model yolov8n-worldv2 --from-scratch \\
        --text-embeddings hash --epochs 30 --imgsz 256

Several GPUs: ``--device 0,1`` (Ultralytics' own DDP; the offline trainer is importable by the
workers).  ``--resume`` continues an interrupted run from ``<run>/weights/last.pt``.
``--epochs 0`` evaluates the untrained model (the baseline a from-scratch run must beat).

Each run folder (``--project``/``--name``, default ``work/runs/yolo/<data>-<model>``) holds
Ultralytics' files (``args.yaml``, ``weights/best.pt``, ``weights/last.pt``, ``results.csv``)
plus ``run_args.json``, ``classes.json`` (trained names, order, prompts, embedding provider),
``metrics.json`` (test fold: Ultralytics' validator, pycocotools, image AUROC, speed) and
``predictions.jsonl`` in the canonical format.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from defectkit import WORK  # noqa: E402

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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from defectkit.finetune.text_embeddings import PROVIDERS

    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="data.yaml written by make convert (default: the embedded demo's)")
    p.add_argument("--model", choices=sorted(MODELS), default="yolov8s-worldv2")
    p.add_argument("--weights", type=Path, default=None, help="pretrained .pt to start from (overrides --weights-dir)")
    p.add_argument("--weights-dir", type=Path, default=WORK / "weights", help="where pretrained .pt files are looked up")
    p.add_argument("--from-scratch", action="store_true", help="build the model from its yaml; no pretrained weights")
    p.add_argument("--text-embeddings", choices=PROVIDERS, default="clip",
                   help="YOLO-World class embeddings: local CLIP, a prepared file, or offline hashes (from scratch only)")
    p.add_argument("--clip-model", type=Path, default=WORK / "weights" / "clip" / "ViT-B-32.pt")
    p.add_argument("--text-embeddings-file", type=Path, default=None)
    p.add_argument("--prompt-template", default="{defect}", help='e.g. "a {defect} on a {category}"')
    p.add_argument("--make-text-embeddings", type=Path, default=None, metavar="OUT.pt",
                   help="only write {name and prompt: embedding} for --data's classes with CLIP, then exit")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="'cpu', '0', '0,1' (DDP); default: GPU 0 if present")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=50, help="early stopping on val fitness (Ultralytics)")
    p.add_argument("--optimizer", default="auto")
    p.add_argument("--lr0", type=float, default=None)
    p.add_argument("--close-mosaic", type=int, default=10)
    p.add_argument("--cache", action="store_true", help="cache decoded images in RAM")
    p.add_argument("--project", type=Path, default=WORK / "runs" / "yolo")
    p.add_argument("--name", default=None, help="run name (default <data>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue <run>/weights/last.pt")
    p.add_argument("--conf", type=float, default=0.001, help="confidence floor of the test predictions")
    return p


# ---------------------------------------------------------------------------------------- helpers


def _setup_env() -> None:
    """Ultralytics writes settings to a config dir and goes online unless told not to."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(WORK / "ultralytics"))
    os.environ.setdefault("YOLO_OFFLINE", "1")


def resolve_weights(args: argparse.Namespace, spec: dict) -> str:
    """The .pt (or .yaml when training from scratch) the model starts from.

    Raises ``FileNotFoundError`` with what to do: Ultralytics would download the weights by
    name, which these machines cannot.
    """
    if args.from_scratch:
        return spec["yaml"]
    if args.weights is not None:
        if not args.weights.is_file():
            raise FileNotFoundError(f"--weights {args.weights} does not exist")
        return str(args.weights)
    local = args.weights_dir / spec["weights"]
    if local.is_file():
        return str(local)
    raise FileNotFoundError(
        f"pretrained weights {spec['weights']} not found in {args.weights_dir}. Ultralytics would download "
        f"them by name, which this machine cannot: fetch {spec['weights']} from the Ultralytics assets "
        f"releases on a machine with internet and copy it to {local}, pass --weights PATH, or train with "
        "--from-scratch (no pretraining; the run is labelled as such)."
    )


def conversion_dir(data_yaml: Path) -> Path:
    return data_yaml.resolve().parent.parent


def class_prompts(names: list[str], conv_dir: Path, template: str) -> list[str]:
    """One prompt per class; ``{category}`` comes from the ground truth of that class."""
    from defectkit.finetune.text_embeddings import prompt_for

    cats: dict[str, str] = {}
    gt = conv_dir / "ground_truth.jsonl"
    if gt.is_file():
        from defectkit.converters.canonical import read_records

        for r in read_records(gt)[1]:
            for lab in r.labels:
                cats.setdefault(lab, r.category or "")
    return [prompt_for(n, template, cats.get(n, "")) for n in names]


def _data_for(spec: dict, data: Path) -> Path:
    if spec["task"] == "segment" and data.parent.name == "yolo":
        seg = data.parent.parent / "yolo_seg" / "data.yaml"
        if not seg.is_file():
            raise FileNotFoundError(f"{spec['task']} models need YOLO-seg labels; {seg} is missing (make convert FORMATS=yolo_seg,...)")
        log.info("segment model: using %s", seg)
        return seg
    return data


def _names(data_yaml: Path) -> list[str]:
    import yaml

    d = yaml.safe_load(data_yaml.read_text())
    names = d["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    bad = [n for n in names if "/" in n]
    if bad:
        raise ValueError(f"{data_yaml}: class names {bad} contain '/', which Ultralytics' YOLO-World evaluation "
                         "cuts at; rename them")
    return names


def _device(arg: str | None) -> str:
    if arg:
        return arg
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def prepare_text_embeddings(args, names: list[str], prompts: list[str], train_dir: Path) -> dict:
    """Compute class embeddings and write them where Ultralytics' WorldTrainer reads them."""
    import numpy as np

    from defectkit.finetune.text_embeddings import embed, write_cache

    if args.text_embeddings == "hash" and not args.from_scratch:
        raise ValueError("--text-embeddings hash carries no language: use it only with --from-scratch; "
                         "a pretrained YOLO-World needs CLIP embeddings (clip or file)")
    device = "cuda" if _device(args.device) != "cpu" else "cpu"
    emb = embed(names, prompts, args.text_embeddings, clip_model=args.clip_model,
                embeddings_file=args.text_embeddings_file, device=device)
    cache = write_cache(names, emb, train_dir.parent)
    return {"provider": args.text_embeddings, "cache": str(cache),
            "sha256": hashlib.sha256(np.ascontiguousarray(emb, np.float32).tobytes()).hexdigest()[:16],
            "clip_model": str(args.clip_model) if args.text_embeddings == "clip" else None,
            "file": str(args.text_embeddings_file) if args.text_embeddings == "file" else None}


# ---------------------------------------------------------------------------------------- train / evaluate


def train(args, spec: dict, data_yaml: Path, run_dir: Path, source: str):
    """Run Ultralytics' trainer; returns the Ultralytics model wrapper (weights in run_dir/weights)."""
    from ultralytics import YOLO, YOLOWorld

    from defectkit.finetune.world_offline import OfflineWorldTrainer

    cls = YOLOWorld if spec["family"] == "world" else YOLO
    trainer = OfflineWorldTrainer if spec["family"] == "world" else None
    last = run_dir / "weights" / "last.pt"
    if args.resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: {last} does not exist; nothing to resume")
        model = cls(str(last))
        model.train(resume=True, trainer=trainer)
        return model
    model = cls(source)
    overrides = dict(data=str(data_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                     device=_device(args.device), workers=args.workers, seed=args.seed, deterministic=True,
                     project=str(run_dir.parent), name=run_dir.name, exist_ok=True, patience=args.patience,
                     optimizer=args.optimizer, close_mosaic=args.close_mosaic, cache=args.cache, plots=True,
                     pretrained=not args.from_scratch, verbose=False)
    if args.lr0 is not None:
        overrides["lr0"] = args.lr0
    model.train(trainer=trainer, **overrides)
    return model


def _untrained(args, spec: dict, data_yaml: Path, names: list[str]):
    """The model as training would start it, unchanged: the baseline for --epochs 0."""
    import torch
    from ultralytics import YOLO, YOLOWorld
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel, WorldModel

    from defectkit.finetune.text_embeddings import read_cache
    from defectkit.finetune.world_offline import set_world_classes

    torch.manual_seed(args.seed)
    if spec["family"] == "world":
        wrapper = YOLOWorld(spec["yaml"])
        net = WorldModel(spec["yaml"], nc=min(len(names), 80), verbose=False)
        import yaml as _yaml

        train_dir = Path(_yaml.safe_load(data_yaml.read_text())["path"]) / "images"
        feats = torch.from_numpy(read_cache(train_dir / "text_embeddings_clip_ViT-B_32.pt", names))
        set_world_classes(net, names, feats)
    else:
        wrapper = YOLO(spec["yaml"])
        net = (SegmentationModel if spec["task"] == "segment" else DetectionModel)(spec["yaml"], nc=len(names), verbose=False)
        net.names = dict(enumerate(names))
    net.args = {"imgsz": args.imgsz}
    wrapper.model = net.eval()
    return wrapper


def predict_records(model, gt_records, data_root: Path, classes: list[str], args, task: str):
    """Canonical prediction records for ``gt_records``' images, and images/s."""
    import numpy as np

    from defectkit.converters.canonical import ImageRecord
    from defectkit.converters.instances import encode_rle

    records, t0 = [], time.perf_counter()
    paths = [str(data_root / r.image) for r in gt_records]
    results = model.predict(source=paths, imgsz=args.imgsz, conf=args.conf, iou=0.7, max_det=100,
                            device=_device(args.device), stream=True, verbose=False,
                            retina_masks=task == "segment")
    for r, res in zip(gt_records, results, strict=True):
        b = res.boxes
        boxes = b.xyxy.cpu().numpy() if len(b) else np.zeros((0, 4))
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, r.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, r.height)
        scores = b.conf.cpu().numpy() if len(b) else np.zeros(0)
        labels = [res.names[int(c)] for c in b.cls.cpu().numpy()] if len(b) else []
        masks = None
        if task == "segment":
            data = res.masks.data.cpu().numpy() > 0.5 if res.masks is not None else np.zeros((0, r.height, r.width), bool)
            masks = [encode_rle(m) for m in data]
        records.append(ImageRecord(image=r.image, height=r.height, width=r.width, boxes_xyxy=boxes, labels=labels,
                                   scores=scores, masks=masks, image_score=float(scores.max()) if len(scores) else 0.0,
                                   key=r.key, category=r.category, defect_type=r.defect_type, fold=r.fold))
    seconds = time.perf_counter() - t0
    unknown = {lab for rec in records for lab in rec.labels} - set(classes)
    if unknown:
        raise RuntimeError(f"model predicts classes {sorted(unknown)} that the data does not have")
    return records, len(records) / seconds if seconds > 0 else float("nan")


def evaluate(model, data_yaml: Path, run_dir: Path, args, spec: dict, names: list[str], ultralytics_val: bool = True) -> dict:
    """Test-fold metrics: Ultralytics' validator, pycocotools on canonical predictions, image AUROC."""
    from defectkit.converters.canonical import make_header, read_records, write_records
    from defectkit.converters.detection_eval import coco_evaluate, image_auroc

    metrics: dict = {}
    if ultralytics_val:
        v = model.val(data=str(data_yaml), split="test", imgsz=args.imgsz, batch=args.batch, device=_device(args.device),
                      plots=True, project=str(run_dir), name="test", exist_ok=True, verbose=False)
        part = v.seg if spec["task"] == "segment" else v.box
        per = {names[int(c)]: {"precision": float(part.p[i]), "recall": float(part.r[i]), "ap50": float(part.ap50[i]),
                               "ap50_95": float(part.ap[i])} for i, c in enumerate(v.ap_class_index)}
        metrics["ultralytics"] = {"map50": float(v.box.map50), "map50_95": float(v.box.map),
                                  "precision": float(v.box.mp), "recall": float(v.box.mr), "per_class": per}
        if spec["task"] == "segment":
            metrics["ultralytics"]["mask_map50"] = float(v.seg.map50)
            metrics["ultralytics"]["mask_map50_95"] = float(v.seg.map)
    gt_path = conversion_dir(data_yaml) / "ground_truth.jsonl"
    if not gt_path.is_file():
        log.warning("%s not found: no canonical predictions or pycocotools cross-check", gt_path)
        return metrics
    header, gt = read_records(gt_path)
    test = [r for r in gt if r.fold == "test"]
    preds, ips = predict_records(model, test, Path(header["data_root"]), names, args, spec["task"])
    pred_header = make_header("predictions", args.model, names, header["data_root"], manifest=header.get("manifest"),
                              run=str(run_dir), fold="test", from_scratch=args.from_scratch,
                              text_embeddings=args.text_embeddings if spec["family"] == "world" else None)
    write_records(run_dir / "predictions.jsonl", pred_header, preds)
    metrics["pycocotools"] = {"bbox": coco_evaluate(test, preds, names, "bbox")}
    if spec["task"] == "segment":
        metrics["pycocotools"]["segm"] = coco_evaluate(test, preds, names, "segm")
    metrics["image_auroc"] = image_auroc(test, preds)
    metrics["test_images"] = len(test)
    metrics["images_per_s"] = ips
    return metrics


# ---------------------------------------------------------------------------------------- main


def default_data() -> Path:
    return WORK / "out" / "defectkit_synth" / "converted" / "all-defect" / "yolo" / "data.yaml"


def main(args: argparse.Namespace) -> dict:
    _setup_env()
    spec = MODELS[args.model]
    data_yaml = _data_for(spec, (args.data or default_data()))
    if not data_yaml.is_file():
        raise FileNotFoundError(f"{data_yaml} does not exist; run `make convert` first (or pass --data)")
    names = _names(data_yaml)
    conv = conversion_dir(data_yaml)
    prompts = class_prompts(names, conv, args.prompt_template)

    if args.make_text_embeddings:
        import torch

        from defectkit.finetune.text_embeddings import clip_embeddings

        emb = clip_embeddings(prompts, args.clip_model, "cpu")
        table = {k: torch.from_numpy(e) for n, p, e in zip(names, prompts, emb, strict=True) for k in (n, p)}
        torch.save(table, args.make_text_embeddings)
        print(f"wrote {len(names)} class embeddings ({', '.join(prompts)}) to {args.make_text_embeddings}")
        return {"text_embeddings": str(args.make_text_embeddings)}

    run_dir = (args.project / (args.name or f"{conv.name}-{args.model}")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    source = resolve_weights(args, spec)
    info: dict = {"names": names, "prompts": prompts, "model": args.model, "start": source,
                  "from_scratch": args.from_scratch, "pretrained": not args.from_scratch}
    if spec["family"] == "world":
        import yaml

        train_dir = Path(yaml.safe_load(data_yaml.read_text())["path"]) / "images" / "train"
        info["text_embeddings"] = prepare_text_embeddings(args, names, prompts, train_dir)
    (run_dir / "run_args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(args).items()}, indent=1) + "\n")
    (run_dir / "classes.json").write_text(json.dumps(info, indent=1) + "\n")

    t0 = time.perf_counter()
    if args.epochs == 0 and not args.resume:
        model = _untrained(args, spec, data_yaml, names)
        metrics = evaluate(model, data_yaml, run_dir, args, spec, names, ultralytics_val=False)
        metrics["note"] = "untrained model (epochs 0): the baseline a from-scratch run must beat"
    else:
        model = train(args, spec, data_yaml, run_dir, source)
        train_s = time.perf_counter() - t0
        from ultralytics import YOLO, YOLOWorld

        best = run_dir / "weights" / "best.pt"
        model = (YOLOWorld if spec["family"] == "world" else YOLO)(str(best))
        metrics = evaluate(model, data_yaml, run_dir, args, spec, names)
        metrics["train_seconds"] = train_s
        metrics["weights"] = str(best)
    metrics.update({"model": args.model, "from_scratch": args.from_scratch, "data": str(data_yaml),
                    "text_embeddings": info.get("text_embeddings", {}).get("provider")})
    if args.from_scratch:
        metrics["note"] = metrics.get("note", "") + ("; " if metrics.get("note") else "") + (
            "trained from scratch" + (" with hash class embeddings" if spec["family"] == "world" else "")
            + ": not a pretrained model's result")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    _print_summary(metrics, run_dir)
    return metrics


def _print_summary(m: dict, run_dir: Path) -> None:
    u, c = m.get("ultralytics", {}), m.get("pycocotools", {}).get("bbox", {})
    print(f"{m['model']} on the test fold ({m.get('test_images', '?')} images): "
          f"mAP50 {u.get('map50', float('nan')):.3f} / mAP50-95 {u.get('map50_95', float('nan')):.3f} (Ultralytics), "
          f"{c.get('map50', float('nan')):.3f} / {c.get('map50_95', float('nan')):.3f} (pycocotools), "
          f"image AUROC {m.get('image_auroc', float('nan')):.3f}, {m.get('images_per_s', float('nan')):.1f} images/s")
    if m.get("note"):
        print(f"note: {m['note']}")
    print(f"run folder: {run_dir}")


def cli(argv: list[str] | None = None) -> int:
    from defectkit.datasets.cli_runner import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
