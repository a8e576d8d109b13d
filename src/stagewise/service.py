"""The search service: a FastAPI app over a loaded :class:`~stagewise.index.Index`.

Requests that arrive together are answered together: a micro-batcher collects concurrent requests for up to
``batch_wait_ms`` (or ``max_batch`` queries) and runs them through the models in one call (one encoder batch,
one cross-encoder batch), on one worker thread so the models never compete for the CPU. Every request has
bounds (query length, ``k``, ``depth``, batch size, body size), a timeout, and errors that say what is wrong,
always as ``{"error": "..."}``. It binds to loopback unless told otherwise: it has no authentication.
"""


import asyncio
import collections
import concurrent.futures
import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np

from stagewise.index import Index
from stagewise.pipeline import Query

PAGE = Path(__file__).with_name("search_page.html")


@dataclass
class ServiceSettings:
    max_query_chars: int = 1000
    max_k: int = 100
    max_depth: int = 200
    max_batch_queries: int = 64  # per /search/batch request
    max_body_bytes: int = 1 << 20
    timeout_s: float = 10.0  # per request, queueing included
    max_batch: int = 32  # queries run through the models together
    batch_wait_ms: float = 2.0  # how long the batcher waits for more requests to join a batch
    max_queued: int = 1024  # requests waiting beyond this are refused with 503


class ServiceError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass
class _Pending:
    queries: list[Query]
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Collects concurrent requests into batches and answers them on one model thread."""

    def __init__(self, index: Index, settings: ServiceSettings):
        self.index, self.settings = index, settings
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=settings.max_queued)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stagewise-model")
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self.stage_ms: dict[str, collections.deque[float]] = {
            stage: collections.deque(maxlen=10_000) for stage in ("queue", "first_stage", "rerank")}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, queries: list[Query]):
        """Results for ``queries`` and the batch's stage timings, or a 504 after ``timeout_s``."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(queries, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise ServiceError(503, f"server busy: {self.queue.qsize()} requests queued; retry shortly",
                               {"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(future, self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(504, f"timed out after {self.settings.timeout_s:g} s "
                                    f"({self.queue.qsize()} requests queued)") from None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.settings.batch_wait_ms / 1000
            while sum(len(p.queries) for p in batch) < self.settings.max_batch:
                if not self.queue.empty():  # already waiting: always joins, whatever batch_wait_ms is
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [p for p in batch if not p.future.done()]  # timed out while queued: skip the work
            if not batch:
                continue
            queries = [q for p in batch for q in p.queries]
            started = time.perf_counter()
            self.stage_ms["queue"].extend((started - p.enqueued) * 1000 for p in batch)
            try:
                results, timings = await loop.run_in_executor(self.executor, self.index.search_many, queries)
            except Exception as e:  # a model failure answers this batch with 500, the service keeps running
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(ServiceError(500, f"search failed: {type(e).__name__}: {e}"))
                continue
            self.batch_sizes.append(len(queries))
            self.stage_ms["first_stage"].append(timings.first_stage_s * 1000)
            self.stage_ms["rerank"].append(timings.rerank_s * 1000)
            start = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result((results[start:start + len(p.queries)], timings))
                start += len(p.queries)


def _percentiles(values) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"count": len(a), "p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}


