"""Our modules are the ones imported, and none of them shadows an installed package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = ["datasets", "converters", "finetune", "anomaly"]


def _run(code: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_top_level_layout():
    for name in [*TOP, "tests"]:
        assert (REPO / name).is_dir(), name
    for name in ["Makefile", "README.md", "pyproject.toml", ".ci/run", "requirements.lock"]:
        assert (REPO / name).is_file(), name
    # A top-level folder with __init__.py would shadow an installed package of the same name
    # for every process started in the repo root (Hugging Face's `datasets`, for one).
    assert [n for n in TOP if (REPO / n / "__init__.py").exists()] == []


def test_installed_datasets_package_wins_over_our_folder(tmp_path):
    fake_site = tmp_path / "site"
    (fake_site / "datasets").mkdir(parents=True)
    (fake_site / "datasets" / "__init__.py").write_text("HUGGING_FACE = True\n")
    code = (
        "import datasets, defectkit.datasets.mvtec as m, defectkit;"
        "print(getattr(datasets, 'HUGGING_FACE', False)); print(m.__file__); print(defectkit.__file__)"
    )
    # cwd = repo root: the worst case, since '' (the root) is first on sys.path
    r = _run(code, REPO, {"PYTHONPATH": str(fake_site)})
    assert r.returncode == 0, r.stderr
    hf, mvtec, pkg = r.stdout.split()
    assert hf == "True"
    assert Path(mvtec) == REPO / "datasets" / "mvtec.py"
    assert Path(pkg) == REPO / "__init__.py"


def _our_module_names() -> list[str]:
    return sorted({p.stem for d in TOP for p in (REPO / d).glob("*.py") if p.stem != "__main__"})


def test_no_module_of_ours_shares_a_name_with_an_installed_or_stdlib_module(tmp_path):
    """`python finetune/yolo.py` puts finetune/ first on sys.path, so a finetune/ultralytics.py
    (or a datasets/types.py) would hijack that import for the whole process."""
    names = _our_module_names()
    assert names, "expected modules in the top-level folders"
    code = (
        "import importlib.util, sys; names = sys.argv[1:];"
        "print(' '.join(n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n)))"
    )
    r = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []


def test_module_cli_runs_from_anywhere(tmp_path):
    r = subprocess.run([sys.executable, "-m", "defectkit.datasets", "--help"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "split manifest" in r.stdout


SCRIPTS = sorted(p for d in ["finetune", "anomaly"] for p in (REPO / d).glob("*.py")
                 if 'if __name__ == "__main__"' in p.read_text() and p.stem != "__main__")


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_import_our_packages_from_any_cwd(script, tmp_path):
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()
