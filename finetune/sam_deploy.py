"""Deploy a fine-tuned SAM as the YOLO -> SAM cascade: on new images, the YOLO run's boxes (at its
cascade confidence) prompt SAM's mask decoder; the image decision is the YOLO run's (its highest box
confidence against the threshold it chose on its val fold).  SAM alone needs prompts, which new
images do not have: a SAM run trained without ``--yolo-predictions`` cannot predict and says so.

``<run>/deploy.json`` (written by ``finetune/sam.py``) names the SAM base (model, checkpoint, size,
seed), the fine-tuned weights and the YOLO run.  ``export`` writes segment-anything's own
``SamOnnxModel`` (prompt encoder + mask decoder, one box as two corner points) and the image encoder
as separate ONNX files, each checked against PyTorch on real images.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from defectkit.core.atomic import atomic_write_bytes, atomic_write_json
from defectkit.core.deploy_spec import read_deploy_spec, write_deploy_spec
from defectkit.core.errors import ConfigError, DataError, MissingFileError
from defectkit.finetune.sam_cascade import prompt_boxes

ONNX_ATOL = 1e-3  # mask logits / embeddings: float32 through the same graph


def write_spec(run: Path, args, key: str, yolo_run: Path | None, conf: float, max_det: int | None) -> dict:
    return write_deploy_spec(
        run, "sam_cascade" if yolo_run else "sam", weights="best.pt", base=key,
        sam={"model": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
             "imgsz": args.imgsz, "seed": args.seed, "crop": args.crop, "box_prior": args.box_prior},
        # relative to this run, so the two run folders can move together
        yolo_run=os.path.relpath(Path(yolo_run).resolve(), Path(run).resolve()) if yolo_run else None,
        cascade_conf=conf,
        cascade_max_det=max_det,
        score="image score and decision: the YOLO run's (highest box confidence)")


def read_spec(run: Path) -> dict:
    spec = read_deploy_spec(run, ["sam", "sam_cascade"], "the SAM run was trained by an older version (retrain it)")
    if spec["kind"] == "sam":
        raise ConfigError(f"{run}: SAM needs prompts and new images have none; train it with --yolo-predictions "
                          "(the YOLO -> SAM cascade) to predict, or predict with the YOLO run")
    return spec


def load_sam_run(run: Path, spec: dict, device: str = "cpu"):
    """``(sam, cache)``: the base model with the run's fine-tuned decoder; the cache object gives the
    resize transform (in memory only: embeddings of new images are not kept).  As after training, a run
    that trained its encoder (the encoder is in its checkpoint) has its embeddings computed live, in float32;
    a frozen encoder's are rounded to float16 as the trainer's cache does (sam_core.EmbeddingCache)."""
    from defectkit.finetune.sam_core import EmbeddingCache, load_sam
    from defectkit.finetune.sam_train import load_trained

    s = spec["sam"]
    sam, key = load_sam(s["model"], Path(s["checkpoint"]) if s["checkpoint"] else None, s["imgsz"], s["seed"])
    sam.box_prior = s.get("box_prior", 0.0)  # the residual the decoder was trained on (sam_core.box_occupancy)
    weights = Path(run) / spec["weights"]
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found: the run has no trained decoder")
    ck = load_trained(sam, weights, key, device)
    sam.to(device).eval()
    cache = EmbeddingCache(sam, None, key, device)
    cache.live = "image_encoder" in ck["weights"]
    return sam, cache


def predict_images(run: Path, images: list[tuple[str, np.ndarray]], backend: str = "torch"):
    """YOLO boxes (>= the cascade confidence) -> SAM masks; decisions from the YOLO run."""
    import torch

    from defectkit.finetune import yolo_deploy
    from defectkit.finetune.sam_core import segment_boxes

    spec = read_spec(run)
    if backend != "torch":
        raise ConfigError("the cascade predicts through PyTorch; --backend onnx is for anomaly and YOLO runs "
                          "(the exported SAM files are for a runtime of your own)")
    info, preds = yolo_deploy.predict_images((Path(run) / spec["yolo_run"]).resolve(), images, backend)
    sam, cache = load_sam_run(run, spec)
    conf = spec["cascade_conf"]
    from defectkit.converters.instances import encode_rle

    with torch.no_grad():
        for p, (_, im) in zip(preds, images, strict=True):
            keep = prompt_boxes(p.box_scores, conf, spec.get("cascade_max_det"))  # as the cascade was scored
            p.boxes, p.labels = p.boxes[keep], [p.labels[k] for k in keep]
            p.box_scores = [p.box_scores[k] for k in keep]
            rgb = im if im.ndim == 3 else np.repeat(im[..., None], 3, 2)
            if not len(p.boxes):
                p.masks = []
                continue
            prob = segment_boxes(sam, rgb, p.boxes, cache, spec["sam"].get("crop", 0.0), encode=cache.encode)
            p.masks = [encode_rle(m > 0.5, b) for m, b in zip(prob, p.boxes, strict=True)]
    info = {**info, "model": f"{info['model']}+sam-{spec['sam']['model']}", "cascade_conf": conf}
    return info, preds


def export_onnx(run: Path, images: list[np.ndarray]) -> dict:
    """segment-anything's ``SamOnnxModel`` (prompt encoder + decoder; a box as two corner points) and the
    image encoder, each run by onnxruntime and PyTorch on ``images`` (one box per image: the central half)."""
    import logging

    import torch
    from segment_anything.utils.onnx import SamOnnxModel

    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run = Path(run)
    spec = read_spec(run)
    sam, cache = load_sam_run(run, spec)
    if not images:
        raise DataError(f"{run}: no readable image to check the export on")
    size = sam.image_encoder.img_size
    rgbs = [im if im.ndim == 3 else np.repeat(im[..., None], 3, 2) for im in images]
    out = run / "export"
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(dir=run, prefix=".export.") as tmp:
        enc_path, dec_path = Path(tmp) / "image_encoder.onnx", Path(tmp) / "sam_decoder.onnx"
        x = torch.cat([sam.preprocess(torch.as_tensor(cache.transform.apply_image(r)).permute(2, 0, 1)[None].float())
                       for r in rgbs])
        torch.onnx.export(sam.image_encoder, (x[:2] if len(x) > 1 else x,), str(enc_path), input_names=["images"],
                          output_names=["embeddings"], dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},)
                          if len(x) > 1 else None, dynamo=True, opset_version=18, external_data=False, verbose=False)
        with torch.no_grad():
            t_emb = sam.image_encoder(x).numpy()
        enc = ort.InferenceSession(str(enc_path), providers=["CPUExecutionProvider"])
        o_emb = enc.run(None, {"images": x.numpy()})[0]
        onnx_model = SamOnnxModel(sam, return_single_mask=True)
        h, w = rgbs[0].shape[:2]
        box = np.array([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]])
        coords = cache.transform.apply_coords(box.reshape(-1, 2, 2), (h, w)).astype(np.float32)
        emb_dim = sam.prompt_encoder.embed_dim
        feeds = {"image_embeddings": t_emb[:1], "point_coords": coords,
                 "point_labels": np.array([[2, 3]], np.float32), "mask_input": np.zeros((1, 1, *(4 * np.array(
                     sam.prompt_encoder.image_embedding_size))), np.float32),
                 "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([h, w], np.float32)}
        torch.onnx.export(onnx_model, tuple(torch.as_tensor(v) for v in feeds.values()), str(dec_path),
                          input_names=list(feeds), output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          opset_version=17, dynamo=False)
        o_masks = ort.InferenceSession(str(dec_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        with torch.no_grad():
            t_masks = onnx_model(*(torch.as_tensor(v) for v in feeds.values()))[0].numpy()
        check = {"images": len(rgbs), "max_abs_diff_embeddings": float(np.abs(o_emb - t_emb).max()),
                 "max_abs_diff_mask_logits": float(np.abs(o_masks - t_masks).max()), "atol": ONNX_ATOL,
                 "embedding_dim": emb_dim, "input_size": size}
        check["max_abs_diff"] = max(check["max_abs_diff_embeddings"], check["max_abs_diff_mask_logits"])
        if check["max_abs_diff"] > ONNX_ATOL:
            raise DataError(f"{run}: the SAM ONNX export differs from PyTorch by {check['max_abs_diff']:.3g} "
                            f"(> {ONNX_ATOL}); nothing written")
        out.mkdir(exist_ok=True)
        for p in (enc_path, dec_path):
            atomic_write_bytes(out / p.name, p.read_bytes())
    atomic_write_json(out / "model.json", {**spec, "onnx": {
        "image_encoder": "image_encoder.onnx: (N, 3, S, S) preprocessed (resize longest side to S, pixel mean/std "
                         "of SAM, pad) -> embeddings",
        "decoder": "sam_decoder.onnx: segment-anything SamOnnxModel inputs (a box = 2 points, labels 2 and 3); "
                   "with sam.box_prior S, add S * (2 * occupancy - 1) of the box to its low-resolution logits "
                   "(defectkit.finetune.sam_core.box_occupancy) before upsampling",
        "prompts": "sam.crop > 0: each box is segmented on its own square window, crop x the box's longer side "
                   "(at least 24 px, shifted inside the image; defectkit.finetune.sam_core.prompt_window), which "
                   "is encoded and decoded as an image of its own and pasted back; 0: the whole image",
        "check": check}})
    return {"onnx": str(out / "sam_decoder.onnx"), "spec": str(out / "model.json"), **check}
