"""The service's micro-batcher: concurrent requests answered together, with bounded work and deadlines.

Requests that arrive together run through the models in one call (one encoder batch, shared cross-encoder
chunks). Work is counted in what it costs: cross-encoder pairs (queries × depth). Two lanes, each on its own
model thread, keep cheap requests from starving: first-stage-only requests never queue behind reranking ones,
and within a lane the request with the fewest pairs runs first; a request larger than a micro-batch
(``max_batch_pairs``) is split, so cheaper ones run between its parts.

Admission is by what the lane has measured (:class:`CostModel`, seconds per batch from its own recent batches):
a request whose own work could not finish within the timeout even on an idle lane is refused with 422, saying
what it costs and what would fit (no retry can help it); one that fits alone is admitted whenever nothing is
ahead of it; 503 with ``Retry-After`` is only for "busy now, would fit later" (the work ahead would leave it too
little time, or the queue is full). Every request carries a deadline that the model thread checks between
cross-encoder chunks, so the work of a request that has timed out stops instead of holding the thread for
minutes, and a queued request whose deadline has passed is never started.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from stagewise.search.pipeline import Query, StageTimings

# the share of the timeout that a request and the work ahead of it may fill, at the measured cost, when the lane is
# busy: the rest is margin for the estimate, the batch waits and the answer. On an idle lane a request whose own
# work fits the whole timeout is admitted: refusing it would only make it retry into the same idle lane.
ADMIT_SHARE = 0.8


class CostModel:
    """Seconds a reranking batch of ``n`` pairs takes here, ``fixed_s + n · per_pair_s``, least-squares fitted to
    the lane's recent batches (stopped ones too, counting the pairs they scored).

    Two terms because a batch costs more than its pairs (the first stage, tokenising, thread hand-offs): a rate
    measured on small batches alone overstates what a large request costs, which would refuse it wrongly.
    """

    def __init__(self, window: int = 64):
        self.samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self.fixed_s = 0.0
        self.per_pair_s: float | None = None  # None until a batch has been measured
        self.largest = 0  # the most pairs of the batches measured: how far the fit can be trusted

    def record(self, pairs: int, seconds: float) -> None:
        self.samples.append((pairs, seconds))
        n = len(self.samples)
        xs, ys = [p for p, _ in self.samples], [t for _, t in self.samples]
        self.largest = max(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
        a = my - b * mx
        if b <= 0 or a < 0:  # one batch size, or noise: the line through the origin that fits best
            a, b = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
        self.fixed_s, self.per_pair_s = a, b

    def seconds(self, pairs: int, batches: int) -> float:
        return batches * self.fixed_s + pairs * self.per_pair_s


class ServiceError(Exception):
    """An HTTP error for the client: status, one-line message, and headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass(eq=False)
class Work:
    """One request: its queries run in one or more slices (a request larger than a batch is split, and cheaper
    requests may run between its slices), all on the index version its first slice ran on."""

    queries: list[Query]
    per_query: int  # cross-encoder pairs each of its queries costs (its depth; 0 without reranking)
    future: asyncio.Future
    enqueued: float  # time.perf_counter()
    deadline: float
    index: object = None  # pinned when its first slice runs: one version answers the whole request
    done: int = 0  # queries handed to the models so far
    results: list = field(default_factory=list)
    first_stage_s: float = 0.0
    rerank_s: float = 0.0

    @property
    def remaining(self) -> int:
        """Pairs not yet handed to the models."""
        return (len(self.queries) - self.done) * self.per_query

    def abandoned(self) -> bool:
        """Nobody waits for the answer any more: timed out, cancelled, or already answered."""
        return self.future.done() or time.perf_counter() >= self.deadline


@dataclass
class LaneStats:
    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))
    stage_ms: dict = field(default_factory=lambda: {stage: collections.deque(maxlen=10_000)
                                                    for stage in ("queue", "first_stage", "rerank")})
    skipped: int = 0  # requests whose deadline passed while queued: never started
    stopped: int = 0  # requests whose work stopped part way when their deadline passed
    refused: int = 0  # requests refused with 503 at the door: busy now
    never_fits: int = 0  # requests refused with 422: their own work could not finish within the timeout


