"""Run one job per category, skip the finished ones, and write the per-category summary with its mean.

    python -m defectkit.review.sweep --family anomaly --data /data/mvtec_anomaly_detection \\
        --run 'work/runs/anomaly/mvtec-{category}-draem' --out work/summary/mvtec/anomaly-draem \\
        --cmd 'python anomaly/train.py --data /data/mvtec_anomaly_detection --category {category} ...'

What ``make anomaly|finetune-yolo|finetune-sam|compare CATEGORY=all`` runs.  ``{category}`` in
``--run`` and ``--cmd`` is replaced by each category (all of the dataset's, or ``--categories``).
A category whose run folder already holds its metrics file is skipped (``--force`` reruns it); a
failing category is reported and the others still run (exit status 1 at the end).  ``--print``
runs nothing: it writes the per-category commands to ``OUT/jobs.sh`` and prints them, for a
scheduler (run them anywhere, then rerun this without ``--print`` to collect the summary).
``OUT/summary.{md,json,png}`` is rewritten at the end of every sweep from what is on disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

from defectkit.core.atomic import atomic_write_text
from defectkit.core.cli import Categories, HelpFormatter
from defectkit.core.errors import ConfigError, TrainingError
from defectkit.review.summary import METRICS_FILE, write_summary

log = logging.getLogger(__name__)


def categories_of(data: Path | None, chosen: list[str] | None) -> list[str]:
    """``chosen``, or every category of ``data`` (the embedded set when None)."""
    from defectkit.datasets import synthetic
    from defectkit.datasets.mvtec import resolve_categories

    root = data if data is not None else synthetic.generate(progress=False)
    return resolve_categories(root, chosen or "all")


def jobs(cats: list[str], run: str, cmd: str) -> list[tuple[str, Path, str]]:
    """``(category, run folder, command)`` per category; the category is shell-quoted in commands."""
    if "{category}" not in run or "{category}" not in cmd:
        raise ConfigError("--run and --cmd must both contain {category}")
    cmd = re.sub(r"\\\n\s*", " ", cmd).strip()  # a Makefile's continued lines, joined
    return [(c, Path(run.replace("{category}", c)), cmd.replace("{category}", shlex.quote(c))) for c in cats]


def sweep(family: str, todo: list[tuple[str, Path, str]], out: Path, force: bool = False,
          print_only: bool = False) -> dict:
    """Run the jobs in order (see the module doc); returns ``{"ran", "skipped", "failed", "summary"}``."""
    out.mkdir(parents=True, exist_ok=True)
    script = "#!/usr/bin/env bash\n# one independent job per category; any order, any machine\nset -e\n"
    atomic_write_text(out / "jobs.sh", script + "".join(f"{c}\n" for _, _, c in todo))
    if print_only:
        for _, _, c in todo:
            print(c)
        print(f"# {len(todo)} jobs written to {out / 'jobs.sh'}; rerun without --print (JOBS=) for the summary")
        return {"ran": [], "skipped": [], "failed": [], "summary": None}
    ran, skipped, failed = [], [], []
    for i, (cat, run, cmd) in enumerate(todo, 1):
        if not force and (run / METRICS_FILE[family]).is_file():
            print(f"[{i}/{len(todo)}] {cat}: finished ({run / METRICS_FILE[family]}), skipped", flush=True)
            skipped.append(cat)
            continue
        print(f"[{i}/{len(todo)}] {cat}: {cmd}", flush=True)
        t0 = time.perf_counter()
        # --force: the trainers' own refusal to train over a finished run is lifted too (core.paths.claim_run_dir)
        env = {**os.environ, "DEFECTKIT_EXIST_OK": "1"} if force else None
        rc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env).returncode
        took = time.perf_counter() - t0
        if rc == 0 and (run / METRICS_FILE[family]).is_file():
            print(f"[{i}/{len(todo)}] {cat}: done in {took:.0f} s", flush=True)
            ran.append(cat)
        else:
            why = f"exit status {rc}" if rc else f"no {run / METRICS_FILE[family]} written"
            print(f"[{i}/{len(todo)}] {cat}: FAILED ({why}) after {took:.0f} s", flush=True)
            failed.append(cat)
    summary = write_summary(out, family, {c: r for c, r, _ in todo},
                            f"{family} on {len(todo)} categories" + (f" ({len(failed)} failed)" if failed else ""))
    print()
    print((out / "summary.md").read_text())
    print(f"summary: {out / 'summary.md'} (also summary.json, summary.png)")
    if failed:
        raise TrainingError(f"{len(failed)} of {len(todo)} categories failed: {', '.join(failed)} "
                            f"(their output is above; rerun to retry only those)")
    return {"ran": ran, "skipped": skipped, "failed": failed, "summary": summary}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                add_help=add_help)
    p.add_argument("--family", required=True, choices=sorted(METRICS_FILE))
    p.add_argument("--data", type=Path, default=None, help="MVTec-layout root (default: the embedded set)")
    p.add_argument("--categories", nargs="+", action=Categories, default=None,
                   help="space- or comma-separated (default: every category of --data)")
    p.add_argument("--run", required=True, help="each category's run folder, with {category}")
    p.add_argument("--cmd", required=True, help="each category's command (bash), with {category}")
    p.add_argument("--out", type=Path, required=True, help="where jobs.sh and summary.{md,json,png} go")
    p.add_argument("--force", action="store_true", help="rerun finished categories too")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="write and print the per-category commands, run nothing")
    return p


def main(args: argparse.Namespace) -> dict:
    todo = jobs(categories_of(args.data, args.categories), args.run, args.cmd)
    return sweep(args.family, todo, args.out, args.force, args.print_only)


def cli(argv: list[str] | None = None) -> int:
    from defectkit.core.cli import run_cli

    return run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
