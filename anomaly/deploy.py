"""Deploy a trained anomaly run: the inference spec written beside its weights, the model rebuilt from
disk as the very :class:`~defectkit.anomaly.scoring.AnomalyHead` the trainer scored with, and its ONNX
export, checked against PyTorch on real images in the same command.

``<run>/deploy.json`` (written by ``anomaly/train.py``) holds everything inference needs: the model
and scoring configuration, the multi-scale statistics, the thresholds the run chose on its val fold
and the preprocessing.  ``export`` writes ``<run>/export/model.onnx`` and ``model.json`` (the same
spec plus the graph's input/output names) so that a runtime needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from defectkit.core.atomic import atomic_write_bytes, atomic_write_json
from defectkit.core.deploy_spec import read_deploy_spec, write_deploy_spec
from defectkit.core.errors import ConfigError, DataError, MissingFileError
from defectkit.core.training import load_weights

log = logging.getLogger("defectkit.anomaly")

HEAD_MODELS = ("draem", "conv_ae", "unet_ae", "fc_ae", "vae")
#: the exported graphs a runner can run: float32 (``export``) and INT8 (``export --quantize int8``)
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
ONNX_ATOL = 1e-4  # max |onnxruntime - torch| allowed on maps and scores (float32 through the same graph)


def preprocess_spec(imgsz: int, mode: str) -> dict:
    """What a runtime must do to an image before the graph (``anomaly.data.prepare``)."""
    channels = 3 if mode == "rgb" else 1
    return {"size": [imgsz, imgsz], "resize": "cv2.resize INTER_AREA to size (aspect ratio not kept)",
            "input": mode, "channel_order": "RGB" if mode == "rgb" else "gray (cv2 RGB2GRAY)",
            "fft": "20*log10(|fftshift(fft2(gray))|+1e-8), min-max to [0, 1]" if mode == "fft" else None,
            "layout": "NCHW", "dtype": "float32", "scale": 1 / 255, "mean": [0.0] * channels, "std": [1.0] * channels,
            "normalisation": "none: inputs stay in [0, 1] (synthetic defects live there; no ImageNet mean/std)"}


def write_spec(run: Path, cfg, head, thresholds) -> dict:
    """``<run>/deploy.json`` after training: model, scoring, statistics, thresholds, preprocessing."""
    return write_deploy_spec(
        run, "anomaly", weights="best.pt", model=dataclasses.asdict(cfg.model), score=dataclasses.asdict(cfg.score),
        family=head.family, kernel=head.kernel, stats=head.stats.tolist(),
        thresholds={"image": thresholds.image, "pixel": thresholds.pixel, "rule": thresholds.rule,
                    "source": thresholds.source},
        preprocess=preprocess_spec(cfg.model.imgsz, cfg.model.input),
        outputs={"maps": "(N, S, S) anomaly map at the input size", "scores": "(N,) image score"})


def read_spec(run: Path) -> dict:
    if not (Path(run) / "deploy.json").is_file():
        model = _run_model(run)
        if model and model not in HEAD_MODELS:
            raise ConfigError(f"{run}: a {model} run (a feature model) has no deployable map head; predict and export "
                              f"support {', '.join(HEAD_MODELS)}")
    hint = (f"{run} is not an anomaly run folder trained by this version (retrain it with anomaly/train.py, "
            "which writes its thresholds and preprocessing there)")
    return read_deploy_spec(run, ["anomaly"], hint)


def _run_model(run: Path) -> str | None:
    try:
        return json.loads((Path(run) / "run_args.json").read_text())["model"]["model"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def build_head(spec: dict, run: Path, device: str = "cpu"):
    """The run's :class:`AnomalyHead` with its best weights (``weights_only`` load), in eval mode."""
    import torch

    from defectkit.anomaly.registry import build_model
    from defectkit.anomaly.scoring import AnomalyHead

    m, s = spec["model"], spec["score"]
    weights = Path(run) / spec.get("weights", "best.pt")
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found: the run has no trained weights")
    channels = 3 if m["input"] == "rgb" else 1
    model = build_model(m["model"], channels, m["imgsz"], m["base"], m["depth"], m["latent"],
                        tuple(m["skips"]) if m.get("skips") else None)
    load_weights(weights, {"model": model}, device)
    head = AnomalyHead(model, spec["family"], topk=s["topk"], map_kind=s["map"], ssim_lambda=s["ssim_lambda"],
                       scales=s["scales"], sigma=s["sigma"], kernel=spec["kernel"])
    if spec["stats"]:
        head.stats = torch.tensor(spec["stats"], dtype=torch.float32)
    return head.to(device).eval()


def map_regions(full: np.ndarray, pixel_threshold: float | None) -> tuple[np.ndarray, list[str], list[float], list]:
    """Connected regions of a map (at image size) at the pixel threshold: boxes, labels, scores (the
    region's peak map value) and COCO RLE masks, as the canonical predictions hold them."""
    from defectkit.converters.instances import encode_rle, mask_to_instances

    if pixel_threshold is None:
        return np.zeros((0, 4)), [], [], []
    inst = mask_to_instances(full >= pixel_threshold)
    scores = [float(full[k].max()) for k in inst.masks]
    rles = [encode_rle(k, b) for k, b in zip(inst.masks, inst.boxes_xyxy, strict=True)]
    return inst.boxes_xyxy, ["anomaly"] * len(inst), scores, rles


