"""The HTTP search service, driven by a real HTTP client (httpx) against a real uvicorn server on loopback.

Answers must be the index's own (same hits, scores and ranks as searching in process), every bound and failure
must answer its status with ``{"error": "..."}`` naming the problem, and concurrent requests must be batched
without any answer getting lost or going to the wrong request.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import json
import threading
import time
from dataclasses import asdict

import httpx
import pytest

from conftest import SERVICE_CORPUS, _build_service_index, running_server, write_beir
from stagewise.search.fusion import Fusion
from stagewise.serving.index import Index
from stagewise.serving.service import ServiceSettings, create_app, is_loopback, serve

QUERIES = ["which animal purrs", "animals that bark", "language with memory safety", "drink from roasted beans",
           "history of trains", "care of violins", "myths about owls", "dynamic typing"]
# small bounds, so every one of them can be crossed cheaply
SETTINGS = dict(max_k=20, max_depth=10, max_query_chars=200, max_batch_queries=5)
DOCS = {d["_id"]: d for d in SERVICE_CORPUS}


@pytest.fixture(scope="module")
def url(reranked_index):
    """One server over the reranked index for the tests that only read from it."""
    with running_server(create_app(reranked_index, ServiceSettings(**SETTINGS))) as base:
        yield base


@pytest.fixture
def start():
    """``start(index, **settings)`` serves a fresh app for this test (clean stats, its own settings); stopped after."""
    with contextlib.ExitStack() as stack:
        yield lambda index, **settings: stack.enter_context(running_server(create_app(index, ServiceSettings(**settings))))


@pytest.fixture
def block_search(monkeypatch):
    """``block_search(index)`` makes the index's first ``search_many`` wait until ``release`` is set.

    Returns (entered, release) events; release is always set at teardown so no model thread is left waiting.
    """
    events = []

    def install(index):
        entered, release, original = threading.Event(), threading.Event(), index.search_many
        calls = []

        def blocking(queries, cancelled=None):
            calls.append(len(queries))
            if len(calls) == 1:
                entered.set()
                release.wait(20)
            return original(queries, cancelled)

        monkeypatch.setattr(index, "search_many", blocking)
        events.append(release)
        return entered, release

    yield install
    for release in events:
        release.set()


def post(base: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    """The response is ``status`` with exactly ``{"error": message}``, and the message contains every word."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


def assert_same_hits(got: list[dict], want, swap_tol: float = 0.0) -> None:
    """``got`` (JSON hits) equals ``want`` (in-process Hits): ids, ranks, scores, first-stage rank and score, text.

    Answers computed in another batch are padded differently, so their scores differ in the 7th digit: with
    ``swap_tol`` two documents whose scores are that close may swap places; each document's own scores still match.
    """
    tol = max(swap_tol, 1e-6)
    assert len(got) == len(want)
    by_id = {w.doc_id: w for w in want}
    for rank, (g, w) in enumerate(zip(got, want), start=1):
        assert g["rank"] == w.rank == rank
        assert g["score"] == pytest.approx(w.score, abs=tol)
        if g["doc_id"] != w.doc_id:  # only a near-tie may swap
            assert g["doc_id"] in by_id and abs(by_id[g["doc_id"]].score - w.score) <= swap_tol, (g, w)
        own = by_id[g["doc_id"]]
        assert g["first_stage_score"] == pytest.approx(own.first_stage_score, abs=tol)
        assert (g["rerank_score"] is None) == (own.rerank_score is None)
        assert (g["fused_score"] is None) == (own.fused_score is None)
        if own.rerank_score is not None:
            assert g["rerank_score"] == pytest.approx(own.rerank_score, abs=tol)
        if own.fused_score is not None:  # the final score is the fused one where a fusion ordered the hit
            assert g["fused_score"] == pytest.approx(own.fused_score, abs=tol) and g["score"] == g["fused_score"]
        elif own.rerank_score is not None:
            assert g["score"] == g["rerank_score"]
        if not swap_tol:
            assert g["first_stage_rank"] == w.first_stage_rank
        doc = DOCS[g["doc_id"]]
        assert (g["title"], g["text"], g["truncated"]) == (doc["title"], doc["text"], False)


