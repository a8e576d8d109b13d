"""The service does what its /openapi.json says, checked by a schema-driven fuzzer (schemathesis) against the live
service, and by the probe's cases: every status documented, every error body ``{"error": ...}``, integers as
JSON Schema counts them, bodies that cannot be parsed answered 422, blank queries refused however they are blank,
and /docs working offline.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import running_server
from stagewise.serving.service import ServiceSettings, create_app

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)

SETTINGS = ServiceSettings(max_k=20, max_depth=10, max_query_chars=200, max_batch_queries=5, max_request_hits=100,
                           max_request_pairs=40, max_text_chars=50)


@pytest.fixture(scope="module")
def url(reranked_index):
    with running_server(create_app(reranked_index, SETTINGS)) as base:
        yield base


@pytest.fixture(scope="module")
def bm25_url(bm25_index):
    """The same bounds over an index without a reranker: its schema must say what it refuses (rerank: true)."""
    with running_server(create_app(bm25_index, SETTINGS)) as base:
        yield base


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("served", ["url", "bm25_url"])
def test_the_service_conforms_to_its_schema(request, served, mode):
    """Schemathesis' cases for every operation of /openapi.json, valid (positive) and schema-invalid (negative):
    status codes, content types and bodies as documented, no 500, every invalid request refused, and every valid
    one accepted (no ST202: over an index without a reranker the schema does not offer rerank: true)."""
    from hypothesis import given

    url = request.getfixturevalue(served)
    api = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.label for op in operations} == {"POST /search", "POST /search/batch", "GET /health", "GET /stats"}
    for operation in operations:
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # no inputs: nothing can be made invalid

        @given(operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            case.call_and_validate(timeout=30)

        check()


def post(url: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url + "/search", json=body, timeout=30, **kwargs)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_every_error_status_is_documented_with_the_error_body(url):
    spec = httpx.get(url + "/openapi.json").json()
    for path in ("/search", "/search/batch"):
        responses = spec["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "408", "413", "422", "500", "503", "504"}
        for status in ("408", "413", "422", "500", "503", "504"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_an_integral_float_is_an_integer_as_json_schema_says(url, reranked_index):
    body = post(url, {"query": "cats", "k": 3.0, "depth": 5.0}).json()
    assert len(body["hits"]) == 3 and body["depth"] == 5
    assert "k:" in error_of(post(url, {"query": "cats", "k": 3.5}), 422)
    assert "k:" in error_of(post(url, {"query": "cats", "k": "3"}), 422)
    assert "k:" in error_of(post(url, {"query": "cats", "k": True}), 422)


@pytest.mark.parametrize("content, words", [
    (b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["body: JSON nested too deeply"]),
    (b'{"query": "caf\xe9"}', ["body: not UTF-8", "byte 14"]),
    (b'{"query": "cats", "k": ' + b"9" * 5000 + b"}", ["body: unreadable JSON", "digits"]),
    (b'{"query": "cats", ', ["body: invalid JSON at character 18"]),
])
def test_a_body_that_cannot_be_parsed_is_a_422_saying_why(url, content, words):
    r = httpx.post(url + "/search", content=content, headers={"content-type": "application/json"}, timeout=30)
    message = error_of(r, 422)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("query", ["   ", "\u200b\u200b", "\ufeff", "\u3000\t\n", "\u2028", "\x00\x07"])
def test_blank_queries_are_refused_however_they_are_blank(url, reranked_index, query):
    """The service, the CLI and the Python API share one rule: only spaces or invisible characters is blank."""
    from stagewise.errors import StagewiseError

    assert "query: is blank" in error_of(post(url, {"query": query}), 422)
    assert "queries.1: is blank" in error_of(httpx.post(url + "/search/batch", json={"queries": ["cats", query]},
                                                       timeout=30), 422)
    with pytest.raises(StagewiseError, match="is blank"):
        reranked_index.search(query)


def test_a_lone_surrogate_in_a_query_is_a_422(url):
    r = httpx.post(url + "/search", content=b'{"query": "cats \\ud800"}', headers={"content-type": "application/json"},
                   timeout=30)
    assert "query:" in error_of(r, 422)  # not text: refused before it reaches a tokenizer


def test_docs_work_offline(url):
    """/docs is Swagger UI served from the package: every asset it loads comes from this service."""
    import re

    page = httpx.get(url + "/docs", timeout=30)
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for asset in assets:
        r = httpx.get(url + asset, timeout=30)
        assert r.status_code == 200 and len(r.content) > 500, asset
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert httpx.get(url + "/docs/nope.js").status_code == 404


@pytest.mark.parametrize("query", ["", "   ", "\u200b"])
def test_the_command_line_refuses_a_blank_query_like_the_service(bm25_index, query):
    from typer.testing import CliRunner

    from stagewise.cli import app

    result = CliRunner().invoke(app, ["search", str(bm25_index.path), query])
    assert result.exit_code == 2 and "query: is blank" in result.output, result.output
