"""SAM fine-tuning on a tiny SAM built from segment_anything.modeling: cache, trained parts, resume, cascade."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defectkit.converters.canonical import ImageRecord, make_header, read_records, write_records
from defectkit.converters.convert import ConvertConfig, convert
from defectkit.core.errors import ConfigError
from defectkit.datasets.mvtec import index_category
from defectkit.datasets.split import build_manifest
from defectkit.finetune import sam as S
from defectkit.finetune import sam_cascade, sam_train
from defectkit.finetune import sam_core as C


def test_jitter_points_and_loss():
    rng = np.random.default_rng(0)
    boxes = np.array([[10, 10, 30, 20], [0, 0, 5, 5]], float)
    j = C.jitter_boxes(boxes, (40, 50), rng, frac=0.1)
    assert (j[:, [0, 2]] >= 0).all() and (j[:, [0, 2]] <= 50).all() and (j[:, [1, 3]] <= 40).all()
    assert np.abs(j - boxes).max() <= 2.0 + 1e-9  # 10 % of a 20 px side
    assert (j[:, 2] > j[:, 0]).all() and (j[:, 3] > j[:, 1]).all()
    m = np.zeros((1, 20, 20), bool)
    m[0, 5:8, 10:12] = True
    pts = C.sample_points(m, 5, rng)
    assert all(m[0, int(y), int(x)] for x, y in pts[0])
    t = torch.from_numpy(m[:, None].astype(np.float32))
    good = C.dice_bce_loss(t * 20 - 10, t)
    bad = C.dice_bce_loss(-t * 20 + 10, t)
    assert good < 0.05 < 1.5 < bad


def test_loss_still_pulls_a_collapsed_decoder_towards_a_tiny_defect():
    """2 defect pixels of 64x64 and every logit at -10 (a collapsed decoder): the
    positives' BCE is weighted by the negative/positive ratio (capped at 100), so their gradient stays
    ~100x what a plain BCE (1/4096 per pixel) would give; one gradient step raises them."""
    t = torch.zeros(1, 1, 64, 64)
    t[0, 0, 10, 10:12] = 1
    logits = torch.full_like(t, -10.0, requires_grad=True)
    (g,) = torch.autograd.grad(C.dice_bce_loss(logits, t), logits)
    pos, neg = -g[t > 0].mean().item(), g[t == 0].mean().item()
    assert pos > 100 * (1 / 4096) * 0.9  # plain BCE: 1/4096; Dice: ~0 at saturation
    assert pos > 1000 * neg > 0


def test_prompt_windows_by_hand():
    # a 20x10 box, crop 2: a 40 px square centred on (20, 25), shifted right to x = 0
    assert C.prompt_window([10, 20, 30, 30], (100, 200), 2) == (5, 45, 0, 40)
    # a 10 px box in the corner: min_side 24, pushed back inside the image
    assert C.prompt_window([190, 90, 200, 100], (100, 200), 2) == (76, 100, 176, 200)
    # a window taller than the image is cut to it; crop 0 is the whole image
    assert C.prompt_window([0, 0, 50, 10], (30, 200), 2) == (0, 30, 0, 100)
    assert C.prompt_window([0, 0, 50, 10], (30, 200), 0) == (0, 30, 0, 200)
    moved = C.in_window(np.array([[10, 20, 30, 30], [0, 0, 5, 5]], float), (5, 45, 0, 40))
    np.testing.assert_array_equal(moved, [[10, 15, 30, 25], [0, 0, 5, 1]])  # cut to the window, >= 1 px
    boxes = np.array([[10, 20, 30, 30], [0, 0, 5, 5]], float)
    assert [g[1] for g in C.prompt_groups(boxes, (100, 200), 0)] == [[0, 1]]
    assert [g[1] for g in C.prompt_groups(boxes, (100, 200), 2)] == [[0], [1]]


def test_segment_boxes_pastes_each_crop_back_and_nothing_outside_it(tmp_path):
    sam, key = C.load_sam("tiny", None, 64)
    cache = C.EmbeddingCache(sam, tmp_path, key)
    rgb = np.random.default_rng(0).integers(0, 255, (100, 200, 3), np.uint8)
    boxes = np.array([[10, 20, 30, 30], [190, 90, 200, 100]], float)
    with torch.no_grad():
        prob = C.segment_boxes(sam, rgb, boxes, cache, crop=2)
        whole = C.segment_boxes(sam, rgb, boxes, cache, crop=0)
    assert prob.shape == whole.shape == (2, 100, 200)
    inside = np.zeros((2, 100, 200), bool)
    inside[0, 5:45, 0:40] = inside[1, 76:100, 176:200] = True
    assert (prob[~inside] == 0).all() and (prob[inside] > 0).all()
    assert cache.misses == 3  # two crops + the whole image


def test_box_as_mask_fills_each_half_open_box():
    class It:
        boxes, hw = np.array([[1, 2, 4, 3]], float), (5, 6)

    (m, p, conf), = S.box_as_mask([It()])
    assert m.shape == (1, 5, 6) and m.sum() == 3 and m[0, 2, 1:4].all() and conf.tolist() == [1.0]


def test_box_occupancy_by_hand():
    # an 8 px input on a 4x4 grid: cells of 2 px; the box x in [1, 4), y in [0, 2)
    occ = C.box_occupancy(torch.tensor([[1.0, 0.0, 4.0, 2.0]]), 8, 4)
    assert occ.shape == (1, 1, 4, 4)
    assert occ[0, 0, 0].tolist() == [0.5, 1.0, 0.0, 0.0]  # half of cell 0 (x 1-2), all of cell 1 (x 2-4)
    assert occ[0, 0, 1:].sum() == 0


def test_with_a_box_prior_an_untrained_decoder_draws_its_prompt_box(tmp_path):
    sam, key = C.load_sam("tiny", None, 64)
    cache = C.EmbeddingCache(sam, tmp_path, key)
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    boxes = np.array([[8, 16, 40, 48]], float)
    box = np.zeros((64, 64), bool)
    box[16:48, 8:40] = True

    def iou(prob):
        m = prob[0] > 0.5
        return (m & box).sum() / max((m | box).sum(), 1)

    with torch.no_grad():
        plain = C.segment_boxes(sam, rgb, boxes, cache)
        sam.box_prior = 8.0
        prior = C.segment_boxes(sam, rgb, boxes, cache)
    assert iou(prior) > 0.95 and iou(plain) < 0.8  # training starts from the box-as-mask answer


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth"):
        C.load_sam("vit_b", None)
    with pytest.raises(FileNotFoundError, match="--model tiny"):
        C.load_sam("vit_l", tmp_path / "nope.pth")


def test_embedding_cache_is_keyed_by_content_and_reused(tmp_path):
    sam, key = C.load_sam("tiny", None, 64)
    cache = C.EmbeddingCache(sam, tmp_path, key)
    img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
    a = cache.get(img)
    assert cache.misses == 1 and len(list((tmp_path / key).glob("*.pt"))) == 1
    cache.get(img)
    assert cache.hits == 1
    fresh = C.EmbeddingCache(sam, tmp_path, key)  # a new process: read from disk, not recomputed
    b = fresh.get(img)
    assert fresh.hits == 1 and fresh.misses == 0 and torch.allclose(a, b, atol=1e-2)
    other = C.EmbeddingCache(sam, tmp_path, key)
    other.get(img[:, ::-1].copy())
    assert other.misses == 1


@pytest.fixture(scope="module")
def conv(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "washer-defect"
    convert(synthetic_root, build_manifest([index_category(synthetic_root, "washer")]), out,
            ConvertConfig(formats=("coco",)), progress=False)
    return out


def _args(conv, tmp_path, *extra):
    # whole-image prompts and a frozen encoder unless a test says otherwise (not the demo recipe's defaults)
    return S.get_args_parser().parse_args(["--data", str(conv), "--model", "tiny", "--tiny-size", "64", "--lr", "1e-3",
                                           "--crop", "0", "--no-train-encoder",
                                           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "-q",
                                           "--device", "cpu", *map(str, extra)])


@pytest.mark.slow
def test_only_the_decoder_trains_the_loss_falls_and_resume_continues(conv, tmp_path, monkeypatch):
    seen = {}
    real_fit = S.fit

    def spy(sam, *a, **k):
        seen["enc"] = {n: p.detach().clone() for n, p in sam.image_encoder.named_parameters()}
        seen["prompt"] = {n: p.detach().clone() for n, p in sam.prompt_encoder.named_parameters()}
        seen["dec"] = {n: p.detach().clone() for n, p in sam.mask_decoder.named_parameters()}
        out = real_fit(sam, *a, **k)
        seen["sam"] = sam
        return out

    monkeypatch.setattr(S, "fit", spy)
    monkeypatch.setattr(sam_train, "fit", spy)
    m = S.main(_args(conv, tmp_path, "--epochs", "3", "--patience", "99"))
    sam = seen["sam"]
    assert all(torch.equal(p, seen["enc"][n]) for n, p in sam.image_encoder.named_parameters())
    assert all(torch.equal(p, seen["prompt"][n]) for n, p in sam.prompt_encoder.named_parameters())
    assert any(not torch.equal(p, seen["dec"][n]) for n, p in sam.mask_decoder.named_parameters())
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert m["base_decoder_changed"] and m["embeddings_computed"] > 0
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert set(ck) >= {"weights", "optim", "base", "base_key", "epoch"} and set(ck["weights"]) == {"mask_decoder"}
    assert set(ck["optim"]) == {"optimizer"}
    assert all(k.startswith(("transformer", "iou", "mask_tokens", "output")) for k in ck["weights"]["mask_decoder"])
    # a second run reads every embedding from the cache
    m2 = S.main(_args(conv, tmp_path, "--epochs", "4", "--resume", "--patience", "99"))
    assert m2["embeddings_computed"] == 0
    assert [h["epoch"] for h in json.loads((tmp_path / "run" / "history.json").read_text())] == [1, 2, 3, 4]
    header, recs = read_records(tmp_path / "run" / "predictions.jsonl")
    assert header["kind"] == "predictions" and all(r.masks is not None for r in recs)
    assert {"zero_shot", "fine_tuned"} <= set(m2) and "per_type" in m2["fine_tuned"]


def _fake_yolo(conv, tmp_path):
    """A YOLO predictions file whose boxes are the test fold's ground truth at confidence 0.9."""
    header, gt = read_records(conv / "ground_truth.jsonl")
    test = [r for r in gt if r.fold == "test"]
    fake = [ImageRecord(image=r.image, height=r.height, width=r.width, boxes_xyxy=r.boxes_xyxy, labels=r.labels,
                        scores=np.full(len(r), 0.9), image_score=0.9 if len(r) else 0.0) for r in test]
    yolo = write_records(tmp_path / "yolo.jsonl", make_header("predictions", "fake-yolo", header["classes"],
                                                              header["data_root"]), fake)
    return header, test, yolo


