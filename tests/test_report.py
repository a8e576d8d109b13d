"""Tests for stagewise.selection.report: the files it writes, what they say, and that they need no network."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from stagewise.selection.report.write import render_screenshot, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "selection_example.json"


@pytest.fixture
def selection() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture
def no_reranker(selection) -> dict:
    sel = copy.deepcopy(selection)
    sel["verdict"].update({"name": "minilm-l6 fine-tuned", "reranker": None, "depth": None, "reranker_worth_it": False,
                           "gain": None, "ci95": None, "p_value": None, "ndcg@10": 0.70, "latency_ms": 29.0,
                           "summary": ["Recommended: minilm-l6 fine-tuned alone (dev nDCG@10 0.700)."]})
    sel["rerankers"] = []
    sel["systems"] = [s for s in sel["systems"] if s["stage"] == "first_stage"]
    return sel


def test_writes_every_file(selection, tmp_path):
    paths = write_report(selection, tmp_path / "out")
    assert set(paths) == {"html", "markdown", "json", "quality_vs_latency", "quality_vs_depth", "per_query"}
    for path in paths.values():
        assert path.parent == tmp_path / "out" and path.stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*.tmp"))  # no temporary files left behind
    assert json.loads(paths["json"].read_text()) == selection


def test_html_is_self_contained_and_says_what_was_measured(selection, tmp_path):
    text = write_report(selection, tmp_path)["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert text.count("<svg") == 3
    for sentence in selection["verdict"]["summary"]:
        assert sentence.replace("'", "&#x27;") in text
    assert "minilm-l6 fine-tuned &gt;&gt; cross bert-tiny@10" in text  # the chosen system, escaped
    for number in ("0.720", "0.700", "+0.020", "+0.005 to +0.035", "38.0", "0.880", "120.4", "20,000"):
        assert number in text
    assert 'class="chosen"' in text


def test_markdown_has_the_tables_verdict_and_plot_links(selection, tmp_path):
    text = write_report(selection, tmp_path)["markdown"].read_text()
    assert selection["verdict"]["summary"][0] in text
    assert "| Name | Status | nDCG@10 |" in text and "| Reranker | Depth | nDCG@10 | Gain |" in text
    assert "▶ **cross bert-tiny** | **10** | **0.720** | **+0.020**" in text
    for name in ("quality_vs_latency.svg", "quality_vs_depth.svg", "per_query.svg"):
        assert f"]({name})" in text
    assert "estimated 14.0 min to train" in text


def test_no_reranker_recommends_the_first_stage_alone(no_reranker, tmp_path):
    paths = write_report(no_reranker, tmp_path)
    html_text, md = paths["html"].read_text(), paths["markdown"].read_text()
    for text in (html_text, md):
        assert "first stage alone is recommended" in text
        assert "No reranker candidates were measured" in text
    assert "quality_vs_depth" not in paths and not (tmp_path / "quality_vs_depth.svg").exists()
    assert html_text.count("<svg") == 2


def test_sparse_selection_still_renders(tmp_path):
    sel = {"verdict": {"name": "bm25", "reranker": None}, "budget": {"latency_budget_ms": None},
           "first_stage": {"candidates": [{"name": "bm<25>", "metrics": {}}]}, "rerankers": [], "per_query": None,
           "systems": [{"name": "bm25", "stage": "first_stage", "ndcg@10": 0.5, "p95_ms": 1.0}]}
    paths = write_report(sel, tmp_path)
    text = paths["html"].read_text()
    assert "bm&lt;25&gt;" in text and "bm<25>" not in text
    assert "No per-query comparison was recorded" in text
    assert text.count("<svg") == 1


def test_screenshot(selection, tmp_path):
    html_path = write_report(selection, tmp_path)["html"]
    if not render_screenshot(html_path, tmp_path / "report.png", height=1200):
        pytest.skip("no headless browser installed")
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
