"""The documentation site builds with warnings as errors: a broken link between pages or to a heading, a page
left out of the toctree, or a CLI help text that does not render fails here (and so in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    # Sphinx, MyST, Furo and sphinx-click come with the `test` extra (through `docs`): a missing one fails here.
    out = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(tmp_path / "doctrees"),
               str(ROOT / "docs"), str(out)]
    # The output and the doctrees go to tmp_path, and no bytecode is written: the build leaves the checkout as it was.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert (out / "index.html").is_file()
    assert (out / "reference" / "cli.html").is_file()