def create_app(index: Index | str | Path, settings: ServiceSettings | None = None):
    """The FastAPI app: ``/`` (search page), ``POST /search``, ``POST /search/batch``, ``/health``, ``/stats``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    index = index if isinstance(index, Index) else Index.load(index)
    settings = settings or ServiceSettings()
    s = settings
    has_reranker = index.pipeline.reranker is not None
    batcher = Batcher(index, settings)
    started = time.time()
    latency_ms: dict[str, collections.deque[float]] = {
        "/search": collections.deque(maxlen=10_000), "/search/batch": collections.deque(maxlen=10_000)}
    counts: collections.Counter = collections.Counter()

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        k: int = Field(10, ge=1, le=s.max_k, description="results to return")
        depth: int | None = Field(None, ge=1, le=s.max_depth,
                                  description=f"candidates the reranker reads (default {index.pipeline.depth})")
        rerank: bool | None = Field(None, description="run the reranker (default: when the index has one)")

    class SearchRequest(Options):
        query: str = Field(..., min_length=1, max_length=s.max_query_chars)

    class BatchRequest(Options):
        queries: list[Annotated[str, Field(min_length=1, max_length=s.max_query_chars)]] = Field(
            ..., min_length=1, max_length=s.max_batch_queries)

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
        title: str
        text: str

    class SearchResponse(BaseModel):
        query: str
        hits: list[HitOut]
        reranked: bool
        depth: int | None
        timings_ms: dict[str, float]

    class BatchResponse(BaseModel):
        results: list[SearchResponse]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="Stagewise search", version=index.version, lifespan=lifespan,
                  description=f"Two-stage search over {len(index):,} documents: {index.pipeline.name}.")

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        counts[f"error_{status}"] += 1
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return error(e.status, e.message, e.headers)

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
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))  # keeps 405's Allow

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        too_big = f"request body exceeds the limit of {s.max_body_bytes:,} bytes"
        length = request.headers.get("content-length")
        if length is not None:
            if length.isdigit() and int(length) > s.max_body_bytes:
                return error(413, f"request body of {int(length):,} bytes: {too_big}")
            return await call_next(request)
        chunks, size = [], 0  # streamed (chunked) body: count as it arrives, stop at the limit
        async for chunk in request.stream():
            size += len(chunk)
            if size > s.max_body_bytes:
                return error(413, too_big)
            chunks.append(chunk)
        request._body = b"".join(chunks)  # Starlette hands the read body on to the endpoint
        return await call_next(request)

    def plan(options: Options, texts: list[str], field: str) -> tuple[list[Query], bool, int | None]:
        rerank = has_reranker if options.rerank is None else options.rerank
        if rerank and not has_reranker:
            raise ServiceError(400, "rerank: this index has no reranker (omit rerank or set it to false)")
        blank = [i for i, text in enumerate(texts) if not text.strip()]
        if blank:
            raise ServiceError(422, f"{field if field == 'query' else f'{field}.{blank[0]}'}: is blank")
        depth = (options.depth or index.pipeline.depth) if rerank else None
        return [Query(t, options.k, depth, rerank) for t in texts], rerank, depth

    def response(query: str, hits, rerank: bool, depth, timings, total_ms: float) -> SearchResponse:
        return SearchResponse(query=query, hits=[HitOut(**h.to_dict()) for h in hits], reranked=rerank, depth=depth,
                              timings_ms={"first_stage": round(timings.first_stage_s * 1000, 2),
                                          "rerank": round(timings.rerank_s * 1000, 2), "total": round(total_ms, 2)})

    @app.post("/search", response_model=SearchResponse, summary="Search: first stage, then rerank the top depth")
    async def search(request: SearchRequest):
        start = time.perf_counter()
        queries, rerank, depth = plan(request, [request.query], "query")
        results, timings = await batcher.submit(queries)
        total = (time.perf_counter() - start) * 1000
        latency_ms["/search"].append(total)
        counts["queries"] += 1
        return response(request.query, results[0], rerank, depth, timings, total)

    @app.post("/search/batch", response_model=BatchResponse, summary="Search many queries in one request")
    async def search_batch(request: BatchRequest):
        start = time.perf_counter()
        queries, rerank, depth = plan(request, request.queries, "queries")
        results, timings = await batcher.submit(queries)
        total = (time.perf_counter() - start) * 1000
        latency_ms["/search/batch"].append(total)
        counts["queries"] += len(queries)
        return BatchResponse(results=[response(q.text, hits, rerank, depth, timings, total)
                                      for q, hits in zip(queries, results)])

    @app.get("/health", summary="Liveness: the index is loaded")
    async def health():
        return {"status": "ok", "documents": len(index), "version": index.version}

    @app.get("/stats", summary="Index, models, settings, request counts and latency percentiles (ms)")
    async def stats():
        return {
            "index": index.describe(), "settings": asdict(settings), "uptime_s": round(time.time() - started, 1),
            "requests": dict(counts), "queued": batcher.queue.qsize(),
            "latency_ms": {path: _percentiles(v) for path, v in latency_ms.items()},
            "batch_stage_ms": {stage: _percentiles(v) for stage, v in batcher.stage_ms.items()},
            "batch_size": _percentiles(batcher.batch_sizes),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    app.state.index, app.state.settings = index, settings
    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(index: Index | str | Path, host: str = "127.0.0.1", port: int = 8000,
          settings: ServiceSettings | None = None, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(create_app(index, settings), host=host, port=port, log_level=log_level)
