"""The conversion file layer: what it writes, how real consumers read it, and how it fails."""

from __future__ import annotations

import contextlib
import io
import json
import os

import cv2
import numpy as np
import pytest
import yaml

from defectkit.converters.canonical import read_records
from defectkit.converters.convert import ConversionError, ConvertConfig, convert
from defectkit.datasets.mvtec import index_category
from defectkit.datasets.split import build_manifest


@pytest.fixture
def small(mvtec_tree, blob_mask):
    items = {("train", "good", f"{i}"): None for i in range(3)}
    items |= {("test", "good", f"{i}"): None for i in range(3)}
    items |= {("test", "crack", f"{i}"): blob_mask(boxes=((2 + i, 3, 12, 5), (30, 20, 33, 31))) for i in range(3)}
    ring = blob_mask(boxes=((10, 10, 20, 20),))
    ring[13:16, 13:16] = False
    items |= {("test", "hole", f"{i}"): ring for i in range(3)}
    root = mvtec_tree("bottle", items, hw=(32, 48))
    manifest = build_manifest([index_category(root, "bottle")], seed=0)
    return root, manifest


def _tree(path):
    return {p.relative_to(path).as_posix(): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(path.rglob("*")) if p.is_file() and p.name not in ("fidelity.json", "ground_truth.jsonl")
            and not p.name.endswith(".cache")}


