"""All-category runs: the summary's arithmetic by hand, and the sweep's skip / fail / print behaviour."""

from __future__ import annotations

import json
import math
import shlex
import sys

import pytest

from defectkit.core.errors import ConfigError, TrainingError
from defectkit.review.summary import family_values, markdown, summarize
from defectkit.review.sweep import categories_of, jobs, sweep


def test_the_mean_is_taken_over_the_categories_that_have_the_figure():
    s = summarize({"a": {"x": 0.5, "y": None}, "b": {"x": 1.0, "y": 0.25}, "c": {"x": math.nan, "y": 0.75}},
                  ["x", "y"])
    assert s["mean"] == {"x": 0.75, "y": 0.5}  # (0.5 + 1.0) / 2, (0.25 + 0.75) / 2
    assert s["n"] == {"x": 2, "y": 2}
    assert s["rows"]["c"]["x"] is None
    md = markdown(s)
    assert "| c | - | 0.750 |" in md
    assert "| **mean (3)** | 0.750 (of 2) | 0.500 (of 2) |" in md


def test_each_family_reads_its_figures_from_its_metrics_file():
    anomaly = {"image": {"auroc": 0.9}, "pixel": {"auroc": 0.8, "aupro": 0.7, "ap": 0.3}, "train_seconds": 12.0}
    assert family_values("anomaly", anomaly) == {"image AUROC": 0.9, "pixel AUROC": 0.8, "AUPRO": 0.7,
                                                 "pixel AP": 0.3, "train s": 12.0}
    yolo = family_values("yolo", {"ultralytics": {"map50": 0.4, "map50_95": 0.2}, "image_auroc": math.nan})
    assert yolo["mAP50"] == 0.4 and yolo["image AUROC"] is None and yolo["mAP50 (pycocotools)"] is None
    cmp = family_values("compare", {"runs": [{"name": "draem", "image_auroc": 0.9, "pixel_auroc": 0.95,
                                              "det_class_agnostic": {"map50": 0.1}, "pixel_iou": 0.3}]})
    assert cmp == {"draem: image AUROC": 0.9, "draem: pixel AUROC": 0.95, "draem: mAP50 (agnostic)": 0.1,
                   "draem: pixel IoU": 0.3}


def _fake_job(tmp_path) -> str:
    """A job that writes an anomaly metrics file (image AUROC from the category name's length) and
    counts its runs; category 'weave' fails when tmp_path/fail exists."""
    code = (
        "import json, pathlib, sys; cat, run, tmp = sys.argv[1:4]; t = pathlib.Path(tmp); "
        "(t / 'calls').open('a').write(cat + chr(10)); "
        "sys.exit(3) if cat == 'weave' and (t / 'fail').exists() else None; "
        "r = pathlib.Path(run); r.mkdir(parents=True, exist_ok=True); "
        "(r / 'metrics.json').write_text(json.dumps({'image': {'auroc': len(cat) / 10}}))"
    )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {{category}} {tmp_path}/runs/{{category}} {tmp_path}"


def test_sweep_runs_every_category_skips_finished_ones_and_summarises(synthetic_root, tmp_path, capsys):
    cats = categories_of(synthetic_root, None)
    assert cats == ["washer", "weave"]
    todo = jobs(cats, f"{tmp_path}/runs/{{category}}", _fake_job(tmp_path))
    out = tmp_path / "summary"
    r = sweep("anomaly", todo, out)
    assert r["ran"] == ["washer", "weave"] and not r["failed"]
    s = json.loads((out / "summary.json").read_text())
    assert s["rows"]["washer"]["image AUROC"] == pytest.approx(0.6)
    assert s["mean"]["image AUROC"] == pytest.approx(0.55)  # (0.6 + 0.5) / 2
    assert (out / "summary.png").stat().st_size > 0 and "**mean (2)**" in (out / "summary.md").read_text()

    r = sweep("anomaly", todo, out)  # a rerun: nothing runs again
    assert r["skipped"] == ["washer", "weave"]
    assert (tmp_path / "calls").read_text().split() == ["washer", "weave"]
    sweep("anomaly", todo, out, force=True)
    assert (tmp_path / "calls").read_text().split() == ["washer", "weave"] * 2


def test_a_failing_category_is_reported_and_the_others_still_run(synthetic_root, tmp_path):
    (tmp_path / "fail").touch()
    todo = jobs(["weave", "washer"], f"{tmp_path}/runs/{{category}}", _fake_job(tmp_path))
    with pytest.raises(TrainingError, match="1 of 2 categories failed: weave"):
        sweep("anomaly", todo, tmp_path / "summary")
    s = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert s["rows"]["weave"]["image AUROC"] is None and s["n"]["image AUROC"] == 1
    assert (tmp_path / "runs" / "washer" / "metrics.json").is_file()


def test_print_only_writes_the_per_category_commands_and_runs_nothing(tmp_path, capsys):
    todo = jobs(["bottle", "metal nut"], f"{tmp_path}/runs/{{category}}", "train --category {category}")
    sweep("anomaly", todo, tmp_path / "summary", print_only=True)
    lines = (tmp_path / "summary" / "jobs.sh").read_text().splitlines()
    assert lines[-2:] == ["train --category bottle", "train --category 'metal nut'"]
    assert "train --category bottle" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "summary" / "summary.json").exists()
    with pytest.raises(ConfigError):
        jobs(["bottle"], "runs/fixed", "train --category {category}")


def test_make_category_all_with_jobs_prints_one_command_per_category(tmp_path):
    """``make finetune-yolo CATEGORY=all JOBS=1``: the per-category commands for a scheduler, nothing trained."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(["make", "--no-print-directory", "finetune-yolo", "CATEGORY=all", "JOBS=1", f"WORK={tmp_path}"],
                       cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    jobs_sh = (tmp_path / "summary" / "defectkit_synth" / "yolo-yolov8n-worldv2" / "jobs.sh").read_text()
    lines = [ln for ln in jobs_sh.splitlines() if ln and not ln.startswith(("#", "set "))]
    assert len(lines) == 2 and "CATEGORY=washer" in lines[0] and "CATEGORY=weave" in lines[1]
    assert lines[0].endswith("defectkit_synth-washer-yolov8n-worldv2/metrics.json")
    assert not (tmp_path / "runs").exists()


def test_a_paper_protocol_summary_says_so_and_puts_the_published_figures_beside_ours(tmp_path):
    from defectkit.review.summary import write_summary

    runs = {}
    for cat, protocol in (("bottle", "paper"), ("screw", "paper")):
        runs[cat] = tmp_path / cat
        runs[cat].mkdir()
        (runs[cat] / "metrics.json").write_text(json.dumps({"protocol": protocol, "image": {"auroc": 0.9}}))
    write_summary(tmp_path / "paper", "anomaly", runs)
    text = (tmp_path / "paper" / "summary.md").read_text()
    assert "protocol: paper" in text
    assert "| DRAEM | bottle | 99.2 | 99.1 | - | 86.5 |" in text  # Zavrtanik et al. 2021, Table 1-2
    assert "| DRAEM | screw | - | - | - | - |" in text  # no figure typed in: never invented
    (runs["screw"] / "metrics.json").write_text(json.dumps({"protocol": "manifest", "image": {"auroc": 0.9}}))
    write_summary(tmp_path / "mixed", "anomaly", runs)
    mixed = (tmp_path / "mixed" / "summary.md").read_text()
    assert "protocol: manifest, paper" in mixed and "Published" not in mixed  # not comparable: no reference