def prepare_batch(images: Sequence[np.ndarray], spec: dict) -> np.ndarray:
    """``(N, C, S, S)`` float32 inputs from RGB uint8 images, exactly as training prepared them."""
    from defectkit.anomaly.data import prepare

    size, mode = spec["preprocess"]["size"][0], spec["preprocess"]["input"]
    return np.stack([prepare(im if im.ndim == 3 else np.repeat(im[..., None], 3, 2), size, mode) for im in images])


class AnomalyRunner:
    """Maps and scores of a run's head on prepared batches, through PyTorch or the exported ONNX file."""

    def __init__(self, run: Path, backend: str = "torch", device: str = "cpu"):
        self.run, self.backend = Path(run), backend
        self.spec = read_spec(self.run)
        if backend == "torch":
            self.head = build_head(self.spec, self.run, device)
            self.device = device
        elif backend in ONNX_FILES:
            onnx_path = self.run / "export" / ONNX_FILES[backend]
            if not onnx_path.is_file():
                flag = " --quantize int8" if backend == "onnx-int8" else ""
                raise MissingFileError(f"{onnx_path} not found: export the run first (defectkit export --run "
                                       f"{self.run}{flag})")
            spec_path = self.run / "export" / "model.json"
            spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
            if spec.get("kind") != "anomaly":
                raise DataError(f"{spec_path}: exported from a {spec.get('kind')} run, not this anomaly run: export "
                                "again (make export RUN=...)")
            self.session = _ort_session(onnx_path)
            self.spec = spec
        else:
            raise ConfigError(f"unknown backend {backend!r}; choose torch, {' or '.join(ONNX_FILES)}")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.backend in ONNX_FILES:
            maps, scores = self.session.run(["maps", "scores"], {"images": np.ascontiguousarray(x, np.float32)})
            return maps, scores.astype(np.float64)
        import torch

        with torch.no_grad():
            maps, scores = self.head(torch.from_numpy(x).to(self.device))
        return maps.cpu().numpy(), scores.double().cpu().numpy()


def _ort_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError("onnxruntime is not installed: run make setup") from e
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def export_onnx(run: Path, images: Sequence[np.ndarray], out: Path | None = None, atol: float = ONNX_ATOL) -> dict:
    """Export the run's head (maps and score, smoothing and normalisation included) with a dynamic batch
    axis; then run onnxruntime and PyTorch on ``images`` and refuse the export if they differ by more than
    ``atol``.  Writes ``model.onnx`` and ``model.json`` into ``out`` (default ``<run>/export``)."""
    import tempfile

    import torch

    for name in ("onnxscript", "onnx_ir"):  # their INFO lines (passes, rewrites) say nothing a user needs
        logging.getLogger(name).setLevel(logging.WARNING)
    run = Path(run)
    spec = read_spec(run)
    head = build_head(spec, run)
    out = Path(out) if out else run / "export"
    x = prepare_batch(images, spec)
    if len(x) < 2:
        raise DataError(f"{run}: need at least 2 images to check the export's batch axis, got {len(x)}")
    with tempfile.TemporaryDirectory(dir=run, prefix=".export.") as tmp:
        onnx_tmp = Path(tmp) / "model.onnx"
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(head, (torch.from_numpy(x[:2]),), str(onnx_tmp), input_names=["images"],
                          output_names=["maps", "scores"], dynamic_shapes=({0: batch},), dynamo=True,
                          opset_version=18, external_data=False, verbose=False)
        session = _ort_session(onnx_tmp)
        o_maps, o_scores = session.run(["maps", "scores"], {"images": x})
        with torch.no_grad():
            t_maps, t_scores = (t.numpy() for t in head(torch.from_numpy(x)))
        check = {"images": len(x), "max_abs_diff_maps": float(np.abs(o_maps - t_maps).max()),
                 "max_abs_diff_scores": float(np.abs(o_scores - t_scores).max()), "atol": atol,
                 "map_range": [float(t_maps.min()), float(t_maps.max())]}
        if not check["max_abs_diff_maps"] <= atol or not check["max_abs_diff_scores"] <= atol:
            raise DataError(f"{run}: the ONNX export differs from PyTorch by {check['max_abs_diff_maps']:.3g} (maps) / "
                            f"{check['max_abs_diff_scores']:.3g} (scores), more than {atol}; nothing written")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "model.onnx", onnx_tmp.read_bytes())
    model_json = {**spec, "onnx": {"file": "model.onnx", "inputs": {"images": "(N, C, S, S) float32, dynamic N"},
                                   "outputs": ["maps", "scores"], "opset": 18, "check": check}}
    atomic_write_json(out / "model.json", model_json)
    log.info("exported %s -> %s (max |onnx - torch|: maps %.2g, scores %.2g on %d images)", run, out / "model.onnx",
             check["max_abs_diff_maps"], check["max_abs_diff_scores"], len(x))
    return {"onnx": str(out / "model.onnx"), "spec": str(out / "model.json"), **check}
