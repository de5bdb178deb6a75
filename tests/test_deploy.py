"""Use what was trained: predict on new images (OK/NG, maps, overlays, CSV), ONNX export checked against
the trainer's own maps, the operating point, and bad input; on tiny runs trained here."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectkit.converters.canonical import read_records
from defectkit.core.errors import ConfigError, DataError, MissingFileError
from defectkit.review.metrics import choose_threshold, confusion_at, max_false_alarm_threshold, recall_threshold
from tests.conftest import write_image

# ---------------------------------------------------------------------------------------- operating point, by hand


def test_max_false_alarm_threshold_by_hand():
    good = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.4, 0.6, 0.8, 0.0]  # 10 good validation scores
    thr, info = max_false_alarm_threshold(good, 0.2)  # 2 of 10 may be flagged: 0.9 and 0.8, not 0.7
    assert 0.7 < thr <= 0.7 + 1e-12 and info["val_false_alarms_allowed"] == 2 and info["supported"]
    thr, info = max_false_alarm_threshold(good, 0.01)  # 1/10 is the finest rate 10 images can show
    assert 0.9 < thr < 0.9 + 1e-12 and not info["supported"] and "steps of 1/10" in info["note"]
    t, rule = choose_threshold("false_alarm", good + [2.0], [0] * 10 + [1], false_alarm_rate=0.01)
    assert t == thr and "NOT SUPPORTED" in rule


def test_recall_threshold_and_confusion_by_hand():
    s, y = [0.9, 0.8, 0.3, 0.2, 0.7, 0.1], [1, 1, 1, 1, 0, 0]
    assert recall_threshold(s, y, 0.5) == 0.8  # the 2 highest of 4 defects
    assert recall_threshold(s, y, 0.75) == 0.3
    c = confusion_at(s, y, 0.5)
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (2, 1, 1, 2)
    assert c["false_alarm_rate"] == 0.5 and c["miss_rate"] == 0.5


# ---------------------------------------------------------------------------------------- images in


def test_find_images_walks_trees_and_globs_and_refuses_an_empty_folder(tmp_path):
    from defectkit.deploy.predict import find_images

    for rel in ("a.png", "sub/b.JPG", "sub/deeper/c.tif", "notes.txt", ".hidden.png"):
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    root, files = find_images(tmp_path / "in")
    assert root == (tmp_path / "in").absolute()
    assert [f.relative_to(root).as_posix() for f in files] == ["a.png", "sub/b.JPG", "sub/deeper/c.tif"]
    root, files = find_images(str(tmp_path / "in" / "sub" / "*.JPG"))
    assert [f.name for f in files] == ["b.JPG"] and root == (tmp_path / "in" / "sub").absolute()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        find_images(tmp_path / "empty")


# ---------------------------------------------------------------------------------------- a trained anomaly run


def _train(root: Path, out: Path, *extra: str) -> Path:
    from defectkit.anomaly import train as T

    T.main(T.get_args_parser().parse_args([
        "--data", str(root), "--manifest", str(out.parent / "manifest.json"), "--out", str(out), "--category", "washer",
        "--batch", "8", "--lr", "2e-3", "--no-augment", "--no-plots", "--patience", "99", "--device", "cpu", "-q",
        *extra]))
    return out


# session scope: a worker of `pytest -n 2` runs this module's tests between other modules' tests, and a module
# fixture is torn down and trained again each time the module is re-entered (measured: three 14-15 s setups)
@pytest.fixture(scope="session")
def ae_run(synthetic_root, tmp_path_factory):
    """A conv AE trained on the embedded washer (image AUROC 1.0 here in ~6 s: it tells good from painted)."""
    return _train(synthetic_root, tmp_path_factory.mktemp("deploy") / "run" / "washer", "--model", "conv_ae",
                  "--imgsz", "64", "--depth", "3", "--base", "16", "--epochs", "10", "--steps-per-epoch", "10",
                  "--sigma", "2")


@pytest.fixture(scope="session")
def draem_run(synthetic_root, tmp_path_factory):
    """A briefly trained DRAEM: its exported graph must still match its trainer's maps."""
    return _train(synthetic_root, tmp_path_factory.mktemp("deploy-draem") / "washer", "--model", "draem",
                  "--imgsz", "48", "--depth", "3", "--base", "8", "--epochs", "2", "--steps-per-epoch", "4")


