"""The split manifest: stratified, seeded, stable across processes, order and machines."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from defectkit.datasets.mvtec import index_dataset
from defectkit.datasets.split import (
    FOLDS,
    assign_folds,
    build_manifest,
    entries,
    fold_counts,
    read_manifest,
    write_manifest,
)

F = {"train": 0.4, "val": 0.2, "test": 0.4}


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, (0, 0, 0)),
        (1, (1, 0, 0)),
        (2, (1, 0, 1)),
        (3, (1, 1, 1)),  # every fold gets one once there are enough
        (5, (2, 1, 2)),
        (10, (4, 2, 4)),
        (16, (7, 3, 6)),  # 6.4/3.2/6.4: the one left over goes to the earlier fold
    ],
)
def test_fold_counts(n, expected):
    c = fold_counts(n, F)
    assert tuple(c[f] for f in FOLDS) == expected
    assert sum(c.values()) == n


def test_fold_counts_respects_zero_fraction_and_rejects_nonsense():
    assert fold_counts(10, {"train": 0.5, "val": 0.0, "test": 0.5}) == {"train": 5, "val": 0, "test": 5}
    with pytest.raises(ValueError, match="positive sum"):
        fold_counts(3, {"train": 0, "val": 0, "test": 0})


def _keys():
    keys, strata = [], []
    for d, n in [("good", 12), ("crack", 9), ("hole", 3), ("tiny", 1)]:
        for i in range(n):
            keys.append(f"cat/test/{d}/{i:03d}")
            strata.append(d)
    return keys, strata


def test_assign_folds_is_stratified():
    keys, strata = _keys()
    folds = assign_folds(keys, strata, seed=0, fractions=F)
    per = Counter((s, folds[k]) for k, s in zip(keys, strata, strict=True))
    for d, n in [("good", 12), ("crack", 9), ("hole", 3)]:
        got = tuple(per[(d, f)] for f in FOLDS)
        assert got == tuple(fold_counts(n, F)[f] for f in FOLDS)
        assert min(got) >= 1, f"{d} must appear in every fold"
    assert per[("tiny", "train")] == 1


def test_assign_folds_depends_on_seed_not_on_input_order():
    keys, strata = _keys()
    a = assign_folds(keys, strata, seed=0)
    pairs = list(zip(keys, strata, strict=True))
    random.Random(1).shuffle(pairs)
    b = assign_folds([k for k, _ in pairs], [s for _, s in pairs], seed=0)
    assert a == b
    assert assign_folds(keys, strata, seed=1) != a


def test_adding_an_image_moves_few_others():
    keys, strata = _keys()
    a = assign_folds(keys, strata, seed=0)
    b = assign_folds([*keys, "cat/test/good/999"], [*strata, "good"], seed=0)
    moved = sum(a[k] != b[k] for k in keys)
    assert moved <= 2


def test_assign_folds_rejects_bad_input():
    with pytest.raises(ValueError, match="unique"):
        assign_folds(["a", "a"], ["x", "x"], 0)
    with pytest.raises(ValueError, match="length"):
        assign_folds(["a"], [], 0)


def test_manifest_on_synthetic_data(synthetic_root, tmp_path):
    idx = index_dataset(synthetic_root)
    m = build_manifest(idx, seed=0)
    path = write_manifest(m, tmp_path / "manifest.json")
    back = read_manifest(path)
    assert back == m
    n_images = sum(len(i.samples) for i in idx)
    assert len(back["entries"]) == n_images == len({e["key"] for e in back["entries"]})
    # train/good always goes to the training fold, and is marked as the dataset's train split
    train_good = entries(back, source_split="train")
    assert train_good and {e.fold for e in train_good} == {"train"}
    assert {e.defect_type for e in train_good} == {"good"}
    for cat in back["categories"]:
        held = entries(back, category=cat, source_split="test")
        for d in {e.defect_type for e in held}:
            folds = Counter(e.fold for e in held if e.defect_type == d)
            assert set(folds) == set(FOLDS), (cat, d, folds)
            assert back["counts"][cat][d] == {f: folds[f] for f in FOLDS}
    # paths are relative to the root and point at real files
    for e in back["entries"]:
        assert (synthetic_root / e["image"]).is_file()
        assert e["mask"] is None or (synthetic_root / e["mask"]).is_file()


def test_manifest_is_identical_in_another_process(synthetic_root, tmp_path):
    """Same seed, same bytes: hash randomisation and process state must not matter."""
    ours = write_manifest(build_manifest(index_dataset(synthetic_root), seed=3), tmp_path / "a.json")
    code = (
        "import sys; from defectkit.datasets.mvtec import index_dataset;"
        "from defectkit.datasets.split import build_manifest, write_manifest;"
        "write_manifest(build_manifest(index_dataset(sys.argv[1]), seed=3), sys.argv[2])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(synthetic_root), str(tmp_path / "b.json")],
                   check=True, env=env, cwd=tmp_path)
    assert ours.read_bytes() == (tmp_path / "b.json").read_bytes()


def test_read_manifest_errors_name_the_file(tmp_path):
    p = tmp_path / "m.json"
    with pytest.raises(FileNotFoundError, match="make split"):
        read_manifest(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="m.json is not valid JSON"):
        read_manifest(p)
    p.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="m.json is not a split manifest"):
        read_manifest(p)
    p.write_text(json.dumps({"format": "defectkit.split_manifest/1", "entries": [{"key": "k", "fold": "dev"}]}))
    with pytest.raises(ValueError, match="fold 'dev'"):
        read_manifest(p)


def test_fractions_are_checked(synthetic_root):
    with pytest.raises(ValueError, match="keyed by"):
        build_manifest(index_dataset(synthetic_root, "weave"), fractions={"train": 1, "dev": 1})


def test_a_category_split_later_joins_the_manifest_as_if_split_together(mvtec_tree, blob_mask, tmp_path):
    from defectkit.datasets.split import load_or_build_manifest, merge_into

    for cat in ("screw", "bottle"):
        items = {("train", "good", f"{i}"): None for i in range(3)}
        items |= {("test", "good", f"{i}"): None for i in range(5)} | {("test", "crack", f"{i}"): blob_mask()
                                                                          for i in range(5)}
        root = mvtec_tree(cat, items)
    together = build_manifest(index_dataset(root, "all"), seed=3)
    path = tmp_path / "manifest.json"
    merge_into(path, build_manifest(index_dataset(root, "screw"), seed=3))
    m = load_or_build_manifest(root, path, "bottle", seed=3)  # asked for a category the file lacks: added
    assert sorted(m["categories"]) == ["bottle", "screw"]
    key = sorted  # the same folds for every image as one split of both
    assert key((e["key"], e["fold"]) for e in m["entries"]) == key((e["key"], e["fold"]) for e in together["entries"])
    again = merge_into(path, build_manifest(index_dataset(root, "screw"), seed=3))  # a rerun of one category
    assert sorted(again["categories"]) == ["bottle", "screw"] and len(again["entries"]) == len(m["entries"])
    merge_into(path, build_manifest(index_dataset(root, "screw"), seed=4))  # another seed replaces the file
    assert json.loads(path.read_text())["categories"] == ["screw"]
