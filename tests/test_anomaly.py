"""Anomaly models train and score on CPU at tiny sizes; scoring and data helpers do what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectkit.anomaly import data as D
from defectkit.anomaly import scoring as S
from defectkit.anomaly.models import UNetAE
from defectkit.anomaly.registry import MODELS, build_model
from defectkit.converters.canonical import read_records
from defectkit.datasets.defect_shapes import cutpaste


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_reconstruct_and_encode(name):
    torch.manual_seed(0)
    m = build_model(name, in_ch=3, size=32, base=8, depth=3).eval()
    x = torch.rand(2, 3, 32, 32)
    y = m(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    z = m.encode(x)
    assert z.ndim == 2 and z.shape[0] == 2


def test_unet_skips_are_configurable_and_size_is_checked():
    full = UNetAE(3, 8, 4, skips=(0, 1, 2))
    none = UNetAE(3, 8, 4, skips=())
    default = UNetAE(3, 8, 4)
    assert default.skips == (2,)  # the two shallowest dropped
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(full) > n(default) > n(none)
    with pytest.raises(ValueError, match="multiple of"):
        build_model("conv_ae", 3, 30, depth=3)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gan", 3, 32)


def test_fft_log_magnitude():
    yy, xx = np.mgrid[0:32, 0:32]
    img = np.sin(2 * np.pi * 4 * xx / 32)
    f = D.fft_log_magnitude(img)
    assert f.min() == 0 and f.max() == 1
    peak = np.unravel_index(np.argmax(f), f.shape)
    assert peak in {(16, 12), (16, 20)}  # +-4 cycles around the centred zero frequency
    x = D.prepare(np.zeros((20, 30, 3), np.uint8) + 9, 16, "fft")
    assert x.shape == (1, 16, 16)


def test_cutpaste_changes_only_its_mask():
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).random((3, 64, 64)).astype(np.float32)
    for scar in (False, True):
        out, mask = cutpaste(img, rng, scar=scar)
        assert mask.any() and not mask.all()
        assert np.array_equal(out[:, ~mask], img[:, ~mask])
        assert not np.allclose(out[:, mask], img[:, mask])


def test_downsample_mask_keeps_one_pixel_defects():
    m = np.zeros((256, 256), bool)
    m[100, 37] = True
    assert D.downsample_mask(m, 32).sum() == 1


def test_image_scores_topk_and_max():
    maps = np.zeros((2, 10, 10))
    maps[0].flat[:5] = [10, 8, 6, 4, 2]
    assert S.image_scores(maps, 1.0)[0] == 10  # top 1 % of 100 pixels = the max
    assert S.image_scores(maps, 3.0)[0] == pytest.approx(8)
    assert S.image_scores(maps, 100)[0] == pytest.approx(0.3)
    assert S.image_scores(maps, "max").tolist() == [10, 0]


def test_sliding_windows_equal_the_whole_image_for_a_pixelwise_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Sigmoid()).eval()
    x = torch.rand(2, 3, 32, 32)
    whole = S.window_maps(model, x, 32, "mse")
    windows = S.window_maps(model, x, 16, "mse")
    assert torch.allclose(whole, windows, atol=1e-6)
    identity = torch.nn.Identity()
    assert S.error_map(x, identity(x), "mse_ssim").abs().max() < 1e-5


def test_multiscale_scorer_needs_calibration():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Sigmoid()).eval()
    sc = S.Scorer(model, "mse", scales=[16, 32], sigma=1.0)
    x = np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32)
    with pytest.raises(RuntimeError, match="calibrate"):
        sc.maps(x)
    sc.calibrate(x)
    maps = sc.maps(x)
    assert maps.shape == (4, 32, 32) and abs(float(maps.mean())) < 0.5  # standardised on good images


def test_latent_scores_rank_outliers_high():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (50, 4))
    test = np.r_[rng.normal(0, 1, (5, 4)), rng.normal(6, 1, (5, 4))]
    y = np.r_[np.zeros(5), np.ones(5)]
    from defectkit.review.metrics import auroc

    assert auroc(S.knn_scores(train, test), y) == 1.0
    train_plane = np.c_[rng.normal(0, 1, (50, 2)), np.zeros((50, 2))]
    test_plane = np.r_[
        np.c_[rng.normal(0, 1, (5, 2)), np.zeros((5, 2))], np.c_[rng.normal(0, 1, (5, 2)), np.full((5, 2), 3.0)]
    ]
    assert auroc(S.pca_scores(train_plane, test_plane), y) == 1.0


# ---------------------------------------------------------------------------------------- the script

# the tests' own small settings (the lr and plain inputs they were written for, not the demo recipe's defaults)
TINY = ["--imgsz", "32", "--depth", "2", "--base", "8", "--batch", "8", "--steps-per-epoch", "4", "--sigma", "1",
        "--lr", "2e-3", "--no-augment", "--device", "cpu", "-q"]


def _run(synthetic_root, tmp_path, *extra):
    from defectkit.anomaly import train as T

    tmp_path.mkdir(parents=True, exist_ok=True)
    args = T.get_args_parser().parse_args(["--data", str(synthetic_root), "--manifest", str(tmp_path / "manifest.json"),
                                           "--out", str(tmp_path / "run"), *TINY, *map(str, extra)])
    return T.main(args), tmp_path / "run"


@pytest.mark.parametrize("model", ["conv_ae", "unet_ae", "fc_ae", "vae"])
def test_every_reconstruction_model_trains_and_scores(synthetic_root, tmp_path, model, auroc_from_scores):
    m, run = _run(synthetic_root, tmp_path, "--model", model, "--category", "washer", "--epochs", "3", "--no-plots",
                  "--patience", "99")
    hist = json.loads((run / "history.json").read_text())
    assert len(hist) == 3 and hist[-1]["train_loss"] < hist[0]["train_loss"]  # the loss falls
    assert m["image"]["auroc"] == pytest.approx(auroc_from_scores(run))  # what it wrote per image
    assert {"auroc", "aupro", "ap"} <= set(m["pixel"]) and m["pixel"]["map_resolution"] == 32
    assert set(m["image"]["per_type_auroc"]) == {"contamination", "hole", "scratch", "stain"}
    assert set(m["pixel"]["per_type_auroc"]) == set(m["image"]["per_type_auroc"])
    assert {"latent_knn_auroc", "latent_pca_auroc", "thresholds"} <= set(m)
    assert m["thresholds"]["source"] == "val fold"
    header, recs = read_records(run / "predictions.jsonl")
    assert header["kind"] == "predictions" and len(recs) == m["test_images"]
    assert all(r.image_score is not None and (run / r.anomaly_map).is_file() for r in recs)
    assert np.load(run / recs[0].anomaly_map).shape == (32, 32)


def test_resume_continues_where_it_stopped(synthetic_root, tmp_path):
    _run(synthetic_root, tmp_path, "--category", "weave", "--epochs", "2", "--no-plots", "--patience", "99")
    first = json.loads((tmp_path / "run" / "history.json").read_text())
    m, run = _run(
        synthetic_root, tmp_path, "--category", "weave", "--epochs", "4", "--resume", "--no-plots", "--patience", "99"
    )
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and hist[:2] == first
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3


def test_fft_input_and_plots(synthetic_root, tmp_path):
    m, run = _run(synthetic_root, tmp_path, "--category", "weave", "--epochs", "1", "--input", "fft", "--loss", "mse")
    assert "pixel" not in m  # a spectrum has no pixel localisation
    assert all(
        (run / "plots" / f).stat().st_size > 5000 for f in ["roc.png", "scores.png", "cases.png", "projections.png"]
    )


@pytest.mark.parametrize("model", ["ocsvm", "patchcore"])
def test_feature_models_with_an_untrained_backbone(synthetic_root, tmp_path, model, auroc_from_scores):
    m, run = _run(synthetic_root, tmp_path, "--model", model, "--category", "washer", "--random-init", "--no-plots",
                  "--coreset", "0.2")
    assert m["image"]["auroc"] == pytest.approx(auroc_from_scores(run))
    assert ("pixel" in m) == (model == "patchcore")
    assert read_records(run / "predictions.jsonl")[0]["model"] == model


def test_missing_backbone_weights_is_a_clear_error(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
        _run(synthetic_root, tmp_path, "--model", "patchcore", "--category", "washer")


def test_purity_by_hand():
    from defectkit.anomaly.cluster import purity

    # cluster 0 = {a, a, b} -> 2 right; cluster 1 = {b, b} -> 2 right; 4 of 5
    assert purity([0, 0, 0, 1, 1], ["a", "a", "b", "b", "b"]) == pytest.approx(0.8)
    assert purity([1, 1, 0, 0], ["x", "x", "y", "y"]) == 1.0


def test_kmeans_regroups_mixed_categories_and_trains_a_model_per_cluster(synthetic_root, tmp_path):
    from defectkit.anomaly.cluster import main as cluster_main

    r = cluster_main(
        [
            "--data",
            str(synthetic_root),
            "--manifest",
            str(tmp_path / "m.json"),
            "--categories",
            "washer,weave",
            "--out",
            str(tmp_path / "c"),
            "--train",
            "--",
            *TINY,
            "--epochs",
            "1",
            "--no-plots",
        ]
    )
    assert r["purity"] == 1.0 and r["k"] == 2  # an RGB washer and a grey weave never mix
    assert sorted(sum(v.values()) for v in r["clusters"].values()) == [40, 40]
    assert set(r["runs"]) == {"cluster0", "cluster1"}
    assert all(v["test_images"] == 30 for v in r["runs"].values())
    assert json.loads((tmp_path / "c" / "clusters.json").read_text())["purity"] == 1.0


@pytest.mark.slow
def test_draem_learns_a_painted_defect_on_the_embedded_washer(synthetic_root, tmp_path):
    """Loss falls and the map highlights painted defects: pixel AUROC > 0.9 at a tiny size."""
    m, run = _run(synthetic_root, tmp_path, "--model", "draem", "--category", "washer", "--imgsz", "64",
                  "--depth", "3", "--base", "8", "--epochs", "14", "--steps-per-epoch", "12", "--lr", "2e-3",
                  "--no-plots", "--patience", "99")
    hist = json.loads((run / "history.json").read_text())
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert m["pixel"]["auroc"] > 0.9, m["pixel"]
    assert m["pixel"]["resolution"].startswith("ground truth")
    assert read_records(run / "predictions.jsonl")[0]["model"] == "draem"


def test_train_crops_are_seeded_by_position_and_inside_the_image():
    from defectkit.anomaly.trainer import Augmented

    x = np.arange(2 * 1 * 8 * 12, dtype=np.float32).reshape(2, 1, 8, 12)
    ds = Augmented(x, augment=False, crop=4)
    ds.reseed(0, 3)
    a, b = ds.item(1, pos=5), ds.item(1, pos=5)
    assert a.shape == (1, 4, 4) and torch.equal(a, b)
    # a crop of image 1 is a contiguous 4x4 window of it
    (top,), (left,) = np.nonzero(x[1, 0] == a[0, 0, 0].item())
    assert np.array_equal(a.numpy(), x[1][:, top : top + 4, left : left + 4])
    tops_lefts = {tuple(np.argwhere(x[1, 0] == ds.item(1, pos=p)[0, 0, 0].item())[0]) for p in range(40)}
    assert len(tops_lefts) > 10 and max(t for t, _ in tops_lefts) <= 4 and max(le for _, le in tops_lefts) <= 8
    assert Augmented(x, augment=False, crop=0).item(0, 0).shape == (1, 8, 12)


def test_val_every_validates_every_n_epochs_and_after_the_last(synthetic_root, tmp_path):
    m, run = _run(synthetic_root, tmp_path, "--model", "conv_ae", "--category", "washer", "--epochs", "5",
                  "--val-every", "2", "--no-plots", "--patience", "99")
    hist = json.loads((run / "history.json").read_text())
    assert [h["val_auroc"] is not None for h in hist] == [False, True, False, True, True]
    assert m["best_val_auroc"] == max(h["val_auroc"] for h in hist if h["val_auroc"] is not None)
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] in (1, 3, 4)


def test_train_crop_is_refused_where_it_cannot_work(synthetic_root, tmp_path):
    from defectkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--train-crop 32: for conv_ae"):
        _run(synthetic_root, tmp_path, "--model", "fc_ae", "--imgsz", "64", "--train-crop", "32", "--epochs", "1")
    with pytest.raises(ConfigError, match="multiple of 2\\*\\*depth"):
        _run(synthetic_root, tmp_path, "--model", "draem", "--imgsz", "64", "--train-crop", "30", "--epochs", "1")


@pytest.mark.slow
def test_draem_trained_on_crops_scores_whole_images(synthetic_root, tmp_path):
    """Trained on 32 px crops of 64 px inputs, DRAEM's map still finds painted defects on whole images."""
    m, run = _run(synthetic_root, tmp_path, "--model", "draem", "--category", "washer", "--imgsz", "64",
                  "--train-crop", "32", "--depth", "3", "--base", "8", "--epochs", "14", "--steps-per-epoch", "12",
                  "--lr", "2e-3", "--no-plots", "--patience", "99")
    assert m["pixel"]["auroc"] > 0.9, m["pixel"]
    assert json.loads((run / "run_args.json").read_text())["train"]["train_crop"] == 32


