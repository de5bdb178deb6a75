"""python finetune/yolo.py: the real Ultralytics trainer, offline, on a tiny generated dataset."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defectkit.converters.canonical import read_records
from defectkit.converters.convert import ConvertConfig, convert
from defectkit.datasets.mvtec import index_category
from defectkit.datasets.split import build_manifest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "finetune" / "yolo.py"


@pytest.fixture(scope="module")
def data_yaml(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "weave-defect"
    manifest = build_manifest([index_category(synthetic_root, "weave")], seed=0)
    convert(synthetic_root, manifest, out, ConvertConfig(formats=("yolo", "yolo_seg", "coco")), progress=False)
    return out / "yolo" / "data.yaml"


@pytest.fixture
def no_clip(tmp_path) -> dict:
    """An environment in which importing `clip` fails loudly: proof that training never calls CLIP."""
    fake = tmp_path / "fake_site" / "clip"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('CLIP must not be used by offline training')\n")
    return {**os.environ, "PYTHONPATH": str(fake.parent), "YOLO_CONFIG_DIR": str(tmp_path / "ycfg"),
            "YOLO_OFFLINE": "1"}


@pytest.fixture
def in_process(monkeypatch, tmp_path) -> None:
    """What ``no_clip`` gives a subprocess, for code run in this process (a new Python costs ~3 s of imports):
    importing `clip` raises, Ultralytics' settings and the current directory are the test's own."""
    monkeypatch.setitem(sys.modules, "clip", None)
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ycfg"))
    monkeypatch.chdir(tmp_path)


def _run(args, env, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


# plots=False (Ultralytics' own argument, passed through): a third of a 1-epoch run's time is its plots, which
# `make demo`'s test checks instead
COMMON = ["--from-scratch", "--imgsz", "64", "--batch", "8", "--workers", "0", "--device", "cpu", "plots=False"]


@pytest.mark.slow
def test_yolo_world_trains_offline_and_writes_its_run_folder(data_yaml, no_clip, tmp_path, in_process, capsys):
    r = _run(["--data", data_yaml, "--model", "yolov8n-worldv2", "--text-embeddings", "hash", "--epochs", "1",
              *COMMON, "--project", tmp_path / "runs", "--name", "w"], no_clip, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    # output to a pipe: Ultralytics' bars print one line as they close, never carriage-return redraws
    # (text mode turns "\r" into "\n", so look for the erase-line code that follows each redraw's "\r")
    assert "\x1b[K" not in r.stdout + r.stderr
    assert any(line.lstrip().startswith("1/1") for line in (r.stdout + r.stderr).splitlines())
    run = tmp_path / "runs" / "w"
    assert (run / "weights" / "best.pt").is_file() and (run / "weights" / "last.pt").is_file()
    assert (run / "args.yaml").is_file() and (run / "run_args.json").is_file()
    classes = json.loads((run / "classes.json").read_text())
    assert classes["names"] == ["cut", "speck", "stain", "tear"]
    assert classes["text_embeddings"]["provider"] == "hash" and classes["from_scratch"] is True
    m = json.loads((run / "metrics.json").read_text())
    assert {"ultralytics", "pycocotools", "image_auroc", "images_per_s", "train_seconds"} <= set(m)
    assert "not a pretrained model's result" in m["note"]
    header, recs = read_records(run / "predictions.jsonl")
    gt_header, gt = read_records(data_yaml.parent.parent / "ground_truth.jsonl")
    # the pycocotools figure is that of the predictions file the run wrote
    from defectkit.review.detection import coco_evaluate

    test = [g for g in gt if g.fold == "test"]
    again = coco_evaluate(test, recs, classes["names"], "bbox")
    assert [m["pycocotools"]["bbox"][k] for k in ("map50", "map50_95")] == pytest.approx([again["map50"],
                                                                                         again["map50_95"]])
    assert header["kind"] == "predictions" and header["classes"] == classes["names"]
    assert sorted(r.image for r in recs) == sorted(g.image for g in gt if g.fold == "test")
    assert all(r.scores is not None and r.image_score is not None for r in recs)
    # the rest runs in this process (`in_process`: CLIP still banned)
    # the trained names and their embeddings travel inside the weights: reload, still no CLIP
    from ultralytics import YOLOWorld

    reloaded = YOLOWorld(run / "weights" / "best.pt")
    assert list(reloaded.names.values()) == ["cut", "speck", "stain", "tear"]
    assert tuple(reloaded.model.txt_feats.shape) == (1, 4, 512)
    # use it: the val-fold image threshold, predict on new images, ONNX export checked, predict through it
    spec = json.loads((run / "deploy.json").read_text())
    assert spec["kind"] == "yolo" and spec["thresholds"]["source"] == "val fold"
    assert m["thresholds"] == spec["thresholds"]
    # the cascade's box confidence is the peak of the val fold's box F1: a detector one epoch from scratch at
    # 64 px finds no box on any image, so it has none (box_f1_conf on boxes: review's hand-computed tests)
    assert sum(len(r) for r in recs) == 0
    assert spec["thresholds"]["box_conf"] is None and spec["thresholds"]["box_at_conf"] is None
    from defectkit.deploy import __main__ as deploy_cli
    from defectkit.deploy import validate

    images = data_yaml.parent / "images" / "test"
    for args in (["predict", "--run", run, "--images", images, "--out", tmp_path / "p-torch"],
                 ["export", "--run", run],
                 ["predict", "--run", run, "--images", images, "--out", tmp_path / "p-onnx", "--backend", "onnx"]):
        assert deploy_cli.cli(list(map(str, args))) == 0, args
    assert (run / "weights" / "best.onnx").is_file()
    check = json.loads((run / "export" / "model.json").read_text())["onnx"]["check"]
    assert check["max_abs_diff"] <= check["atol"] and check["images"] > 0
    rows = {b: list(csv.DictReader((tmp_path / f"p-{b}" / "summary.csv").open())) for b in ("torch", "onnx")}
    assert len(rows["torch"]) == len(list(images.iterdir())) and [r["image"] for r in rows["torch"]] == [
        r["image"] for r in rows["onnx"]]
    assert np.allclose([float(r["score"]) for r in rows["torch"]], [float(r["score"]) for r in rows["onnx"]],
                       atol=1e-3)
    # defectkit val: the run re-scored as deployed on its own conversion's folds (test by default, then all)
    for split, n in (("test", len(test)), ("all", len(gt))):
        capsys.readouterr()
        assert validate.cli(["--run", str(run), "--split", split]) == 0
        assert f"on the {split} split of {data_yaml.parent.parent} ({n} images)" in capsys.readouterr().out
        again = json.loads((run / "val" / f"{data_yaml.parent.parent.name}-{split}" / "comparison.json").read_text())
        assert again["runs"][0]["images"] == n and again["fold"] == (None if split == "all" else split)
        if split == "test":
            assert again["runs"][0]["image_auroc"] == pytest.approx(m["image_auroc"])


@pytest.mark.slow
def test_untrained_baseline_with_epochs_0(data_yaml, tmp_path, in_process, capsys):
    code, err = _cli(["--data", data_yaml, "--model", "yolov8n-worldv2", "--text-embeddings", "hash", "--epochs", "0",
                      *COMMON, "--project", tmp_path / "runs", "--name", "u"], capsys)
    assert code == 0, err[-4000:]
    m = json.loads((tmp_path / "runs" / "u" / "metrics.json").read_text())
    assert "untrained" in m["note"] and "pycocotools" in m and "ultralytics" not in m
    assert read_records(tmp_path / "runs" / "u" / "predictions.jsonl")[0]["kind"] == "predictions"


@pytest.mark.slow
def test_segment_model_resumes_after_an_interruption(data_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ycfg"))
    from ultralytics.utils import callbacks

    from defectkit.finetune import yolo as ft

    def interrupt(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt("simulated interruption after epoch 1")

    args = ft.get_args_parser().parse_args(
        ["--data", str(data_yaml), "--model", "yolov8n-seg", "--epochs", "2", "--val-begin", "2", *COMMON,
         "--project", str(tmp_path / "runs"), "--name", "s"])
    monkeypatch.setitem(callbacks.default_callbacks, "on_fit_epoch_end",
                        [*callbacks.default_callbacks["on_fit_epoch_end"], interrupt])
    with pytest.raises(KeyboardInterrupt):
        ft.main(args)
    run = tmp_path / "runs" / "s"
    assert (run / "weights" / "last.pt").is_file() and not (run / "metrics.json").exists()
    monkeypatch.setitem(callbacks.default_callbacks, "on_fit_epoch_end",
                        [c for c in callbacks.default_callbacks["on_fit_epoch_end"] if c is not interrupt])
    args.resume = True
    m = ft.main(args)
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]  # epoch 2 was trained after the resume
    # --val-begin 2: epoch 1 was not validated (Ultralytics' zero placeholders), epoch 2 was, after the resume too
    assert float(rows[0]["val/cls_loss"]) == 0 and float(rows[1]["val/cls_loss"]) > 0
    assert "segm" in m["pycocotools"] and "mask_map50" in m["ultralytics"]
    header, recs = read_records(run / "predictions.jsonl")
    assert all(r.masks is not None and len(r.masks) == len(r) for r in recs)
    assert str(data_yaml.parent.parent / "yolo_seg" / "data.yaml") == m["data"]


@pytest.mark.slow
def test_validating_from_a_later_epoch_changes_the_time_not_the_training(data_yaml, tmp_path, monkeypatch):
    """--val-begin skips the early validations, which draw from Python's random stream (Ultralytics' Format):
    the skipped ones make the same draws, so both schedules train the same model."""
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ycfg"))
    from defectkit.finetune import yolo as ft

    losses = {}
    for first in (1, 2):
        ft.main(ft.get_args_parser().parse_args(
            ["--data", str(data_yaml), "--model", "yolov8n", "--epochs", "2", "--val-begin", str(first), *COMMON,
             "--out", str(tmp_path / f"v{first}"), "-q"]))
        rows = list(csv.DictReader((tmp_path / f"v{first}" / "results.csv").open()))
        losses[first] = [(r["train/box_loss"], r["train/cls_loss"]) for r in rows]
        validated = [float(r["val/cls_loss"]) > 0 for r in rows]
        assert validated == [e >= first for e in (1, 2)]
    assert losses[1] == losses[2]  # epoch 2 trained on the same draws, validated after epoch 1 or not


def _cli(args, capsys) -> tuple[int, str]:
    """``python finetune/yolo.py ARGS`` in this process (with ``in_process``; the script itself runs as a process
    in the first test): exit code and stderr."""
    from defectkit.finetune import yolo as ft

    capsys.readouterr()
    try:
        code = ft.cli(list(map(str, args)))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def test_missing_weights_and_misuse_are_clear_errors(data_yaml, tmp_path, in_process, capsys):
    code, err = _cli(["--data", data_yaml, "--model", "yolo11n", "--no-from-scratch", "--weights-dir", tmp_path / "w",
                      "--epochs", "1"], capsys)
    assert code == 2
    assert "yolo11n.pt not found in" in err and "--from-scratch" in err
    code, err = _cli(["--data", data_yaml, "--model", "yolov8s-worldv2", "--no-from-scratch", "--weights",
                      tmp_path / "nope.pt"], capsys)
    assert code == 2 and "nope.pt does not exist" in err
    (tmp_path / "fake.pt").write_bytes(b"x")
    code, err = _cli(["--data", data_yaml, "--model", "yolov8s-worldv2", "--weights", tmp_path / "fake.pt",
                      "--text-embeddings", "hash"], capsys)
    assert code == 2 and "only with --from-scratch" in err
    code, err = _cli(["--data", tmp_path / "missing.yaml"], capsys)
    assert code == 2 and "make convert" in err


@pytest.mark.slow
def test_pretrained_path_with_stand_in_weights_and_an_embeddings_file(data_yaml, tmp_path, in_process, capsys):
    """--weights PATH and --text-embeddings file: the route a user with real YOLO-World weights takes.
    The stand-in .pt is a 1-epoch from-scratch run of the same model, saved by Ultralytics itself."""
    import torch

    code, err = _cli(["--data", data_yaml, "--model", "yolov8n-worldv2", "--text-embeddings", "hash", "--epochs", "1",
                      *COMMON, "--out", tmp_path / "base"], capsys)
    assert code == 0, err[-3000:]
    torch.manual_seed(0)
    table = {n: torch.randn(512) for n in ["cut", "speck", "stain", "tear"]}
    torch.save(table, tmp_path / "emb.pt")
    args = ["--data", data_yaml, "--model", "yolov8n-worldv2", "--weights", tmp_path / "base" / "weights" / "best.pt",
            "--text-embeddings", "file", "--text-embeddings-file", tmp_path / "emb.pt", "--epochs", "1",
            "--imgsz", "64", "--batch", "8", "--workers", "0", "--device", "cpu", "plots=False",
            "--out", tmp_path / "ft", "-q"]
    code, err = _cli(args, capsys)
    assert code == 0, err[-3000:]
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["from_scratch"] is False and m["text_embeddings"] == "file" and "from scratch" not in (m.get("note") or "")
    info = json.loads((tmp_path / "ft" / "classes.json").read_text())
    assert info["start"].endswith("best.pt") and info["pretrained"] is True


@pytest.mark.slow
def test_synthetic_pretraining_then_fine_tuning_from_its_checkpoint(data_yaml, tmp_path, in_process, monkeypatch,
                                                                   capsys):
    """--synthetic-pretrain: defects painted on the data's good images, one class, a pretraining run, then
    the real fine-tuning starts from its best.pt; a rerun reuses the finished pretraining stage."""
    from defectkit.finetune import synthetic_pretrain

    monkeypatch.setattr(synthetic_pretrain, "WORK", tmp_path / "work")
    args = ["--data", data_yaml, "--model", "yolov8n-worldv2", "--text-embeddings", "hash", "--epochs", "1",
            "--synthetic-pretrain", "8", "--pretrain-epochs", "1", *COMMON, "--out", tmp_path / "run", "-q"]
    code, err = _cli(args, capsys)
    assert code == 0, err[-3000:]
    run = tmp_path / "run"
    pre = run / "pretrain"
    assert (pre / "weights" / "best.pt").is_file() and (pre / "done.json").is_file()
    info = json.loads((run / "classes.json").read_text())
    assert info["start"] == str(pre / "weights" / "best.pt")
    sp = info["synthetic_pretrain"]
    assert sp["images"] == 8 and sp["seed"] == 0 and sp["categories"] == ["weave"]
    synth = Path(sp["conversion"])
    assert yaml_names(synth / "yolo" / "data.yaml") == ["defect"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["synthetic_pretrain"]["images"] == 8 and "synthetic defect images" in m["note"]
    header, _ = read_records(run / "predictions.jsonl")
    assert header["model"] == "yolov8n-worldv2 (synthetic pretrain 8)"
    done_before = (pre / "done.json").stat().st_mtime_ns
    code, err = _cli([*args, "--exist-ok"], capsys)  # rerun: the pretraining stage is reused
    assert code == 0, err[-3000:]
    assert (pre / "done.json").stat().st_mtime_ns == done_before


def yaml_names(path):
    import yaml

    names = yaml.safe_load(path.read_text())["names"]
    return [names[k] for k in sorted(names)]


def test_offline_world_trainer_survives_ultralytics_ddp_hand_off(data_yaml, no_clip, tmp_path):
    """Ultralytics' DDP (``--device 0,1``) pickles the trainer's class, args, model and callbacks with
    cloudpickle and rebuilds the trainer in each worker from a generated script.  Here: the hand-off
    file is generated from our trainer, and the generated worker script runs in a fresh interpreter
    with its last line (``trainer.train()``, which needs GPUs) replaced by checks: the worker rebuilds
    an OfflineWorldTrainer, imported by module path, whose callbacks never call CLIP."""
    parent = f"""
