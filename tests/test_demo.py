"""`make demo` end to end on a tiny configuration, in its own work folder: every stage runs, the table
comes out, and a stage that fails makes the demo fail with that stage's error visible."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "ANOMALY_ARGS": "--imgsz 32 --depth 2 --base 8 --epochs 1 --steps-per-epoch 2 --batch 4 -q",
    "YOLO_ARGS": "--from-scratch --text-embeddings hash --epochs 1 --imgsz 64 --batch 8 --workers 0",  # its bars too
    "SAM_ARGS": "--epochs 1 --imgsz 64 -q",
}


STAGES = ["data", "convert", "anomaly model", "YOLO", "SAM", "the YOLO->SAM", "comparison", "FiftyOne"]


def _make(work: Path, *extra: str, **overrides: str) -> subprocess.CompletedProcess:
    """``make demo`` with its output captured to a file, as a log would be (not a terminal)."""
    variables = [f"{k}={v}" for k, v in {**TINY, **overrides}.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DEFECTKIT_WORK"))}
    log = work.parent / f"demo-{len(list(work.parent.glob('demo-*.log')))}.log"
    with open(log, "w") as f:
        r = subprocess.run(["make", "--no-print-directory", "demo", f"WORK={work}", *variables, *extra], cwd=REPO,
                           env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1500)
    return subprocess.CompletedProcess(r.args, r.returncode, log.read_text(), "")


@pytest.mark.slow
@pytest.mark.fiftyone  # its last stage builds a FiftyOne dataset
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_runs_every_stage_and_a_failing_stage_fails_it(tmp_path):
    work = tmp_path / "work"
    r = _make(work)
    out = r.stdout
    assert r.returncode == 0, out[-6000:]
    lines = out.splitlines()
    assert max(map(len, lines)) <= 500, max(lines, key=len)[:600]  # no carriage-return bar piled into one line
    for i, name in enumerate(STAGES, start=1):
        mine = [(k, line) for k, line in enumerate(lines) if line.startswith(f"== [{i}/8] {name}")]
        starts = [k for k, line in mine if line.endswith(": started")]
        ends = [k for k, line in mine if ": done in " in line]
        assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], f"stage {i} ({name}) lines missing"
        assert i == 8 or " - " in lines[ends[0]], f"stage {i} end line has no headline figure"
    assert "demo done" not in "\n".join(lines[: lines.index(next(x for x in lines if x.startswith("== [8/8]")))])
    assert "Reading existed cache" not in out  # hash embeddings are not announced as CLIP's
    table = (work / "compare" / "defectkit_synth-all" / "comparison.md").read_text()
    assert table.count("\n| ") >= 4  # header + yolo, anomaly, sam, cascade rows
    assert (work / "compare" / "defectkit_synth-all" / "report.html").stat().st_size > 50_000
    yolo = work / "runs" / "yolo" / "defectkit_synth-all-yolov8n-worldv2"
    assert all((yolo / f).stat().st_size > 10_000 for f in ("results.png", "labels.jpg"))  # Ultralytics' plots, kept
    # a failing stage (here YOLO, given a flag it does not know) fails the demo, its error shown
    bad = _make(work, YOLO_MODEL="yolov8n", YOLO_ARGS="--from-scratch --epochs 1 --no-such-flag")
    assert bad.returncode != 0
    assert "unrecognized arguments: --no-such-flag" in bad.stdout  # the stage's own error, not swallowed
    assert "== [4/8] YOLO (yolov8n) on the converted labels: FAILED after" in bad.stdout
    assert "== [6/8]" not in bad.stdout  # nothing after the failed stage ran (SAM trains beside it, in the other lane)