def test_every_format_is_written_and_exact(small, tmp_path):
    root, manifest = small
    out = tmp_path / "conv"
    report = convert(root, manifest, out, progress=False)
    assert report["classes"] == ["crack", "hole"]
    assert report["images"] == 9 and report["background_images"] == 3
    assert report["instances_per_class"] == {"crack": 6, "hole": 3}
    f = report["formats"]
    assert f["yolo"]["instance_iou"]["min"] > 0.999 and f["yolo"]["classes_ok"]
    assert f["yolo_seg"]["instance_iou"]["min"] == 1.0 and f["yolo_seg"]["image_iou_vs_source"]["min"] == 1.0
    assert (
        f["coco"]["instance_iou"]["min"] == 1.0
        and f["coco"]["bbox_matches_toBbox"]
        and f["coco"]["area_is_pixel_count"]
    )
    assert f["voc"]["exact"] and f["label_maps"]["image_iou_vs_source"]["min"] == 1.0
    assert json.loads((out / "fidelity.json").read_text()) == report
    # YOLO: labels named after images, good images as empty label files, images linked
    for e in manifest["entries"]:
        if e["source_split"] != "test":
            continue
        name = f"bottle__{e['defect_type']}__{e['image'].rsplit('/', 1)[1][:-4]}"
        lab = out / "yolo" / "labels" / e["fold"] / f"{name}.txt"
        img = out / "yolo" / "images" / e["fold"] / f"{name}.png"
        assert img.is_symlink() and img.resolve() == (root / e["image"]).resolve()
        text = lab.read_text()
        assert (text == "") == (e["defect_type"] == "good")
        assert len(text.splitlines()) == {"good": 0, "crack": 2, "hole": 1}[e["defect_type"]]
    data = yaml.safe_load((out / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "crack", 1: "hole"} and data["path"] == str(out / "yolo")
    assert {data["train"], data["val"], data["test"]} == {"images/train", "images/val", "images/test"}
    # COCO: license, iscrowd 0, categories from 1, file names relative to the dataset root
    coco = json.loads((out / "coco" / "test.json").read_text())
    assert coco["licenses"][0]["name"] == "CC BY-NC-SA 4.0"
    assert {a["iscrowd"] for a in coco["annotations"]} == {0}
    assert coco["categories"] == [
        {"id": 1, "name": "crack", "supercategory": "defect"},
        {"id": 2, "name": "hole", "supercategory": "defect"},
    ]
    assert all((root / im["file_name"]).is_file() for im in coco["images"])
    hole = next(a for a in coco["annotations"] if a["category_id"] == 2)
    assert hole["area"] == 100 - 9 and hole["bbox"] == [10, 10, 10, 10]
    # VOC and label maps
    assert (out / "voc" / "ImageSets" / "Main" / "test.txt").read_text().count("\n") == len(coco["images"])
    lm = cv2.imread(str(next((out / "label_maps" / "test").glob("bottle__hole__*.png"))), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(lm)) == {0, 2} and (lm == 2).sum() == 91
    # canonical ground truth reloads
    header, recs = read_records(out / "ground_truth.jsonl")
    assert header["kind"] == "ground_truth" and header["classes"] == ["crack", "hole"]
    assert len(recs) == 9 and sum(len(r) for r in recs) == 9
    r = next(r for r in recs if r.defect_type == "hole")
    assert r.decode_masks()[0].sum() == 91


def test_formats_option_and_train_good_backgrounds(small, tmp_path):
    root, manifest = small
    out = tmp_path / "c"
    report = convert(root, manifest, out, ConvertConfig(formats=("coco",), train_good=2), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.txt",
        "coco",
        "conversion.json",
        "fidelity.json",
        "ground_truth.jsonl",
    ]
    assert report["images"] == 11 and report["background_images"] == 5
    train = json.loads((out / "coco" / "train.json").read_text())
    assert sum("train/good" in im["file_name"] for im in train["images"]) == 2


def test_schemes_and_min_area(small, tmp_path):
    root, manifest = small
    r = convert(root, manifest, tmp_path / "a", ConvertConfig(scheme="single", formats=("yolo",)), progress=False)
    assert r["classes"] == ["defect"] and r["instances_per_class"] == {"defect": 9}
    r = convert(
        root,
        manifest,
        tmp_path / "b",
        ConvertConfig(scheme="category_defect", min_area=25, formats=("yolo",)),
        progress=False,
    )
    assert r["classes"] == ["bottle_crack", "bottle_hole"]
    assert r["regions_dropped_by_min_area"]["count"] == 3  # the 16-20 px crack parts; 33 px ones stay
    assert r["instances_per_class"] == {"bottle_crack": 3, "bottle_hole": 3}


def test_rerun_is_safe_and_workers_give_the_same_output(small, tmp_path):
    root, manifest = small
    out = tmp_path / "outs" / "conv"
    convert(root, manifest, out, progress=False)
    first = _tree(out)
    convert(root, manifest, out, ConvertConfig(workers=2), progress=False)
    assert _tree(out) == first
    assert [p.name for p in out.parent.iterdir()] == ["conv"]  # no temporary folders left


def _all_bytes(path):
    """Every output byte, the report and the canonical file included; only the header's creation time and
    the output folder's own path (in data.yaml) may differ."""
    here = str(path.resolve()).encode()
    tree = {p.relative_to(path).as_posix(): (os.readlink(p) if p.is_symlink() else p.read_bytes().replace(here, b"OUT"))
            for p in sorted(path.rglob("*")) if p.is_file()}
    head, _, rest = tree["ground_truth.jsonl"].partition(b"\n")
    tree["ground_truth.jsonl"] = json.dumps({**json.loads(head), "created": None}).encode() + b"\n" + rest
    return tree


def test_threads_and_processes_write_byte_identical_outputs(synthetic_root, tmp_path):
    manifest = build_manifest([index_category(synthetic_root, "washer"), index_category(synthetic_root, "weave")])
    trees = []
    for i, cfg in enumerate([ConvertConfig(threads=1), ConvertConfig(threads=4), ConvertConfig(workers=2)]):
        convert(synthetic_root, manifest, tmp_path / str(i), cfg, progress=False)
        trees.append(_all_bytes(tmp_path / str(i)))
    assert len(trees[0]) > 300 and trees[0] == trees[1] == trees[2]


def test_bad_masks_name_the_file_and_leave_the_old_output(small, tmp_path):
    root, manifest = small
    out = tmp_path / "outs" / "conv"
    convert(root, manifest, out, ConvertConfig(formats=("yolo",)), progress=False)
    before = _tree(out)
    mask = root / "bottle/ground_truth/hole/1_mask.png"
    mask.write_bytes(b"garbage")
    with pytest.raises(ConversionError, match="hole/1_mask.png"):
        convert(root, manifest, out, progress=False)
    cv2.imwrite(str(mask), np.zeros((16, 16), np.uint8))
    with pytest.raises(ConversionError, match=r"1_mask.png: mask is 16x16 .* is 48x32"):
        convert(root, manifest, out, progress=False)
    mask.unlink()
    with pytest.raises(ConversionError, match="1_mask.png does not exist"):
        convert(root, manifest, out, progress=False)
    assert _tree(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["conv"]


def test_unwritable_output_names_the_folder(small, tmp_path):
    root, manifest = small
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="file/conv"):
        convert(root, manifest, blocker / "conv", progress=False)


def test_empty_mask_is_skipped_and_reported(small, tmp_path):
    root, manifest = small
    cv2.imwrite(str(root / "bottle/ground_truth/crack/0_mask.png"), np.zeros((32, 48), np.uint8))
    r = convert(root, manifest, tmp_path / "c", ConvertConfig(formats=("yolo",)), progress=False)
    assert [s["image"] for s in r["skipped_images"]] == ["bottle/test/crack/0.png"]
    assert "empty mask" in r["skipped_images"][0]["reason"]
    assert not list((tmp_path / "c" / "yolo" / "labels").rglob("bottle__crack__0.txt"))


def test_unknown_category_in_manifest(small, tmp_path):
    root, manifest = small
    with pytest.raises(ConversionError, match="not in the split manifest"):
        convert(root, manifest, tmp_path / "c", categories=["screw"], progress=False)


# ---------------------------------------------------------------------------- real consumers


@pytest.mark.parametrize("fmt, task", [("yolo", "detect"), ("yolo_seg", "segment")])
def test_ultralytics_builds_its_dataset_with_no_corrupt_label(small, tmp_path, fmt, task, monkeypatch):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ycfg"))
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    root, manifest = small
    out = tmp_path / "conv"
    convert(root, manifest, out, progress=False)
    data = check_det_dataset(str(out / fmt / "data.yaml"))
    for fold in ("train", "val", "test"):
        ds = YOLODataset(img_path=data[fold], imgsz=64, data=data, task=task, augment=False)
        cache = np.load(str(out / fmt / "labels" / f"{fold}.cache"), allow_pickle=True).item()
        found, missing, empty, corrupt, total = cache["results"]
        assert corrupt == 0 and missing == 0 and found == total == len(ds.labels)
        n_lines = sum(len(p.read_text().splitlines()) for p in (out / fmt / "labels" / fold).glob("*.txt"))
        assert sum(len(lb["cls"]) for lb in ds.labels) == n_lines
        if task == "segment":
            assert sum(len(lb["segments"]) for lb in ds.labels) == n_lines


@pytest.mark.parametrize("polygons", [False, True])
def test_cocoeval_of_ground_truth_against_itself_is_perfect(small, tmp_path, polygons):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, manifest = small
    out = tmp_path / "conv"
    convert(root, manifest, out, ConvertConfig(formats=("coco",), coco_polygons=polygons), progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "coco" / "test.json"))
        dets = [
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": a["bbox"],
                "segmentation": gt.annToRLE(a),
                "score": 1.0,
            }
            for a in gt.dataset["annotations"]
        ]
        for a in dets:  # annToRLE hands back our str counts for RLE, bytes for polygons
            c = a["segmentation"]["counts"]
            a["segmentation"]["counts"] = c.decode() if isinstance(c, bytes) else c
        dt = gt.loadRes(dets)
        for iou_type in ("bbox", "segm"):
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ev.stats[0] == pytest.approx(1.0), iou_type  # AP@[.5:.95]


