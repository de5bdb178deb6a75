"""Shared fixtures: MVTec-layout trees built on disk with known answers, and the real data."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_image(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` (gray or RGB uint8) with the codec of ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr
    assert cv2.imwrite(str(path), a), path
    return path


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> Callable[..., Path]:
    """Build ``<root>/<category>/...`` from a dict ``{(split, defect, stem): mask or None}``.

    Images are mid-grey ``hw`` images (RGB unless ``gray``); masks are written as
    ``ground_truth/<defect>/<stem>_mask.png`` scaled by ``mask_value``.
    """

    def build(category: str, items: dict, *, hw=(32, 48), gray=False, ext=".png", mask_value=255,
              root: Path | None = None) -> Path:
        root = root or tmp_path / "root"
        rng = np.random.default_rng(0)
        for (split, defect, stem), mask in items.items():
            shape = hw if gray else (*hw, 3)
            img = rng.integers(60, 200, shape, dtype=np.uint8)
            write_image(root / category / split / defect / f"{stem}{ext}", img)
            if mask is not None:
                m = (np.asarray(mask) > 0).astype(np.uint8) * mask_value
                write_image(root / category / "ground_truth" / defect / f"{stem}_mask.png", m)
        return root

    return build


def _blob_mask(hw=(32, 48), boxes=((4, 4, 10, 9),)) -> np.ndarray:
    m = np.zeros(hw, bool)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def blob_mask() -> Callable[..., np.ndarray]:
    """``blob_mask(hw, boxes)``: bool mask with filled half-open ``(x0, y0, x1, y1)`` rectangles."""
    return _blob_mask


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from defectkit.datasets.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth") / "defectkit_synth", progress=False)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present: {SHARED_DATA} (../shared/data beside the repo) is absent")
    return SHARED_DATA


@pytest.fixture
def auroc_from_scores() -> Callable[[Path], float]:
    """The image AUROC recomputed from a run's own ``scores.csv`` (what it wrote, per test image), so a
    metric in ``metrics.json`` can be checked against the scores it claims to summarise."""
    import csv

    from defectkit.review.metrics import auroc

    def compute(run: Path) -> float:
        rows = list(csv.DictReader((Path(run) / "scores.csv").open()))
        return auroc(np.array([float(r["score"]) for r in rows]), np.array([int(r["label"]) for r in rows]))

    return compute


def pytest_configure(config):
    """Under ``pytest -n N`` each worker computes on one thread, and so do the processes it starts
    (OMP_NUM_THREADS, which torch and our YOLO wrapper read): N workers of every-core torch on N cores
    spend much of their time contending (measured: 68 s -> 37 s for four anomaly tests, -n 2, 2 cores)."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers > 1:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        cv2.setNumThreads(1)


def _starts_fiftyone(source: str) -> bool:
    """A test whose source (decorators included) names FiftyOne or the App page starts FiftyOne's database
    (``make demo``'s last stage does: its test is marked ``fiftyone`` by hand)."""
    return any(k in source.lower() for k in ("fiftyone", "app_page"))


@functools.cache
def _fiftyone_test_ids(root: Path = REPO / "tests") -> frozenset[str]:
    """``path::name`` of every test :func:`_starts_fiftyone` picks, read from the test files' source once: the
    workers mark those tests, and xdist's controller, which schedules by node id and never collects, keeps
    them together."""
    import ast

    ids = set()
    for path in sorted(root.rglob("test_*.py")):
        text = path.read_text()
        lines = text.splitlines()
        rel = path.relative_to(REPO).as_posix()
        for node in ast.parse(text).body:
            for fn, prefix in ([(node, "")] if isinstance(node, ast.FunctionDef) else
                               [(f, f"{node.name}::") for f in node.body if isinstance(f, ast.FunctionDef)]
                               if isinstance(node, ast.ClassDef) else []):
                first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
                if fn.name.startswith("test") and _starts_fiftyone("\n".join(lines[first - 1 : fn.end_lineno])):
                    ids.add(f"{rel}::{prefix}{fn.name}")
    return frozenset(ids)


def pytest_collection_modifyitems(config, items):
    """Tests that start FiftyOne's database are marked ``fiftyone``; :func:`one_fiftyone_at_a_time`
    serialises them."""
    for item in items:
        if item.nodeid.split("[")[0] in _fiftyone_test_ids():
            item.add_marker(pytest.mark.fiftyone)


def pytest_xdist_make_scheduler(config, log):
    """xdist's load scheduling, with every FiftyOne test in one work unit: one worker runs them one after
    the other (their lock then never makes the other worker wait: it waited ~95 s a run when both drew
    them at once), the rest is shared test by test.  The unit has the most tests, so it is sent first."""
    from xdist.scheduler import LoadScopeScheduling

    class FiftyOneTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "fiftyone" if nodeid.split("[")[0] in _fiftyone_test_ids() else nodeid

    return FiftyOneTogether(config, log)


@pytest.fixture(autouse=True)
def one_fiftyone_at_a_time(request, tmp_path_factory):
    """Two FiftyOne processes started side by side with different database folders can reach the same
    database service, and one then misses the dataset the other made ("Dataset dk-app not found" in CI):
    under ``pytest -n N`` the ``fiftyone`` tests run on one worker (:func:`pytest_xdist_make_scheduler`) and
    also take one lock shared by every worker, which holds when a run is scheduled otherwise (``--dist``).
    (Not xdist's ``--dist loadgroup``: with pytest 9 that option no longer groups.)"""
    if request.node.get_closest_marker("fiftyone") is None:
        yield
        return
    import fcntl

    lock = tmp_path_factory.getbasetemp().parent / "fiftyone.lock"  # pytest-N/, above every worker's folder
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
