"""FiftyOne imports our COCO and YOLO exports with the same object counts (own mongod, own DB dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from defectkit.converters.convert import convert
from defectkit.datasets.mvtec import index_category
from defectkit.datasets.split import build_manifest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import fiftyone as fo
    out, root = sys.argv[1], sys.argv[2]
    counts = {}
    for fold in ("train", "val", "test"):
        coco = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=root,
                                   labels_path=f"{out}/coco/{fold}.json", label_types=["segmentations"],
                                   label_field="gt",
                                   name=f"coco-{fold}", overwrite=True)
        yolo = fo.Dataset.from_dir(dataset_dir=f"{out}/yolo", dataset_type=fo.types.YOLOv5Dataset,
                                   yaml_path="data.yaml", split=fold, label_field="gt", name=f"yolo-{fold}",
                                   overwrite=True)
        with_masks = sum(1 for s in coco for d in (s.gt.detections if s.gt else []) if d.mask is not None)
        counts[fold] = {
            "coco_samples": len(coco), "coco_objects": coco.count("gt.detections"),
            "coco_with_masks": with_masks,
            "yolo_samples": len(yolo), "yolo_objects": yolo.count("gt.detections"),
            "yolo_labels": sorted(yolo.distinct("gt.detections.label")),
        }
    print(json.dumps(counts))
    """
)


@pytest.mark.slow
def test_fiftyone_imports_coco_and_yolo_with_the_same_counts(mvtec_tree, blob_mask, tmp_path):
    items = {("test", "good", f"{i}"): None for i in range(3)}
    items |= {("test", "crack", f"{i}"): blob_mask(boxes=((2, 3, 12, 5), (30, 20, 33, 31))) for i in range(3)}
    items |= {("test", "hole", f"{i}"): blob_mask(boxes=((10, 10, 20, 20),)) for i in range(3)}
    root = mvtec_tree("bottle", items)
    out = tmp_path / "conv"
    report = convert(root, build_manifest([index_category(root, "bottle")]), out, progress=False)
    env = {
        **os.environ,
        "FIFTYONE_DATABASE_DIR": str(tmp_path / "fodb"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
    }
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), str(root)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    per_fold = report["instances_per_fold"]
    for fold, c in counts.items():
        n = sum(per_fold.get(fold, {}).values())
        assert c["coco_objects"] == c["yolo_objects"] == n, (fold, c)
        assert c["coco_with_masks"] == n  # RLE came through as instance masks
        assert c["coco_samples"] == c["yolo_samples"] == 3
        assert set(c["yolo_labels"]) <= {"crack", "hole"}