# ---- answers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"k": 5, "depth": 8}, {"k": 4, "rerank": False}, {"k": 20, "depth": 10},
                                     {"k": 1, "depth": 1, "rerank": True}, {"k": 7, "depth": 5, "rerank": False}])
def test_search_answers_what_the_index_answers_in_process(url, reranked_index, options):
    """The service adds nothing and loses nothing: same hits as Index.search with the same k, depth and rerank."""
    k, rerank = options.get("k", 10), options.get("rerank", True)
    depth = options.get("depth", reranked_index.pipeline.depth) if rerank else None
    for query in QUERIES[:4]:
        r = post(url, "/search", {"query": query, **options})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"query", "hits", "reranked", "depth", "index_version", "timings_ms"}
        assert (body["query"], body["reranked"], body["depth"]) == (query, rerank, depth)
        assert body["index_version"] == reranked_index.version
        assert set(body["timings_ms"]) == {"first_stage", "rerank", "total"}
        assert all(v >= 0 for v in body["timings_ms"].values())
        assert body["timings_ms"]["total"] >= body["timings_ms"]["first_stage"]
        assert_same_hits(body["hits"], reranked_index.search(query, k=k, depth=depth, rerank=rerank))
        hits = body["hits"]
        if rerank:  # the top depth carry reranker scores, the rest keep the first stage's
            assert [h["rerank_score"] is not None for h in hits] == [i < depth for i in range(len(hits))]
        else:
            assert all(h["rerank_score"] is None and h["rank"] == h["first_stage_rank"] for h in hits)


def test_reranking_changes_the_answer(url):
    """The rerank flag reaches the pipeline: with the reranker some query's order differs from the first stage's."""
    moved = 0
    for query in QUERIES:
        on = post(url, "/search", {"query": query, "k": 5}).json()["hits"]
        off = post(url, "/search", {"query": query, "k": 5, "rerank": False}).json()["hits"]
        assert {h["doc_id"] for h in on[:3]} == {h["doc_id"] for h in off[:3]}  # depth 3: reordered, not replaced
        assert [h["doc_id"] for h in on[3:]] == [h["doc_id"] for h in off[3:]]
        moved += [h["doc_id"] for h in on] != [h["doc_id"] for h in off]
    assert moved > 0


def test_index_without_reranker_answers_first_stage_only(start, bm25_index):
    """Over a BM25-only index the default is no reranking (depth null), and hits are BM25's."""
    base = start(bm25_index)
    for query in QUERIES[:4]:
        for options in ({}, {"rerank": False, "k": 3}):
            body = post(base, "/search", {"query": query, **options}).json()
            assert (body["reranked"], body["depth"]) == (False, None)
            assert_same_hits(body["hits"], bm25_index.search(query, k=options.get("k", 10), rerank=False))


def test_batch_answers_in_request_order_like_single_searches(url, reranked_index):
    """Each batch result belongs to the query at its position and equals that query's /search answer."""
    queries = QUERIES[:5]
    for order in (queries, queries[::-1]):
        r = post(url, "/search/batch", {"queries": order, "k": 4, "depth": 5})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [res["query"] for res in results] == order
        for query, res in zip(order, results):
            assert (res["reranked"], res["depth"]) == (True, 5)
            single = post(url, "/search", {"query": query, "k": 4, "depth": 5}).json()
            assert_same_hits(res["hits"], reranked_index.search(query, k=4, depth=5), swap_tol=2e-6)
            assert [h["doc_id"] for h in res["hits"]] == [h["doc_id"] for h in single["hits"]]
    results = post(url, "/search/batch", {"queries": queries[:2], "rerank": False, "k": 2}).json()["results"]
    assert [(res["reranked"], res["depth"], len(res["hits"])) for res in results] == [(False, None, 2)] * 2


