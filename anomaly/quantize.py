"""INT8 export of an anomaly run: onnxruntime's static quantization of the exported head, refused unless it
scores the run's test fold as the float32 export does.

* Calibration: the run's own ``train/good`` images (the data the model was fitted on), as anomalib's INT8 export
  calibrates on training data; onnxruntime's QDQ format, weights int8 per channel, activations uint8.
* Check: the images of the run's test fold (its ``predictions.jsonl``) through both graphs; the largest map and
  score difference, and image and pixel AUROC (maps and masks at the model's input size) from each graph.  A
  difference in either AUROC larger than ``tol`` (default 0.002) refuses the export and writes nothing.

Writes ``<run>/export/model.int8.onnx`` and adds an ``int8`` entry (the check) to ``<run>/export/model.json``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np

from defectkit.anomaly.deploy import ONNX_FILES, export_onnx, prepare_batch, read_spec
from defectkit.core.atomic import atomic_write_bytes, atomic_write_json
from defectkit.core.errors import DataError

log = logging.getLogger("defectkit.anomaly")
INT8_FILE = ONNX_FILES["onnx-int8"]
AUROC_TOL = 0.002


def _fold(run: Path, size: int, n_calib: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(test images, labels, masks at the model's size, calibration images)``: the run's own test fold, and
    ``n_calib`` of its category's good training images, evenly spaced."""
    from defectkit.anomaly.data import entry_masks
    from defectkit.anomaly.validate import run_data, split_entries
    from defectkit.datasets.image_files import read_image
    from defectkit.datasets.split import entries

    root, m, category = run_data(run)
    test = split_entries(m, category, "test")
    masks = [cv2.resize(mk.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
             for mk in entry_masks(root, test)]
    goods = entries(m, category=category, source_split="train")
    goods = goods[:: max(1, len(goods) // n_calib)][:n_calib]
    return ([read_image(root / e.image) for e in test], np.array([e.defect_type != "good" for e in test]),
            np.stack(masks), [read_image(root / e.image) for e in goods])


def _scores(session, x: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    out = [session.run(["maps", "scores"], {"images": x[i : i + batch]}) for i in range(0, len(x), batch)]
    return np.concatenate([m for m, _ in out]), np.concatenate([s for _, s in out])


def quantize_int8(run: Path, n_calib: int = 32, tol: float = AUROC_TOL) -> dict:
    """Quantize ``<run>/export/model.onnx`` (exported first when missing) to INT8 and check it (module doc).

    Raises:
        DataError: the INT8 graph's image or pixel AUROC differs from float32's by more than ``tol``.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from defectkit.review.metrics import auroc

    run = Path(run)
    spec = read_spec(run)
    images, labels, masks, goods = _fold(run, spec["preprocess"]["size"][0], n_calib)
    fp32 = run / "export" / "model.onnx"
    if not fp32.is_file():
        export_onnx(run, images[:8])
    calib = prepare_batch(goods, spec)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    for name in ("onnxruntime", "root"):
        logging.getLogger(name).setLevel(logging.WARNING)
    x = prepare_batch(images, spec)
    with tempfile.TemporaryDirectory(dir=run, prefix=".int8.") as tmp:
        q = Path(tmp) / INT8_FILE
        quantize_static(str(fp32), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        f_maps, f_scores = _scores(ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]), x)
        q_maps, q_scores = _scores(ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]), x)
        check = {"test_images": len(x), "calibration_images": len(calib),
                 "max_abs_diff_maps": float(np.abs(q_maps - f_maps).max()),
                 "max_abs_diff_scores": float(np.abs(q_scores - f_scores).max()),
                 "image_auroc": {"fp32": auroc(f_scores, labels), "int8": auroc(q_scores, labels)},
                 "pixel_auroc": {"fp32": auroc(f_maps.ravel(), masks.ravel()),
                                 "int8": auroc(q_maps.ravel(), masks.ravel())}, "tol": tol}
        worst = max(abs(check[k]["int8"] - check[k]["fp32"]) for k in ("image_auroc", "pixel_auroc")
                    if not np.isnan(check[k]["fp32"]))
        check["max_auroc_change"] = float(worst)
        if not worst <= tol:
            raise DataError(f"{run}: INT8 changes the test fold's AUROC by {worst:.4f} (image {check['image_auroc']}, "
                            f"pixel {check['pixel_auroc']}), more than {tol}; nothing written")
        atomic_write_bytes(run / "export" / INT8_FILE, q.read_bytes())
    model_json = run / "export" / "model.json"
    atomic_write_json(model_json, {**json.loads(model_json.read_text()), "int8": {"file": INT8_FILE, **check}})
    log.info("INT8 export %s: max |int8 - fp32| maps %.3g, AUROC change %.4f on %d test images",
             run / "export" / INT8_FILE, check["max_abs_diff_maps"], worst, len(x))
    return {"onnx": str(run / "export" / INT8_FILE), **check}
