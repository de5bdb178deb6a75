"""The work folder: everything a run writes (git-ignored): data, outputs, runs, caches, databases."""

from __future__ import annotations

from pathlib import Path

#: the repository root (the ``defectkit`` package)
ROOT = Path(__file__).resolve().parents[1]
#: everything a run writes
WORK = ROOT / "work"