# ---- fusion ----------------------------------------------------------------------------------------------

FUSION = Fusion(0.4)


@pytest.fixture(scope="module")
def fused(tiny_bi_encoder, tiny_cross_encoder, tmp_path_factory):
    """(index, in-process pipeline): the reranked index's models with a fusion, built once, and the same pipeline
    over the same documents in memory."""
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker
    from stagewise.search.retrievers import build_first_stage

    def pipeline():
        return Pipeline(build_first_stage(str(tiny_bi_encoder)), CrossEncoderReranker(str(tiny_cross_encoder)),
                        depth=3, fusion=FUSION)

    index = _build_service_index(tmp_path_factory, "fused-index", pipeline)
    return index, pipeline().index(dict(index.corpus))


def test_a_fused_index_answers_with_the_in_process_fused_scores(start, fused):
    """/search and /search/batch carry fused_score per hit, equal (1e-6) to Pipeline.search in process."""
    index, pipeline = fused
    base = start(index)
    assert index.pipeline.fusion == FUSION and httpx.get(base + "/stats").json()["index"]["fusion"] == FUSION.config()
    for options in ({}, {"k": 5, "depth": 8}, {"k": 4, "rerank": False}):
        k, rerank = options.get("k", 10), options.get("rerank", True)
        for query in QUERIES[:4]:
            body = post(base, "/search", {"query": query, **options}).json()
            want = pipeline.search(query, k=k, depth=options.get("depth"), rerank=rerank)
            assert_same_hits(body["hits"], want)
            assert_same_hits(body["hits"], index.search(query, k=k, depth=options.get("depth"), rerank=rerank))
            fused_shown = [h["fused_score"] is not None for h in body["hits"]]
            assert fused_shown == [rerank and i < options.get("depth", 3) for i in range(k)]
    results = post(base, "/search/batch", {"queries": QUERIES[:5], "k": 4}).json()["results"]
    for res, want in zip(results, pipeline.search_batch(QUERIES[:5], k=4)):  # the same batch in process
        assert_same_hits(res["hits"], want)
        assert all(h["fused_score"] is not None for h in res["hits"][:3])


# ---- health, stats, schema -------------------------------------------------------------------------------


def test_health_and_stats_report_the_index_and_the_traffic(start, reranked_index):
    """/stats starts empty, then counts queries, errors, latency percentiles and batch sizes as they happen."""
    base = start(reranked_index, **SETTINGS)
    health = httpx.get(base + "/health").json()
    assert health.pop("loaded")
    assert health == {"status": "ok", "documents": 30, "version": reranked_index.version, "reloads": 0}

    stats = httpx.get(base + "/stats").json()
    index = stats["index"]
    assert (index["documents"], index["version"], index["depth"]) == (30, reranked_index.version, 3)
    assert index["reranker"] == reranked_index.pipeline.reranker.name
    assert index["first_stage"] == reranked_index.pipeline.first_stage.name
    assert [m["name"] for m in index["models"]] == [index["first_stage"], index["reranker"]]
    assert stats["settings"] == asdict(ServiceSettings(**SETTINGS))
    assert stats["requests"] == {} and stats["queued"] == 0
    assert stats["latency_ms"] == {"/search": {"count": 0}, "/search/batch": {"count": 0}}
    assert stats["batch_size"] == {"count": 0}

    for query in QUERIES[:3]:  # one after another: three batches of one
        assert post(base, "/search", {"query": query}).status_code == 200
    assert post(base, "/search/batch", {"queries": QUERIES[3:5]}).status_code == 200
    assert post(base, "/search", {"query": "x", "k": 0}).status_code == 422

    stats = httpx.get(base + "/stats").json()
    assert stats["requests"] == {"queries": 5, "error_422": 1}
    search = stats["latency_ms"]["/search"]
    assert search["count"] == 3 and 0 < search["p50"] <= search["p95"] <= search["p99"] <= search["max"]
    assert stats["latency_ms"]["/search/batch"]["count"] == 1
    assert stats["batch_size"] == {"count": 4, "p50": 1.0, "p95": pytest.approx(1.85), "p99": pytest.approx(1.97),
                                   "max": 2.0}
    assert {stage: s["count"] for stage, s in stats["batch_stage_ms"].items()} == {"queue": 4, "first_stage": 4, "rerank": 4}
    assert stats["uptime_s"] >= 0