@pytest.mark.slow
def test_cascade_with_yolo_predictions(conv, tmp_path):
    header, test, yolo = _fake_yolo(conv, tmp_path)
    m = S.main(_args(conv, tmp_path, "--epochs", "1", "--yolo-predictions", yolo))
    c = m["cascade"]
    assert {"mask_ap", "pixel_iou_per_image", "pixel_auroc", "box_ap_after_sam"} <= set(c)
    h, recs = read_records(tmp_path / "run" / "cascade_predictions.jsonl")
    assert h["model"] == "fake-yolo+sam-tiny" and len(recs) == len(test)
    # the figures are those of the file it wrote, as the comparison scores it
    from defectkit.review.compare import compare
    from defectkit.review.detection import coco_evaluate

    assert c["mask_ap"]["map50"] == pytest.approx(coco_evaluate(test, recs, header["classes"], "segm")["map50"])
    rows = {r["name"]: r for r in compare(conv / "ground_truth.jsonl", [tmp_path / "run"], tmp_path / "cmp")}
    assert c["pixel_auroc"] == pytest.approx(rows["fake-yolo+sam-tiny (cascade)"]["pixel_auroc"])


@pytest.mark.slow
def test_cascades_added_to_a_finished_run_equal_those_of_a_run_trained_with_them(conv, tmp_path):
    """make demo trains SAM beside YOLO, then adds the cascades with --score-only: the same figures as one
    run given the YOLO predictions from the start, and the run becomes a deployable cascade."""
    _, _, yolo = _fake_yolo(conv, tmp_path)
    with pytest.raises(ConfigError, match="no finished SAM run"):
        S.main(_args(conv, tmp_path / "b", "--score-only", "--yolo-predictions", yolo))
    # the encoder trained too, as the demo's recipe: its embeddings are computed live (float32), never cached
    once = S.main(_args(conv, tmp_path / "a", "--epochs", "2", "--train-encoder", "--crop", "2",
                        "--yolo-predictions", yolo))
    trained = S.main(_args(conv, tmp_path / "b", "--epochs", "2", "--train-encoder", "--crop", "2"))
    assert "cascade" not in trained and json.loads((tmp_path / "b/run/deploy.json").read_text())["kind"] == "sam"
    later = S.main(_args(conv, tmp_path / "b", "--score-only", "--yolo-predictions", yolo))
    assert later["cascade"]["mask_ap"] == once["cascade"]["mask_ap"]
    assert later["cascade"]["pixel_iou_per_image"] == once["cascade"]["pixel_iou_per_image"]
    assert later["fine_tuned"] == trained["fine_tuned"] and later["train_seconds"] == trained["train_seconds"]
    assert json.loads((tmp_path / "b/run/deploy.json").read_text())["kind"] == "sam_cascade"
    assert json.loads((tmp_path / "b/run/metrics.json").read_text())["cascade"] == later["cascade"]
    _, a = read_records(tmp_path / "a/run/cascade_predictions.jsonl")
    _, b = read_records(tmp_path / "b/run/cascade_predictions.jsonl")
    assert [r.masks for r in a] == [r.masks for r in b]  # the very same masks, pixel for pixel
    # a later --score-only without the YOLO predictions keeps that cascade, deployable as it was
    again = S.main(_args(conv, tmp_path / "b", "--score-only"))
    assert again["cascade"] == later["cascade"]
    assert json.loads((tmp_path / "b/run/deploy.json").read_text())["kind"] == "sam_cascade"


