"""Reading images and masks, with errors that name the file.  The only file I/O of datasets/."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectkit.core.errors import UnreadableFileError

# Channels a PIL mode decodes to for this suite: grey (+alpha) is 1, palette decodes to RGB.
_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "I;16B": 1, "F": 1, "P": 3, "RGB": 3}


class ImageReadError(UnreadableFileError):
    """A file that should be an image could not be read or decoded."""


def read_header(path: str | Path) -> tuple[tuple[int, int], int]:
    """``((height, width), channels)`` from the file header, without decoding pixels.

    Raises:
        ImageReadError: the file is missing, empty, or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            channels = _MODE_CHANNELS.get(im.mode, len(im.getbands()))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, ImportError) as e:
        # ImportError: Ultralytics patches Image.open to try pi_heif on unidentified files
        raise ImageReadError(f"cannot read image header of {path}: {e}") from e
    return (h, w), channels


_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def check_complete(path: str | Path) -> None:
    """Cheap integrity check without decoding pixels, as Ultralytics' dataset check does: a JPEG
    must end with its EOI marker (``FF D9``), a PNG with its ``IEND`` chunk (CRC included); any
    other format must pass PIL's ``verify()``.  Catches truncated files whose header is intact.

    Raises:
        ImageReadError: the file is truncated or corrupt (named in the message).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 12))
            tail = f.read()
    except OSError as e:
        raise ImageReadError(f"cannot read {path}: {e.strerror}") from e
    if head[:2] == b"\xff\xd8" or suffix in (".jpg", ".jpeg"):
        # some encoders pad after EOI; accept the marker within the last bytes
        if b"\xff\xd9" not in tail:
            raise ImageReadError(f"{path} is a truncated JPEG (no end-of-image marker): re-export or remove it")
        return
    if head == b"\x89PNG\r\n\x1a\n" or suffix == ".png":
        if tail != _PNG_IEND:
            raise ImageReadError(f"{path} is a truncated PNG (no IEND chunk at its end): re-export or remove it")
        return
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for a corrupt file
        raise ImageReadError(f"{path} is corrupt: {e}") from e


def _imread(path: Path, flags: int) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise ImageReadError(f"{path} does not exist")
    data = np.fromfile(path, dtype=np.uint8)  # fromfile + imdecode: works with any path
    if data.size == 0:
        raise ImageReadError(f"{path} is empty (0 bytes)")
    img = cv2.imdecode(data, flags)
    if img is None:
        raise ImageReadError(f"cannot decode {path}: corrupt or not an image")
    return img


def read_image(path: str | Path, *, rgb: bool = True) -> np.ndarray:
    """Decode an image to ``(H, W, 3)`` uint8 RGB (``rgb=True``) or as stored.

    Truncated files are detected (PIL's full decode), not silently padded as OpenCV does.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # raises on truncated data
            if not rgb:
                return np.asarray(im)
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise ImageReadError(f"{path} does not exist") from e
    except (OSError, ValueError, SyntaxError, ImportError) as e:
        raise ImageReadError(f"cannot decode {path}: {e}") from e


def read_mask(path: str | Path, *, binary: bool = True) -> np.ndarray:
    """Decode a mask.  ``binary=True``: ``(H, W)`` bool, defect wherever any channel > 0.
    ``binary=False``: the raw ``(H, W)`` array (channels reduced by max), any dtype."""
    import cv2

    raw = _imread(Path(path), cv2.IMREAD_UNCHANGED)
    if raw.ndim == 3:
        raw = raw.max(axis=2)
    return raw > 0 if binary else raw
