"""The search page at ``/`` in a real headless browser against a real server: what it shows must be what the
API answers (hits, scores, how far the reranker moved each hit), and the API's errors must reach the user.

Needs the ``playwright`` package and a chromium binary (Debian's ``chromium``); skipped without them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import _build_service_index, running_server
from stagewise.serving.service import create_app

if os.environ.get("STAGEWISE_REQUIRE_BROWSER"):
    import playwright.sync_api as sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("STAGEWISE_REQUIRE_BROWSER"):  # CI installs chromium: a missing one is a failure there
        raise RuntimeError("STAGEWISE_REQUIRE_BROWSER is set but no chromium binary was found")
    pytest.skip("the browser test needs a chromium binary", allow_module_level=True)
expect = sync_api.expect

QUERY = "animals that bark"
# what each rendered hit shows, read straight from the DOM
HITS_JS = """els => els.map(li => ({
  doc_id: li.dataset.docId,
  rank: li.querySelector('.rank').textContent,
  move: li.querySelector('.move').className,
  move_text: li.querySelector('.move').textContent,
  title: li.querySelector('.title').firstChild.textContent,
  scores: [...li.querySelectorAll('.scores b')].map(b => b.textContent),
  first_stage_rank: li.querySelector('.scores span').textContent,
}))"""


@pytest.fixture(scope="module")
def url(reranked_index):
    with running_server(create_app(reranked_index)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(15_000)
    yield page
    page.close()


def open_page(page, base: str) -> dict:
    """Load ``/`` and wait until it has read /stats; return /stats as the API gives it."""
    stats = httpx.get(base + "/stats").json()
    page.goto(base + "/")
    expect(page.locator("#about")).not_to_have_text("loading index…")
    return stats


def search(page, query: str, summary: str) -> list[dict]:
    """Type ``query``, press Enter, wait for a summary containing ``summary``; return the rendered hits."""
    page.fill("#query", query)
    page.press("#query", "Enter")
    expect(page.locator("#summary")).to_contain_text(summary)
    return page.eval_on_selector_all("li.hit", HITS_JS)


def expected_move(hit: dict) -> tuple[str, str]:
    """The badge the page should show: how many places the reranker moved the hit, up or down."""
    if hit["rerank_score"] is None:
        return "move same", "—"
    d = hit["first_stage_rank"] - hit["rank"]
    return ("move up", f"▲ {d}") if d > 0 else ("move down", f"▼ {-d}") if d < 0 else ("move same", "=")


def test_header_describes_the_index(page, url, reranked_index):
    """The header names what is being searched: document count, first stage, reranker and depth, version."""
    index = open_page(page, url)["index"]
    about = page.inner_text("#about")
    assert about.startswith("30 documents")
    for part in (f"first stage {index['first_stage']} (exact)", f"reranker {index['reranker']}, depth 3",
                 f"index {reranked_index.version}"):
        assert part in about
    assert page.is_checked("#rerank") and page.is_enabled("#rerank")
    assert page.get_attribute("#depth", "placeholder") == "3"


def test_reranked_search_shows_the_api_answer_with_scores_and_movement(page, url, tmp_path):
    """k and depth from the form reach the API; each hit shows both scores and a badge that matches its move."""
    open_page(page, url)
    page.fill("#k", "5")
    page.fill("#depth", "4")
    shown = search(page, QUERY, "reranked the top 4")
    api = httpx.post(url + "/search", json={"query": QUERY, "k": 5, "depth": 4}).json()["hits"]

    assert len(shown) == 5
    assert [h["doc_id"] for h in shown] == [h["doc_id"] for h in api]
    for s, a in zip(shown, api):
        assert (s["rank"], s["first_stage_rank"], s["title"]) == (str(a["rank"]), str(a["first_stage_rank"]), a["title"])
        reranker = f"{a['rerank_score']:.4f}" if a["rerank_score"] is not None else "not reranked"
        assert s["scores"] == [f"{a['first_stage_score']:.4f}", reranker]
        assert (s["move"], s["move_text"]) == expected_move(a)
    assert [s["scores"][1] == "not reranked" for s in shown] == [False] * 4 + [True]
    moved = sum(a["rank"] != a["first_stage_rank"] for a in api[:4])
    assert f"5 results · reranked the top 4: {moved} of 5 results moved" in page.inner_text("#summary")
    assert page.inner_text("#error") == ""

    shot = tmp_path / "search_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("STAGEWISE_SCREENSHOT"):
        Path(os.environ["STAGEWISE_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, os.environ["STAGEWISE_SCREENSHOT"])


def test_unchecking_rerank_shows_the_first_stage_only(page, url):
    """Without the reranker every hit says "not reranked", has no movement, and keeps the first stage's order."""
    open_page(page, url)
    page.fill("#k", "6")
    page.uncheck("#rerank")
    assert page.is_disabled("#depth")
    shown = search(page, QUERY, "first stage only")
    api = httpx.post(url + "/search", json={"query": QUERY, "k": 6, "rerank": False}).json()["hits"]
    assert [h["doc_id"] for h in shown] == [h["doc_id"] for h in api]
    assert all(s["scores"][1] == "not reranked" and (s["move"], s["move_text"]) == ("move same", "—") for s in shown)
    assert [s["first_stage_rank"] for s in shown] == [s["rank"] for s in shown] == [str(i) for i in range(1, 7)]
    assert page.inner_text("#summary").startswith("6 results · first stage only · first stage ")


