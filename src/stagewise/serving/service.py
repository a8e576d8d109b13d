"""The search service: a FastAPI app over a :class:`~stagewise.serving.live_index.LiveIndex`.

Concurrent requests are micro-batched through the models (:mod:`stagewise.serving.batching`). Every request has bounds
on its fields (query length, ``k``, ``depth``, batch size, body size) and on the work and the answer they add up
to (reranking pairs, hits, text per hit), a timeout after which its work stops, and errors that say what is
wrong, always as ``{"error": "..."}``, each documented in ``/openapi.json``. The index follows ``CURRENT``: a
version committed by ``index add`` is served as soon as it is loaded, and ``/openapi.json`` describes the version
served (``rerank`` can only be false over one without a reranker). A vector store that is down (a Milvus server
restarting) is a 503 that names no internal address, and ``/health`` says so. ``/docs`` serves Swagger UI from the
package, offline. It binds to loopback unless told otherwise: it has no authentication.
"""

import asyncio
import collections
import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

import numpy as np

from stagewise.errors import StagewiseError, Unavailable
from stagewise.limits import MAX_BATCH, MAX_CANDIDATES, MAX_COUNT, MAX_SECONDS, MAX_TEXT_CHARS
from stagewise.search.pipeline import Query, is_blank
from stagewise.serving.batching import Batcher, ServiceError
from stagewise.serving.index import Index
from stagewise.serving.live_index import LiveIndex

PAGE = Path(__file__).with_name("search_page.html")