def test_anomaly_regions_prompt_a_class_agnostic_cascade(conv, tmp_path, monkeypatch):
    """An anomaly run (one predictions file per category, classes ["anomaly"], raw map values as scores far
    below --cascade-conf) prompts SAM: every region is kept (they were thresholded on the anomaly run's val
    fold), mask AP is class-agnostic, and the comparison lists the cascade beside the other runs.  SAM is
    replaced by box-as-mask so the figures follow from the prompts alone: the prompts are the ground
    truth's boxes, so the union IoU is that of boxes vs masks (> 0.3 here), 0 if the conf were applied."""
    from defectkit.review.compare import compare

    header, gt = read_records(conv / "ground_truth.jsonl")
    test = [r for r in gt if r.fold == "test"]
    anomaly_run = tmp_path / "anomaly-run"
    fake = [ImageRecord(image=r.image, height=r.height, width=r.width, boxes_xyxy=r.boxes_xyxy,
                        labels=["anomaly"] * len(r), scores=np.full(len(r), 0.05), image_score=0.05 * (len(r) > 0))
            for r in test]
    write_records(anomaly_run / "washer" / "predictions.jsonl",
                  make_header("predictions", "draem", ["anomaly"], header["data_root"], kind_of_model="anomaly"),
                  fake)

    def box_masks(sam, items, cache, device, boxes_of=None, crop=0.0):
        return S.box_as_mask([type("I", (), {"boxes": it.boxes if boxes_of is None else boxes_of(it),
                                             "hw": it.hw})() for it in items])

    monkeypatch.setattr(sam_cascade, "predict", box_masks)
    m = S.main(_args(conv, tmp_path, "--epochs", "0", "--anomaly-predictions", anomaly_run))
    c = m["anomaly_cascade"]
    assert c["class_aware"] is False and c["cascade_conf"] is None and "mask_ap" not in c
    assert c["mask_ap_class_agnostic"]["map50"] > 0.5 and c["pixel_iou_per_image"] > 0.3
    h, recs = read_records(tmp_path / "run" / "cascade_anomaly_predictions.jsonl")
    assert h["model"] == "draem+sam-tiny" and h["classes"] == ["anomaly"] and h["kind_of_model"] == "anomaly"
    assert sum(len(r) for r in recs) == sum(len(r) for r in test)
    rows = compare(conv / "ground_truth.jsonl", [tmp_path / "run"], tmp_path / "cmp")
    row = {r["name"]: r for r in rows}["draem+sam-tiny (cascade)"]
    assert row["pixel_iou"] == pytest.approx(c["pixel_iou_per_image"])


