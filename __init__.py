"""defectkit: defect detection and segmentation fine-tuning suite for MVTec-layout data.

The repository root *is* the ``defectkit`` package (``pyproject.toml`` maps ``defectkit`` to
``.``), so that the top-level folders are imported as ``defectkit.datasets`` and so on.  Those
folders deliberately have no ``__init__.py``: a folder called ``datasets`` with one would shadow
Hugging Face's ``datasets`` for any process started in the repository root.  As namespace
portions they lose to any installed regular package of the same name, and
``tests/test_packaging.py`` proves it.

The data flow, and the direction every import follows (``tests/test_architecture.py``)::

    core -> datasets -> converters -> review -> anomaly, finetune

``core`` is shared infrastructure (errors, CLI runner, atomic writes, the work folder);
``review`` holds the metrics every model family uses, the comparison and the FiftyOne dataset,
and reads runs only through their canonical predictions files, never model code.
"""

__version__ = "0.2.0"
