"""defectkit: defect detection and segmentation fine-tuning suite for MVTec-layout data.

The repository root *is* the ``defectkit`` package (``pyproject.toml`` maps ``defectkit`` to
``.``), so that the top-level folders ``datasets/``, ``converters/``, ``finetune/`` and
``anomaly/`` are imported as ``defectkit.datasets`` and so on.  Those folders deliberately have
no ``__init__.py``: a folder called ``datasets`` with one would shadow Hugging Face's
``datasets`` for any process started in the repository root.  As namespace portions they lose
to any installed regular package of the same name, and ``tests/test_packaging.py`` proves it.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

#: everything a run writes (git-ignored): data, outputs, runs, caches, databases
WORK = _Path(__file__).resolve().parent / "work"
