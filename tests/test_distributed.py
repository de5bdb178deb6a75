"""torchrun on CPU (gloo): two processes with batch b train what one process trains with batch 2b.

Each job is launched as a user would (``torchrun --nproc_per_node 2 anomaly/train.py ...``) and
compared with a single-process run of the same global batch (in the test's own process): the weights
after training, the test metrics, and the files written (one set: rank 0 alone writes).  The
fully-connected autoencoder and the tiny SAM have no BatchNorm, so the two runs differ only by
floating-point summation order;
DRAEM (BatchNorm, which PyTorch cannot synchronise on CPU) is checked to finish with one set of outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
pytestmark = pytest.mark.slow


def _launch(cmd: list, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEFECTKIT_WORK": str(tmp / "work"), "MPLBACKEND": "Agg"}
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def _single(cmd: list) -> None:
    """The one-process reference run in this process (``anomaly/train.py ARGS`` -> ``defectkit.anomaly.train``'s
    ``cli``): the same code as the script, without a second start of Python and torch."""
    import importlib

    module = "defectkit." + str(cmd[0]).removesuffix(".py").replace("/", ".")
    assert importlib.import_module(module).cli([str(c) for c in cmd[1:]]) == 0


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def test_anomaly_trainer_two_processes_match_one_with_the_same_global_batch(synthetic_root, tmp_path):
    common = ["anomaly/train.py", "--data", synthetic_root, "--manifest", tmp_path / "manifest.json",
              "--category", "washer", "--model", "fc_ae", "--imgsz", "32", "--epochs", "3",
              "--steps-per-epoch", "3", "--augment", "--no-plots", "--patience", "99", "--device", "cpu", "-q"]
    _single([*common, "--batch", "8", "--out", tmp_path / "one"])
    p = _launch([*TORCHRUN, *common, "--batch", "4", "--out", tmp_path / "two"], tmp_path)
    assert p.stdout.count("run folder:") == 1  # rank 0 alone reports

    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    # Adam steps of 1e-3 from ~1e-7 differences
    assert _max_diff(one["weights"]["model"], two["weights"]["model"]) < 1e-4
    assert [h["train_loss"] for h in one["history"]] == pytest.approx([h["train_loss"] for h in two["history"]],
                                                                      rel=1e-5)
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert m2["image"]["auroc"] == pytest.approx(m1["image"]["auroc"], abs=1e-4)
    assert m2["pixel"]["auroc"] == pytest.approx(m1["pixel"]["auroc"], abs=1e-4)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_draem_under_torchrun_finishes_with_one_set_of_outputs(synthetic_root, tmp_path):
    common = ["anomaly/train.py", "--data", synthetic_root, "--manifest", tmp_path / "manifest.json",
              "--category", "washer", "--model", "draem", "--imgsz", "32", "--depth", "2", "--base", "8",
              "--epochs", "2", "--steps-per-epoch", "2", "--no-plots", "--device", "cpu", "-q"]
    _single([*common, "--batch", "4", "--out", tmp_path / "one"])
    _launch([*TORCHRUN, *common, "--batch", "2", "--out", tmp_path / "two"], tmp_path)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert (tmp_path / "two" / "deploy.json").is_file()


def test_sam_encoder_and_decoder_two_processes_match_one_with_the_same_global_batch(synthetic_root, tmp_path):
    from defectkit.converters.convert import ConvertConfig, convert
    from defectkit.datasets.mvtec import index_category
    from defectkit.datasets.split import build_manifest

    conv = tmp_path / "washer-defect"
    convert(synthetic_root, build_manifest([index_category(synthetic_root, "washer")]), conv,
            ConvertConfig(formats=("coco",)), progress=False)
    common = ["finetune/sam.py", "--data", conv, "--model", "tiny", "--tiny-size", "64", "--lr", "1e-3", "--crop", "0",
              "--epochs", "2", "--train-encoder", "--patience", "99", "--device", "cpu", "-q"]
    _single([*common, "--batch", "4", "--cache-dir", tmp_path / "c1", "--out", tmp_path / "one"])
    _launch([*TORCHRUN, *common, "--batch", "2", "--cache-dir", tmp_path / "c2", "--out", tmp_path / "two"], tmp_path)

    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    for part in ("mask_decoder", "image_encoder"):
        assert _max_diff(one["weights"][part], two["weights"][part]) < 1e-4, part
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert m2["fine_tuned"]["iou"] == pytest.approx(m1["fine_tuned"]["iou"], abs=1e-3)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_the_process_group_is_torn_down_when_training_fails(tmp_path):
    """Both processes raise inside the group (as a crashed epoch would): the group is destroyed on
    the way out, and the exception still reaches the caller."""
    script = tmp_path / "fails.py"
    script.write_text(
        "import torch\n"
        "from defectkit.core.distributed import process_group\n"
        "try:\n"
        "    with process_group('cpu') as d:\n"
        "        assert d.active and torch.distributed.is_initialized()\n"
        "        raise RuntimeError('epoch 3 failed')\n"
        "except RuntimeError as e:\n"
        "    print(f'rank {d.rank}: {e}; initialized after: {torch.distributed.is_initialized()}')\n"
    )
    out = _launch([*TORCHRUN, script], tmp_path).stdout
    assert "rank 0: epoch 3 failed; initialized after: False" in out
    assert "rank 1: epoch 3 failed; initialized after: False" in out