def test_openapi_lists_the_endpoints_and_the_bounds(url, reranked_index):
    """Clients can read every bound from /openapi.json: k, depth, query length and batch size limits."""
    spec = httpx.get(url + "/openapi.json").json()
    assert spec["info"]["version"] == reranked_index.version
    methods = {path: set(ops) for path, ops in spec["paths"].items()}
    assert methods == {"/search": {"post"}, "/search/batch": {"post"}, "/health": {"get"}, "/stats": {"get"}}
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/SearchRequest")
    schemas = spec["components"]["schemas"]
    search, batch = schemas["SearchRequest"], schemas["BatchRequest"]
    assert search["required"] == ["query"] and search["additionalProperties"] is False
    assert (search["properties"]["k"]["minimum"], search["properties"]["k"]["maximum"]) == (1, 20)
    depth = next(s for s in search["properties"]["depth"]["anyOf"] if s.get("type") == "integer")
    assert (depth["minimum"], depth["maximum"]) == (1, 10)
    assert (search["properties"]["query"]["minLength"], search["properties"]["query"]["maxLength"]) == (1, 200)
    queries = batch["properties"]["queries"]
    assert (queries["minItems"], queries["maxItems"], queries["items"]["maxLength"]) == (1, 5, 200)
    assert batch["properties"]["k"]["maximum"] == 20
    hit = schemas["HitOut"]
    assert "fused_score" in hit["required"] and "fusion" in hit["properties"]["fused_score"]["description"]
    assert {s.get("type") for s in hit["properties"]["fused_score"]["anyOf"]} == {"number", "null"}


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, words", [
    ("/search", {"query": "cats", "k": 0}, ["k:", "greater than or equal to 1"]),
    ("/search", {"query": "cats", "k": 21}, ["k:", "less than or equal to 20"]),
    ("/search", {"query": "cats", "depth": 11}, ["depth:", "less than or equal to 10"]),
    ("/search", {"query": "cats", "depth": 0}, ["depth:", "greater than or equal to 1"]),
    ("/search", {"k": 3}, ["query:", "Field required"]),
    ("/search", {"query": ""}, ["query:", "at least 1 character"]),
    ("/search", {"query": "   "}, ["query: is blank"]),
    ("/search", {"query": "a" * 201}, ["query:", "at most 200 characters"]),
    ("/search", {"query": "cats", "nope": 1}, ["nope:", "Extra inputs are not permitted"]),
    ("/search", {"query": "cats", "k": "ten"}, ["k:", "valid integer"]),
    ("/search", {"query": 5}, ["query:", "valid string"]),
    ("/search", ["cats"], ["body:", "dictionary"]),
    ("/search", {"query": "", "k": 0}, ["query:", "k:", "; "]),  # every problem at once
    ("/search/batch", {"queries": []}, ["queries:", "at least 1 item"]),
    ("/search/batch", {"queries": ["cats"] * 6}, ["queries:", "at most 5 items"]),
    ("/search/batch", {"queries": ["cats", "dogs", "  "]}, ["queries.2: is blank"]),
    ("/search/batch", {"queries": ["cats", ""]}, ["queries.1:", "at least 1 character"]),
    ("/search/batch", {"queries": ["cats", "a" * 201]}, ["queries.1:", "at most 200 characters"]),
    ("/search/batch", {"queries": "cats"}, ["queries:", "valid list"]),
    ("/search/batch", {"query": "cats"}, ["queries:", "Field required", "query:", "Extra inputs"]),
    ("/search/batch", {"queries": ["cats"], "k": 21}, ["k:", "less than or equal to 20"]),
])
def test_bad_requests_get_422_naming_the_problem(url, path, body, words):
    assert_error(post(url, path, body), 422, *words)


