"""What one request can cost the service: bounded work and answers, deadlines that stop work, lanes that keep cheap
requests answered, and a flood of maximal requests after which the service answers at its normal latency.

The reranker is slowed down (a fixed sleep per pair) so that "expensive" means the same on every machine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import statistics
import time

import httpx
import pytest

from conftest import SERVICE_CORPUS, running_server, write_beir
from stagewise.serving.service import ServiceSettings, create_app

DOCS = {d["_id"]: d for d in SERVICE_CORPUS}


def post(base: str, path: str, body, timeout: float = 30) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=timeout)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


@pytest.fixture
def slow_reranker(reranked_index, monkeypatch):
    """Each scored pair takes ``seconds_per_pair``; counts the pairs actually scored."""
    reranker = reranked_index.pipeline.reranker
    original, scored = reranker.score_pairs, []

    def install(seconds_per_pair: float):
        def slow(pairs, batch_job=False):
            time.sleep(seconds_per_pair * len(pairs))
            scored.append(len(pairs))
            return original(pairs, batch_job)

        monkeypatch.setattr(reranker, "score_pairs", slow)
        return scored

    return install


@pytest.fixture
def start():
    import contextlib

    with contextlib.ExitStack() as stack:
        yield lambda index, **settings: stack.enter_context(
            running_server(create_app(index, ServiceSettings(**settings))))


# ---- bounds on the work and the answer of one request ------------------------------------------------------


def test_the_probe_request_is_refused_at_once_naming_its_cost(start, reranked_index):
    """64 queries × depth 200 = 12,800 pairs, each field within its bound: refused with 422 before any work."""
    base = start(reranked_index, max_depth=200)
    began = time.perf_counter()
    r = post(base, "/search/batch", {"queries": [f"query {i}" for i in range(64)], "k": 10, "depth": 200})
    message = error_of(r, 422)
    assert time.perf_counter() - began < 2
    assert "64 × 200 = 12,800 pairs" in message and "limit of 2,048" in message
    r = post(base, "/search/batch", {"queries": [f"query {i}" for i in range(64)], "k": 100, "rerank": False})
    assert "64 × 100 = 6,400 hits" in error_of(r, 422)
    stats = httpx.get(base + "/stats").json()
    assert stats["batch_size"] == {"count": 0}  # nothing reached the models


def test_requests_within_the_work_bounds_are_answered(start, reranked_index):
    base = start(reranked_index, max_request_pairs=30, max_request_hits=40, max_depth=30, max_k=10)
    assert post(base, "/search/batch", {"queries": ["cats", "dogs", "tea"], "depth": 10, "k": 10}).status_code == 200
    assert "4 × 10 = 40 pairs" in error_of(post(base, "/search/batch", {"queries": ["a", "b", "c", "d"], "depth": 10,
                                                                       "k": 10}), 422)
    assert "5 × 10 = 50 hits" in error_of(post(base, "/search/batch", {"queries": list("abcde"), "k": 10,
                                                                      "rerank": False}), 422)


@pytest.fixture(scope="module")
def big_document_index(tmp_path_factory):
    """BM25 over the service corpus plus one 5 MB document that matches every query about 'violins'."""
    from stagewise.data.loaders import load_corpus
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.retrievers import build_first_stage
    from stagewise.serving.index import Index

    folder = tmp_path_factory.mktemp("big-doc")
    big = {"_id": "big", "title": "Violins " * 100, "text": "violins and their care " * 220_000}
    corpus = load_corpus(write_beir(folder / "data", corpus=SERVICE_CORPUS + [big]) / "corpus.jsonl")
    return Index.build(Pipeline(build_first_stage("bm25")), corpus, folder / "idx")


def test_text_per_hit_is_bounded_and_ids_only_is_an_option(start, big_document_index):
    """A 5 MB document answers with its first max_text_chars characters (truncated: true); include_text false
    returns ids and scores only. The 64-query batch that returned 320 MB now returns well under a megabyte."""
    base = start(big_document_index, max_text_chars=500)
    hit = post(base, "/search", {"query": "care of violins", "k": 1}).json()["hits"][0]
    assert hit["doc_id"] == "big" and hit["truncated"] is True
    assert len(hit["text"]) == 500 and len(hit["title"]) == 500
    assert hit["text"] == big_document_index.corpus["big"].text[:500]
    small = post(base, "/search", {"query": "history of trains", "k": 1}).json()["hits"][0]
    assert small["truncated"] is False and small["text"] == DOCS[small["doc_id"]]["text"]

    ids_only = post(base, "/search", {"query": "care of violins", "k": 3, "include_text": False}).json()["hits"]
    assert [h["doc_id"] for h in ids_only][:1] == ["big"]
    assert all(h["title"] is None and h["text"] is None and h["score"] is not None for h in ids_only)

    r = httpx.post(base + "/search/batch", json={"queries": ["care of violins"] * 64, "k": 1}, timeout=60)
    assert r.status_code == 200 and len(r.content) < 200_000, len(r.content)
    r = httpx.post(base + "/search/batch", json={"queries": ["care of violins"] * 64, "k": 1,
                                                 "include_text": False}, timeout=60)
    assert r.status_code == 200 and len(r.content) < 30_000, len(r.content)


# ---- admission: what can never fit (422), what fits now, what fits later (503) ------------------------------


def test_the_cost_model_tells_a_batch_fixed_cost_from_its_pairs():
    """Small batches cost more per pair (a part is per batch): a rate measured on 3-pair batches alone would call a
    240-pair batch four times dearer than it is. With one batch size only, the line through the origin."""
    from stagewise.serving.batching import CostModel

    model = CostModel()
    for pairs in (3, 3, 30, 90, 240, 3):
        model.record(pairs, 0.05 + 0.004 * pairs)
    assert (model.fixed_s, model.per_pair_s, model.largest) == (pytest.approx(0.05), pytest.approx(0.004), 240)
    assert model.seconds(480, 2) == pytest.approx(2.02)
    one = CostModel()
    one.record(3, 0.062)
    assert (one.fixed_s, one.per_pair_s) == (0.0, pytest.approx(0.062 / 3))


def test_a_cost_measured_on_small_batches_only_never_refuses_a_large_request_for_good():
    """Until the lane has measured batches of about a request's size, it does not call the request impossible: it
    tries it on an idle lane (and measures it); once measured at that size, a request that cannot fit is a 422."""
    from stagewise.serving.batching import Lane, ServiceError

    lane = Lane("rerank", None, None, max_batch=32, max_batch_pairs=256, batch_wait_ms=2, max_queued=1024,
                max_queued_pairs=32768, timeout_s=2.0)
    try:
        for _ in range(5):
            lane.cost.record(3, 0.062)  # 3-pair batches: 20 ms a pair as far as they can tell
        lane.admit(1, 200)  # 4 s at that rate, but nothing near 200 pairs was measured: admitted
        lane.cost.record(200, 4.05)  # measured: it does take that long
        with pytest.raises(ServiceError) as e:
            lane.admit(1, 200)
        assert e.value.status == 422 and e.value.headers is None
        assert "1 query × depth 200 = 200 pairs" in e.value.message and "depth at most" in e.value.message
    finally:
        lane.executor.shutdown()


def test_the_running_batch_counts_only_its_wanted_pairs_and_the_time_they_still_need():
    """After a flood times out, the batch still on the model thread skips its abandoned queries: it is no work ahead
    of a new request (counting all its pairs refused the first request after a flood with 503). A wanted batch is
    ahead for its cost less the time it has run."""
    import concurrent.futures as futures

    from stagewise.serving.batching import Lane, ServiceError, Work

    lane = Lane("rerank", None, None, max_batch=32, max_batch_pairs=256, batch_wait_ms=2, max_queued=1024,
                max_queued_pairs=32768, timeout_s=1.0)
    try:
        lane.cost.record(240, 1.2)  # 5 ms a pair
        now = time.perf_counter()
        late = Work([None] * 8, 30, futures.Future(), now - 2, deadline=now - 1)  # answered 504 already
        lane.running, lane.running_since = [(late, 0, 8)], now - 0.1
        lane.admit(1, 30)  # 0.15 s alone, and nothing wanted ahead of it
        wanted = Work([None] * 8, 30, futures.Future(), now, deadline=now + 10)
        lane.running, lane.running_since = [(wanted, 0, 8)], now - 0.1
        with pytest.raises(ServiceError) as e:  # 1.1 s of it still to run
            lane.admit(1, 30)
        assert e.value.status == 503 and "240 pairs" in e.value.message
        lane.running_since = now - 1.0  # 0.2 s of it left
        lane.admit(1, 30)
    finally:
        lane.executor.shutdown()


def test_a_request_that_fits_the_timeout_alone_is_admitted_when_nothing_is_ahead(start, reranked_index,
                                                                                 slow_reranker):
    """With nothing queued, a request whose own work needs 84-92% of the timeout at the measured rate is admitted
    and answered (it was a 503 'retry shortly', Retry-After: 1, that no retry could fix). A second one arriving
    while it runs is the 503: busy now, with a Retry-After covering the work ahead; retried after that, answered."""
    slow_reranker(0.01)  # 10 ms a pair
    timeout = 4.0
    base = start(reranked_index, timeout_s=timeout, max_depth=30, max_request_pairs=1200, max_batch_queries=40)
    warm = post(base, "/search/batch", {"queries": [f"cats {i}" for i in range(8)], "depth": 30, "k": 1})
    assert warm.status_code == 200, warm.text  # 240 pairs, 2.4 s: the lane has measured its rate
    rate = httpx.get(base + "/stats").json()["lanes"]["rerank"]["pairs_per_s"]
    n = next(n for n in range(1, 40) if n * 30 / rate >= 0.84 * timeout)
    assert n * 30 / rate < 0.93 * timeout, (n, rate)
    big = {"queries": [f"which animal purrs {i}" for i in range(n)], "depth": 30, "k": 1}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, base, "/search/batch", big)
        time.sleep(0.3)
        assert not running.done()  # admitted, and at work
        began = time.perf_counter()
        refused = post(base, "/search/batch", big)
        assert time.perf_counter() - began < 1
        assert "busy" in error_of(refused, 503)
        assert 2 <= int(refused.headers["retry-after"]) <= timeout + 1  # the work ahead: about n × 30 pairs
        answer = running.result()
    assert answer.status_code == 200, answer.text
    assert post(base, "/search/batch", big).status_code == 200  # retried once the lane is free: it fits


def test_a_request_that_could_never_fit_is_a_422_saying_what_it_costs_and_what_fits(start, reranked_index,
                                                                                   slow_reranker):
    """At the measured rate, 20 queries at depth 30 need 6 s of a 2 s timeout even on an idle service: refused at
    once with 422 (no Retry-After: retrying cannot help) saying what it costs and the largest requests like it that
    fit, fewer queries or a smaller depth, consistent with the measured rate; such a request is admitted."""
    import re

    slow_reranker(0.01)
    base = start(reranked_index, timeout_s=2.0, max_depth=30, max_request_pairs=1200, max_batch_queries=40)
    warm = post(base, "/search/batch", {"queries": [f"cats {i}" for i in range(5)], "depth": 30, "k": 1})
    assert warm.status_code == 200, warm.text  # 150 pairs, 1.5 s: measured
    began = time.perf_counter()
    r = post(base, "/search/batch", {"queries": [f"cats {i}" for i in range(20)], "depth": 30, "k": 1})
    message = error_of(r, 422)
    assert time.perf_counter() - began < 1 and "retry-after" not in r.headers
    assert "20 queries × depth 30 = 600 pairs to rerank need about" in message
    assert "over the 2 s timeout even with nothing else queued" in message and "pairs/s" in message
    most = int(re.search(r"at most (\d+) queries at depth 30", message).group(1))
    deepest = int(re.search(r"depth at most (\d+) for 20 queries", message).group(1))
    rate = httpx.get(base + "/stats").json()["lanes"]["rerank"]["pairs_per_s"]
    assert most * 30 / rate <= 2.0 < (most + 2) * 30 / rate, (message, rate)
    assert 20 * deepest / rate <= 2.0 < 20 * (deepest + 2) / rate, (message, rate)
    lane = httpx.get(base + "/stats").json()["lanes"]["rerank"]
    assert (lane["refused_never_fits"], lane["refused_busy"]) == (1, 0)
    # what it says fits is admitted (it fits alone; whether it beats the clock by its last milliseconds is not the
    # point here)
    fits = post(base, "/search/batch", {"queries": [f"cats {i}" for i in range(most)], "depth": 30, "k": 1})
    assert fits.status_code in (200, 504), fits.text


# ---- deadlines -------------------------------------------------------------------------------------------------


def test_a_timed_out_request_stops_its_work(start, reranked_index, slow_reranker):
    """A request that costs 10 s of reranking gets its 504 after 0.5 s, and the model thread stops within a chunk:
    far fewer pairs than asked are scored, and the next request is answered at once."""
    scored = slow_reranker(0.01)  # 10 ms per pair: 32-pair chunks of 0.32 s
    base = start(reranked_index, timeout_s=0.5, max_depth=30, max_request_pairs=1020, max_batch_queries=64)
    began = time.perf_counter()
    r = post(base, "/search/batch", {"queries": [f"cats {i}" for i in range(34)], "depth": 30, "k": 1})
    assert "timed out after 0.5 s" in error_of(r, 504)
    assert time.perf_counter() - began < 2
    time.sleep(0.5)  # the chunk in flight when the deadline passed
    assert 0 < sum(scored) <= 96, scored  # of 1,020 pairs
    began = time.perf_counter()
    r = post(base, "/search", {"query": "cats", "k": 3})
    assert r.status_code == 200, r.text
    assert time.perf_counter() - began < 0.4
    lane = httpx.get(base + "/stats").json()["lanes"]["rerank"]
    assert lane["stopped_past_deadline"] == 1


def test_first_stage_requests_skip_the_reranking_queue(start, reranked_index, slow_reranker):
    """While the reranker is busy for seconds, rerank: false requests are answered in their normal time."""
    slow_reranker(0.01)
    base = start(reranked_index, timeout_s=5, max_depth=30, max_request_pairs=1000, max_batch_queries=64)
    normal = statistics.median(_timed(base, {"query": "dogs", "rerank": False}) for _ in range(5))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, base, "/search/batch", {"queries": [f"cats {i}" for i in range(10)], "depth": 30})
        time.sleep(0.3)
        assert not busy.done()
        during = [_timed(base, {"query": "dogs", "rerank": False}) for _ in range(5)]
        assert not busy.done()  # these were answered while the reranker was still at work
        assert busy.result().status_code == 200
    assert statistics.median(during) < max(10 * normal, 0.25), (normal, during)


def test_a_cheap_reranked_request_runs_between_the_slices_of_an_expensive_one(start, reranked_index, slow_reranker):
    """A 1,020-pair request (5 s of reranking) is split into batches of at most 256 pairs; a 3-pair request arriving
    meanwhile runs at the next batch (the cheapest first), not after the whole of it; both answers are right."""
    slow_reranker(0.005)
    base = start(reranked_index, timeout_s=10, max_depth=30, max_request_pairs=1020, max_batch_queries=64,
                 max_batch_pairs=256)
    big = {"queries": [f"which animal purrs {i}" for i in range(34)], "depth": 30, "k": 5}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        began = time.perf_counter()
        running = pool.submit(post, base, "/search/batch", big)
        time.sleep(0.3)
        cheap = _timed(base, {"query": "cats", "k": 3})
        assert not running.done()  # answered while the expensive request was still at work
        answer = running.result()
        whole = time.perf_counter() - began
    # one 256-pair batch (1.3 s) at most was ahead of it, not the whole request (5 s)
    assert answer.status_code == 200 and cheap < 0.5 * whole, (whole, cheap)
    for query, result in zip(big["queries"], answer.json()["results"]):
        want = reranked_index.search(query, k=5, depth=30)
        assert [h["doc_id"] for h in result["hits"]] == [w.doc_id for w in want]
        assert [h["score"] for h in result["hits"]] == pytest.approx([w.score for w in want], abs=1e-5)
    sizes = httpx.get(base + "/stats").json()["batch_size"]
    assert sizes["count"] >= 5 and sizes["max"] <= 9  # 256 pairs: 8 queries at depth 30, and the cheap one


def _timed(base: str, body: dict) -> float:
    began = time.perf_counter()
    r = post(base, "/search", body)
    assert r.status_code == 200, r.text
    return time.perf_counter() - began


def test_a_flood_of_maximal_requests_then_normal_latency(start, reranked_index, slow_reranker):
    """40 concurrent requests of the maximum cost (2 minutes of reranking in all, far over the 1 s timeout), twice.

    The first flood comes before the service has measured its reranker: all are queued, and each is answered 504
    within its timeout, its work stopped or never started. The second comes once it knows its rate: refused at once
    with 422, as no retry could make 3 s of work fit 1 s. During a flood a first-stage request is answered at once;
    after it a reranked one is answered at its normal latency, and of all the work asked, less than one maximal
    request's worth was done.

    Each answer's time is taken from when its request was sent, over one client shared by the 40 threads: with a
    client per request, setting each up (in this process, 40 at once) spread the sends over a second, and that
    second was counted against the service's timeout."""
    import threading

    scored = slow_reranker(0.005)
    settings = dict(timeout_s=1.0, max_depth=30, max_request_pairs=600, max_batch_queries=20, max_request_hits=600)
    base = start(reranked_index, **settings)
    maximal = {"queries": [f"which animal purrs {i}" for i in range(20)], "depth": 30, "k": 30}  # 600 pairs: 3 s
    sent = threading.local()

    def flood(request=maximal):
        def one(_):
            r = client.post("/search/batch", json=request)
            return r.status_code, time.perf_counter() - sent.at

        with httpx.Client(base_url=base, timeout=30, limits=httpx.Limits(max_connections=40),
                          event_hooks={"request": [lambda _: setattr(sent, "at", time.perf_counter())]}) as client, \
                concurrent.futures.ThreadPoolExecutor(40) as pool:
            answers = pool.map(one, range(40))
            time.sleep(0.5)
            during = _timed(base, {"query": "dogs", "rerank": False})
            answers = list(answers)
        # the timeout, and a second for this process's 40 clients, the server's event loop and the model thread to
        # share two cores: a request held past its deadline (queued behind work) would take seconds more
        assert all(seconds < settings["timeout_s"] + 1.0 for _, seconds in answers), answers
        assert during < 1.0
        return collections.Counter(status for status, _ in answers)

    assert flood() == {504: 40}
    first_after = _timed(base, {"query": "cats", "k": 3})  # no leftover work ahead of it
    assert sum(scored) < 600, sum(scored)  # about one timeout's worth (1 s at 5 ms a pair, and a chunk)
    normal = statistics.median(_timed(base, {"query": "cats", "k": 3}) for _ in range(5))
    assert first_after < max(5 * normal, 0.5), (normal, first_after)

    assert flood() == {422: 40}  # 3 s of work each, at the measured rate: could never finish within 1 s
    assert _timed(base, {"query": "cats", "k": 3}) < max(5 * normal, 0.5)
    # 0.2 s each: a few are admitted (answered, or timed out in the crush of 40 clients in this process), the rest
    # refused at once with 503, as the queue ahead of them could not finish within the timeout: busy now
    answered = flood({**maximal, "queries": maximal["queries"][:20], "depth": 2})
    assert answered[503] >= 30 and answered[200] + answered[504] <= 10 and set(answered) <= {200, 503, 504}, answered
    lane = httpx.get(base + "/stats").json()["lanes"]["rerank"]
    assert lane["queued"] == 0 and lane["queued_pairs"] == 0 and lane["refused_busy"] >= 30
    assert lane["refused_never_fits"] == 40 and lane["stopped_past_deadline"] >= 1


