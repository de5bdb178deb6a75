"""Screenshots for the docs, taken from the current version's own output with Debian's headless Chromium, so
the pictures in ``docs/img`` always show what this version draws.

    python -m defectkit.review.screenshots --report work/compare/defectkit_synth-all/report.html --out docs/img

``make screenshots`` runs it on the demo's report (``make demo`` first).  The FiftyOne App's screenshot comes
from its browser test: ``DEFECTKIT_SCREENSHOTS=docs/img pytest tests/test_compare_review.py -k app``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from defectkit.core.cli import HelpFormatter, run_cli
from defectkit.core.errors import MissingFileError

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--virtual-time-budget=20000"]


def chromium() -> str:
    """The headless browser; a clear error when it is missing (``.ci/run`` installs Debian's)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise MissingFileError("chromium is not installed: `sudo apt-get install chromium` (Debian)")
    return found


def screenshot(url: str, out: Path, width: int = 1400, height: int = 900) -> Path:
    """A ``width`` x ``height`` PNG of the page at ``url`` (the top of the page), written to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="defectkit-chrome-") as profile:
        subprocess.run([chromium(), *FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}",
                        f"--screenshot={out}", url], capture_output=True, timeout=180, check=False)
    if not out.is_file():
        raise MissingFileError(f"chromium wrote no screenshot of {url}")
    return out


def main(args: argparse.Namespace) -> list[Path]:
    report = Path(args.report)
    if not report.is_file():
        raise MissingFileError(f"{report} does not exist: run `make demo` (or `defectkit compare`) first")
    shots = [screenshot(report.resolve().as_uri(), Path(args.out) / "report.png")]
    for p in shots:
        print(f"screenshot: {p}")
    return shots


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m defectkit.review.screenshots", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--report", required=True, help="a comparison's report.html")
    p.add_argument("--out", default="docs/img", help="folder for the PNG files")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


if __name__ == "__main__":
    raise SystemExit(run_cli(get_args_parser(), main))