def test_draem_objective_keeps_half_the_batch_unaltered_with_empty_masks():
    from defectkit.anomaly.draem import DraemObjective, build_synthesizer, focal_loss

    x = np.random.default_rng(0).random((16, 3, 32, 32)).astype(np.float32)
    obj = DraemObjective(build_synthesizer(x), seed=0)
    aug, masks = obj.corrupt(x)
    untouched = [np.array_equal(a, b) for a, b in zip(aug, x, strict=True)]
    assert 3 <= sum(untouched) <= 13
    for a, b, m, same in zip(aug, x, masks, untouched, strict=True):
        assert (m.sum() == 0) == same
        assert np.array_equal(a[:, m == 0], b[:, m == 0])  # exact masks
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 5.0  # confident "defect" everywhere
    assert focal_loss(logits, torch.ones(1, 2, 2)) < 1e-3 < focal_loss(logits, torch.zeros(1, 2, 2))


def test_conv_ae_detection_floor_on_the_embedded_washer(synthetic_root, tmp_path):
    """A floor that a sign flip, a transposed map or a misaligned mask would break."""
    m, _ = _run(synthetic_root, tmp_path, "--model", "conv_ae", "--category", "washer", "--imgsz", "64",
                "--depth", "3", "--epochs", "6", "--steps-per-epoch", "8", "--no-plots", "--patience", "99")
    assert m["image"]["auroc"] > 0.8 and m["pixel"]["auroc"] > 0.8, (m["image"]["auroc"], m["pixel"]["auroc"])