# ---- settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, value, words", [
    ("timeout_s", 0, ["'--timeout'", "more than 0"]),
    ("timeout_s", float("nan"), ["'--timeout'", "finite"]),
    ("max_k", 0, ["'--max-k'", "more than 0"]),
    ("max_depth", -1, ["'--max-depth'"]),
    ("max_batch", 0, ["'--max-batch'"]),
    ("batch_wait_ms", -1, ["'--batch-wait-ms'", "0 or more"]),
    ("max_request_pairs", 10, ["'--max-request-pairs'", "at least --max-depth"]),
    ("max_request_hits", 5, ["'--max-request-hits'", "at least --max-k"]),
    ("max_text_chars", 0, ["'--max-text-chars'"]),
    ("max_k", 2.5, ["'--max-k'", "integer"]),
    ("max_queued", 0, ["'max_queued'"]),
    ("reload_interval_s", -1, ["'--reload-interval'", "0 or more"]),
    ("max_batch_queries", 0, ["'--max-batch-queries'"]),
    ("body_timeout_s", 0, ["'--body-timeout'", "more than 0"]),
])
def test_settings_that_would_refuse_every_request_are_refused(setting, value, words):
    from stagewise.errors import StagewiseError

    with pytest.raises(StagewiseError) as e:
        ServiceSettings(**{setting: value}).validate()
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("options, words", [
    (["--port", "70000"], ["--port"]),
    (["--port", "0"], ["--port"]),
    (["--timeout", "0"], ["'--timeout'", "more than 0"]),
    (["--max-k", "0"], ["'--max-k'"]),
    (["--max-depth", "0"], ["'--max-depth'"]),
    (["--batch-wait-ms", "-1"], ["'--batch-wait-ms'"]),
    (["--host", "no such host.invalid"], ["'--host'"]),
    (["--reload-interval", "-1"], ["'--reload-interval'"]),
    (["--max-request-pairs", "5"], ["'--max-request-pairs'"]),
    (["--max-text-chars", "0"], ["'--max-text-chars'"]),
    (["--body-timeout", "0"], ["'--body-timeout'"]),
])
def test_serve_refuses_its_own_bad_settings_in_one_line(bm25_index, monkeypatch, options, words):
    """Before anything starts: exit 2, one line naming the option, no traceback; the server is never started."""
    from typer.testing import CliRunner

    from stagewise.cli import app

    started = []
    monkeypatch.setattr("stagewise.serving.service.serve", lambda *args, **kwargs: started.append(args))
    result = CliRunner().invoke(app, ["serve", str(bm25_index.path), *options])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not started
    lines = [line for line in result.output.splitlines() if line.strip() and not set(line) <= set("─│╭╮╰╯ ")]
    assert any(all(w in line for w in words) for line in lines), result.output


def test_serve_refuses_a_port_in_use(bm25_index, monkeypatch):
    import socket

    from typer.testing import CliRunner

    from stagewise.cli import app

    monkeypatch.setattr("stagewise.serving.service.serve", lambda *args, **kwargs: pytest.fail("served"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(bm25_index.path), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