def _new_images(synthetic_root: Path, folder: Path) -> dict[str, np.ndarray]:
    """A good image, the same with a painted defect, a resized and a gray copy, and a truncated file."""
    good = cv2.cvtColor(cv2.imread(str(synthetic_root / "washer" / "test" / "good" / "000.png")), cv2.COLOR_BGR2RGB)
    painted = good.copy()
    cv2.circle(painted, (90, 70), 22, (20, 200, 230), -1)  # a bright stain on the washer's ring
    imgs = {"good.png": good, "line2/painted.png": painted,
            "big.jpg": cv2.resize(painted, (400, 300)), "gray.bmp": cv2.cvtColor(good, cv2.COLOR_RGB2GRAY)}
    for rel, im in imgs.items():
        write_image(folder / rel, im)
    (folder / "broken.png").write_bytes((folder / "good.png").read_bytes()[:200])
    return imgs


@pytest.mark.slow
def test_predict_decides_ok_and_ng_writes_everything_and_names_the_unreadable_image(ae_run, synthetic_root,
                                                                                     tmp_path):
    from defectkit.deploy.predict import predict

    imgs = _new_images(synthetic_root, tmp_path / "in")
    out = tmp_path / "out"
    summary = predict(ae_run, str(tmp_path / "in"), out)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    by = {r["image"]: r for r in rows}
    assert set(by) == {*imgs, str((tmp_path / "in" / "broken.png").absolute())}  # one line per image
    assert by[str((tmp_path / "in" / "broken.png").absolute())]["decision"] == "UNREADABLE"
    assert summary["counts"]["unreadable"] == 1 and summary["counts"]["images"] == 4
    # the painted stain is rejected; the good part is never rejected with confidence (how close it sits to the
    # val-chosen threshold depends on the float reductions of the machine's thread count)
    assert by["line2/painted.png"]["decision"] == "NG" and by["line2/painted.png"]["uncertain"] == "0"
    assert by["good.png"]["decision"] == "OK" or by["good.png"]["uncertain"] == "1"
    assert float(by["line2/painted.png"]["score"]) > float(by["good.png"]["score"])
    header, recs = read_records(out / "predictions.jsonl")
    assert header["threshold_source"].endswith("on the val fold") and header["run_kind"] == "anomaly"
    for r in recs:  # maps come back at each image's own size
        assert np.load(out / r.anomaly_map).shape == (r.height, r.width)
        assert r.decision in ("OK", "NG")
    big = next(r for r in recs if r.image == "big.jpg")
    assert (big.height, big.width) == (300, 400)
    assert (out / "overlays" / "line2__painted.png.png").is_file()
    for r in rows:  # an overlay for each NG or uncertain image, and only for them
        if r["decision"] == "UNREADABLE":
            continue
        flagged = r["decision"] == "NG" or r["uncertain"] in ("1", "True", "true")
        assert bool(r["overlay"]) == flagged and (out / r["overlay"]).is_file() == flagged, r
    # --threshold overrides; a rerun replaces the folder whole
    predict(ae_run, str(tmp_path / "in"), out, threshold=1e9)
    assert {r["decision"] for r in csv.DictReader((out / "summary.csv").open())} == {"OK", "UNREADABLE"}
    assert not (out / "overlays").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ae_run", "draem_run"])