def test_api_errors_show_in_the_error_line(page, url):
    """A request the server refuses shows its error message and clears the previous results."""
    open_page(page, url)
    search(page, QUERY, "results")
    assert page.locator("li.hit").count() == 10
    # the form's own max=100 would stop the browser submitting; a stale or edited page would not
    page.evaluate("() => { const k = document.getElementById('k'); k.removeAttribute('max'); k.value = '1000'; }")
    page.press("#query", "Enter")
    expect(page.locator("#error")).to_contain_text("k: Input should be less than or equal to 100")
    assert page.locator("li.hit").count() == 0 and page.inner_text("#summary") == ""

    page.fill("#k", "3")
    page.fill("#query", "   ")  # passes the form's "required", not the server's check
    page.press("#query", "Enter")
    expect(page.locator("#error")).to_contain_text("query: is blank")

    search(page, QUERY, "3 results")  # and a good search clears the error again
    assert page.inner_text("#error") == "" and page.locator("li.hit").count() == 3


def test_page_over_an_index_without_reranker(page, bm25_index):
    """Over a BM25-only index the page says so, disables the rerank controls, and never asks for reranking."""
    with running_server(create_app(bm25_index)) as base:
        open_page(page, base)
        assert "first stage bm25 (lexical) · no reranker" in page.inner_text("#about")
        assert page.is_disabled("#rerank") and not page.is_checked("#rerank") and page.is_disabled("#depth")
        page.fill("#k", "4")
        shown = search(page, "history of trains", "first stage only")
        api = httpx.post(base + "/search", json={"query": "history of trains", "k": 4}).json()["hits"]
        assert [h["doc_id"] for h in shown] == [h["doc_id"] for h in api]
        assert page.inner_text("#error") == ""


def test_page_shows_the_fused_score_of_a_fused_index(page, tiny_bi_encoder, tiny_cross_encoder, tmp_path_factory):
    """Over a fused pipeline the header names the fusion and each fused hit shows its fused score as a third score."""
    from stagewise.search.fusion import Fusion
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker
    from stagewise.search.retrievers import build_first_stage

    index = _build_service_index(tmp_path_factory, "fused-page-index", lambda: Pipeline(
        build_first_stage(str(tiny_bi_encoder)), CrossEncoderReranker(str(tiny_cross_encoder)), depth=3,
        fusion=Fusion(0.4)))
    with running_server(create_app(index)) as base:
        open_page(page, base)
        assert "reranker weight 0.40" in page.inner_text("#about")
        page.fill("#k", "5")
        shown = search(page, QUERY, "reranked the top 3")
        api = httpx.post(base + "/search", json={"query": QUERY, "k": 5}).json()["hits"]
        assert [h["doc_id"] for h in shown] == [h["doc_id"] for h in api]
        for s, a in zip(shown, api):
            reranker = f"{a['rerank_score']:.4f}" if a["rerank_score"] is not None else "not reranked"
            fused = [f"{a['fused_score']:.4f}"] if a["fused_score"] is not None else []
            assert s["scores"] == [f"{a['first_stage_score']:.4f}", reranker, *fused]
        assert [len(s["scores"]) for s in shown] == [3, 3, 3, 2, 2]


def test_the_api_docs_render_offline(page, url):
    """/docs is Swagger UI from the package: it renders every operation with any request off this host refused."""
    elsewhere = []

    def only_here(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    page.goto(url + "/docs")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    paths = set(page.locator(".opblock-summary-path").all_inner_texts())
    assert {"/search", "/search/batch", "/health", "/stats"} <= {p.replace("\u200b", "") for p in paths}
    assert elsewhere == []
