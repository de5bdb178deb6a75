"""Run folders: a finished run is never trained over silently, and every run says what it is in results.md."""

from __future__ import annotations

import pytest

from defectkit.core.errors import ConfigError
from defectkit.core.paths import claim_run_dir
from defectkit.review.summary import finish_run


def test_a_finished_run_is_refused_unless_resumed_or_overwritten_on_purpose(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFECTKIT_EXIST_OK", raising=False)
    monkeypatch.delenv("MAKELEVEL", raising=False)
    run = claim_run_dir(tmp_path / "runs" / "a")  # new: created
    assert run.is_dir()
    assert claim_run_dir(run) == run  # interrupted (no metrics.json): reused, --resume continues it
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"runs/a already holds a finished run.*--exist-ok.*--resume"):
        claim_run_dir(run)
    monkeypatch.setenv("MAKELEVEL", "1")  # a make target retraining because its inputs changed
    with pytest.raises(ConfigError, match=r"--exist-ok to train over it \(through make: FORCE=1 trains over it\)"):
        claim_run_dir(run)
    assert claim_run_dir(run, resume=True) == run and claim_run_dir(run, exist_ok=True) == run
    monkeypatch.setenv("DEFECTKIT_EXIST_OK", "1")  # make ... FORCE=1
    assert claim_run_dir(run) == run
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        claim_run_dir(tmp_path / "file")


def test_every_run_gets_the_shared_keys_and_a_results_page(tmp_path):
    yolo = {"model": "yolov8n", "data": "/d/data.yaml", "image_auroc": 0.75, "ultralytics": {"map50": 0.5},
            "at_threshold": {"false_alarm_rate": 0.25, "miss_rate": 0.125}, "train_seconds": 12.0}
    m = finish_run(tmp_path, "yolo", yolo)
    assert m["family"] == "yolo" and m["protocol"] == "manifest"
    assert m["image"] == {"auroc": 0.75, "at_threshold": yolo["at_threshold"]}  # as the anomaly models have it
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# yolov8n (yolo) on data.yaml")
    assert "| mAP50 | 0.500 |" in text and "| image AUROC | 0.750 |" in text
    assert "false alarms 0.250, misses 0.125" in text and "training time: 12 s" in text
    paper = finish_run(tmp_path, "anomaly", {"model": "draem", "category": "bottle", "protocol": "paper",
                                             "test_images": 83, "image": {"auroc": 0.99}})
    assert paper["protocol"] == "paper"
    assert "scored on the whole official test split (83 images)" in (tmp_path / "results.md").read_text()