def test_an_interrupted_run_resumes_to_the_same_weights_and_history(synthetic_root, tmp_path, monkeypatch):
    from defectkit.anomaly import trainer as T

    common = ["--category", "weave", "--epochs", "4", "--no-plots", "--patience", "99", "--augment"]
    _run(synthetic_root, tmp_path / "a", *common)
    full = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=True)

    real = T.train_one_epoch

    def dies_in_epoch_3(step, loader, opt, device, epoch, *a, **k):
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return real(step, loader, opt, device, epoch, *a, **k)

    monkeypatch.setattr(T, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _run(synthetic_root, tmp_path / "b", *common)
    assert torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "b" / "run" / "metrics.json").exists()
    monkeypatch.setattr(T, "train_one_epoch", real)
    _run(synthetic_root, tmp_path / "b", *common, "--resume")
    resumed = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)
    for k, v in full["weights"]["model"].items():
        assert torch.allclose(v.float(), resumed["weights"]["model"][k].float(), atol=1e-6), k
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]]


@pytest.mark.slow
def test_the_paper_protocol_selects_without_real_defects_and_scores_the_whole_test_split(synthetic_root, tmp_path):
    from defectkit.anomaly import train as T
    from defectkit.anomaly.config import RunConfig
    from defectkit.anomaly.data import load_category
    from defectkit.core.errors import ConfigError
    from defectkit.datasets.split import entries, resolve_manifest

    m, run = _run(synthetic_root, tmp_path, "--model", "fc_ae", "--category", "washer", "--epochs", "2",
                  "--no-plots", "--patience", "99", "--protocol", "paper")
    _, manifest = resolve_manifest(synthetic_root, tmp_path / "manifest.json", 0, "washer")
    official = entries(manifest, category="washer", source_split="test")
    assert m["protocol"] == "paper" and m["test_images"] == len(official)
    assert {e.fold for e in official} == {"train", "val", "test"}  # more than the manifest's test fold
    assert m["thresholds"]["source"].startswith("CutPaste")  # no real defect chose them either
    assert read_records(run / "predictions.jsonl")[0]["protocol"] == "paper"
    args = T.get_args_parser().parse_args(["--data", str(synthetic_root), "--manifest", str(tmp_path / "manifest.json"),
                                           "--category", "washer", "--protocol", "paper", *TINY])
    data = load_category(RunConfig.from_args(args))
    assert data.val_e == [] and len(data.test_e) == len(official)
    with pytest.raises(ConfigError, match="drop --val-fold"):
        RunConfig.from_args(T.get_args_parser().parse_args(["--protocol", "paper", "--val-fold"]))
    manifest_run, _ = _run(synthetic_root, tmp_path / "m", "--model", "fc_ae", "--category", "washer", "--epochs",
                           "1", "--no-plots")
    assert manifest_run["protocol"] == "manifest" and manifest_run["test_images"] < len(official)
