"""The one way our command lines start: parse, configure logging, turn expected errors into exit 2.

Only :class:`~defectkit.core.errors.DefectkitError` is an expected error: it prints
``error: <message>`` and exits 2.  Anything else (``KeyError``, ``TypeError``...) is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from defectkit.core.config import apply_defaults, read_yaml, split_config_flag
from defectkit.core.errors import DefectkitError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the module docstring as written and shows every flag's default."""

    @staticmethod
    def _shown(action: argparse.Action) -> bool:
        d = action.default  # identity, not equality: 0 and 0.0 are defaults worth showing, False is not
        return not (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d))

    def add_argument(self, action: argparse.Action) -> None:
        if action.option_strings and not action.help and self._shown(action):
            action.help = "(default: %(default)s)"  # argparse prints nothing for a flag without help text
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and action.option_strings and self._shown(action):
            text = f"{text.rstrip()} (default: %(default)s)".lstrip()
        return text


class Categories(argparse.Action):
    """``--categories a b`` or ``--categories a,b`` (both spellings, in every command that takes it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = [c.strip() for v in values for c in str(v).split(",") if c.strip()]
        if not names:
            parser.error(f"{option_string}: no category named")
        setattr(namespace, self.dest, names)


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: a YAML recipe (or a run's ``config.yaml``) whose values become the defaults."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                            help="YAML of flag values (a recipe in configs/, or a run's config.yaml): they become "
                                 "the defaults, flags given here still win")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` with ``--config FILE`` applied first (:mod:`defectkit.core.config`)."""
    add_config_flag(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    path, _ = split_config_flag(argv)
    if path is not None:
        apply_defaults(parser, read_yaml(path), str(path))
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        return parser.parse_args(argv)
    return parser.parse_intermixed_args(argv)  # ``key=value`` positionals may sit among the flags


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    """A deprecation reads ``warning: --old is deprecated ...: use --new``, not a path into argparse."""
    if issubclass(category, FutureWarning):
        return f"warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


_default_format = warnings.formatwarning


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], object],
            argv: Sequence[str] | None = None) -> int:
    """Run ``main(parse(parser, argv))``; a :class:`DefectkitError` prints ``error: ...`` (which
    names the file and the fix) instead of a traceback and returns 2."""
    warnings.formatwarning = _plain_warning
    try:
        args = parse(parser, argv)
    except DefectkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging(getattr(args, "quiet", False))
    try:
        main(args)
    except DefectkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