def test_invalid_json_gets_422_saying_so(url):
    r = httpx.post(url + "/search", content=b'{"query": "cats", ', headers={"content-type": "application/json"})
    assert_error(r, 422, "body: invalid JSON", "character 18")


def rerank_schema(base: str) -> dict:
    return httpx.get(base + "/openapi.json").json()["components"]["schemas"]["SearchRequest"]["properties"]["rerank"]


def test_the_schema_says_what_the_index_served_can_rerank_and_follows_a_reload(tmp_path, tiny_cross_encoder):
    """Over an index without a reranker /openapi.json allows ``rerank`` false or omitted only, and ``rerank: true``
    is refused with 422 as the schema says (never answered unreranked); ``depth`` is valid and unused. After a
    reload to a version with a reranker the schema allows true, and true reranks."""
    from stagewise.data.loaders import load_corpus
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker
    from stagewise.search.retrievers import build_first_stage

    corpus = load_corpus(write_beir(tmp_path / "data", corpus=SERVICE_CORPUS) / "corpus.jsonl")
    path = tmp_path / "idx"
    Index.build(Pipeline(build_first_stage("bm25")), corpus, path)
    with running_server(create_app(path, ServiceSettings(reload_interval_s=0.05))) as base:
        assert {"type": "boolean", "enum": [False]} in rerank_schema(base)["anyOf"]
        assert_error(post(base, "/search", {"query": "cats", "rerank": True}), 422, "rerank", "no reranker")
        assert_error(post(base, "/search/batch", {"queries": ["cats"], "rerank": True, "depth": 5}), 422,
                     "no reranker")
        for options in ({"depth": 5}, {"rerank": False, "depth": 5}):
            body = post(base, "/search", {"query": "cats", **options}).json()
            assert (body["reranked"], body["depth"]) == (False, None)

        Index.build(Pipeline(build_first_stage("bm25"), CrossEncoderReranker(str(tiny_cross_encoder)), depth=3),
                    corpus, path, replace=True)
        deadline = time.monotonic() + 30
        while httpx.get(base + "/health").json()["version"] != "v000002":
            assert time.monotonic() < deadline, "the service never picked up v000002"
            time.sleep(0.05)
        assert rerank_schema(base)["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
        assert httpx.get(base + "/openapi.json").json()["info"]["version"] == "v000002"
        body = post(base, "/search", {"query": "cats", "rerank": True, "depth": 5}).json()
        assert (body["reranked"], body["depth"], body["index_version"]) == (True, 5, "v000002")


def test_body_over_the_limit_is_a_413(start, reranked_index):
    """max_body_bytes is checked before the body is read; a body of exactly the limit still gets through."""
    base = start(reranked_index, max_body_bytes=100)
    headers = {"content-type": "application/json"}
    big = json.dumps({"query": "a" * 200}).encode()
    assert_error(httpx.post(base + "/search", content=big, headers=headers), 413,
                 f"{len(big)} bytes", "limit of 100")
    exact = json.dumps({"query": "a" * (100 - len('{"query": ""}'))}).encode()
    assert len(exact) == 100
    assert httpx.post(base + "/search", content=exact, headers=headers).status_code == 200


def test_chunked_body_over_the_limit_is_a_413(start, reranked_index):
    """A client that streams its body (Transfer-Encoding: chunked, no Content-Length) must meet the same limit."""
    base = start(reranked_index, max_body_bytes=100)
    big = json.dumps({"query": "a" * 200}).encode()
    r = httpx.post(base + "/search", content=iter([big[:50], big[50:]]), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # really sent chunked
    assert_error(r, 413, "limit of 100")


def test_unknown_path_is_a_404_and_wrong_method_a_405(url):
    assert_error(httpx.get(url + "/nope"), 404, "Not Found")
    assert_error(post(url, "/search/nope", {"query": "cats"}), 404, "Not Found")
    assert_error(httpx.get(url + "/search"), 405, "Method Not Allowed")
    assert_error(post(url, "/health", {}), 405, "Method Not Allowed")


def test_405_says_which_methods_are_allowed(url):
    """RFC 9110 §15.5.6: a 405 must carry an Allow header listing the methods the resource supports."""
    assert httpx.get(url + "/search").headers.get("allow") == "POST"


def test_timeout_is_a_504_and_the_service_keeps_answering(start, reranked_index, block_search):
    """A request still waiting after timeout_s gets 504; the model finishing late answers nobody and breaks nothing."""
    entered, release = block_search(reranked_index)
    base = start(reranked_index, timeout_s=0.3)
    began = time.perf_counter()
    assert_error(post(base, "/search", {"query": "cats"}), 504, "timed out after 0.3 s")
    assert 0.3 <= time.perf_counter() - began < 5
    assert entered.is_set()
    release.set()
    r = post(base, "/search", {"query": "cats", "k": 3})
    assert r.status_code == 200, r.text
    assert_same_hits(r.json()["hits"], reranked_index.search("cats", k=3))
    assert httpx.get(base + "/stats").json()["requests"] == {"error_504": 1, "queries": 1}


def test_a_tiny_timeout_answers_504(start, reranked_index):
    """timeout_s counts queueing: 1 ms is shorter than the batcher's own wait, so every request times out."""
    base = start(reranked_index, timeout_s=0.001)
    assert_error(post(base, "/search", {"query": "cats"}), 504, "timed out after 0.001 s")
    assert_error(post(base, "/search/batch", {"queries": ["cats"]}), 504, "timed out")


def test_full_queue_is_a_503_with_retry_after(start, reranked_index, block_search):
    """With the model busy and max_queued requests waiting, the next one is refused at once, not queued forever."""
    entered, release = block_search(reranked_index)
    base = start(reranked_index, max_queued=1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, base, "/search", {"query": "cats", "k": 2})
        try:
            assert entered.wait(10)  # the model thread is busy with the first request
            waiting = pool.submit(post, base, "/search", {"query": "dogs", "k": 2})
            deadline = time.monotonic() + 10
            while httpx.get(base + "/stats").json()["queued"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.01)
            began = time.perf_counter()
            refused = post(base, "/search", {"query": "owls"})
            assert time.perf_counter() - began < 2
            assert_error(refused, 503, "busy", "retry")
            assert refused.headers["retry-after"] == "1"
        finally:
            release.set()  # before the pool waits for the requests the model holds
        answered = [running.result(), waiting.result()]
    assert [r.status_code for r in answered] == [200, 200]
    assert [r.json()["query"] for r in answered] == ["cats", "dogs"]
    assert_same_hits(answered[1].json()["hits"], reranked_index.search("dogs", k=2))


def test_a_failing_model_is_a_500_and_the_service_keeps_answering(start, reranked_index, monkeypatch):
    """An exception in search_many answers that batch with 500 and its message; the next request is fine."""
    original, calls = reranked_index.search_many, []

    def fail_once(queries, cancelled=None):
        calls.append(queries)
        if len(calls) == 1:
            raise RuntimeError("the cross-encoder fell over")
        return original(queries, cancelled)

    monkeypatch.setattr(reranked_index, "search_many", fail_once)
    base = start(reranked_index)
    assert_error(post(base, "/search", {"query": "cats"}), 500,
                 "search failed: RuntimeError: the cross-encoder fell over")
    r = post(base, "/search", {"query": "cats", "k": 4})
    assert r.status_code == 200, r.text
    assert_same_hits(r.json()["hits"], reranked_index.search("cats", k=4))
    assert httpx.get(base + "/stats").json()["requests"] == {"error_500": 1, "queries": 1}


def test_a_body_shorter_than_its_content_length_is_a_408_within_the_body_timeout(start, reranked_index):
    """A client that announces more body than it sends is answered 408 and its connection closed once
    body_timeout_s has passed (by default a few seconds), not held until it gives up."""
    import socket

    base = start(reranked_index)
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        began = time.perf_counter()
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"query": "cats"}')
        answer = b""
        while chunk := sock.recv(65536):  # until the service closes the connection (a socket timeout: held open)
            answer += chunk
        elapsed = time.perf_counter() - began
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    timeout = ServiceSettings().body_timeout_s
    assert timeout <= elapsed < timeout + 2 and timeout <= 5, elapsed
    assert json.loads(body)["error"] == f"body: 17 bytes of the 100 its Content-Length announced arrived within the " \
                                        f"{timeout:g} s allowed"
    assert post(base, "/search", {"query": "cats", "k": 2}).status_code == 200  # the service is not held up


# ---- batching --------------------------------------------------------------------------------------------


def fire_together(base: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body to /search at the same moment, each from its own thread and connection."""
    barrier = threading.Barrier(len(bodies))

    def send(body):
        with httpx.Client(base_url=base, timeout=30) as client:
            barrier.wait()
            return client.post("/search", json=body)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


@pytest.mark.parametrize("max_batch", [32, 4])
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(start, reranked_index, max_batch):
    """16 requests at once, differing in query, k, depth and rerank: batched together (up to max_batch), and
    every answer equals the in-process answer for that request: none lost, none mixed up."""
    bodies = [{"query": f"{QUERIES[i % len(QUERIES)]} {i}", "k": 1 + i % 8, "rerank": i % 3 != 0,
               **({"depth": 2 + i % 5} if i % 2 else {})} for i in range(16)]
    expected = [reranked_index.search(b["query"], k=b["k"], rerank=b["rerank"],
                                      depth=b.get("depth", 3) if b["rerank"] else None) for b in bodies]
    base = start(reranked_index, batch_wait_ms=100, max_batch=max_batch)
    responses = fire_together(base, bodies)
    for body, response, want in zip(bodies, responses, expected):
        assert response.status_code == 200, response.text
        got = response.json()
        assert (got["query"], got["reranked"]) == (body["query"], body["rerank"])
        assert got["depth"] == (body.get("depth", 3) if body["rerank"] else None)
        assert_same_hits(got["hits"], want, swap_tol=2e-6)
    stats = httpx.get(base + "/stats").json()
    assert stats["requests"] == {"queries": 16}
    sizes = stats["batch_size"]
    assert 1 < sizes["max"] <= max_batch
    assert sizes["count"] < 16  # fewer model calls than requests


def test_a_backlog_is_batched_even_with_no_batch_wait(start, reranked_index, block_search):
    """Requests that queued while the model was busy are ready: they should form one batch without any waiting."""
    entered, release = block_search(reranked_index)
    base = start(reranked_index, batch_wait_ms=0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, base, "/search", {"query": "cats"})]
        assert entered.wait(10)
        futures += [pool.submit(post, base, "/search", {"query": q}) for q in QUERIES[:3]]
        try:
            deadline = time.monotonic() + 10
            while httpx.get(base + "/stats").json()["queued"] < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            release.set()
        assert [f.result().status_code for f in futures] == [200] * 4
    assert httpx.get(base + "/stats").json()["batch_size"]["max"] == 3


# ---- defaults --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.2", False), ("example.com", False), ("", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_the_service_binds_to_loopback_by_default():
    """It has no authentication: both serve() and the CLI's serve default to 127.0.0.1."""
    import typer.main
    from typer.testing import CliRunner

    from stagewise.cli import app

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    host = next(p for p in typer.main.get_command(app).commands["serve"].params if p.name == "host")
    assert host.default == "127.0.0.1" and is_loopback(host.default)
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    assert "127.0.0.1" in result.output and "--host" in result.output
