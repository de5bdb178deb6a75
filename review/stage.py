"""Run one stage of a pipeline with a start line, an end line (elapsed time and headline figure) and
output that reads well in a log.

``python -m defectkit.review.stage --step 3/7 --name "anomaly model" --headline anomaly:RUN -- CMD...``

* Prints ``== [3/7] anomaly model: started`` and, at the end, ``== [3/7] anomaly model: done in
  2m13s - image AUROC 0.962`` (or ``FAILED after ... (exit 2)``, the child's exit status passed on).
* The child's stdout and stderr go to ours.  In a terminal they pass through untouched.  Otherwise
  (``make demo > log``, CI) carriage-return progress bars (Ultralytics', tqdm's) become one line per
  ``every`` seconds plus their last state, ANSI colours are removed and no line exceeds
  ``MAX_LINE`` characters, so a log never holds the 29,000-character lines that redirected bars make.
  Nothing is filtered out: errors and warnings always come through.

Headline figures are read from the files the stage wrote (JSON only: this module imports no model code).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

MAX_LINE = 400
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def fmt_elapsed(seconds: float) -> str:
    """``7s``, ``2m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class LogSanitizer:
    """Turns a byte stream with ``\\r`` redraws and colour codes into sane lines for a log.

    A segment ended by ``\\r`` is a redraw of the current line: it is shown only if ``every`` seconds
    passed since the last shown redraw; the segment ended by ``\\n`` (the bar's final state, or any
    normal line) is always shown.  Lines are cut at ``max_line`` characters, saying how many were cut.
    """

    def __init__(self, write: Callable[[str], None], every: float = 30.0, max_line: int = MAX_LINE,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.every, self.max_line, self.clock = write, every, max_line, clock
        self.buf = ""
        self.last_redraw = -math.inf
        self.pending = ""  # the newest redraw not yet shown

    def _emit(self, line: str) -> None:
        line = ANSI.sub("", line).rstrip()
        if not line:
            return
        if len(line) > self.max_line:
            line = f"{line[: self.max_line]} ... ({len(line) - self.max_line} characters cut)"
        self.write(line + "\n")

    def feed(self, text: str) -> None:
        self.buf += text
        while True:
            i = min((k for k in (self.buf.find("\r"), self.buf.find("\n")) if k >= 0), default=-1)
            if i < 0:
                break
            seg, sep, self.buf = self.buf[:i], self.buf[i], self.buf[i + 1:]
            if sep == "\n":
                self._emit(seg if seg.strip() else self.pending)
                self.pending = ""
            elif seg.strip():
                now = self.clock()
                if now - self.last_redraw >= self.every:
                    self.last_redraw = now
                    self._emit(seg)
                    self.pending = ""
                else:
                    self.pending = seg
        if len(self.buf) > 64 * self.max_line:  # a runaway line with no terminator at all
            self._emit(self.buf)
            self.buf = ""

    def close(self) -> None:
        self._emit(self.buf or self.pending)
        self.buf = self.pending = ""


# ---------------------------------------------------------------- headline figures per stage kind


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _mean(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _headline_manifest(p: Path) -> str:
    m = _read(p)
    folds: dict[str, int] = {}
    for types in m["counts"].values():
        for by_fold in types.values():
            for fold, n in by_fold.items():
                folds[fold] = folds.get(fold, 0) + n
    return f"{len(m['categories'])} categories, " + " / ".join(f"{n} {f}" for f, n in folds.items())


def _headline_fidelity(p: Path) -> str:
    f = _read(p)
    inst = sum(f.get("instances_per_class", {}).values())
    return f"{f['images']} images, {inst} instances, {len(f.get('formats', {}))} formats"


def _headline_anomaly(run: Path) -> str:
    files = sorted(run.glob("*/metrics.json")) or sorted(run.glob("metrics.json"))
    ms = [_read(f) for f in files]
    img = _mean([m.get("image", {}).get("auroc") for m in ms])
    pix = _mean([(m.get("pixel") or {}).get("auroc") for m in ms])
    cats = f" (mean of {len(ms)} categories)" if len(ms) > 1 else ""
    return f"image AUROC {_f(img)}, pixel AUROC {_f(pix)}{cats}"


def _headline_yolo(p: Path) -> str:
    m = _read(p)
    box = m.get("pycocotools", {}).get("bbox", {})
    return f"mAP50 {_f(box.get('map50'))}, mAP50-95 {_f(box.get('map50_95'))} (pycocotools, test fold)"


def _headline_sam(p: Path) -> str:
    m = _read(p)
    ft = m.get("fine_tuned") or {}
    out = f"mask IoU with box prompts {_f(ft.get('iou'))}"
    cas = m.get("cascade")
    if isinstance(cas, dict):
        out += f", cascade pixel IoU {_f(cas.get('pixel_iou_per_image'))}"
    anom = m.get("anomaly_cascade")
    if isinstance(anom, dict):
        out += f", {anom.get('prompt_model', 'anomaly')}->SAM pixel IoU {_f(anom.get('pixel_iou_per_image'))}"
    return out


def _headline_compare(p: Path) -> str:
    runs = _read(p)["runs"]
    scored = [r for r in runs if _f(r.get("image_auroc")) != "n/a"]
    best = max(scored, key=lambda r: r["image_auroc"], default=None)
    if best is None:
        return f"{len(runs)} runs scored"
    return f"{len(runs)} runs scored; best image AUROC {_f(best.get('image_auroc'))} ({best['name']})"


HEADLINES: dict[str, Callable[[Path], str]] = {
    "manifest": _headline_manifest, "fidelity": _headline_fidelity, "anomaly": _headline_anomaly,
    "yolo": _headline_yolo, "sam": _headline_sam, "compare": _headline_compare,
}


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def headline(spec: str | None) -> str:
    """``kind:path`` -> a short figure; never raises (a stage's success must not hinge on its summary)."""
    if not spec:
        return ""
    kind, _, path = spec.partition(":")
    try:
        return HEADLINES[kind](Path(path))
    except Exception as e:  # noqa: BLE001 - the stage already succeeded; say why there is no figure
        return f"(no headline figure: {type(e).__name__}: {e})"


# ---------------------------------------------------------------- running a stage


def _pump(src, dst, tty: bool, every: float, prefix: str = "") -> None:
    if tty and not prefix:
        for chunk in iter(lambda: src.read1(4096), b""):
            dst.buffer.write(chunk)
            dst.flush()
        return

    def write(s: str) -> None:
        dst.write(prefix + s)
        dst.flush()

    san = LogSanitizer(write, every=every)
    for chunk in iter(lambda: src.read1(4096), b""):
        san.feed(chunk.decode("utf-8", "replace"))
    san.close()


def _say(line: str, file=None) -> None:
    """One whole line in one write: stages side by side share the terminal or log, and print() writes its text and
    its newline apart when Python's output is unbuffered (PYTHONUNBUFFERED), so two start lines could run together."""
    file = file or sys.stdout
    file.write(line + "\n")
    file.flush()


def run_stage(cmd: list[str], step: str, name: str, headline_spec: str | None = None, every: float = 30.0,
              prefix: str = "") -> int:
    """Run ``cmd`` as stage ``step``; with ``prefix`` every line of its output starts with it (two stages running
    side by side stay readable: their bars become whole lines, never redraws that overwrite each other)."""
    _say(f"== [{step}] {name}: started")
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        _say(f"== [{step}] {name}: FAILED to start: {e}")
        return 127
    pumps = [threading.Thread(target=_pump, args=(src, dst, dst.isatty(), every, prefix), daemon=True)
             for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
    for t in pumps:
        t.join()
    took = fmt_elapsed(time.perf_counter() - t0)
    if rc != 0:
        _say(f"== [{step}] {name}: FAILED after {took} (exit {rc})", sys.stderr)
        return rc
    figure = headline(headline_spec)
    _say(f"== [{step}] {name}: done in {took}" + (f" - {figure}" if figure else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m defectkit.review.stage --step I/N --name NAME [--headline KIND:PATH] -- CMD ...",
              file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m defectkit.review.stage")
    p.add_argument("--step", required=True, help="e.g. 3/7")
    p.add_argument("--name", required=True)
    p.add_argument("--headline", help=f"KIND:PATH, KIND one of {', '.join(HEADLINES)}")
    p.add_argument("--every", type=float, default=30.0, help="seconds between progress lines in a log")
    p.add_argument("--prefix", default="", help="start every output line with this (stages run side by side)")
    args = p.parse_args(argv[:i])
    if not argv[i + 1:]:
        p.error("no command after --")
    return run_stage(argv[i + 1:], args.step, args.name, args.headline, args.every, args.prefix)


if __name__ == "__main__":
    sys.exit(main())