class Lane:
    """One queue and one model thread; its batches mix slices of many requests, up to the batch bounds."""

    def __init__(self, name: str, search: Callable, current: Callable, max_batch: int, max_batch_pairs: int,
                 batch_wait_ms: float, max_queued: int, max_queued_pairs: int, timeout_s: float):
        """``search(index, queries, cancelled)`` answers a batch on ``index``; ``current()`` is the index to pin."""
        self.name, self.search, self.current = name, search, current
        self.max_batch, self.max_batch_pairs, self.batch_wait_s = max_batch, max_batch_pairs, batch_wait_ms / 1000
        self.max_queued, self.max_queued_pairs, self.timeout_s = max_queued, max_queued_pairs, timeout_s
        self.pending: list[Work] = []  # requests with queries not yet handed to the models
        self.queued_pairs = 0  # their remaining pairs
        self.running: list = []  # the batch on the model thread: (work, first query, end) slices
        self.running_since = 0.0
        self.cost = CostModel()  # measured, to refuse work that could not finish in time
        self.stats = LaneStats()
        self._arrived = asyncio.Event()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stagewise-{name}")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def pairs_per_s(self) -> float | None:
        """The marginal reranking rate measured (for /stats)."""
        return 1 / self.cost.per_pair_s if self.cost.per_pair_s else None

    def _batches(self, queries: int, per_query: int) -> tuple[int, int]:
        """How a request of ``queries`` × ``per_query`` pairs is split: (batches, pairs in its largest one)."""
        per_batch = max(1, min(self.max_batch, self.max_batch_pairs // per_query))
        return math.ceil(queries / per_batch), min(queries, per_batch) * per_query

    def alone_s(self, queries: int, per_query: int) -> float:
        """Seconds the request's own work takes at the measured cost, with nothing else on the lane."""
        return self.cost.seconds(queries * per_query, self._batches(queries, per_query)[0])

    def admit(self, queries: int, per_query: int) -> None:
        """Refuse a request that can never fit the timeout (422), or that the lane has no room or time for now (503
        with ``Retry-After``); admit it otherwise, and always when it fits alone and nothing is ahead of it."""
        pairs = queries * per_query
        if len(self.pending) >= self.max_queued:
            self._busy(f"{len(self.pending)} requests queued", None)
        if self.queued_pairs + pairs > self.max_queued_pairs:
            self._busy(f"{self.queued_pairs:,} reranking pairs queued (limit {self.max_queued_pairs:,})", None)
        if not pairs or self.cost.per_pair_s is None:
            return  # nothing measured yet: its own batches will be
        alone_s = self.alone_s(queries, per_query)
        # only a cost measured on batches of at least a quarter of its batches' size says "never" (the fit of tiny
        # batches alone overstates large ones): beyond that the lane tries it when idle, and measures it
        if alone_s > self.timeout_s and 4 * self.cost.largest >= self._batches(queries, per_query)[1]:
            self.stats.never_fits += 1
            raise ServiceError(422, self._never_fits(queries, per_query, alone_s))
        # cheapest first: only what runs now and what is no dearer than this request is ahead of it
        waiting = sum(w.remaining for w in self.pending if w.remaining <= pairs)
        running, running_s = self._running_left()
        ahead = running + waiting
        if not ahead:
            return
        ahead_s = running_s + (self.cost.seconds(waiting, math.ceil(waiting / self.max_batch_pairs)) if waiting else 0)
        if ahead_s + alone_s > self.timeout_s * ADMIT_SHARE:
            self._busy(f"the reranking work ahead ({ahead:,} pairs) needs about {ahead_s:.1f} s and this request "
                       f"{alone_s:.1f} s, more than {ADMIT_SHARE:.0%} of the {self.timeout_s:g} s timeout", ahead_s)

    def _running_left(self) -> tuple[int, float]:
        """The running batch's pairs still wanted (a request past its deadline has its queries skipped) and the
        seconds they still need: their cost less the time the batch has already run."""
        pairs = sum((b - a) * w.per_query for w, a, b in self.running if not w.abandoned())
        if not pairs:
            return 0, 0.0
        return pairs, max(0.0, self.cost.seconds(pairs, 1) - (time.perf_counter() - self.running_since))

    def _busy(self, why: str, wait_s: float | None):
        self.stats.refused += 1
        retry = max(1, math.ceil(wait_s)) if wait_s else 1
        raise ServiceError(503, f"server busy: {why}; retry after {retry} s", {"Retry-After": str(retry)})

    def _never_fits(self, queries: int, per_query: int, alone_s: float) -> str:
        """What the request costs, and the largest ones like it that fit: fewer queries, or a smaller depth."""
        def fits(q: int, d: int) -> bool:
            return self.alone_s(q, d) <= self.timeout_s

        n = "1 query" if queries == 1 else f"{queries} queries"
        smaller = []
        most = next((q for q in range(queries - 1, 0, -1) if fits(q, per_query)), 0)
        if most:
            smaller.append(f"at most {most} {'query' if most == 1 else 'queries'} at depth {per_query}")
        deepest = next((d for d in range(per_query - 1, 0, -1) if fits(queries, d)), 0)
        if deepest:
            smaller.append(f"depth at most {deepest}" + (f" for {n}" if queries > 1 else ""))
        return (f"{n} × depth {per_query} = {queries * per_query:,} pairs to rerank need about {alone_s:.1f} s at "
                f"this service's measured speed ({self.pairs_per_s:,.0f} pairs/s), over the {self.timeout_s:g} s "
                "timeout even with nothing else queued; what fits: "
                + (", or ".join(smaller) if smaller else "no reranking (rerank: false)"))

    async def submit(self, queries: list[Query], pairs: int):
        """(results, timings, index version) for ``queries``, or 504 once the timeout has passed."""
        per_query = pairs // len(queries)
        self.admit(len(queries), per_query)
        now = time.perf_counter()
        work = Work(queries, per_query, asyncio.get_running_loop().create_future(), now,
                    now + self.timeout_s, results=[None] * len(queries))
        self.pending.append(work)
        self.queued_pairs += pairs
        self._arrived.set()
        try:
            return await asyncio.wait_for(work.future, self.timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(504, f"timed out after {self.timeout_s:g} s ({len(self.pending)} in the queue); "
                                    "its work was stopped") from None
        finally:
            self._forget(work)

    def _forget(self, work: Work) -> None:
        """Take a request out of the queue (answered, timed out, cancelled or failed): its pairs no longer count."""
        if work in self.pending:
            self.pending.remove(work)
            self.queued_pairs -= work.remaining

    def _drop_abandoned(self) -> None:
        """Requests whose deadline passed while queued: never started, or not continued."""
        for work in [w for w in self.pending if w.abandoned()]:
            self._forget(work)
            if work.done:
                self.stats.stopped += 1
            else:
                self.stats.skipped += 1

    def _take(self, batch: list, index, room_queries: int, room_pairs: int) -> tuple[object, int, int] | None:
        """Add to ``batch`` a slice of the cheapest request that can join it (same index version); None when none
        can. Returns the batch's index and the room left."""
        self._drop_abandoned()
        joinable = [w for w in self.pending if w.index is None or index is None or w.index is index]
        if not joinable:
            return None
        work = min(joinable, key=lambda w: w.remaining)  # min keeps the first of equals: FIFO among them
        left = len(work.queries) - work.done
        n = min(left, room_queries, room_pairs // work.per_query if work.per_query else left)
        if n == 0:
            if batch:
                return None
            n = 1  # one query deeper than a whole batch still runs, alone
        if work.index is None:
            work.index = index if index is not None else self.current()
            self.stats.stage_ms["queue"].append((time.perf_counter() - work.enqueued) * 1000)
        batch.append((work, work.done, work.done + n))
        work.done += n
        self.queued_pairs -= n * work.per_query
        if work.done == len(work.queries):
            self.pending.remove(work)
        return work.index, room_queries - n, room_pairs - n * work.per_query

    async def _next_batch(self) -> list[tuple[Work, int, int]]:
        """Wait for a request, then gather slices for up to ``batch_wait_ms`` within the batch bounds."""
        while True:
            self._drop_abandoned()
            if self.pending:
                break
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        batch: list[tuple[Work, int, int]] = []
        index, room_queries, room_pairs = None, self.max_batch, self.max_batch_pairs
        until = loop.time() + self.batch_wait_s
        while room_queries > 0 and room_pairs > 0:
            taken = self._take(batch, index, room_queries, room_pairs)
            if taken is not None:  # already waiting: joins, whatever batch_wait_ms is
                index, room_queries, room_pairs = taken
                continue
            if any(w.index is None or w.index is index for w in self.pending):
                break  # waiting requests that do not fit: the batch is full
            remaining = until - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            queries = [q for w, a, b in batch for q in w.queries[a:b]]
            owner = [w for w, a, b in batch for _ in range(a, b)]
            self.running, self.running_since = batch, time.perf_counter()
            stopped: set[Work] = set()
            scored: set[int] = set()  # queries whose pairs went to the cross-encoder: what the batch's time bought

            def cancelled(i: int) -> bool:  # asked on the model thread before each query's cross-encoder chunk
                if owner[i].abandoned():
                    stopped.add(owner[i])
                    return True
                scored.add(i)
                return False

            try:
                results, timings = await loop.run_in_executor(self.executor, self.search, batch[0][0].index, queries,
                                                              cancelled)
            except Exception as e:  # a model failure answers these requests with 500 (a store outage: 503, from
                # the search function), and the service keeps running
                error = e if isinstance(e, ServiceError) else ServiceError(500, f"search failed: {type(e).__name__}: "
                                                                                     f"{e}")
                for work, _, _ in batch:
                    self._forget(work)
                    if not work.future.done():
                        work.future.set_exception(error)
                continue
            finally:
                self.running = []
            self._record(queries, timings, sum(owner[i].per_query for i in scored))
            start = 0
            for work, a, b in batch:
                work.results[a:b] = results[start:start + b - a]
                start += b - a
                work.first_stage_s += timings.first_stage_s
                work.rerank_s += timings.rerank_s
                if work in stopped:  # its deadline passed part way: its 504 is answered by submit
                    self.stats.stopped += 1
                    self._forget(work)
                elif work.done == len(work.queries) and b == work.done and not work.future.done():
                    work.future.set_result((work.results, StageTimings(work.first_stage_s, work.rerank_s),
                                            work.index.version))

    def _record(self, queries: list[Query], timings, scored_pairs: int) -> None:
        s = self.stats
        s.batch_sizes.append(len(queries))
        s.stage_ms["first_stage"].append(timings.first_stage_s * 1000)
        s.stage_ms["rerank"].append(timings.rerank_s * 1000)
        if scored_pairs and timings.rerank_s > 0:  # a batch stopped part way is measured by what it scored
            self.cost.record(scored_pairs, timings.total_s)


class Batcher:
    """The two lanes: ``rerank`` for requests that use the cross-encoder, ``first_stage`` for those that do not.

    ``search(index, queries, cancelled)`` answers one batch; ``current()`` is the index version new requests run on.
    """

    def __init__(self, search: Callable, current: Callable, settings):
        s = settings

        def lane(name: str) -> Lane:
            return Lane(name, search, current, s.max_batch, s.max_batch_pairs, s.batch_wait_ms, s.max_queued,
                        s.max_queued_pairs, s.timeout_s)

        self.lanes = {"rerank": lane("rerank"), "first_stage": lane("first_stage")}

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.start()

    async def stop(self) -> None:
        for lane in self.lanes.values():
            await lane.stop()

    async def submit(self, queries: list[Query], pairs: int):
        return await self.lanes["rerank" if pairs else "first_stage"].submit(queries, pairs)

    def queued(self) -> int:
        return sum(len(lane.pending) for lane in self.lanes.values())
