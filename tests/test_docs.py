"""The documentation is part of the product: it builds strictly (a broken link or anchor fails), the README
stays a newcomer's page, and no page points outside the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").glob("*.md"))


def _mkdocs(site: Path, docs: Path | None = None) -> subprocess.CompletedProcess:
    config = REPO / "mkdocs.yml"
    args = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(args, capture_output=True, text=True, cwd=docs.parent if docs else REPO)


def test_the_docs_build_strictly(tmp_path):
    r = _mkdocs(tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "benchmarks.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "docs", copy / "docs", symlinks=False)
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "data.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       capture_output=True, text=True, cwd=copy)
    assert r.returncode != 0 and "no-such-page.md" in r.stderr


def test_the_readme_is_a_newcomers_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert text.count("```bash") >= 1 and "make demo" in text and "make test" in text
    for target in re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", text):  # every link into the docs exists
        assert (REPO / target).is_file(), target


@pytest.mark.parametrize("page", [*PAGES, REPO / "README.md"], ids=lambda p: p.name)
def test_no_page_points_outside_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text, f"{page.name} points at ../shared, which a user's clone does not have"
