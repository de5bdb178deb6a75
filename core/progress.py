"""Progress that reads well in a terminal and in a log.

In a terminal: a tqdm bar.  Otherwise (output redirected to a file, CI, ``make demo > log``): one
plain line every ``every`` seconds and one at the end, instead of carriage-return bar updates that
pile up into single lines of thousands of characters.  tqdm has no such mode; this wrapper adds it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


class LineProgress:
    """A tqdm-compatible subset (iteration, ``set_postfix``, ``update``, ``close``) printing lines."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "", total: int | None = None,
                 initial: int = 0, every: float = 30.0, stream=None, unit: str = "it"):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) + initial if hasattr(iterable, "__len__") else None)
        self.n, self.every, self.stream = initial, every, stream or sys.stderr
        self.postfix = ""
        self.t0 = self.last = time.perf_counter()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}{of} {self.unit}, {time.perf_counter() - self.t0:.0f}s{extra}"

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        print(self._line(), file=self.stream, flush=True)

    def __iter__(self) -> Iterator:
        for x in self.iterable:
            yield x
            self.update()
        self.close()


class _Silent(LineProgress):
    def update(self, k: int = 1) -> None:
        self.n += k

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, disable: bool = False,
             initial: int = 0, leave: bool = True, every: float = 30.0, unit: str = "it"):
    """tqdm in a terminal, :class:`LineProgress` elsewhere, nothing when ``disable``."""
    if disable:
        return _Silent(iterable, desc, total, initial)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, unit=unit)
    return LineProgress(iterable, desc, total, initial, every, unit=unit)


def plain_ultralytics_bars() -> bool:
    """Make Ultralytics' own bars print one line when they close, not redraws, when stdout is not a terminal.

    Ultralytics redraws its bar with carriage returns ten times a second wherever it writes, so a
    redirected ``python finetune/yolo.py > log`` grows lines of tens of thousands of characters; its
    quiet line-per-bar mode is switched on only under GitHub Actions. Returns whether it was switched on.
    """
    if sys.stdout.isatty():
        return False
    try:
        from ultralytics.utils import tqdm as ultralytics_tqdm
    except ImportError:  # an Ultralytics without its own bar (<8.3.160) uses tqdm, which handles this itself
        return False
    if not hasattr(ultralytics_tqdm, "is_noninteractive_console"):
        return False
    ultralytics_tqdm.is_noninteractive_console = lambda: True
    return True