def test_cascade_box_confidence_comes_from_the_yolo_runs_val_fold(tmp_path):
    from defectkit.core.deploy_spec import write_deploy_spec
    from defectkit.review.predictions import run_box_conf

    run = tmp_path / "yolo"
    run.mkdir()
    preds = run / "predictions.jsonl"
    assert S.resolve_cascade_conf(None, preds)[0] == 0.25  # no deploy.json
    write_deploy_spec(run, "yolo", thresholds={"image": 0.1, "box_conf": 0.07})
    assert S.resolve_cascade_conf(None, preds)[0] == 0.07
    assert S.resolve_cascade_conf(0.5, preds) == (0.5, "--cascade-conf")
    assert run_box_conf(preds, {}, 0.25) == 0.07
    assert run_box_conf(run / "cascade_predictions.jsonl", {"box_conf": 0.3}, 0.25) == 0.3
    assert run_box_conf(run / "cascade_predictions.jsonl", {}, 0.25) == 0.25


def test_cascade_rejects_other_classes(conv, tmp_path):
    header, gt = read_records(conv / "ground_truth.jsonl")
    yolo = write_records(tmp_path / "y.jsonl", make_header("predictions", "y", ["other"], header["data_root"]), [])
    with pytest.raises(ValueError, match="same conversion"):
        S.main(_args(conv, tmp_path, "--epochs", "0", "--yolo-predictions", yolo))


