"""The house plan: imports follow the data flow, one error type reaches the user, checkpoints hold no code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: top-level packages in data-flow order; a package may import only those before it (and itself)
LAYERS = ["core", "datasets", "converters", "review", "anomaly", "finetune", "deploy"]


def package_imports() -> dict[str, set[str]]:
    """``{package: packages it imports}`` from every ``import defectkit.<pkg>...`` in its files,
    at module level or inside functions (a function-level import is still a dependency)."""
    edges: dict[str, set[str]] = {p: set() for p in LAYERS}
    for pkg in LAYERS:
        for f in (REPO / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for n in names:
                    parts = n.split(".")
                    if parts[0] == "defectkit" and len(parts) > 1 and parts[1] in edges and parts[1] != pkg:
                        edges[pkg].add(parts[1])
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the package graph as a list of names (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycle_between_top_level_packages():
    assert find_cycle(package_imports()) is None


def module_imports() -> dict[str, set[tuple[str, str]]]:
    """``{"pkg.module": {("pkg.other", name imported or "")}}`` for every import of the project's own files,
    at module level or inside functions (a lazy import hides a dependency, it does not remove it)."""
    files = {f"{f.parent.name}.{f.stem}": f for pkg in LAYERS for f in (REPO / pkg).glob("*.py")}
    edges: dict[str, set[tuple[str, str]]] = {m: set() for m in files}
    for mod, f in files.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            found: list[tuple[str, str]] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("defectkit."):
                target = node.module.removeprefix("defectkit.")
                for a in node.names:
                    if f"{target}.{a.name}" in files:  # ``from defectkit.pkg import module``
                        found.append((f"{target}.{a.name}", ""))
                    elif target in files:
                        found.append((target, a.name))
            elif isinstance(node, ast.Import):
                found = [(a.name.removeprefix("defectkit."), "") for a in node.names
                         if a.name.removeprefix("defectkit.") in files]
            edges[mod] |= {(t, n) for t, n in found if t != mod}
    return edges


def test_no_import_cycle_between_files():
    graph = {m: {t for t, _ in e} for m, e in module_imports().items()}
    assert find_cycle(graph) is None, f"import cycle between files: {' -> '.join(find_cycle(graph))}"


def test_no_private_name_is_imported_from_another_module():
    """A ``_name`` is private to its module: another module that needs it means it should be public."""
    private = sorted(f"{m} imports {t}.{n}" for m, e in module_imports().items() for t, n in e
                     if n.startswith("_"))
    assert private == []


def test_the_file_import_checks_see_a_planted_cycle_and_a_private_import(tmp_path, monkeypatch):
    """Break the house on purpose (in a copy): both checks must notice."""
    import shutil

    copy = tmp_path / "repo"
    for pkg in LAYERS:
        shutil.copytree(REPO / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "core" / "planted_a.py").write_text("def f():\n    from defectkit.core.planted_b import g\n")
    (copy / "core" / "planted_b.py").write_text("from defectkit.core.planted_a import f\n"
                                                  "from defectkit.core.errors import _hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", copy)
    graph = {m: {t for t, _ in e} for m, e in module_imports().items()}
    assert find_cycle(graph) == ["core.planted_a", "core.planted_b", "core.planted_a"]
    assert ("core.errors", "_hidden") in module_imports()["core.planted_b"]


def test_imports_follow_the_data_flow():
    """core <- datasets <- converters <- review <- {anomaly, finetune} <- deploy: nothing imports back up."""
    back = {(p, q) for p, qs in package_imports().items() for q in qs if LAYERS.index(q) > LAYERS.index(p)}
    # the two model families sit side by side: neither may import the other
    back |= {(p, q) for p, qs in package_imports().items() for q in qs if {p, q} == {"anomaly", "finetune"}}
    assert back == set(), f"imports against the data flow: {sorted(back)}"


def test_every_torch_load_of_our_files_is_weights_only():
    """A checkpoint found on disk must never be able to run code (``weights_only=True``)."""
    offenders = []
    for pkg in LAYERS:
        for f in (REPO / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                        and getattr(node.func.value, "id", None) == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                        offenders.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_a_checkpoint_holding_code_is_refused(tmp_path):
    import argparse

    import torch

    from defectkit.core.atomic import atomic_torch_save, load_checkpoint
    from defectkit.core.errors import UnreadableFileError

    # any pickled object other than tensors and plain values (here a Namespace) needs code to load
    torch.save({"model": argparse.Namespace(x=1)}, tmp_path / "evil.pt")
    with pytest.raises(UnreadableFileError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    atomic_torch_save({"w": torch.ones(2), "epoch": 3, "history": [{"loss": 0.5}]}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob("*.tmp"))


def _cli(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


def test_cli_turns_only_defectkit_errors_into_exit_2():
    user = _cli("import argparse\nfrom defectkit.core.cli import run_cli\nfrom defectkit.core.errors import DataError\n"
                "def main(a): raise DataError('mask x.png is 10x10, its image 20x20')\n"
                "raise SystemExit(run_cli(argparse.ArgumentParser(), main, []))")
    assert user.returncode == 2
    assert user.stderr.strip() == "error: mask x.png is 10x10, its image 20x20"
    bug = _cli("import argparse\nfrom defectkit.core.cli import run_cli\n"
               "def main(a): return {}['missing']\n"
               "raise SystemExit(run_cli(argparse.ArgumentParser(), main, []))")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError" in bug.stderr


def test_user_errors_are_defectkit_errors_and_builtin_ones_too():
    from defectkit.core import errors as E

    for cls in (E.ConfigError, E.DataError, E.MissingFileError, E.UnreadableFileError, E.TrainingError):
        assert issubclass(cls, E.DefectkitError)
    assert issubclass(E.MissingFileError, FileNotFoundError) and issubclass(E.DataError, ValueError)


@pytest.mark.parametrize("script", ["anomaly/train.py", "finetune/yolo.py", "finetune/sam.py"])
def test_training_scripts_share_their_flags(script):
    """The same flag for the same thing in every training script (README: 'Flags the scripts share')."""
    r = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for flag in ["--out", "--lr", "--imgsz", "--epochs", "--batch", "--augment", "--category", "--seed", "--device",
                 "--resume", "--quiet", "--patience"]:
        assert flag in r.stdout, f"{script} has no {flag}"
