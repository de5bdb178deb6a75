"""Atomic writes: a crash or an error leaves the old output or none, never half of it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from defectkit.core.errors import ConfigError, OutputError


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj, *, indent: int | None = 1) -> Path:
    """JSON (NaN kept as ``NaN``, numpy scalars as floats), written atomically, newline-terminated."""
    import json

    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def touch_atomic(path: Path) -> Path:
    """An (empty) marker file such as ``.done``, created in one rename."""
    return atomic_write_bytes(path, b"")


def atomic_torch_save(obj, path: Path) -> Path:
    """``torch.save`` to a temporary file, then one rename: a killed run never leaves half a
    checkpoint.  Save tensors and plain Python values only, so that ``torch.load(...,
    weights_only=True)`` can read it back (a checkpoint on disk must not be able to run code)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint the suite wrote, with ``weights_only=True``: tensors and plain values
    only, never code.

    Raises:
        MissingFileError: ``path`` does not exist.
        UnreadableFileError: not a checkpoint, or one holding objects other than tensors and
            plain values (which would need unpickling code).
    """
    import pickle

    import torch

    from defectkit.core.errors import MissingFileError, UnreadableFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise UnreadableFileError(f"cannot load checkpoint {path} safely (weights_only=True): "
                                  f"{str(e).splitlines()[0]}") from e


@contextlib.contextmanager
def atomic_dir(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    On any exception the temporary folder is removed and ``final`` is left as it was.

    Raises:
        UnreadableFileError: the parent of ``final`` cannot be made or written (named in the message).
        ConfigError: ``final`` exists and ``replace`` is False.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except OSError as e:
        raise OutputError(f"cannot write output folder {final}: {e.strerror}") from e
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise ConfigError(f"{final} exists; remove it or allow replacing it")
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
