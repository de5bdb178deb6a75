"""Deploy a trained YOLO run: the image threshold chosen on its val fold (``<run>/deploy.json``),
prediction on new images through PyTorch or the exported ONNX file, and the export itself
(Ultralytics' own exporter), checked against PyTorch on real images.

The image score of a detector is its highest box confidence; an image is NG when that reaches the
threshold the run chose on its val fold (F1-optimal, or a percentile of good images' scores when
the val fold has no defect image).  Ultralytics runs both backends (``AutoBackend`` loads ``.onnx``
through onnxruntime), so preprocessing (letterbox to ``imgsz``, RGB, /255) and NMS are one code path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from defectkit.core.atomic import atomic_write_json
from defectkit.core.deploy_spec import read_deploy_spec, write_deploy_spec
from defectkit.core.errors import DataError, MissingFileError

log = logging.getLogger("defectkit.finetune")

BOX_ATOL = 1.0  # px: |onnx - torch| for boxes; scores within SCORE_ATOL
SCORE_ATOL = 1e-3


def image_threshold(val_records, val_preds, method: str = "f1", false_alarm_rate: float = 0.01) -> dict:
    """The image threshold on the val fold's highest box confidences (``method`` as the anomaly models'
    ``--threshold``; ``false_alarm`` keeps at most ``false_alarm_rate`` of the good val images rejected).

    An image without a box scores 0, so a threshold at or below 0 would reject every image, boxes or not
    (F1 picks it when most val images are defective and the detector misses many): the threshold is
    raised to the lowest box confidence seen, so NG always means "a box was found"."""
    from defectkit.review.metrics import choose_threshold

    by = {p.image: p for p in val_preds}
    scores = np.array([by[r.image].image_score or 0.0 for r in val_records])
    labels = np.array([len(r) > 0 for r in val_records])
    if not len(scores):
        return {"image": 0.25, "rule": "default 0.25 (no val fold)", "source": "none"}
    thr, rule = choose_threshold(method, scores, labels, false_alarm_rate)
    if thr <= 0:
        boxed = scores[scores > 0]
        thr = float(boxed.min()) if len(boxed) else 1.0
        rule += (" (raised to the lowest val box confidence: an image needs a box to be rejected)" if len(boxed)
                 else " (no box on the val fold: nothing is rejected)")
    elif (scores >= thr).any():  # the lowest val score at or above it: the same val decisions, a readable value
        thr = float(scores[scores >= thr].min())
    good = scores[~labels]
    return {"image": float(thr), "rule": rule, "source": "val fold", "val_images": int(len(scores)),
            "val_false_alarm_rate": float((good >= thr).mean()) if len(good) else None}


def write_spec(run_dir: Path, cfg, spec: dict, names: list[str], thresholds: dict) -> dict:
    return write_deploy_spec(
        run_dir, "yolo", weights="weights/best.pt", model=cfg.model, family=spec["family"], task=spec["task"],
        imgsz=cfg.imgsz, conf=cfg.conf, classes=names, thresholds=thresholds,
        preprocess={"size": [cfg.imgsz, cfg.imgsz], "resize": "Ultralytics letterbox (aspect kept, pad 114)",
                    "channel_order": "RGB", "layout": "NCHW", "dtype": "float32", "scale": 1 / 255,
                    "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        score="image score = highest box confidence in [0, 1]")


def read_spec(run: Path) -> dict:
    return read_deploy_spec(run, ["yolo"], "the YOLO run was trained by an older version (retrain it; "
                                           "finetune/yolo.py writes the val-fold threshold there)")


def load_model(run: Path, spec: dict, backend: str):
    from ultralytics import YOLO, YOLOWorld

    weights = Path(run) / spec["weights"]
    if backend == "onnx":
        weights = weights.with_suffix(".onnx")
        if not weights.is_file():
            raise MissingFileError(f"{weights} not found: export the run first (make export RUN={run})")
        return YOLO(str(weights), task=spec["task"])
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found: the run has no trained weights")
    return (YOLOWorld if spec["family"] == "world" else YOLO)(str(weights))


def _run(model, spec: dict, images: list[np.ndarray]):
    bgr = [im[..., ::-1] if im.ndim == 3 else np.repeat(im[..., None], 3, 2) for im in images]
    return model.predict(source=bgr, imgsz=spec["imgsz"], conf=spec["conf"], iou=0.7, max_det=100, device="cpu",
                         verbose=False, retina_masks=spec["task"] == "segment")


def predict_images(run: Path, images: list[tuple[str, np.ndarray]], backend: str = "torch", batch: int = 16):
    """``(info, [Prediction])`` for ``(relative name, image)`` pairs, boxes at the images' own size."""
    from defectkit.converters.canonical import Prediction
    from defectkit.converters.instances import encode_rle

    spec = read_spec(run)
    model = load_model(run, spec, backend)
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        for (rel, im), res in zip(chunk, _run(model, spec, [im for _, im in chunk]), strict=True):
            b = res.boxes
            scores = b.conf.cpu().numpy() if len(b) else np.zeros(0)
            boxes = b.xyxy.cpu().numpy() if len(b) else np.zeros((0, 4))
            labels = [spec["classes"][int(c)] for c in b.cls.cpu().numpy()] if len(b) else []
            masks = None
            if spec["task"] == "segment" and res.masks is not None:
                masks = [encode_rle(m > 0.5) for m in res.masks.data.cpu().numpy()]
            out.append(Prediction(rel, im.shape[0], im.shape[1], float(scores.max()) if len(scores) else 0.0,
                                  boxes, labels, [float(s) for s in scores], masks))
    t = spec["thresholds"]
    info = {"model": spec["model"], "classes": spec["classes"], "threshold": t["image"],
            "threshold_source": f"{Path(run) / 'deploy.json'}: {t['rule']} on the {t['source']}",
            "score": spec["score"]}
    return info, out


