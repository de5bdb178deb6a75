"""The work folder: everything a run writes (git-ignored): data, outputs, runs, caches, databases."""

from __future__ import annotations

import os
from pathlib import Path

from defectkit.core.errors import ConfigError

#: the repository root (the ``defectkit`` package)
ROOT = Path(__file__).resolve().parents[1]
#: everything a run writes: ``./work`` of the directory the command runs in (never inside an installed package);
#: ``DEFECTKIT_WORK`` (set by ``make WORK=...``) moves it
WORK = Path(os.environ.get("DEFECTKIT_WORK") or Path.cwd() / "work").resolve()


def claim_run_dir(run: Path, resume: bool = False, exist_ok: bool = False) -> Path:
    """Create the run folder ``run`` for a new training run, refusing to train silently over a finished one
    (a folder with ``metrics.json``) unless ``resume`` or ``exist_ok`` (or ``DEFECTKIT_EXIST_OK=1``, which
    ``make ... FORCE=1`` sets) says so.  An interrupted run (no ``metrics.json``) is reused: its checkpoints
    are what ``--resume`` continues.  Raises :class:`~defectkit.core.errors.ConfigError` naming the folder."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"{run}: the run folder is an existing file; pass another --out")
    if (run / "metrics.json").is_file() and not (resume or exist_ok or os.environ.get("DEFECTKIT_EXIST_OK") == "1"):
        under_make = " (through make: FORCE=1 trains over it)" if os.environ.get("MAKELEVEL") else ""
        raise ConfigError(f"{run} already holds a finished run (metrics.json): pass --exist-ok to train over it"
                          f"{under_make}, --resume to continue it, or another --out")
    run.mkdir(parents=True, exist_ok=True)
    return run
