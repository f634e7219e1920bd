"""The docs site builds with `mkdocs build --strict`: a broken link, a broken anchor or a page left out
of the nav fails the build (mkdocs.yml's `validation`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short_and_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    assert "make demo" in text and "make test" in text and "fedlora run CONFIG.yaml" in text


def test_benchmarks_readme_has_no_line_over_300_characters():
    lines = (ROOT / "benchmarks" / "README.md").read_text().splitlines()
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 300] == []
