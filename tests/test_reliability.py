"""What a killed, misconfigured or fed-bad-input run does: clear errors, nothing stale, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectkit.core.errors import DataError, DefectkitError, TrainingError


def test_a_manifest_written_for_other_data_is_refused_not_reused(mvtec_tree, blob_mask, tmp_path):
    from defectkit.datasets.split import load_or_build_manifest, read_manifest

    items = {("train", "good", f"g{i}"): None for i in range(4)}
    items.update({("test", "good", f"t{i}"): None for i in range(4)})
    items.update({("test", "crack", f"c{i}"): blob_mask() for i in range(4)})
    root = mvtec_tree("bottle", items)
    path = tmp_path / "manifest.json"
    first = load_or_build_manifest(root, path, "all", seed=0)
    assert load_or_build_manifest(root, path, "all", seed=0)["entries"] == first["entries"]  # same data: reused
    with pytest.raises(DataError, match="seed 0 \\(asked: 1\\)"):
        load_or_build_manifest(root, path, "all", seed=1)
    other = mvtec_tree("bottle", items, root=tmp_path / "other")
    with pytest.raises(DataError, match="data root"):
        load_or_build_manifest(other, path, "all", seed=0)
    with pytest.raises(DataError, match="unknown category 'screw'; available: bottle"):  # not split in from nowhere
        load_or_build_manifest(root, path, "screw", seed=0)
    assert read_manifest(path)["categories"] == ["bottle"]  # and the file is left as it was


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_convert_names_a_truncated_image_whose_header_is_intact(mvtec_tree, blob_mask, tmp_path, ext):
    from defectkit.converters.convert import ConversionError, ConvertConfig, convert
    from defectkit.datasets.mvtec import index_category
    from defectkit.datasets.split import build_manifest

    items = {("test", "crack", f"c{i}"): blob_mask() for i in range(3)}
    items.update({("test", "good", f"t{i}"): None for i in range(3)})
    root = mvtec_tree("bottle", items, ext=ext)
    bad = root / "bottle" / "test" / "crack" / f"c1{ext}"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # the header still reads: indexing passes
    manifest = build_manifest([index_category(root, "bottle")])
    out = tmp_path / "conv"
    with pytest.raises(ConversionError, match=f"c1{ext}.*truncated"):
        convert(root, manifest, out, ConvertConfig(formats=("yolo",)), progress=False)
    assert not out.exists()  # nothing half-written


def test_check_complete_accepts_whole_images(tmp_path):
    import cv2

    from defectkit.datasets.image_files import check_complete

    for ext in (".png", ".jpg", ".bmp", ".tif"):
        p = tmp_path / f"a{ext}"
        assert cv2.imwrite(str(p), np.full((8, 8, 3), 100, np.uint8))
        check_complete(p)


def test_a_non_finite_loss_stops_training_with_a_clear_error(synthetic_root, tmp_path, monkeypatch):
    import torch

    from defectkit.anomaly import train as T
    from defectkit.anomaly import trainer

    monkeypatch.setattr(trainer, "loss_fn", lambda kind, lam: (lambda x, recon: torch.mean(recon) * float("nan")))
    args = T.get_args_parser().parse_args(["--data", str(synthetic_root), "--manifest", str(tmp_path / "m.json"),
                                           "--out", str(tmp_path / "run"), "--imgsz", "32", "--depth", "2", "--base",
                                           "8", "--batch", "4", "--steps-per-epoch", "2", "--epochs", "2", "-q",
                                           "--category", "washer", "--device", "cpu", "--lr", "0.5",
                                           "--model", "conv_ae"])
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 1.*--lr, now 0.5"):
        T.main(args)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert issubclass(TrainingError, DefectkitError)


def test_sam_with_an_empty_val_fold_still_ends_with_a_best_checkpoint(synthetic_root, tmp_path):
    """Seen on a small category with 7 defect images: no val instance, no best.pt, a crash."""
    from defectkit.converters.convert import ConvertConfig, convert
    from defectkit.datasets.mvtec import index_category
    from defectkit.datasets.split import build_manifest
    from defectkit.finetune import sam as S

    manifest = build_manifest([index_category(synthetic_root, "washer")])
    manifest["entries"] = [e for e in manifest["entries"] if e["fold"] != "val"]
    conv = tmp_path / "washer-defect"
    convert(synthetic_root, manifest, conv, ConvertConfig(formats=("coco",)), progress=False)
    args = S.get_args_parser().parse_args(["--data", str(conv), "--model", "tiny", "--imgsz", "64", "--epochs", "2",
                                           "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "-q",
                                           "--device", "cpu", "--lr", "1e-3"])
    m = S.main(args)
    assert (tmp_path / "run" / "best.pt").is_file() and m["epochs_run"] == 2
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["val_iou"] for h in hist] == [None, None]


def test_progress_writes_plain_lines_when_not_a_terminal(capsys):
    from defectkit.core.progress import LineProgress, progress

    bar = progress(range(5), desc="train", every=0.0)  # pytest's stderr is not a terminal
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.1")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("train: 5/5 it") and "loss=0.1" in lines[-1]
    assert all("\r" not in x and len(x) < 200 for x in lines)
    assert list(progress(range(3), disable=True)) == [0, 1, 2] and capsys.readouterr().err == ""
