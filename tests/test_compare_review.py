"""make compare and the FiftyOne review dataset, on runs generated with known answers."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectkit.converters.canonical import ImageRecord, make_header, read_records, write_records
from defectkit.converters.convert import ConvertConfig, convert
from defectkit.datasets.mvtec import index_category
from defectkit.datasets.split import build_manifest
from defectkit.review.compare import compare


@pytest.fixture(scope="module")
def setup(synthetic_root, tmp_path_factory):
    """A conversion, a perfect detector, an anomaly run (per category, maps), a box-only run that finds nothing."""
    base = tmp_path_factory.mktemp("cmp")
    conv = base / "conv"
    manifest = build_manifest([index_category(synthetic_root, "washer"), index_category(synthetic_root, "weave")])
    convert(synthetic_root, manifest, conv, ConvertConfig(formats=("coco",)), progress=False)
    header, gt = read_records(conv / "ground_truth.jsonl")
    test = [g for g in gt if g.fold == "test"]
    perfect = [ImageRecord(image=g.image, height=g.height, width=g.width, boxes_xyxy=g.boxes_xyxy, labels=g.labels,
                           scores=np.full(len(g), 0.9), masks=g.masks, image_score=0.9 if len(g) else 0.05)
               for g in test]
    (base / "perfect").mkdir()
    write_records(base / "perfect" / "predictions.jsonl",
                  make_header("predictions", "perfect", header["classes"], header["data_root"]), perfect)
    (base / "perfect" / "metrics.json").write_text(json.dumps({"images_per_s": 12.5}))
    for cat in ("washer", "weave"):  # one anomaly run per category, merged by compare
        run = base / f"anomaly-{cat}"
        (run / "maps").mkdir(parents=True)
        recs = []
        for g in test:
            if g.category != cat:
                continue
            gm = g.decode_masks().any(0) if len(g) else np.zeros((g.height, g.width), bool)
            small = cv2.resize(gm.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
            np.save(run / "maps" / f"{Path(g.image).stem}-{g.defect_type}.npy", small.astype(np.float16))
            recs.append(ImageRecord(image=g.image, height=g.height, width=g.width, boxes_xyxy=g.boxes_xyxy,
                                    labels=["anomaly"] * len(g), scores=np.full(len(g), 0.01), masks=g.masks,
                                    anomaly_map=f"maps/{Path(g.image).stem}-{g.defect_type}.npy",
                                    image_score=float(small.max())))
        write_records(run / "predictions.jsonl", make_header("predictions", "ae", ["anomaly"], header["data_root"],
                                                             kind_of_model="anomaly"), recs)
    (base / "oracle").mkdir()  # SAM-like: prompted with the ground truth's boxes
    write_records(base / "oracle" / "predictions.jsonl",
                  make_header("predictions", "oracle", header["classes"], header["data_root"],
                              prompts="ground-truth boxes"), perfect)
    blind = [ImageRecord(image=g.image, height=g.height, width=g.width, boxes_xyxy=np.zeros((0, 4)), labels=[],
                         scores=np.zeros(0), image_score=0.0) for g in test]
    (base / "blind").mkdir()
    write_records(base / "blind" / "predictions.jsonl", make_header("predictions", "blind", header["classes"],
                                                                     header["data_root"]), blind)
    return base, conv


def test_compare_scores_every_run_with_the_same_code(setup):
    base, conv = setup
    results = compare(conv / "ground_truth.jsonl", [base / "perfect", base / "anomaly-washer", base / "anomaly-weave",
                                                   base / "blind"], base / "out")
    by = {r["name"]: r for r in results}
    assert set(by) == {"perfect", "ae", "blind"}  # the two anomaly runs are one model
    p, a, b = by["perfect"], by["ae"], by["blind"]
    assert p["det_class_aware"]["map50"] == pytest.approx(1.0) and p["mask_ap"]["map50"] == pytest.approx(1.0)
    assert p["pixel_iou"] == pytest.approx(1.0) and p["image_auroc"] == 1.0 and p["images_per_s"] == 12.5
    assert a["images"] == p["images"]  # merged categories cover the whole test fold
    assert "det_class_aware" not in a and a["det_class_agnostic"]["map50"] == pytest.approx(1.0)
    assert a["pixel_iou"] == pytest.approx(1.0)  # anomaly masks kept whatever their raw scores
    assert a["pixel_auroc"] > 0.95 and a["image_auroc"] == 1.0
    assert b["det_class_aware"]["map50"] == 0.0 and b["image_auroc"] == 0.5 and "pixel_iou" not in b
    md = (base / "out" / "comparison.md").read_text()
    assert md.splitlines()[0].startswith("| model | test images | mAP50")
    assert "| perfect |" in md and "per defect type" in md
    page = (base / "out" / "report.html").read_text()
    assert page.count("<img") >= 4 and "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"]https?://", page)  # self-contained
    assert json.loads((base / "out" / "comparison.json").read_text())["fold"] == "test"


def test_compare_errors(setup, tmp_path):
    base, conv = setup
    with pytest.raises(FileNotFoundError, match="no predictions.jsonl"):
        compare(conv / "ground_truth.jsonl", [tmp_path], tmp_path / "o")


def _env(tmp_path):
    return {**os.environ, "FIFTYONE_DATABASE_DIR": str(tmp_path / "fodb"), "FIFTYONE_DO_NOT_TRACK": "true",
            "FIFTYONE_DATABASE_VALIDATION": "false"}


@pytest.mark.slow
def test_fiftyone_dataset_fields_counts_and_views(setup, tmp_path):
    base, conv = setup
    code = """
