"""The service's micro-batcher: concurrent requests answered together, with bounded work and deadlines.

Requests that arrive together run through the models in one call (one encoder batch, shared cross-encoder
chunks). Work is counted in what it costs: cross-encoder pairs (queries × depth). Two lanes, each on its own
model thread, keep cheap requests from starving: first-stage-only requests never queue behind reranking ones.
A lane refuses a request with 503 when its queue already holds more work than it can finish within the
timeout; a micro-batch holds at most ``max_batch_pairs`` pairs; and every request carries a deadline that the
model thread checks between cross-encoder chunks, so the work of a request that has timed out stops instead of
holding the thread for minutes, and a queued request whose deadline has passed is never started.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Callable

from stagewise.pipeline import Query


class ServiceError(Exception):
    """An HTTP error for the client: status, one-line message, and headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass(eq=False)
class Work:
    """One request waiting for (or being given) the models."""

    queries: list[Query]
    pairs: int  # cross-encoder pairs it needs scored
    future: asyncio.Future
    enqueued: float  # time.perf_counter()
    deadline: float

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
    refused: int = 0  # requests refused with 503 at the door


class Lane:
    """One queue and one model thread; its batches mix queries of many requests, up to the batch bounds."""

    def __init__(self, name: str, search: Callable, max_batch: int, max_batch_pairs: int, batch_wait_ms: float,
                 max_queued: int, max_queued_pairs: int, timeout_s: float):
        self.name, self.search = name, search
        self.max_batch, self.max_batch_pairs, self.batch_wait_s = max_batch, max_batch_pairs, batch_wait_ms / 1000
        self.max_queued, self.max_queued_pairs, self.timeout_s = max_queued, max_queued_pairs, timeout_s
        self.pending: collections.deque[Work] = collections.deque()
        self.queued_pairs = 0
        self.running_pairs = 0
        self.pairs_per_s: float | None = None  # measured, to refuse work that could not finish in time
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

    def admit(self, pairs: int) -> None:
        """Refuse (503) a request the queue has no room or no time for."""
        busy = None
        if len(self.pending) >= self.max_queued:
            busy = f"{len(self.pending)} requests queued"
        elif self.queued_pairs + pairs > self.max_queued_pairs:
            busy = f"{self.queued_pairs:,} reranking pairs queued (limit {self.max_queued_pairs:,})"
        elif pairs and self.pairs_per_s:
            wait_s = (self.queued_pairs + self.running_pairs + pairs) / self.pairs_per_s
            if wait_s > self.timeout_s:
                busy = (f"the reranking queue needs about {wait_s:.1f} s, over the {self.timeout_s:g} s timeout "
                        f"({self.queued_pairs + self.running_pairs:,} pairs ahead)")
        if busy:
            self.stats.refused += 1
            raise ServiceError(503, f"server busy: {busy}; retry shortly", {"Retry-After": "1"})

    async def submit(self, queries: list[Query], pairs: int):
        """The batch's (results, timings, index version) for ``queries``, or 504 once the timeout has passed."""
        self.admit(pairs)
        now = time.perf_counter()
        work = Work(queries, pairs, asyncio.get_running_loop().create_future(), now, now + self.timeout_s)
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
        """Take a request out of the queue (answered, timed out or cancelled): its pairs no longer count."""
        try:
            self.pending.remove(work)
        except ValueError:
            return  # already taken into a batch
        self.queued_pairs -= work.pairs

    def _pop(self) -> Work:
        work = self.pending.popleft()
        self.queued_pairs -= work.pairs
        return work

    async def _next_batch(self) -> list[Work]:
        """Wait for a request, then gather more for up to ``batch_wait_ms`` within the batch bounds."""
        while not self.pending:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        batch = [self._pop()]
        until = loop.time() + self.batch_wait_s
        while sum(len(w.queries) for w in batch) < self.max_batch:
            if self.pending:  # already waiting: joins, whatever batch_wait_ms is, unless it overflows the pairs
                if sum(w.pairs for w in batch) + self.pending[0].pairs > self.max_batch_pairs:
                    break
                batch.append(self._pop())
                continue
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
            live = [w for w in batch if not w.abandoned()]  # deadline passed while queued: never started
            self.stats.skipped += len(batch) - len(live)
            if not live:
                continue
            queries = [q for w in live for q in w.queries]
            owner = [w for w in live for _ in w.queries]
            started = time.perf_counter()
            self.stats.stage_ms["queue"].extend((started - w.enqueued) * 1000 for w in live)
            self.running_pairs = sum(w.pairs for w in live)
            stopped: set[Work] = set()

            def cancelled(i: int) -> bool:  # asked on the model thread between cross-encoder chunks
                if owner[i].abandoned():
                    stopped.add(owner[i])
                    return True
                return False

            try:
                results, timings, version = await loop.run_in_executor(self.executor, self.search, queries, cancelled)
            except Exception as e:  # a model failure answers this batch with 500, the service keeps running
                for w in live:
                    if not w.future.done():
                        w.future.set_exception(ServiceError(500, f"search failed: {type(e).__name__}: {e}"))
                continue
            finally:
                self.running_pairs = 0
            self._record(live, queries, timings, complete=not stopped)
            start = 0
            for w in live:
                mine = results[start:start + len(w.queries)]
                start += len(w.queries)
                if w in stopped:  # its deadline passed part way: its 504 is answered by submit
                    self.stats.stopped += 1
                elif not w.future.done():
                    w.future.set_result((mine, timings, version))

    def _record(self, live: list[Work], queries: list[Query], timings, complete: bool) -> None:
        s = self.stats
        s.batch_sizes.append(len(queries))
        s.stage_ms["first_stage"].append(timings.first_stage_s * 1000)
        s.stage_ms["rerank"].append(timings.rerank_s * 1000)
        pairs = sum(w.pairs for w in live)
        if pairs and timings.rerank_s > 0 and complete:  # the rate of batches scored whole
            rate = pairs / timings.rerank_s
            self.pairs_per_s = rate if self.pairs_per_s is None else 0.7 * self.pairs_per_s + 0.3 * rate


class Batcher:
    """The two lanes: ``rerank`` for requests that use the cross-encoder, ``first_stage`` for those that do not."""

    def __init__(self, search: Callable, settings):
        s = settings

        def lane(name: str) -> Lane:
            return Lane(name, search, s.max_batch, s.max_batch_pairs, s.batch_wait_ms, s.max_queued,
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
