"""review/stage.py: the demo's stage lines and the log sanitizer, on hand-made streams and files."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from defectkit.review.stage import LogSanitizer, fmt_elapsed, headline


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _sanitize(chunks, clock=None, every=30.0, max_line=400):
    out = []
    s = LogSanitizer(out.append, every=every, max_line=max_line, clock=clock or Clock())
    for c in chunks:
        s.feed(c)
    s.close()
    return "".join(out).splitlines()


def test_carriage_return_bar_becomes_its_final_line():
    bar = "".join(f"\r 1/2  {k}% ━━━━" for k in range(0, 101, 10)) + "\n"
    lines = _sanitize(["header\n", bar, "after\n"])
    # the first redraw is shown (nothing shown yet), then only the bar's last state
    assert lines == ["header", " 1/2  0% ━━━━", " 1/2  100% ━━━━", "after"]


def test_redraws_shown_every_so_many_seconds_and_bar_split_across_chunks():
    clock = Clock()
    out = []
    s = LogSanitizer(out.append, every=10, clock=clock)
    for k in range(30):
        clock.t = k  # one redraw per second
        s.feed(f"\rstep {k}")
    s.feed("\n")
    lines = "".join(out).splitlines()
    assert lines == ["step 0", "step 10", "step 20", "step 29"]


def test_long_lines_cut_ansi_removed_tail_flushed():
    lines = _sanitize(["\x1b[34mblue\x1b[0m text\n", "x" * 1000 + "\n", "no newline at the end"], max_line=50)
    assert lines[0] == "blue text"
    assert lines[1] == "x" * 50 + " ... (950 characters cut)"
    assert lines[2] == "no newline at the end"
    assert all(len(line) < 100 for line in lines)


def test_fmt_elapsed():
    assert [fmt_elapsed(s) for s in (0.4, 59.6, 125, 3725)] == ["0s", "1m00s", "2m05s", "1h02m"]


def test_headlines_read_the_stage_files(tmp_path):
    run = tmp_path / "anomaly"
    for cat, (img, pix) in {"a": (0.9, 0.8), "b": (0.7, 0.6)}.items():
        (run / cat).mkdir(parents=True)
        (run / cat / "metrics.json").write_text(json.dumps({"image": {"auroc": img}, "pixel": {"auroc": pix}}))
    assert headline(f"anomaly:{run}") == "image AUROC 0.800, pixel AUROC 0.700 (mean of 2 categories)"
    y = tmp_path / "y.json"
    y.write_text(json.dumps({"pycocotools": {"bbox": {"map50": 0.5, "map50_95": 0.25}}}))
    assert headline(f"yolo:{y}").startswith("mAP50 0.500, mAP50-95 0.250")
    c = tmp_path / "c.json"
    c.write_text('{"runs": [{"name": "sam", "image_auroc": NaN}, {"name": "ae", "image_auroc": 0.9}]}')
    assert headline(f"compare:{c}") == "2 runs scored; best image AUROC 0.900 (ae)"  # NaN never "best"
    assert headline(f"yolo:{tmp_path / 'missing.json'}").startswith("(no headline figure: FileNotFoundError")
    assert headline(None) == ""


def _stage(cmd, *extra):
    return subprocess.run([sys.executable, "-m", "defectkit.review.stage", "--step", "2/3", "--name", "toy", *extra,
                           "--", sys.executable, "-c", cmd], capture_output=True, text=True, timeout=60)


def test_stage_lines_and_a_failing_stage_passes_its_exit_status_and_error_on():
    ok = _stage("import sys\nfor k in range(500): sys.stderr.write(f'\\rbar {k}')\nprint('\\nresult 42')")
    assert ok.returncode == 0
    assert ok.stdout.splitlines()[0] == "== [2/3] toy: started"
    assert ok.stdout.splitlines()[-1].startswith("== [2/3] toy: done in ")
    assert "result 42" in ok.stdout and max(map(len, ok.stderr.splitlines())) < 20  # no 5000-char bar line
    bad = _stage("import sys; sys.stderr.write('error: the thing is broken\\n'); sys.exit(3)")
    assert bad.returncode == 3
    assert "error: the thing is broken" in bad.stderr  # nothing swallowed
    assert "== [2/3] toy: FAILED after" in bad.stderr and "(exit 3)" in bad.stderr
    assert "done in" not in bad.stdout


@pytest.mark.parametrize("argv", [["--step", "1/1", "--name", "x"], ["--step", "1/1", "--name", "x", "--"]])
def test_stage_needs_a_command(argv):
    r = subprocess.run([sys.executable, "-m", "defectkit.review.stage", *argv], capture_output=True, text=True)
    assert r.returncode == 2


def test_two_stages_side_by_side_keep_their_lines_whole_and_tagged():
    code = ("import sys, time\nfor k in range(20):\n    sys.stderr.write(f'\\r{TAG} bar {k}/20'); sys.stderr.flush(); "
            "time.sleep(0.01)\nsys.stderr.write('\\n'); print(f'{TAG} result')")
    cmd = [sys.executable, "-m", "defectkit.review.stage", "--step", "{n}/2", "--name", "{tag}", "--prefix",
           "[{tag}] ", "--", sys.executable, "-c"]
    script = " & ".join(" ".join(shlex.quote(a.format(n=n, tag=t)) for a in cmd) + " "
                        + shlex.quote(code.replace("{TAG}", t))
                        for n, t in ((1, "a"), (2, "b"))) + " & wait"
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    lines = (r.stdout + r.stderr).splitlines()
    body = [x for x in lines if x and not x.startswith("==")]
    assert {x.split()[0] for x in body} == {"[a]", "[b]"}, body  # every line of each child carries its tag
    assert all(x.startswith(f"[{x[1]}] {x[1]} ") for x in body), body  # and is one child's line, not a mix of both
    assert "[a] a bar 19/20" in lines and "[b] b result" in lines


def test_stage_lines_are_each_written_whole(monkeypatch):
    """Stages side by side share one output: a start or end line written as two pieces (print's text, then its
    newline, which is what unbuffered Python does) can be split by the other stage's line."""
    from defectkit.review import stage

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, s):
            self.writes.append(s)

        def flush(self):
            pass

        def isatty(self):
            return False

    out, err = Recorder(), Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert stage.run_stage([sys.executable, "-c", "print('hello')"], "1/2", "toy") == 0
    assert stage.run_stage([sys.executable, "-c", "import sys; sys.exit(4)"], "2/2", "bad") == 4
    mine = [w for w in out.writes + err.writes if "==" in w]
    assert [w.split(":")[1].split()[0] for w in mine] == ["started", "done", "started", "FAILED"]
    assert all(w.startswith("== [") and w.endswith("\n") and w.count("\n") == 1 for w in mine), mine