import json, sys
from defectkit.review.fiftyone_dataset import build_dataset
ds = build_dataset("dk-test", sys.argv[1], sys.argv[2:])
print(json.dumps({"n": len(ds), "fields": sorted(ds.get_field_schema()), "views": ds.list_saved_views(),
  "gt": ds.count("ground_truth.detections"), "perfect": ds.count("perfect.detections"),
  "tp": int(sum(ds.values("eval_perfect_tp"))), "fn_blind": int(sum(ds.values("eval_blind_fn"))),
  "heatmap_range": ds.first()["ae_heatmap"]["range"], "tags": sorted(ds.distinct("tags")),
  "missed_blind": len(ds.load_saved_view("missed defects: blind"))}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(conv / "ground_truth.jsonl"), str(base / "perfect"),
                        str(base / "anomaly-washer"), str(base / "anomaly-weave"), str(base / "blind")],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    header, gt = read_records(conv / "ground_truth.jsonl")
    test = [g for g in gt if g.fold == "test"]
    n_inst = sum(len(g) for g in test)
    assert out["n"] == len(test) and out["gt"] == out["perfect"] == n_inst
    assert {"ground_truth", "gt_segmentation", "perfect", "ae", "ae_heatmap", "ae_mask", "blind"} <= set(out["fields"])
    assert out["tp"] == n_inst and out["fn_blind"] == n_inst
    assert out["heatmap_range"][1] > out["heatmap_range"][0]
    assert "test" in out["tags"] and "good" in out["tags"]
    assert out["missed_blind"] == sum(1 for g in test if len(g))
    assert {"missed defects: perfect", "false alarms on good images: ae"} <= set(out["views"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", "--virtual-time-budget=20000"]


def _chromium() -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return chromium


def _look(url: str, tmp_path: Path) -> tuple[str, Path]:
    """The page's DOM after load and a screenshot of it, from one headless Chromium run."""
    chromium, shot = _chromium(), tmp_path / "page.png"
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}", "--dump-dom", f"--screenshot={shot}"]
    # the App fetches its samples from the server in real time, which virtual time does not wait for: on a
    # loaded machine the page can be caught before it paints; look again (at most 3 times)
    for _ in range(3):
        dom = subprocess.run([chromium, *flags, url], capture_output=True, text=True, timeout=120).stdout
        img = cv2.imread(str(shot))
        if img is not None and img.std() > 10:
            break
        time.sleep(5)
    return dom, shot


def app_page(name: str, tmp_path: Path, prelude: str = "", cli: list[str] | None = None) -> tuple[str, Path]:
    """Serve the persistent dataset ``name`` with FiftyOne's App and look at it with headless Chromium.
    ``cli``: the App is started by ``python -m defectkit.review.fiftyone_dataset CLI --launch`` (which builds
    the dataset first); ``prelude``: Python run in the App's process before it launches.  One process builds
    and serves, as a user's does: each FiftyOne process pays ~8 s for its imports and its database start."""
    _chromium()
    port = _free_port()
    if cli is not None:
        args = ["-m", "defectkit.review.fiftyone_dataset", *cli, "--name", name, "--launch", "--port", str(port)]
    else:
        args = ["-c", f"{prelude}\nfrom defectkit.review.fiftyone_dataset import launch\nlaunch({name!r}, port={port})"]
    app = subprocess.Popen([sys.executable, *args], env=_env(tmp_path), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(120):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(1)
                assert app.poll() is None, app.stdout.read()[-3000:]
        time.sleep(2)
        return _look(f"http://127.0.0.1:{port}/datasets/{name}", tmp_path)
    finally:
        app.terminate()
        try:
            app.wait(30)
        except subprocess.TimeoutExpired:
            app.kill()


@pytest.mark.slow
def test_app_serves_the_samples_to_a_headless_browser(setup, tmp_path):
    _chromium()
    base, conv = setup
    # the user's command: build the review dataset and serve it (`--launch`)
    dom, shot = app_page("dk-app", tmp_path, cli=["--gt", str(conv / "ground_truth.jsonl"),
                                                  "--runs", str(base / "perfect")])
    tiles = dom.count('data-cy="looker"')
    assert "dk-app" in dom and tiles > 0, "no sample tile on the App page"
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (900, 1400) and img.std() > 10
    out = Path(os.environ.get("DEFECTKIT_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, out / "fiftyone_app.png")


def test_report_bars_print_values_and_draw_missing_ones_as_n_a():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from defectkit.review.report import _labelled_barh, _value

    fig, ax = plt.subplots()
    _labelled_barh(ax, ["a", "b", "c"], [_value(0.0), _value(None), _value(float("nan"))])
    assert [t.get_text() for t in ax.texts] == ["0.000", "n/a", "n/a"]  # zero is a value, missing is not
    plt.close(fig)


def test_runs_prompted_with_ground_truth_boxes_report_no_image_auroc_or_box_map(setup):
    base, conv = setup
    (r,) = compare(conv / "ground_truth.jsonl", [base / "oracle"], base / "out-oracle")
    assert np.isnan(r["image_auroc"]) and np.isnan(r["det_class_agnostic"]["map50"])  # they measure the prompts
    assert all(np.isnan(t["image_auroc"]) for t in r["per_type"].values())
    assert r["pixel_iou"] == pytest.approx(1.0)  # its mask quality is still scored
    assert "prompted with ground-truth boxes" in r["note"]
    assert "| oracle | " in (base / "out-oracle" / "comparison.md").read_text()


def test_examples_are_each_models_worst_and_best_and_its_top_scored_good_image():
    from defectkit.review.report import _choose_examples

    gt = [ImageRecord(image=f"{t}{k}.png", height=4, width=4, defect_type=t,
                      boxes_xyxy=np.zeros((0 if t == "good" else 1, 4)), labels=[] if t == "good" else ["d"])
          for t in ("good", "crack") for k in range(4)]
    r = {"per_image_quality": {"crack0.png": 0.5, "crack1.png": 0.0, "crack2.png": 0.9, "crack3.png": 0.7},
         "per_image_iou": {"crack0.png": 0.5, "crack1.png": 0.0, "crack2.png": 0.9},
         "image_scores": {"good0.png": 0.1, "good1.png": 0.8, "good2.png": 0.3}}
    picks = [(title, g.image) for title, g in _choose_examples(r, gt)]
    assert picks == [("worst: mask IoU 0.000", "crack1.png"), ("worst: mask IoU 0.500", "crack0.png"),
                     ("best: mask IoU 0.900", "crack2.png"), ("best: box IoU 0.700", "crack3.png"),
                     ("good image, its top score 0.8", "good1.png")]
    two = {"per_image_quality": {"crack0.png": 0.2}, "per_image_iou": {}, "image_scores": {}}
    assert [g.image for _, g in _choose_examples(two, gt)] == ["crack0.png"]  # never the same image twice


@pytest.mark.slow
def test_report_shows_every_models_output_in_a_headless_browser(setup, tmp_path):
    _chromium()
    base, conv = setup
    results = compare(conv / "ground_truth.jsonl", [base / "perfect", base / "anomaly-washer",
                                                   base / "anomaly-weave", base / "blind"], tmp_path / "out")
    dom, shot = _look((tmp_path / "out" / "report.html").as_uri(), tmp_path)
    for r in results:  # every model has its own examples, drawn with its output
        sec = re.search(rf'<section class="examples" data-model="{re.escape(r["name"])}">(.*?)</section>', dom, re.S)
        assert sec, f"no examples for {r['name']}"
        (b64,) = re.findall(r'src="data:image/png;base64,([^"]+)"', sec.group(1))
        img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape[1] > 500 and img.std() > 10
    assert "perfect" in dom and "raw anomaly-map values" in dom  # each family's score scale explained
    img = cv2.imread(str(shot))
    assert img is not None and img.std() > 10