def test_fidelity_report_flags_faults_injected_into_the_written_files(small, tmp_path, monkeypatch):
    """The report is computed from the files read back: a shifted YOLO box, a dropped polygon vertex
    and a wrong COCO area, each injected after writing, are each flagged."""
    from defectkit.converters import convert as C

    root, manifest = small
    real_files, real_coco = C._write_image_files, C._write_coco

    def faulty_files(tmp, r, cfg):
        real_files(tmp, r, cfg)
        if "crack" in r.name:
            f = tmp / "yolo" / "labels" / r.fold / f"{r.name}.txt"
            lines = f.read_text().splitlines()
            cls, cx, cy, w, h = lines[0].split()
            lines[0] = f"{cls} {float(cx) + 0.05:.6f} {cy} {w} {h}"  # shifted right by 5 % of the width
            f.write_text("\n".join(lines) + "\n")
        if "hole" in r.name:
            g = tmp / "yolo_seg" / "labels" / r.fold / f"{r.name}.txt"
            first, *rest = g.read_text().splitlines()
            parts = first.split()
            g.write_text("\n".join([" ".join(parts[:-2]), *rest]) + "\n")  # the polygon loses its last vertex

    def faulty_coco(tmp, *a, **k):
        files = real_coco(tmp, *a, **k)
        path = next(iter(files.values()))
        doc = json.loads(path.read_text())
        doc["annotations"][0]["area"] += 7
        path.write_text(json.dumps(doc))
        return files

    monkeypatch.setattr(C, "_write_image_files", faulty_files)
    monkeypatch.setattr(C, "_write_coco", faulty_coco)
    f = convert(root, manifest, tmp_path / "conv", progress=False)["formats"]
    assert f["yolo"]["instance_iou"]["min"] < 0.9
    assert f["yolo_seg"]["instance_iou"]["min"] < 1.0
    assert f["coco"]["area_is_pixel_count"] is False
    assert f["voc"]["exact"] and f["coco"]["instance_iou"]["min"] == 1.0  # untouched formats stay exact


def test_bench_convert_says_what_it_wrote_to_and_leaves_nothing_behind(synthetic_root, tmp_path, capsys):
    from defectkit.converters import bench_convert as B

    assert B._filesystem(tmp_path).endswith(")") and B._filesystem(tmp_path) != str(tmp_path)
    assert B._filesystem(os.path.realpath("/proc/self")) == "/proc (proc)"
    args = B.get_args_parser().parse_args(["--data", str(synthetic_root), "--category", "washer", "--scale", "1",
                                           "--repeat", "1", "--tmp", str(tmp_path)])
    rows = B.main(args)
    first = next(iter(rows.values()))
    assert first["ratio_to_decode"] == 1.0 and all(r["masks_per_s"] > 0 for r in rows.values())
    assert any("fidelity check" in k and "the default" in k for k in rows)
    assert f"written to {B._filesystem(tmp_path)}" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # its copies and outputs are gone
