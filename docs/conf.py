"""Sphinx configuration for the Stagewise documentation (MyST Markdown pages, the Furo theme).

Build: ``python -m sphinx -b html docs build/docs`` (``-W --keep-going`` as tests/test_docs.py runs it in CI).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))  # stagewise_click (the typer app for sphinx-click), stagewise_api (autodoc pages)

project = "Stagewise"
author = "the Stagewise authors"
copyright = "the Stagewise authors"  # noqa: A001 (Sphinx's name)
try:
    from importlib.metadata import version as _version

    release = _version("stagewise")
except Exception:  # not installed: the docs still build
    release = ""
version = release

extensions = ["myst_parser", "sphinx_click", "sphinx.ext.autodoc", "stagewise_api"]

# The API reference: members in the order the source gives them, type hints in the signatures.
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# MyST: headings get anchors down to ###, so relative links such as [x](guides/deploying.md#the-service) are
# checked at build time; a link to a missing page or heading is a warning, and the build runs with -W.
myst_heading_anchors = 3
myst_enable_extensions: list[str] = []
myst_links_external_new_tab = False

# No smart quotes or dashes: option names (--calibration) and quoted values ('' for none) in the CLI reference
# must stay as typed.
smartquotes = False

# Every warning counts (the build is -W); nothing is suppressed.
suppress_warnings: list[str] = []

html_theme = "furo"
html_title = "Stagewise"
html_static_path: list[str] = []
html_show_sourcelink = False
pygments_style = "sphinx"
