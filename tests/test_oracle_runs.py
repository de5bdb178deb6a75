"""Oracle and anti-oracle runs through the real scripts: a scorer whose map IS the ground truth must
score 1.0 everywhere, its inverse 0 (or 0.5 for tied image scores).  Catches resize, order and sign bugs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

IMGSZ = 256  # the washer's own size: the oracle map is the ground truth exactly


class OracleScorer:
    def __init__(self, data, invert: bool):
        from defectkit.anomaly.data import downsample_mask, load_masks
        from defectkit.datasets.image_files import read_header

        self.table = {}
        for es, xs in ((data.val_e, data.val_x), (data.test_e, data.test_x)):
            masks = load_masks([data.root / e.mask if e.mask else None for e in es],
                               [read_header(data.root / e.image)[0] for e in es])
            for x, m in zip(xs, masks, strict=True):
                self.table[self._key(x)] = downsample_mask(m, IMGSZ).astype(np.float32)
        self.invert = invert

    @staticmethod
    def _key(x) -> str:
        return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()

    def maps(self, inputs):
        out = np.stack([self.table.get(self._key(x), np.zeros((IMGSZ, IMGSZ), np.float32)) for x in inputs])
        return 1.0 - out if self.invert else out

    def image_scores(self, maps):
        return maps.reshape(len(maps), -1).max(1).astype(np.float64)


@pytest.mark.parametrize("invert", [False, True], ids=["oracle", "anti-oracle"])
def test_oracle_through_train_and_compare(synthetic_root, tmp_path, monkeypatch, invert):
    from defectkit.anomaly import train as T
    from defectkit.converters.convert import ConvertConfig, convert
    from defectkit.datasets.split import read_manifest
    from defectkit.review.compare import compare

    monkeypatch.setattr(T, "build_scorer",
                        lambda cfg, data, run, device, dist=None: (OracleScorer(data, invert), None, []))
    args = T.get_args_parser().parse_args(["--data", str(synthetic_root), "--manifest", str(tmp_path / "m.json"),
                                           "--out", str(tmp_path / "run"), "--imgsz", str(IMGSZ), "--category",
                                           "washer", "--model", "conv_ae", "--no-plots", "-q", "--device", "cpu"])
    m = T.main(args)
    manifest = read_manifest(tmp_path / "m.json")
    manifest["path"] = str(tmp_path / "m.json")
    conv = tmp_path / "conv"
    convert(synthetic_root, manifest, conv, ConvertConfig(formats=("coco",)), categories=["washer"], progress=False)
    (r,) = compare(conv / "ground_truth.jsonl", [tmp_path / "run"], tmp_path / "cmp")
    if not invert:
        assert m["image"]["auroc"] == 1.0
        assert m["pixel"]["auroc"] == 1.0 and m["pixel"]["aupro"] == pytest.approx(1.0) and m["pixel"]["ap"] == 1.0
        assert r["pixel_auroc"] == 1.0 and r["pixel_aupro"] == pytest.approx(1.0)
        assert r["pixel_iou"] == 1.0 and r["pixel_dice"] == 1.0
        assert r["mask_ap_class_agnostic"]["map50"] == pytest.approx(1.0)
        assert r["image_auroc"] == 1.0
    else:
        assert m["pixel"]["auroc"] == 0.0 and m["pixel"]["aupro"] == pytest.approx(0.0)
        assert m["image"]["auroc"] <= 0.5  # every map's maximum is 1: tied image scores
        assert r["pixel_auroc"] == 0.0
        assert r["pixel_iou"] < 0.05
    assert r["images"] == m["test_images"] == 30
