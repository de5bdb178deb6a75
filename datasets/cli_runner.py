"""The one way our command lines start: parse, configure logging, turn expected errors into exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

EXPECTED = (FileNotFoundError, FileExistsError, ValueError, KeyError, OSError)


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], object],
            argv: Sequence[str] | None = None, errors: tuple[type[BaseException], ...] = EXPECTED) -> int:
    """Run ``main(parser.parse_args(argv))``; an expected error prints ``error: ...`` (which names
    the file and the fix) instead of a traceback and returns 2."""
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
