"""``<run>/deploy.json``: what a trained run needs on new images (weights, thresholds, preprocessing).

One reader and one writer for every run kind (anomaly, yolo, sam, sam_cascade); each model family
decides what goes in it, this module only names the file, stamps the format and checks the kind.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from defectkit.core.atomic import atomic_write_json
from defectkit.core.errors import DataError, MissingFileError

FORMAT = "defectkit.deploy/1"
NAME = "deploy.json"


def write_deploy_spec(run: Path, kind: str, **fields) -> dict:
    spec = {"format": FORMAT, "kind": kind, **fields}
    atomic_write_json(Path(run) / NAME, spec)
    return spec


def read_deploy_spec(run: Path, kinds: Iterable[str] | None = None, missing: str = "") -> dict:
    """The run's spec; :class:`MissingFileError` (with ``missing`` as the hint) when absent,
    :class:`DataError` when it is not JSON, not this format, or of a kind not in ``kinds``."""
    path = Path(run) / NAME
    if not path.is_file():
        raise MissingFileError(f"{path} not found" + (f": {missing}" if missing else ""))
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e})") from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} file")
    if kinds is not None and spec.get("kind") not in set(kinds):
        raise DataError(f"{path}: a {spec.get('kind')!r} run, not {' or '.join(sorted(set(kinds)))}")
    return spec