@dataclass
class ServiceSettings:
    """Every bound of the service; ``validate`` refuses a setting that would make every request fail."""

    max_query_chars: int = 1000
    max_k: int = 100
    max_depth: int = 200
    max_batch_queries: int = 64  # per /search/batch request
    max_request_pairs: int = 2048  # queries × depth: cross-encoder pairs one request may cost
    max_request_hits: int = 1000  # queries × k: hits one request may return
    max_text_chars: int = 2000  # each hit's title and text are cut to this many characters
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 5.0  # the whole body must arrive within this (one shorter than its Content-Length: 408)
    timeout_s: float = 10.0  # per request, queueing included; its work stops when it passes
    max_batch: int = 32  # queries run through the models together
    max_batch_pairs: int = 256  # pairs one micro-batch scores: a larger request is split, cheaper ones run between
    batch_wait_ms: float = 2.0  # how long the batcher waits for more requests to join a batch
    max_queued: int = 1024  # requests waiting beyond this are refused with 503
    max_queued_pairs: int = 32768  # reranking pairs waiting beyond this are refused with 503
    reload_interval_s: float = 1.0  # how often CURRENT is checked for a new version (0: never)

    # the command-line option of each setting, for error messages
    OPTIONS = {"max_k": "--max-k", "max_depth": "--max-depth", "timeout_s": "--timeout", "max_batch": "--max-batch",
               "batch_wait_ms": "--batch-wait-ms", "max_request_pairs": "--max-request-pairs",
               "max_request_hits": "--max-request-hits", "max_text_chars": "--max-text-chars",
               "max_batch_queries": "--max-batch-queries", "reload_interval_s": "--reload-interval",
               "body_timeout_s": "--body-timeout"}

    # the most each setting can be and still be served (the rest: counts, at most limits.MAX_COUNT)
    MOST = {"max_k": MAX_CANDIDATES, "max_depth": MAX_CANDIDATES, "max_batch": MAX_BATCH,
            "max_batch_pairs": MAX_BATCH, "max_batch_queries": MAX_BATCH, "max_query_chars": MAX_TEXT_CHARS,
            "max_text_chars": MAX_TEXT_CHARS, "max_body_bytes": 1 << 31, "timeout_s": MAX_SECONDS,
            "body_timeout_s": MAX_SECONDS, "batch_wait_ms": 1000 * MAX_SECONDS, "reload_interval_s": MAX_SECONDS}

    def validate(self) -> "ServiceSettings":
        def bad(name: str, rule: str):
            option = self.OPTIONS.get(name)
            where = f"option '{option}'" if option else f"setting '{name}'"
            raise StagewiseError(f"{where}: {rule}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(f.name, "must be a finite number")
            if f.name in ("batch_wait_ms", "reload_interval_s"):
                if value < 0:
                    bad(f.name, "must be 0 or more")
            elif f.type in (int, "int") and not isinstance(value, int):
                bad(f.name, "must be an integer")
            elif value <= 0:
                bad(f.name, "must be more than 0 (0 would refuse every request)")
            if value > self.MOST.get(f.name, MAX_COUNT):
                bad(f.name, f"must be at most {self.MOST.get(f.name, MAX_COUNT):g} (what the service can serve)")
        if self.max_request_pairs < self.max_depth:
            bad("max_request_pairs", f"must be at least --max-depth ({self.max_depth}), or one query at full depth "
                                     "is refused")
        if self.max_request_hits < self.max_k:
            bad("max_request_hits", f"must be at least --max-k ({self.max_k})")
        if self.max_queued_pairs < self.max_request_pairs:
            bad("max_queued_pairs", f"must be at least max_request_pairs ({self.max_request_pairs})")
        return self


def _percentiles(values) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"count": len(a), "p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}


def _integral(value):
    """JSON Schema's integers include 89.0: accept a float with no fraction where an integer is asked for."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        return int(value)
    return value


@functools.cache
def not_blank_pattern() -> str:
    """The JSON Schema ``pattern`` of a query that is not blank (:func:`~stagewise.search.pipeline.is_blank`): it holds a
    character outside the blank ones, so clients and schema-driven tools know what is refused."""
    blank = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF and is_blank(chr(c))]
    ranges, start = [], blank[0]
    for previous, c in zip(blank, blank[1:] + [None]):
        if c != previous + 1:
            ranges.append((start, previous))
            start = c

    def char(c: int) -> str:
        return "\\" + chr(c) if chr(c) in "\\]^-[" else chr(c)

    return "[^" + "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in ranges) + "]"


def _check_body(body: bytes) -> str | None:
    """Why a JSON body cannot be parsed (invalid UTF-8, too deep, a number too long), in one line, or None.

    Run only after FastAPI failed to parse it (its 400 becomes the documented 422): never twice on the hot path."""
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"body: not UTF-8 (byte {e.start})"
    except json.JSONDecodeError as e:
        return f"body: invalid JSON at character {e.pos} ({e.msg})"
    except RecursionError:
        return "body: JSON nested too deeply"
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        return f"body: unreadable JSON ({str(e).splitlines()[0]})"
    return None


def create_app(index: Index | LiveIndex | str | Path, settings: ServiceSettings | None = None,
               allow_untrained_reranker: bool = False):
    """The FastAPI app: ``/`` (search page), ``POST /search``, ``POST /search/batch``, ``/health``, ``/stats``,
    ``/docs``. ``index`` is followed as it changes on disk (see :class:`~stagewise.serving.live_index.LiveIndex`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if not isinstance(index, LiveIndex):
        index = LiveIndex(index if isinstance(index, Index) else Index.load(index),
                          allow_untrained_reranker=allow_untrained_reranker)
    live = index
    settings = (settings or ServiceSettings()).validate()
    s = settings

    def search(index: Index, queries, cancelled):  # on a lane's model thread; each request stays on one version
        try:
            return index.search_many(queries, cancelled)
        except Unavailable as e:  # a vector store restarting: the same request may work in a moment
            raise ServiceError(503, str(e), {"Retry-After": "2"}) from None

    batcher = Batcher(search, lambda: live.index, settings)
    started = time.time()
    latency_ms: dict[str, collections.deque[float]] = {
        "/search": collections.deque(maxlen=10_000), "/search/batch": collections.deque(maxlen=10_000)}
    counts: collections.Counter = collections.Counter()

    def integer(low: int, high: int):
        return Annotated[int, Field(ge=low, le=high), BeforeValidator(_integral)]

    def text(low: int, high: int):  # the pattern documents the blank check, which gives the clearer message
        blank = {"pattern": not_blank_pattern()}
        return Annotated[str, Field(min_length=low, max_length=high, json_schema_extra=blank)]

    def has_reranker() -> bool:
        return live.index.pipeline.reranker is not None

    def depth_schema(schema: dict) -> None:  # called whenever /openapi.json is made: it describes the version served
        schema["description"] = (f"candidates the reranker reads (default {live.index.pipeline.depth}); reranking "
                                 f"costs queries × depth pairs, at most {s.max_request_pairs:,} per request, and "
                                 "must fit the timeout at the measured speed (422 says what fits)" if has_reranker()
                                 else "candidates the reranker reads: this index has no reranker, so it is not used")

    def rerank_schema(schema: dict) -> None:
        if not has_reranker():  # asking for it is refused (422): the schema says so
            schema["anyOf"] = [{"type": "boolean", "enum": [False]}, {"type": "null"}]
            schema["description"] = "run the reranker: this index has none, so false or omitted"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        k: integer(1, s.max_k) = Field(10, description="results to return")
        depth: integer(1, s.max_depth) | None = Field(None, json_schema_extra=depth_schema)
        rerank: bool | None = Field(None, description="run the reranker (default: when the index has one)",
                                    json_schema_extra=rerank_schema)
        include_text: bool = Field(True, description="return each hit's title and text (cut to "
                                                     f"{s.max_text_chars:,} characters each); false: ids and scores "
                                                     "only")

    class SearchRequest(Options):
        query: text(1, s.max_query_chars) = Field(
            ..., description="the query; one of only spaces or invisible characters is refused (422)")

    class BatchRequest(Options):
        queries: list[text(1, s.max_query_chars)] = Field(
            ..., min_length=1, max_length=s.max_batch_queries,
            description=f"queries × k may be at most {s.max_request_hits:,} hits, and with reranking queries × depth "
                        f"at most {s.max_request_pairs:,} pairs")

    class HitOut(BaseModel):
        doc_id: str
        rank: int
        score: float = Field(..., description="the final score: fused_score where set, else rerank_score where set, "
                                              "else first_stage_score")
        first_stage_rank: int
        first_stage_score: float
        rerank_score: float | None
        fused_score: float | None = Field(..., description="the pipeline's fusion of both stages' scores, which "
                                                           "ordered the reranked hits; null when purely reranked")
        title: str | None = Field(..., description=f"at most {s.max_text_chars:,} characters; null without "
                                                   "include_text")
        text: str | None = Field(..., description=f"at most {s.max_text_chars:,} characters; null without "
                                                  "include_text")
        truncated: bool = Field(..., description="the title or the text was cut to the limit")

    class SearchResponse(BaseModel):
        query: str
        hits: list[HitOut]
        reranked: bool
        depth: int | None
        index_version: str = Field(..., description="the index version that answered")
        timings_ms: dict[str, float]

    class BatchResponse(BaseModel):
        results: list[SearchResponse]

    class ErrorOut(BaseModel):
        error: str = Field(..., description="what is wrong, in one line")

    class HealthOut(BaseModel):
        status: str = Field(..., description="ok; degraded while the vector store is down (searches answer 503)")
        documents: int
        version: str = Field(..., description="the index version being served")
        reloads: int = Field(..., description="new versions picked up since the start")
        loaded: str
        reload_failed: dict | None = Field(None, description="a newer version that could not be served, and why")
        vector_store: dict | None = Field(None, description="an index whose vectors are in a Milvus server: its "
                                                            "status (up, down) and, when down, why")

    def documented(*statuses: int) -> dict:
        reasons = {408: f"the body did not arrive within {s.body_timeout_s:g} s (shorter than its Content-Length)",
                   413: "request body too large",
                   422: "a field, the body, or the work it asks for is out of bounds (the message says which): also "
                        "rerank on an index without a reranker, and reranking work that could not finish within the "
                        "timeout even on an idle service at its measured speed (the message gives the cost and what "
                        "fits: fewer queries or a smaller depth); retrying the same request does not help",
                   500: "the models failed on this batch",
                   503: "busy now (the work ahead would not leave this request time, or the queue is full), or the "
                        "vector store is down: retry after Retry-After seconds",
                   504: "not answered within the timeout; its work was stopped"}
        return {status: {"model": ErrorOut, "description": reasons[status]} for status in statuses}

    search_errors = documented(408, 413, 422, 500, 503, 504)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        watcher = asyncio.get_running_loop().create_task(follow_index()) if s.reload_interval_s else None
        yield
        if watcher:
            watcher.cancel()
        await batcher.stop()

    async def follow_index():
        """Poll CURRENT; load a new version on a thread of its own (the model threads keep answering)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(s.reload_interval_s)
            if live.stale():
                await loop.run_in_executor(None, live.reload)

    def describe() -> str:
        index = live.index
        return (f"Two-stage search over {len(index):,} documents: {index.pipeline.name}. Every error is "
                f"`{{\"error\": \"...\"}}`. Reranking work is admitted by its cost at the speed this service has "
                f"measured on its own recent batches: a request that could not finish within the {s.timeout_s:g} s "
                "timeout even with nothing else queued is refused with 422 saying what it costs and what fits; one "
                "that fits is admitted whenever nothing is ahead of it; 503 with Retry-After means busy now. This "
                "schema describes the index version served now (it follows reloads).")

    app = FastAPI(title="Stagewise search", version=live.index.version, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description=describe())
    described = [live.index]
    make_openapi = app.openapi

    def openapi() -> dict:
        """The schema of the version served: made again after a reload swapped in another one."""
        if described[0] is not live.index:
            described[0] = live.index
            app.openapi_schema, app.version, app.description = None, live.index.version, describe()
        return make_openapi()

    app.openapi = openapi

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        counts[f"error_{status}"] += 1
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(StagewiseError)
    async def _stagewise_error(request: Request, e: StagewiseError):
        return error(422, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            if err["type"] == "json_invalid":
                problems.append(f"body: invalid JSON at character {err['loc'][-1]} ({err.get('ctx', {}).get('error')})")
                continue
            where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{where}: {err['msg']}")
        return error(422, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 400 and "body" in request.scope.get("stagewise", {}):  # FastAPI could not parse it
            return error(422, _check_body(request.scope["stagewise"]["body"]) or "body: unreadable JSON")
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))  # keeps 405's Allow

    @app.middleware("http")
    async def _read_body(request: Request, call_next):
        """Bound the body (also when streamed in chunks) and the time it takes to arrive (a Content-Length larger
        than the body sent would hold the connection open until the client gives up), and keep it to say why when
        it is not JSON."""
        if request.method not in ("POST", "PUT", "PATCH"):
            return await call_next(request)
        too_big = f"request body exceeds the limit of {s.max_body_bytes:,} bytes"
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > s.max_body_bytes:
            return error(413, f"request body of {int(length):,} bytes: {too_big}")
        chunks: list[bytes] = []

        async def read() -> bool:  # False: over the limit
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > s.max_body_bytes:
                    return False
                chunks.append(chunk)
            return True

        try:
            if not await asyncio.wait_for(read(), s.body_timeout_s):
                return error(413, too_big)
        except asyncio.TimeoutError:
            expected = f" of the {int(length):,} its Content-Length announced" if length and length.isdigit() else ""
            return error(408, f"body: {sum(map(len, chunks)):,} bytes{expected} arrived within the "
                              f"{s.body_timeout_s:g} s allowed", {"Connection": "close"})
        body = b"".join(chunks)
        request._body = body  # Starlette hands the read body on to the endpoint
        request.scope["stagewise"] = {"body": body}  # parsed only if FastAPI fails to: to say why (a 422)
        return await call_next(request)

    def plan(options: Options, texts: list[str], field: str) -> tuple[list[Query], bool, int | None, int]:
        """The queries to run, and the pairs they cost; refuses what this index or the bounds cannot do."""
        reranker = has_reranker()
        rerank = reranker if options.rerank is None else options.rerank
        if rerank and not reranker:  # the schema of this version says so: a client is never answered unreranked
            raise ServiceError(422, "rerank: this index has no reranker (omit rerank or set it to false)")
        blank = [i for i, text in enumerate(texts) if is_blank(text)]
        if blank:
            raise ServiceError(422, f"{field if field == 'query' else f'{field}.{blank[0]}'}: is blank (only spaces "
                                    "or invisible characters)")
        depth = (options.depth or live.index.pipeline.depth) if rerank else None
        if len(texts) * options.k > s.max_request_hits:
            raise ServiceError(422, f"{field} × k: {len(texts)} × {options.k} = {len(texts) * options.k:,} hits, over "
                                    f"the limit of {s.max_request_hits:,} per request (fewer queries or a smaller k)")
        pairs = len(texts) * depth if rerank else 0
        if pairs > s.max_request_pairs:
            raise ServiceError(422, f"{field} × depth: {len(texts)} × {depth} = {pairs:,} pairs to rerank, over the "
                                    f"limit of {s.max_request_pairs:,} per request (fewer queries or a smaller depth)")
        return [Query(t, options.k, depth, rerank) for t in texts], rerank, depth, pairs

    def hit_out(hit, include_text: bool) -> HitOut:
        h = hit.to_dict()
        title, text = h.pop("title"), h.pop("text")
        cut = len(title) > s.max_text_chars or len(text) > s.max_text_chars
        if not include_text:
            return HitOut(**h, title=None, text=None, truncated=False)
        return HitOut(**h, title=title[:s.max_text_chars], text=text[:s.max_text_chars], truncated=cut)

    def response(query: str, hits, options: Options, rerank: bool, depth, timings, version: str,
                 total_ms: float) -> SearchResponse:
        return SearchResponse(query=query, hits=[hit_out(h, options.include_text) for h in hits], reranked=rerank,
                              depth=depth, index_version=version,
                              timings_ms={"first_stage": round(timings.first_stage_s * 1000, 2),
                                          "rerank": round(timings.rerank_s * 1000, 2), "total": round(total_ms, 2)})

    @app.post("/search", response_model=SearchResponse, responses=search_errors,
              summary="Search: first stage, then rerank the top depth")
    async def search_one(request: SearchRequest):
        start = time.perf_counter()
        queries, rerank, depth, pairs = plan(request, [request.query], "query")
        results, timings, version = await batcher.submit(queries, pairs)
        total = (time.perf_counter() - start) * 1000
        latency_ms["/search"].append(total)
        counts["queries"] += 1
        return response(request.query, results[0], request, rerank, depth, timings, version, total)

    @app.post("/search/batch", response_model=BatchResponse, responses=search_errors,
              summary="Search many queries in one request")
    async def search_batch(request: BatchRequest):
        start = time.perf_counter()
        queries, rerank, depth, pairs = plan(request, request.queries, "queries")
        results, timings, version = await batcher.submit(queries, pairs)
        total = (time.perf_counter() - start) * 1000
        latency_ms["/search/batch"].append(total)
        counts["queries"] += len(queries)
        return BatchResponse(results=[response(q.text, hits, request, rerank, depth, timings, version, total)
                                      for q, hits in zip(queries, results)])

    @app.get("/health", response_model=HealthOut, response_model_exclude_none=True,
             summary="Liveness: the index version being served, and its vector store's state (200 while the process "
                     "runs: a Milvus outage is status degraded, not a reason to restart the service)")
    async def health():
        state = await asyncio.get_running_loop().run_in_executor(None, live.health)  # a store's probe: off the loop
        down = state.get("vector_store", {}).get("status") == "down"
        return {"status": "degraded" if down else "ok", **state}

    @app.get("/stats", summary="Index, models, settings, request counts and latency percentiles (ms)")
    async def stats():
        lanes = batcher.lanes
        return {
            "index": live.index.describe(), "settings": asdict(settings), "uptime_s": round(time.time() - started, 1),
            "requests": dict(counts), "queued": batcher.queued(),
            "latency_ms": {path: _percentiles(v) for path, v in latency_ms.items()},
            "batch_stage_ms": {stage: _percentiles([x for lane in lanes.values() for x in lane.stats.stage_ms[stage]])
                               for stage in ("queue", "first_stage", "rerank")},
            "batch_size": _percentiles([x for lane in lanes.values() for x in lane.stats.batch_sizes]),
            "lanes": {name: {"queued": len(lane.pending), "queued_pairs": lane.queued_pairs,
                             "pairs_per_s": round(lane.pairs_per_s, 1) if lane.pairs_per_s else None,
                             "skipped_past_deadline": lane.stats.skipped, "stopped_past_deadline": lane.stats.stopped,
                             "refused_busy": lane.stats.refused, "refused_never_fits": lane.stats.never_fits}
                      for name, lane in lanes.items()},
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    swagger = _swagger_assets()

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: API",
                                   swagger_js_url="/docs/swagger-ui-bundle.js", swagger_css_url="/docs/swagger-ui.css",
                                   swagger_favicon_url="/docs/favicon-32x32.png")

    @app.get("/docs/{asset}", include_in_schema=False)
    async def docs_asset(asset: str):
        if asset not in swagger:
            raise StarletteHTTPException(404, "Not Found")
        return Response(swagger[asset].read_bytes(), media_type=_MEDIA[Path(asset).suffix],
                        headers={"Cache-Control": "max-age=86400"})

    app.state.live, app.state.settings = live, settings
    return app


_MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


def _swagger_assets() -> dict:
    """Swagger UI's files, from the ``fastapi-swagger`` package: /docs works with no internet."""
    from importlib import resources

    folder = resources.files("fastapi_swagger") / "resources"
    return {name: folder / name for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")}


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int) -> None:
    """Refuse, in one line, an address the service could not listen on (before any model loads)."""
    import socket

    if not 1 <= port <= 65535:
        raise StagewiseError(f"option '--port': must be 1 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise StagewiseError(f"option '--host': cannot resolve {host!r} ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise StagewiseError(f"option '--port': cannot listen on {host}:{port} ({e.strerror})") from None


def serve(index: Index | LiveIndex | str | Path, host: str = "127.0.0.1", port: int = 8000,
          settings: ServiceSettings | None = None, log_level: str = "warning",
          allow_untrained_reranker: bool = False) -> None:
    import uvicorn

    check_listen(host, port)
    uvicorn.run(create_app(index, settings, allow_untrained_reranker), host=host, port=port, log_level=log_level)
