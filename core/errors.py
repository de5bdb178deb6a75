"""One base error for everything a user can cause; anything else is a bug and shows its traceback.

Every expected, user-facing error of the suite is a :class:`DefectkitError`.  The subclasses
also derive from the built-in error a caller would naturally catch (``ValueError``,
``FileNotFoundError``, ``OSError``), so ``except ValueError`` keeps working around our calls,
while the CLI runner (:mod:`defectkit.core.cli`) catches only ``DefectkitError``.
"""

from __future__ import annotations


class DefectkitError(Exception):
    """An expected error the user can fix; its message names the file or flag and the fix."""


class ConfigError(DefectkitError, ValueError):
    """A flag, a config value or a combination of them that cannot work."""


class DataError(DefectkitError, ValueError):
    """Input data (a dataset, a manifest, a predictions file, a mask) breaks its contract."""


class MissingFileError(DefectkitError, FileNotFoundError):
    """A file or folder the run needs is not there (weights, a run folder, a conversion)."""


class UnreadableFileError(DefectkitError, OSError):
    """A file exists but cannot be read or decoded (truncated, corrupt, not an image)."""


class TrainingError(DefectkitError, RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint from another model)."""


class OutputError(DefectkitError, OSError):
    """An output cannot be written (no permission, a full disk, a name taken by a file)."""


class OutputExistsError(DefectkitError, FileExistsError):
    """An output path is taken by something the suite did not write; it is never overwritten."""
