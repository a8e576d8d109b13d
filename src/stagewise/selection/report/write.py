"""Writing the report: every file atomically into one directory, and a screenshot of the page.

The only module here that touches the file system or runs a process; the rest are pure functions of the
selection dict.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from stagewise.selection.report.document import build_document
from stagewise.selection.report.html import render_html
from stagewise.selection.report.markdown import render_markdown
from stagewise.selection.report.plots import plot_per_query, plot_quality_vs_depth, plot_quality_vs_latency

logger = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(selection: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, report.md, selection.json and the plots' SVG files into ``out_dir``.

    Returns the paths written: keys ``html``, ``markdown``, ``json``, and one per plot drawn (see PLOTS;
    a plot with nothing to show is left out, and a stale file of that name is removed).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"quality_vs_latency": plot_quality_vs_latency(selection),
             "quality_vs_depth": plot_quality_vs_depth(selection), "per_query": plot_per_query(selection)}
    paths: dict[str, Path] = {}
    for key, svg in plots.items():
        path = out / f"{key}.svg"
        if svg is None:
            path.unlink(missing_ok=True)
            continue
        _write_atomic(path, svg)
        paths[key] = path
    sections = build_document(selection, plots)
    for key, name, text in (("json", "selection.json", json.dumps(selection, indent=2, default=str) + "\n"),
                            ("markdown", "report.md", render_markdown(selection, sections, plots)),
                            ("html", "report.html", render_html(selection, sections, plots))):
        paths[key] = out / name
        _write_atomic(paths[key], text)
    return paths


def render_screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280,
                      height: int | None = None) -> bool:
    """Screenshot ``html_path`` with headless Chromium. False when no browser is installed or it fails.

    ``height`` defaults to a rough estimate of the page's length (tables, lists and figures), so the
    whole report is captured.
    """
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        return False
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    if height is None:
        text = html_path.read_text(encoding="utf-8")
        svg_px = sum(float(h) * 4 / 3 for h in re.findall(r'<svg[^>]*?height="([\d.]+)pt"', text))
        text = re.sub(r"<svg.*?</svg>", "", text, flags=re.S)
        height = int(400 + svg_px + 40 * text.count("<tr") + 34 * text.count("<li") + 100 * text.count("<h2")
                     + 40 * len(re.findall(r"<p[ >]", text)))
        height = min(max(height, 800), 16000)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [shutil.which(browser), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--force-device-scale-factor=1", f"--window-size={width},{height}",
               f"--screenshot={png_path}", html_path.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.warning("screenshot failed: %s", e)
            return False
    if not png_path.exists() or png_path.stat().st_size == 0:
        logger.warning("screenshot failed (exit %s): %s", proc.returncode, proc.stderr[-500:])
        return False
    return True