def export_onnx(run: Path, images: list[np.ndarray]) -> dict:
    """Ultralytics' ONNX export (dynamic batch) of ``weights/best.pt``, then both backends on ``images``:
    image scores and matched boxes must agree within ``SCORE_ATOL`` / ``BOX_ATOL`` px."""
    import shutil
    import tempfile

    spec = read_spec(run)
    run = Path(run)
    if len(images) < 1:
        raise DataError(f"{run}: no readable image to check the export on")
    model = load_model(run, spec, "torch")
    with tempfile.TemporaryDirectory(dir=run, prefix=".export.") as tmp:
        src = Path(tmp) / "best.pt"
        shutil.copy(run / spec["weights"], src)
        tmp_model = load_model(Path(tmp), {**spec, "weights": "best.pt"}, "torch")
        onnx_tmp = Path(tmp_model.export(format="onnx", imgsz=spec["imgsz"], dynamic=True, simplify=False,
                                         device="cpu", verbose=False))
        onnx_model = load_model(Path(tmp), {**spec, "weights": "best.pt"}, "onnx")
        t_res, o_res = _run(model, spec, images), _run(onnx_model, spec, images)
        score_diff, box_diff = 0.0, 0.0
        for a, b in zip(t_res, o_res, strict=True):
            sa = float(a.boxes.conf.max()) if len(a.boxes) else 0.0
            sb = float(b.boxes.conf.max()) if len(b.boxes) else 0.0
            score_diff = max(score_diff, abs(sa - sb))
            if len(a.boxes) and len(b.boxes):
                from defectkit.converters.instances import box_iou

                ba, bb = a.boxes.xyxy.cpu().numpy(), b.boxes.xyxy.cpu().numpy()
                k = box_iou(ba, bb).argmax(1)
                box_diff = max(box_diff, float(np.abs(ba - bb[k]).max()))
        check = {"images": len(images), "max_abs_diff": score_diff, "max_abs_diff_boxes_px": box_diff,
                 "atol": SCORE_ATOL, "box_atol_px": BOX_ATOL}
        if score_diff > SCORE_ATOL or box_diff > BOX_ATOL:
            raise DataError(f"{run}: the ONNX export differs from PyTorch (image scores by {score_diff:.3g}, boxes by "
                            f"{box_diff:.3g} px); nothing written")
        dest = run / Path(spec["weights"]).with_suffix(".onnx")
        shutil.move(str(onnx_tmp), dest)  # same filesystem: a rename
    out = run / "export"
    out.mkdir(exist_ok=True)
    onnx = {"file": str(dest.relative_to(run)), "check": check,
            "outputs": "Ultralytics raw head output; NMS by the runtime"}
    atomic_write_json(out / "model.json", {**spec, "onnx": onnx})
    return {"onnx": str(dest), "spec": str(out / "model.json"), **check}