def test_onnx_export_reproduces_the_trainers_maps_and_predict_runs_on_it(family, synthetic_root, tmp_path, request):
    """The exported graph must give the maps the trainer wrote for its test fold (maps/*.npy, float16):
    an export that dropped the smoothing or the score would differ from them."""
    run = request.getfixturevalue(family)
    from defectkit.anomaly.deploy import export_onnx, prepare_batch, read_spec
    from defectkit.datasets.image_files import read_image
    from defectkit.deploy.predict import predict

    header, recs = read_records(run / "predictions.jsonl")
    recs = recs[:: max(1, len(recs) // 6)][:6]
    images = [read_image(Path(header["data_root"]) / r.image) for r in recs]
    rep = export_onnx(run, images)
    assert rep["max_abs_diff_maps"] <= rep["atol"] and rep["images"] == len(images)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    maps, scores = sess.run(["maps", "scores"], {"images": prepare_batch(images, read_spec(run))})
    trainer_maps = np.stack([np.load(run / r.anomaly_map).astype(np.float32) for r in recs])
    assert np.abs(maps - trainer_maps).max() < 2e-3  # float16 storage of the trainer's maps
    assert np.allclose(scores, [r.image_score for r in recs], atol=2e-3)
    spec = json.loads((run / "export" / "model.json").read_text())
    assert spec["thresholds"]["image"] == read_spec(run)["thresholds"]["image"]
    assert spec["preprocess"] == read_spec(run)["preprocess"] and spec["preprocess"]["channel_order"] == "RGB"
    _new_images(synthetic_root, tmp_path / "in")
    a = predict(run, str(tmp_path / "in"), tmp_path / "torch")
    b = predict(run, str(tmp_path / "in"), tmp_path / "onnx", backend="onnx")
    assert a["counts"] == b["counts"]
    sa = [float(r["score"]) for r in csv.DictReader((tmp_path / "torch" / "summary.csv").open()) if r["score"]]
    sb = [float(r["score"]) for r in csv.DictReader((tmp_path / "onnx" / "summary.csv").open()) if r["score"]]
    assert np.allclose(sa, sb, atol=1e-4)


@pytest.mark.slow
def test_bad_runs_are_clear_errors_and_leave_nothing_behind(ae_run, synthetic_root, tmp_path):
    from defectkit.deploy.predict import predict, run_kind

    _new_images(synthetic_root, tmp_path / "in")
    with pytest.raises(ConfigError, match="one anomaly run per category"):
        run_kind(ae_run.parent)
    broken = tmp_path / "old-run"
    shutil.copytree(ae_run, broken, ignore=shutil.ignore_patterns("export", "maps", "plots"))
    (broken / "deploy.json").unlink()
    with pytest.raises(MissingFileError, match="deploy.json not found"):
        predict(broken, str(tmp_path / "in"), tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    feature = tmp_path / "feature-run"
    shutil.copytree(broken, feature)
    args = json.loads((feature / "run_args.json").read_text())
    args["model"]["model"] = "patchcore"
    (feature / "run_args.json").write_text(json.dumps(args))
    with pytest.raises(ConfigError, match="feature model"):
        predict(feature, str(tmp_path / "in"), tmp_path / "o2")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(ae_run, no_weights, ignore=shutil.ignore_patterns("export", "maps", "plots"))
    (no_weights / "best.pt").unlink()
    with pytest.raises(MissingFileError, match="best.pt not found"):
        predict(no_weights, str(tmp_path / "in"), tmp_path / "o3")
    with pytest.raises(MissingFileError, match="export the run first"):
        predict(no_weights, str(tmp_path / "in"), tmp_path / "o4", backend="onnx")
    other = tmp_path / "other-kind"
    shutil.copytree(ae_run, other, ignore=shutil.ignore_patterns("maps", "plots"))
    (other / "export").mkdir(exist_ok=True)
    (other / "export" / "model.onnx").write_bytes(b"not onnx")
    (other / "export" / "model.json").write_text(json.dumps({"kind": "yolo"}))
    with pytest.raises(DataError, match="exported from a yolo run"):
        predict(other, str(tmp_path / "in"), tmp_path / "o5", backend="onnx")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


@pytest.mark.slow
def test_max_false_alarm_operating_point_is_reported_on_the_test_fold(synthetic_root, tmp_path):
    from defectkit.anomaly import train as T

    args = T.get_args_parser().parse_args([
        "--data", str(synthetic_root), "--manifest", str(tmp_path / "manifest.json"), "--out", str(tmp_path / "run"),
        "--model", "conv_ae", "--category", "weave", "--imgsz", "32", "--depth", "2", "--base", "8", "--epochs", "1",
        "--steps-per-epoch", "2", "--no-plots", "--max-false-alarm", "0.01", "-q"])
    m = T.main(args)
    op = m["image"]["at_threshold"]
    assert op["tp"] + op["fn"] + op["fp"] + op["tn"] == m["test_images"]
    assert "NOT SUPPORTED" in op["rule"]  # 3 good val images cannot show a 1 % false-alarm rate
    assert m["thresholds"]["method"] == "false_alarm"
    spec = json.loads((tmp_path / "run" / "deploy.json").read_text())
    assert spec["thresholds"]["image"] == op["threshold"]


@pytest.mark.slow
def test_predict_output_reviewed_in_fiftyone_tagged_and_harvested(ae_run, synthetic_root, tmp_path):
    from defectkit.deploy.predict import predict
    from tests.test_compare_review import app_page

    _new_images(synthetic_root, tmp_path / "in")
    predict(ae_run, str(tmp_path / "in"), tmp_path / "out")
    # built, tagged and harvested in the process that then serves the App (one FiftyOne start, as a user's)
    prelude = f"""
import json
from pathlib import Path
from defectkit.review.fiftyone_dataset import build_predict_dataset, harvest
ds = build_predict_dataset("dk-predict", [{str(tmp_path / "out")!r}])
s = ds.match_tags("ng").first()
s.tags.append("false alarm"); s.save()
harvest("dk-predict", {str(tmp_path / "harvest.csv")!r})
Path({str(tmp_path / "review.json")!r}).write_text(json.dumps({{"n": len(ds), "tags": sorted(ds.distinct("tags")),
  "views": ds.list_saved_views(), "ng": len(ds.load_saved_view("NG")), "fields": sorted(ds.get_field_schema()),
  "tagged": s.filepath}}))
"""
    dom, _ = app_page("dk-predict", tmp_path, prelude=prelude)
    assert "dk-predict" in dom and dom.count('data-cy="looker"') > 0, "no sample tile on the App page"
    out = json.loads((tmp_path / "review.json").read_text())
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert out["n"] == sum(r["decision"] != "UNREADABLE" for r in rows)
    assert out["ng"] == sum(r["decision"] == "NG" for r in rows) and {"ng", "ok"} <= set(out["tags"])
    assert {"NG", "uncertain, review first"} <= set(out["views"])
    assert {"conv_ae", "conv_ae_heatmap", "conv_ae_decision", "conv_ae_score"} <= set(out["fields"])
    (row,) = list(csv.DictReader((tmp_path / "harvest.csv").open()))
    assert row["filepath"] == out["tagged"] and row["review_tags"] == "false alarm" and row["decision"] == "NG"


@pytest.mark.slow
def test_int8_export_is_checked_on_the_test_fold_and_refused_when_it_moves_the_auroc(ae_run, tmp_path):
    from defectkit.anomaly.quantize import INT8_FILE, quantize_int8

    run = tmp_path / "run"
    shutil.copytree(ae_run, run, ignore=shutil.ignore_patterns("plots"))
    with pytest.raises(DataError, match="INT8 changes the test fold's AUROC by .* nothing written"):
        quantize_int8(run, n_calib=8, tol=-1.0)  # no change can be within a negative tolerance
    assert not (run / "export" / INT8_FILE).exists() and "int8" not in json.loads((run / "export" / "model.json")
                                                                                  .read_text())
    r = quantize_int8(run, n_calib=8, tol=1.0)
    n_test = len(read_records(run / "predictions.jsonl")[1])
    assert r["test_images"] == n_test and r["calibration_images"] == 8
    assert r["max_auroc_change"] == max(abs(r[k]["int8"] - r[k]["fp32"]) for k in ("image_auroc", "pixel_auroc"))
    assert 0 < r["max_abs_diff_maps"] < 1  # quantized: close, not identical
    assert json.loads((run / "export" / "model.json").read_text())["int8"]["file"] == INT8_FILE
    from defectkit.deploy.bench_predict import bench

    rows = {row["backend"]: row for row in bench(run, None, 8, 1, 8)}
    assert set(rows) == {"PyTorch", "onnxruntime", "onnxruntime INT8"} and rows["PyTorch"]["ratio_vs_pytorch"] == 1
    # several runs in one call: every row a ratio to the first run's PyTorch figure
    from defectkit.deploy.bench_predict import get_args_parser, main

    both = main(get_args_parser().parse_args(["--run", str(ae_run), str(run), "--n", "8", "--repeat", "1"]))
    assert [(r["run"], r["backend"]) for r in both] == [(str(ae_run), "PyTorch"), (str(ae_run), "onnxruntime"),
                                                        (str(run), "PyTorch"), (str(run), "onnxruntime"),
                                                        (str(run), "onnxruntime INT8")]
    assert [r["ratio_vs_pytorch"] for r in both] == [r["images_per_s"] / both[0]["images_per_s"] for r in both]


@pytest.mark.slow
def test_val_rescores_a_run_to_its_own_figures_and_on_the_whole_test_split(ae_run, tmp_path):
    from defectkit.anomaly import validate as V
    from defectkit.deploy import validate as entry  # `defectkit val`, for every kind of run

    own = json.loads((ae_run / "metrics.json").read_text())
    m = entry.main(entry.get_args_parser().parse_args(["--run", str(ae_run), "--out", str(tmp_path / "test"), "-q"]))
    assert m["test_images"] == own["test_images"]
    assert m["image"]["auroc"] == pytest.approx(own["image"]["auroc"], abs=1e-6)  # the trainer's own numbers
    assert m["pixel"]["auroc"] == pytest.approx(own["pixel"]["auroc"], abs=1e-6)
    assert m["image"]["at_threshold"]["fp"] == own["image"]["at_threshold"]["fp"]
    assert (tmp_path / "test" / "results.md").is_file()
    everything = V.rescore(ae_run, split="all")
    assert everything["protocol"] == "paper" and everything["test_images"] > m["test_images"]
    with pytest.raises(ConfigError, match="--split 'train'"):
        V.rescore(ae_run, split="train")
