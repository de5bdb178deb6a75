"""Recipes as data: ``--config`` files, flags that win over them, runs that write their own ``config.yaml``,
and the ``defectkit`` command that reaches every part of the suite."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from defectkit.core.cli import HelpFormatter, parse
from defectkit.core.config import CONFIGS, read_yaml
from defectkit.core.errors import ConfigError, MissingFileError

REPO = Path(__file__).resolve().parents[2]


def _parser():
    p = argparse.ArgumentParser(prog="toy", formatter_class=HelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--crop", type=float, default=0.0, help="crop factor")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--augment", action="store_true")
    return p


def test_a_config_file_sets_defaults_and_flags_still_win(tmp_path):
    (tmp_path / "r.yaml").write_text("epochs: 7\ncrop: 2\nout: runs/x\naugment: true\n")
    a = parse(_parser(), ["--config", str(tmp_path / "r.yaml")])
    assert (a.epochs, a.crop, a.out, a.augment) == (7, 2.0, Path("runs/x"), True)
    assert isinstance(a.crop, float) and isinstance(a.out, Path)  # as if typed on the command line
    a = parse(_parser(), ["--epochs", "9", f"--config={tmp_path / 'r.yaml'}"])
    assert (a.epochs, a.crop) == (9, 2.0)
    assert parse(_parser(), []).epochs == 3  # no config: the parser's own defaults


def test_a_bad_config_names_the_file_and_the_problem(tmp_path):
    (tmp_path / "typo.yaml").write_text("epoch: 7\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: epoch is not a flag of toy"):
        parse(_parser(), ["--config", str(tmp_path / "typo.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not YAML"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "type.yaml").write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="type.yaml: a value does not fit"):
        parse(_parser(), ["--config", str(tmp_path / "type.yaml")])
    with pytest.raises(MissingFileError, match="nope.yaml does not exist"):
        read_yaml(tmp_path / "nope.yaml")


def test_a_renamed_flag_keeps_its_old_spelling_for_one_release_with_a_warning(tmp_path):
    from defectkit.anomaly.train import get_args_parser as anomaly_parser
    from defectkit.finetune.sam import get_args_parser as sam_parser
    from defectkit.finetune.yolo import get_args_parser as yolo_parser

    p = sam_parser()
    with pytest.warns(FutureWarning, match="--augment is deprecated and will be removed in 0.4: use --augment-copies"):
        a = parse(p, ["--augment", "3", "--cache", str(tmp_path / "c")])
    assert (a.augment_copies, a.cache_dir) == (3, tmp_path / "c") and not hasattr(a, "augment")
    assert "--augment " not in p.format_help() and "--augment-copies" in p.format_help()
    # a run's config.yaml written before the rename still reruns, saying which key to change
    (tmp_path / "old.yaml").write_text("augment: 2\ncache: somewhere\nepochs: 3\n")
    with pytest.warns(FutureWarning, match="old.yaml: key augment is deprecated .* use augment_copies"):
        a = parse(sam_parser(), ["--config", str(tmp_path / "old.yaml")])
    assert (a.augment_copies, a.cache_dir, a.epochs) == (2, Path("somewhere"), 3)
    # --threshold is a score in predict; the training scripts' rule is --threshold-rule
    for parser in (anomaly_parser, yolo_parser):
        with pytest.warns(FutureWarning, match="use --threshold-rule"):
            assert parse(parser(), ["--threshold", "otsu"]).threshold_rule == "otsu"
        assert parse(parser(), ["--threshold-rule", "percentile"]).threshold_rule == "percentile"
        with pytest.raises(SystemExit):  # still checked against the rules
            parse(parser(), ["--threshold", "0.3"])


def test_categories_take_either_spelling_in_every_command():
    from defectkit.anomaly.cluster import get_args_parser as cluster_parser
    from defectkit.review.sweep import get_args_parser as sweep_parser

    for argv in (["--categories", "a,b", "c"], ["--categories", "a", "b,c"], ["--categories", "a, b ,c"]):
        assert cluster_parser().parse_args(argv).categories == ["a", "b", "c"]
        common = ["--family", "anomaly", "--run", "r/{category}", "--cmd", "x", "--out", "o"]
        assert sweep_parser().parse_args([*common, *argv]).categories == ["a", "b", "c"]
    with pytest.raises(SystemExit):
        cluster_parser().parse_args(["--categories", ","])


def test_category_means_the_same_in_every_trainer():
    from defectkit.anomaly.train import get_args_parser as anomaly_parser
    from defectkit.finetune.sam import get_args_parser as sam_parser
    from defectkit.finetune.sam_data import conversion_folder
    from defectkit.finetune.yolo import get_args_parser as yolo_parser
    from defectkit.finetune.yolo_core import default_data

    assert {f().parse_args([]).category for f in (sam_parser, yolo_parser, anomaly_parser)} == {"all"}
    # with no --data, both supervised trainers take the embedded conversion of --category
    assert conversion_folder(None, "weave") == default_data("weave").parent.parent


def test_help_shows_every_default():
    text = _parser().format_help()
    assert "(default: 3)" in text and "crop factor (default: 0.0)" in text
    assert "--augment" in text and "(default: False)" not in text


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
def test_every_shipped_recipe_is_valid_for_its_command(recipe):
    from defectkit.anomaly.train import get_args_parser as anomaly
    from defectkit.finetune.sam import get_args_parser as sam
    from defectkit.finetune.yolo import get_args_parser as yolo

    family = Path(recipe).stem.split("-")[0]  # anomaly-fast.yaml: a variant of anomaly.yaml
    parser = {"anomaly": anomaly, "yolo": yolo, "sam": sam}[family]()
    args = parse(parser, ["--config", str(CONFIGS / recipe)])
    for k, v in read_yaml(CONFIGS / recipe).items():
        assert getattr(args, k) == (type(getattr(args, k))(v) if v is not None else None), k


def test_yolo_passes_ultralytics_arguments_through_and_refuses_unknown_ones(tmp_path):
    from defectkit.finetune.yolo import get_args_parser
    from defectkit.finetune.yolo_core import YoloConfig, train_overrides, ultralytics_overrides

    assert ultralytics_overrides(["mosaic=0.5", "fliplr=0", "cos_lr=true", "name="]) == {
        "mosaic": 0.5, "fliplr": 0, "cos_lr": True, "name": None}
    with pytest.raises(ConfigError, match="'mosiac' is not an Ultralytics training argument"):
        ultralytics_overrides(["mosiac=0.5"])
    with pytest.raises(ConfigError, match="key=value"):
        ultralytics_overrides(["mosaic"])
    args = parse(get_args_parser(), ["--epochs", "2", "mosaic=0.25", "--batch", "4", "hsv_v=0.1"])
    cfg = YoloConfig.from_args(args)
    kw = train_overrides(cfg, tmp_path / "d.yaml", tmp_path / "r", "yolov8n.yaml")
    assert (kw["mosaic"], kw["hsv_v"], kw["epochs"], kw["batch"]) == (0.25, 0.1, 2, 4)


def _defectkit(*args, cwd=REPO):
    exe = Path(sys.executable).parent / "defectkit"  # the console script `make setup` installs
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "defectkit.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_defectkit_command_lists_its_subcommands():
    r = _defectkit("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("data", "convert", "train anomaly", "train yolo", "train sam", "predict", "export", "compare",
                "app", "bench", "cfg"):
        assert f"  {cmd}" in r.stdout, cmd
    bad = _defectkit("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


@pytest.mark.parametrize("cmd", ["data", "convert", "train anomaly", "train yolo", "train sam", "predict", "export",
                                 "compare", "app", "bench convert", "bench predict", "bench anomaly", "bench sam"])
def test_every_subcommand_has_help(cmd):
    r = _defectkit(*cmd.split(), "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout and "--" in r.stdout


def test_cfg_prints_what_a_command_would_run(tmp_path):
    r = _defectkit("cfg", "train", "sam", "--config", CONFIGS / "demo" / "sam.yaml", "--epochs", "3")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["model"] == "tiny" and cfg["crop"] == 2.0 and cfg["train_encoder"] is True and cfg["epochs"] == 3
    (tmp_path / "x.yaml").write_text("crop_size: 3\n")
    bad = _defectkit("cfg", "train", "sam", "--config", tmp_path / "x.yaml")
    assert bad.returncode == 2 and "crop_size is not a flag" in bad.stderr


@pytest.mark.slow
def test_a_runs_config_yaml_fed_back_reproduces_its_metrics(synthetic_root, tmp_path, monkeypatch):
    """Through the ``defectkit`` command, end to end: a tiny anomaly run writes its config.yaml; the same
    command with ``--config <run>/config.yaml`` (and only another --out) gives the same figures.  The second
    command runs in this process (``defectkit.cli.main``, what the console script calls)."""
    first = tmp_path / "a"
    r = _defectkit("train", "anomaly", "--data", synthetic_root, "--manifest", tmp_path / "m.json", "--category",
                   "washer", "--model", "fc_ae", "--imgsz", "32", "--epochs", "2", "--steps-per-epoch", "3",
                   "--batch", "8", "--no-plots", "--device", "cpu", "-q", "--out", first, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((first / "config.yaml").read_text())
    assert cfg["model"] == "fc_ae" and cfg["epochs"] == 2 and cfg["out"] == str(first)
    from defectkit.cli import main as defectkit_main

    monkeypatch.chdir(tmp_path)
    argv = ["train", "anomaly", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "b")]
    assert defectkit_main(argv) == 0
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert m2["image"] == m1["image"] and m2["pixel"]["auroc"] == m1["pixel"]["auroc"]
    assert m2["epochs_run"] == m1["epochs_run"] == 2


def test_the_work_folder_is_that_of_the_current_directory_unless_moved(tmp_path):
    code = "from defectkit.core.paths import WORK; print(WORK)"
    env = {k: v for k, v in os.environ.items() if k != "DEFECTKIT_WORK"}
    here = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert here.stdout.strip() == str((tmp_path / "work").resolve()), here.stderr  # never inside the package
    moved = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "DEFECTKIT_WORK": "elsewhere"},
                           capture_output=True, text=True)
    assert moved.stdout.strip() == str((tmp_path / "elsewhere").resolve())


def test_make_clean_keeps_the_weights_users_put_in_the_work_folder(tmp_path):
    work = tmp_path / "work"
    for f in ("weights/sam_vit_b_01ec64.pth", "runs/anomaly/x/metrics.json", "out/a.json"):
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        (work / f).write_text("x")
    r = subprocess.run(["make", "-C", str(REPO), "clean", f"WORK={work}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["weights"]
    assert (work / "weights" / "sam_vit_b_01ec64.pth").read_text() == "x"