@pytest.mark.slow
def test_an_interrupted_sam_run_resumes_to_the_same_decoder(conv, tmp_path, monkeypatch):
    S.main(_args(conv, tmp_path / "a", "--epochs", "3", "--patience", "99"))
    full = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=True)
    real = sam_train.train_one_epoch

    def dies_in_epoch_3(step, items, opt, cfg, rng, epoch=0, dist=None):
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return real(step, items, opt, cfg, rng, epoch, dist)

    monkeypatch.setattr(sam_train, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        S.main(_args(conv, tmp_path / "b", "--epochs", "3", "--patience", "99"))
    monkeypatch.setattr(sam_train, "train_one_epoch", real)
    S.main(_args(conv, tmp_path / "b", "--epochs", "3", "--patience", "99", "--resume"))
    resumed = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)
    for k, v in full["weights"]["mask_decoder"].items():
        assert torch.allclose(v, resumed["weights"]["mask_decoder"][k], atol=1e-6), k
    assert [h["train_loss"] for h in full["history"]] == pytest.approx([h["train_loss"] for h in resumed["history"]])


@pytest.mark.slow
def test_cascade_run_predicts_new_images_and_exports_sam_to_onnx(conv, tmp_path, monkeypatch):
    """A SAM run trained with YOLO predictions deploys as the cascade: the YOLO run's boxes (here a stand-in
    giving the ground-truth boxes) prompt the fine-tuned decoder on new images; SAM exports to ONNX, checked."""
    import csv

    from defectkit.converters.canonical import Prediction
    from defectkit.core.errors import ConfigError
    from defectkit.datasets.image_files import read_image
    from defectkit.deploy.predict import predict
    from defectkit.finetune import sam_deploy, yolo_deploy

    header, gt = read_records(conv / "ground_truth.jsonl")
    test = [r for r in gt if r.fold == "test"][:6]
    yrun = tmp_path / "yolo-run"
    yrun.mkdir()
    yolo = write_records(yrun / "predictions.jsonl", make_header("predictions", "yolo", header["classes"],
                                                                 header["data_root"]), [])
    S.main(_args(conv, tmp_path, "--epochs", "1", "--yolo-predictions", yolo, "--crop", "2"))
    run = tmp_path / "run"
    spec = json.loads((run / "deploy.json").read_text())
    assert spec["kind"] == "sam_cascade" and spec["yolo_run"] == "../yolo-run" and spec["sam"]["crop"] == 2  # relative
    by_name = {r.image.replace("/", "_"): r for r in test}
    images = tmp_path / "new"
    images.mkdir()
    for name, r in by_name.items():
        (images / name).symlink_to(Path(header["data_root"]) / r.image)

    def stand_in(yolo_run, imgs, backend):  # the YOLO run's boxes: here the ground truth's, score 0.9
        assert Path(yolo_run) == yrun.resolve()  # found from the SAM run's own folder
        preds = [Prediction(rel, im.shape[0], im.shape[1], 0.9 if len(by_name[rel]) else 0.0,
                            by_name[rel].boxes_xyxy, list(by_name[rel].labels), [0.9] * len(by_name[rel]))
                 for rel, im in imgs]
        return {"model": "yolo", "classes": header["classes"], "threshold": 0.5, "threshold_source": "stand-in",
                "score": "box confidence"}, preds

    monkeypatch.setattr(yolo_deploy, "predict_images", stand_in)
    predict(run, str(images), tmp_path / "out")
    h, recs = read_records(tmp_path / "out" / "predictions.jsonl")
    assert h["model"] == "yolo+sam-tiny" and h["run_kind"] == "sam_cascade"
    for r in recs:
        assert len(r.masks) == len(r) == len(by_name[r.image])  # one SAM mask per YOLO box
        assert r.decision == ("NG" if len(by_name[r.image]) else "OK")
    assert len(list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))) == len(by_name)
    rep = sam_deploy.export_onnx(run, [read_image(images / n) for n in list(by_name)[:3]])
    assert rep["max_abs_diff"] <= rep["atol"]
    assert (run / "export" / "sam_decoder.onnx").is_file() and (run / "export" / "image_encoder.onnx").is_file()
    # SAM without a YOLO run has no prompts for new images: a clear error
    S.main(_args(conv, tmp_path / "alone", "--epochs", "0"))
    with pytest.raises(ConfigError, match="SAM needs prompts"):
        predict(tmp_path / "alone" / "run", str(images), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_train_encoder_trains_it_end_to_end_and_keeps_it_in_the_checkpoint(conv, tmp_path):
    m = S.main(_args(conv, tmp_path, "--epochs", "2", "--train-encoder", "--patience", "99"))
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    base, _ = C.load_sam("tiny", None, 64, 0)
    assert "image_encoder" in ck["weights"]
    trained = ck["weights"]["image_encoder"]
    assert any(not torch.equal(v, base.image_encoder.state_dict()[k]) for k, v in trained.items())
    assert m["embeddings_computed"] == sum(1 for _ in (tmp_path / "cache").rglob("*.pt"))  # zero-shot only
    # the trained encoder is what predict and the scores use: reloading gives the same masks
    sam, key = C.load_sam("tiny", None, 64, 0)
    sam_train.load_trained(sam, tmp_path / "run" / "best.pt", key, "cpu")
    assert all(torch.equal(v, sam.image_encoder.state_dict()[k]) for k, v in ck["weights"]["image_encoder"].items())


@pytest.mark.slow
@pytest.mark.parametrize("box_prior", [0, 4])
def test_trained_on_crops_the_decoder_beats_its_own_prompt_box(conv, tmp_path, box_prior):
    """A decoder given ground-truth boxes must not score below the box itself used as the mask
    after training on the same images (whole-image prompting, crop 0, stays below it on
    the demo); with a box prior it starts from the box and must learn where thin scratches and
    ring-shaped stains leave it."""
    m = S.main(_args(conv, tmp_path, "--epochs", "14", "--train-encoder", "--crop", "2", "--patience", "99",
                     "--box-prior", box_prior))
    assert m["fine_tuned"]["iou"] > m["box_as_mask"]["iou"]
    d = S.load_sam_data(conv, None, 0, 0)
    sam, key = C.load_sam("tiny", None, 64, 0)
    sam.box_prior = box_prior
    sam_train.load_trained(sam, tmp_path / "run" / "best.pt", key, "cpu")
    train = [it for it in d.train if len(it.boxes)]
    fit = S.instance_scores(train, S.predict(sam, train, C.EmbeddingCache(sam, tmp_path / "c2", key), "cpu", crop=2))
    assert fit["iou"] > S.instance_scores(train, S.box_as_mask(train))["iou"] + 0.05
    assert json.loads((tmp_path / "run" / "deploy.json").read_text())["sam"]["crop"] == 2


@pytest.mark.slow
def test_synthetic_pretraining_then_fine_tuning_from_its_checkpoint(conv, tmp_path, monkeypatch):
    """--synthetic-pretrain: a first stage on painted defects (<run>/pretrain), the real fine-tuning starts
    from its best.pt, a rerun reuses the finished stage, and the run is labelled by its recipe."""
    from defectkit.finetune import synthetic_pretrain

    monkeypatch.setattr(synthetic_pretrain, "WORK", tmp_path / "work")
    starts = []
    real_fit = S.fit

    def spy(sam, key, train, val, cache, cfg, run, *a, **k):
        starts.append((run.name, {n: v.clone() for n, v in sam.mask_decoder.state_dict().items()}))
        return real_fit(sam, key, train, val, cache, cfg, run, *a, **k)

    monkeypatch.setattr(S, "fit", spy)
    monkeypatch.setattr(sam_train, "fit", spy)
    args = ("--epochs", "1", "--pretrain-epochs", "2", "--synthetic-pretrain", "6", "--crop", "2", "--patience", "99")
    m = S.main(_args(conv, tmp_path, *args))
    run, pre = tmp_path / "run", tmp_path / "run" / "pretrain"
    assert [name for name, _ in starts] == ["pretrain", "run"]
    pre_best = torch.load(pre / "best.pt", weights_only=True)["weights"]["mask_decoder"]
    assert all(torch.equal(v, pre_best[k]) for k, v in starts[1][1].items())  # fine-tuning starts from it
    assert not all(torch.equal(v, pre_best[k]) for k, v in starts[0][1].items())
    sp = m["synthetic_pretrain"]
    assert sp["images"] == 6 and sp["epochs"] == 2 and sp["test"]["instances"] == m["fine_tuned"]["instances"]
    assert len(json.loads((pre / "history.json").read_text())) == 2
    header, _ = read_records(run / "predictions.jsonl")
    assert header["model"] == "sam-tiny (synthetic pretrain 6)"
    done = (pre / "done.json").stat().st_mtime_ns
    starts.clear()
    S.main(_args(conv, tmp_path, *args, "--exist-ok"))  # a rerun reloads the finished stage, does not retrain it
    assert [name for name, _ in starts] == ["run"] and (pre / "done.json").stat().st_mtime_ns == done
    assert all(torch.equal(v, pre_best[k]) for k, v in starts[0][1].items())


def test_data_is_the_conversion_folder_or_its_yolo_data_yaml_for_both_trainers(tmp_path):
    from defectkit.finetune.sam_data import conversion_folder
    from defectkit.finetune.yolo_core import data_for

    conv = tmp_path / "washer-defect"
    (conv / "yolo").mkdir(parents=True)
    (conv / "yolo" / "data.yaml").write_text("path: x\n")
    assert conversion_folder(conv / "yolo" / "data.yaml") == conv and conversion_folder(conv) == conv
    assert data_for({"task": "detect"}, conv) == conv / "yolo" / "data.yaml"
    assert data_for({"task": "detect"}, conv / "yolo" / "data.yaml") == conv / "yolo" / "data.yaml"


def test_a_cascade_segments_the_boxes_its_detector_keeps_highest_first_at_most_max_det():
    from defectkit.finetune.sam_cascade import prompt_boxes

    scores = [0.1, 0.5, 0.3, 0.05, 0.3]
    # by hand: >= 0.1 are boxes 0, 1, 2, 4; highest first (ties in their order): 1, 2, 4, 0
    assert prompt_boxes(scores, 0.1, None).tolist() == [1, 2, 4, 0]
    assert prompt_boxes(scores, 0.1, 2).tolist() == [1, 2]
    assert prompt_boxes(scores, -np.inf, 3).tolist() == [1, 2, 4]  # an anomaly model's regions: all pass
    assert prompt_boxes([], 0.25).tolist() == []


def test_boxes_a_cascade_does_not_prompt_keep_their_box_as_the_mask():
    from defectkit.finetune.sam_cascade import with_box_masks

    sam_mask = np.zeros((1, 4, 5), bool)
    sam_mask[0, 1, 1] = True
    boxes = [[1, 1, 2, 2], [0.5, 2, 3, 3.2]]  # the second was not prompted: filled outward to whole pixels
    masks, prob, conf = with_box_masks((sam_mask, sam_mask.astype(np.float32), np.array([0.7])), boxes, (4, 5))
    assert masks.shape == (2, 4, 5) and masks[0].sum() == 1
    # by hand: rows 2..3 (floor 2, ceil 3.2 = 4) x columns 0..2 (floor 0.5 = 0, ceil 3) -> 6 pixels
    assert masks[1].sum() == 6 and masks[1, 2:4, 0:3].all()
    assert conf.tolist() == [0.7, 1.0] and prob[1].max() == 1.0
