"""The work folder: everything a run writes (git-ignored): data, outputs, runs, caches, databases."""

from __future__ import annotations

import os
from pathlib import Path

#: the repository root (the ``defectkit`` package)
ROOT = Path(__file__).resolve().parents[1]
#: everything a run writes; ``DEFECTKIT_WORK`` (set by ``make WORK=...``) moves it
WORK = Path(os.environ["DEFECTKIT_WORK"]).resolve() if os.environ.get("DEFECTKIT_WORK") else ROOT / "work"