import sys
from ultralytics.utils.dist import generate_ddp_file
from defectkit.finetune.world_offline import OfflineWorldTrainer
t = OfflineWorldTrainer(overrides=dict(model="yolov8n-worldv2.yaml", data={str(data_yaml)!r}, epochs=1, imgsz=64,
                                       device="cpu", project={str(tmp_path / "runs")!r}, name="ddp", workers=0))
t.model = t.get_model(cfg="yolov8n-worldv2.yaml", verbose=False)
print(generate_ddp_file(t))
"""
    r = subprocess.run([sys.executable, "-c", parent], env=no_clip, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    script = Path(r.stdout.strip().splitlines()[-1])
    worker = script.read_text()
    assert worker.rstrip().endswith("trainer.train()")
    checks = """
    from defectkit.finetune import world_offline as W
    hooks = trainer.callbacks["on_pretrain_routine_end"]
    assert type(trainer).__module__ == "defectkit.finetune.world_offline", type(trainer)
    assert type(trainer).__name__ == "OfflineWorldTrainer"
    assert W._set_classes_from_cache in hooks and W._clip_callback not in hooks
    print("worker ok")
"""
    script.write_text(worker.rstrip()[: -len("trainer.train()")].rstrip(" ") + checks.lstrip("\n"))
    w = subprocess.run([sys.executable, str(script)], env=no_clip, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert w.returncode == 0 and "worker ok" in w.stdout, w.stderr[-4000:]


def test_optimizer_step_settings_reach_ultralytics(tmp_path):
    """--nbs / --warmup-epochs go to Ultralytics' trainer; with an Adam-family optimizer the bias warmup
    lr (Ultralytics' 0.1, an SGD value) is zeroed, with SGD it is left to Ultralytics."""
    from defectkit.core.cli import parse
    from defectkit.finetune import yolo as Y
    from defectkit.finetune.yolo_core import YoloConfig, train_overrides

    def overrides(*argv):
        cfg = YoloConfig.from_args(Y.get_args_parser().parse_args(["--model", "yolov8n", *argv]))
        return train_overrides(cfg, tmp_path / "data.yaml", tmp_path / "run", "yolov8n.yaml")

    seen = overrides("--from-scratch", "--optimizer", "AdamW", "--nbs", "8", "--warmup-epochs", "1", "--batch", "8")
    assert seen["nbs"] == 8 and seen["warmup_epochs"] == 1.0 and seen["warmup_bias_lr"] == 0.0
    assert seen["batch"] == 8 and seen["data"] == str(tmp_path / "data.yaml") and seen["name"] == "run"
    assert seen["pretrained"] is False  # from scratch, from the yaml
    seen = overrides("--optimizer", "SGD")
    assert seen["nbs"] == 8 and "warmup_bias_lr" not in seen  # the recipe's step per batch; SGD keeps its warmup
    recipe = str(REPO / "configs" / "pretrained" / "yolo.yaml")
    pretrained = YoloConfig.from_args(parse(Y.get_args_parser(), ["--config", recipe]))
    assert train_overrides(pretrained, tmp_path / "d.yaml", tmp_path / "r", "x.pt")["nbs"] == 64  # Ultralytics' own
    assert overrides("--no-augment")["mosaic"] == 0.0 and "mosaic" not in seen


def test_a_detectors_image_threshold_never_rejects_an_image_without_a_box():
    """Val fold: 4 defective images, 2 good; boxes (0.6, 0.4) on two defects only.  F1 is highest with every
    image rejected (threshold 0: P 4/6, R 1, F1 0.8 against 0.667 at 0.4), which would reject every good part
    on the line; the threshold is raised to the lowest box confidence, 0.4, so NG means a box was found."""
    from defectkit.converters.canonical import ImageRecord
    from defectkit.finetune.yolo_deploy import image_threshold

    def rec(name, n_boxes, score=0.0):
        return ImageRecord(image=name, height=8, width=8, boxes_xyxy=np.tile([0.0, 0, 4, 4], (n_boxes, 1)),
                           labels=["d"] * n_boxes, scores=np.full(n_boxes, score), image_score=score)

    gt = [rec(f"d{i}", 1) for i in range(4)] + [rec("g0", 0), rec("g1", 0)]
    preds = [rec("d0", 1, 0.6), rec("d1", 1, 0.4), rec("d2", 0), rec("d3", 0), rec("g0", 0), rec("g1", 0)]
    t = image_threshold(gt, preds)
    assert t["image"] == 0.4 and "raised" in t["rule"] and t["val_false_alarm_rate"] == 0.0
    none = image_threshold(gt, [rec(p.image, 0) for p in preds])
    assert none["image"] == 1.0 and "nothing is rejected" in none["rule"]
    # a good image with a box at 0.5, and at most half the good images may be rejected: any box rejects,
    # which the lowest box confidence (0.4) says with the same val decisions
    preds[4] = rec("g0", 1, 0.5)
    fa = image_threshold(gt, preds, "false_alarm", 0.5)
    assert fa["image"] == 0.4 and fa["val_false_alarm_rate"] == 0.5
    assert image_threshold(gt, preds, "false_alarm", 0.0)["val_false_alarm_rate"] == 0.0  # above 0.5 now


def test_ultralytics_trains_on_every_core_not_cores_minus_one(monkeypatch):
    """Ultralytics' CPU default is min(8, cores - 1) threads: one thread on a 2-core machine."""
    import torch
    from ultralytics.utils import torch_utils

    from defectkit.finetune.yolo_core import setup_env

    before = torch.get_num_threads()
    monkeypatch.setattr(torch_utils, "NUM_THREADS", 1)
    try:
        setup_env(3)
        torch_utils.select_device("cpu", verbose=False)
        assert torch_utils.NUM_THREADS == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
