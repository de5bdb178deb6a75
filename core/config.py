"""Recipes are data: YAML files of flag values that become a command's defaults.

* ``configs/<name>.yaml`` are the recipes the project ships (``recipe("sam")``): the training scripts
  take their defaults from them, so ``python finetune/sam.py`` with no flag runs the recommended recipe.
* ``--config FILE`` (any command run through :func:`defectkit.core.cli.run_cli`) loads a file over those
  defaults; flags given on the command line still win.  Keys are the flags' names with ``_`` or ``-``.
* Every run writes its resolved ``config.yaml``; ``--config <run>/config.yaml`` runs it again.

Unknown keys are refused with the file's name, so a typo in a recipe never passes silently.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import yaml

from defectkit.core.errors import ConfigError, MissingFileError

#: the recipes shipped with the project
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: what a run writes beside run_args.json; ``--config`` reads it back
RUN_CONFIG = "config.yaml"


def read_yaml(path: Path) -> dict:
    """A YAML mapping of flag values; a clear error for a missing file or anything but a mapping."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_CONFIG
    if not path.is_file():
        raise MissingFileError(f"--config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def recipe(name: str) -> dict:
    """``configs/<name>.yaml``: a shipped recipe's flag values."""
    return read_yaml(CONFIGS / f"{name}.yaml")


#: the release that drops the old spellings kept by :func:`rename_flag`
ALIASES_REMOVED_IN = "0.4"


def deprecated(old: str, new: str, where: str = "") -> None:
    """The one warning an old spelling gets (FutureWarning: Python shows it by default)."""
    warnings.warn(f"{where}{old} is deprecated and will be removed in {ALIASES_REMOVED_IN}: use {new}",
                  FutureWarning, stacklevel=3)


class _Renamed(argparse.Action):
    """An old flag spelling: warns, then sets the new flag's value."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        deprecated(option_string, self.new)
        setattr(namespace, self.dest, values)


def rename_flag(parser: argparse.ArgumentParser, old: str, new: str, **kw) -> None:
    """Keep ``old`` for one release as a hidden spelling of the already added flag ``new`` (same value
    type, ``kw``): on the command line and as a key of a ``--config`` file (a run's config.yaml written
    before the rename), each with a FutureWarning."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_Renamed, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kw)
    renamed = dict(getattr(parser, "renamed_keys", {}))
    renamed[old.lstrip("-").replace("-", "_")] = dest
    parser.renamed_keys = renamed  # read by apply_defaults


def apply_defaults(parser: argparse.ArgumentParser, values: dict, source: str) -> None:
    """Make ``values`` the parser's defaults; a key that names no flag of the parser is an error (a key
    renamed by :func:`rename_flag` is read as its new name, with a warning)."""
    dests = {a.dest for a in parser._actions}  # argparse offers no public list of its actions
    renamed = getattr(parser, "renamed_keys", {})
    for old in [k for k in values if k in renamed and k not in dests]:
        deprecated(old, renamed[old], f"{source}: key ")
        values = {(renamed[old] if k == old else k): v for k, v in values.items()}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise ConfigError(f"{source}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a flag of "
                          f"{parser.prog}; its flags: {', '.join(sorted(d for d in dests if d != 'help'))}")
    types = {a.dest: a.type for a in parser._actions if callable(a.type)}

    def typed(k, v):  # as if given on the command line: 2 for a float flag is 2.0, a string a Path
        if v is None or k not in types:
            return v
        return [types[k](x) for x in v] if isinstance(v, list) else types[k](v)

    try:
        parser.set_defaults(**{k: typed(k, v) for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: a value does not fit its flag ({e})") from e


def split_config_flag(argv: list[str]) -> tuple[Path | None, list[str]]:
    """``(--config value, the other arguments)``."""
    rest, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            path, i = Path(argv[i + 1]), i + 2
            continue
        if a.startswith("--config="):
            path = Path(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return path, rest


def plain(value):
    """A flag value as YAML can hold it (paths as strings, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def write_run_config(run: Path, args: argparse.Namespace) -> Path:
    """``<run>/config.yaml``: every flag value of the run, so ``--config`` of it reruns the same recipe."""
    from defectkit.core.atomic import atomic_write_text

    body = yaml.safe_dump({k: plain(v) for k, v in vars(args).items() if k != "config"}, sort_keys=False)
    return atomic_write_text(Path(run) / RUN_CONFIG, "# the resolved configuration of this run; rerun it with "
                             f"--config {Path(run) / RUN_CONFIG}\n" + body)
