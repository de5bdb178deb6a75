"""The docs' screenshots are taken from the current version's own pages with headless Chromium."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from defectkit.core.errors import MissingFileError
from defectkit.review import screenshots as S


def test_a_page_becomes_a_png_of_the_asked_size(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    page = tmp_path / "report.html"
    page.write_text("<html><body style='margin:0;background:#000'><div style='width:200px;height:100px;"
                    "background:#fff'></div></body></html>")
    shot = S.screenshot(page.as_uri(), tmp_path / "out" / "report.png", 400, 300)
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (300, 400)
    assert img[:100, :200].mean() > 200 and img[150:, 250:].mean() < 50  # the white box, top left, on black


def test_a_missing_report_is_a_clear_error(tmp_path):
    args = S.get_args_parser().parse_args(["--report", str(tmp_path / "none.html"), "--out", str(tmp_path)])
    with pytest.raises(MissingFileError, match="none.html does not exist"):
        S.main(args)
    assert not np.any([p.suffix == ".png" for p in tmp_path.iterdir()])
