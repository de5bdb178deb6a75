"""The one way our command lines start: parse, configure logging, turn expected errors into exit 2.

Only :class:`~defectkit.core.errors.DefectkitError` is an expected error: it prints
``error: <message>`` and exits 2.  Anything else (``KeyError``, ``TypeError``...) is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from defectkit.core.errors import DefectkitError


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], object],
            argv: Sequence[str] | None = None) -> int:
    """Run ``main(parser.parse_args(argv))``; a :class:`DefectkitError` prints ``error: ...`` (which
    names the file and the fix) instead of a traceback and returns 2."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    try:
        main(args)
    except DefectkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
