"""`python -m defectkit.datasets` end to end, as `make demo` / `make stats` call it."""

from __future__ import annotations

import json
import subprocess
import sys


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "defectkit.datasets", *args, "-q"], cwd=cwd,
                          capture_output=True, text=True)


def test_demo_writes_stats_and_manifest(mvtec_tree, blob_mask, tmp_path):
    items = {("train", "good", f"{i}"): None for i in range(3)}
    items |= {("test", "good", f"{i}"): None for i in range(3)}
    items |= {("test", "scratch", f"{i}"): blob_mask() for i in range(3)}
    root = mvtec_tree("metal_nut", items)
    out = tmp_path / "out"
    r = _cli("demo", "--data", str(root), "--category", "metal_nut", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| scratch" in r.stdout and "split manifest (seed 0)" in r.stdout
    stats = json.loads((out / "stats" / "metal_nut.json").read_text())
    assert stats["per_type"]["scratch"]["images"] == 3
    assert (out / "stats" / "metal_nut_defect_sizes.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["metal_nut"]["scratch"] == {"train": 1, "val": 1, "test": 1}
    # rerun is safe and gives the same manifest
    first = (out / "manifest.json").read_bytes()
    assert _cli("split", "--data", str(root), "--out", str(out), cwd=tmp_path).returncode == 0
    assert (out / "manifest.json").read_bytes() == first


def test_layout_error_exits_2_and_names_the_file(mvtec_tree, blob_mask, tmp_path):
    root = mvtec_tree("metal_nut", {("test", "scratch", "0"): blob_mask()})
    (root / "metal_nut/ground_truth/scratch/0_mask.png").unlink()
    r = _cli("validate", "--data", str(root), cwd=tmp_path)
    assert r.returncode == 2
    assert "metal_nut/test/scratch/0.png: defect image has no mask" in r.stderr
    r = _cli("stats", "--data", str(root), "--category", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "unknown category 'nope'" in r.stderr
