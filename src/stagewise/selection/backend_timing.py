"""Timings that a busy machine cannot flip: backends measured in interleaved rounds against PyTorch float32.

Each round measures every candidate once, the order rotated, so a burst of load from another process lands on
one round of a few candidates, not on one candidate's whole measurement. A candidate's speed-up is the median of
its per-round ratios to the reference measured in the same round; its spread (the range of those ratios, the
range of its own rounds) is reported beside it. When the reference's own rounds disagree (more than one round
off their median by ``MAX_DEVIATION``), the machine was busy: the measurement is taken again, and if it stays
disturbed it is flagged so that nobody acts on it.

Two uses are measured, because they can be fastest on different backends: **batch** work (a corpus or many
pairs: items per second) and **per-query** work (one query's encoding, one request's pairs: milliseconds each,
p50 and p95 over every query of every round).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

ROUNDS = 5
MAX_DEVIATION = 0.3  # a reference round this far (relative) from the reference's median is a disturbed round
MAX_ATTEMPTS = 3  # a disturbed measurement is taken this many times in all before it is flagged
PAUSE_S = 0.05  # between candidates: lets the previous runtime's worker threads go idle (ONNX Runtime spins)
USES = ("batch", "query")


@dataclass
class RoundWork:
    """One candidate's work for one round: ``run()`` does it and returns what it measured."""

    run: Callable[[], "RoundResult"]
    warm_up: Callable[[], None] = lambda: None


@dataclass
class RoundResult:
    value: float  # batch: items per second (higher is better); per query: the round's latency statistic in ms
    samples_ms: list[float] = field(default_factory=list)  # per query: each query's milliseconds


def batch_work(fn: Callable[[list], object], items: list) -> RoundWork:
    """Batch use: ``fn(items)`` once per round, measured in items per second. Warmed by one whole untimed round:
    the round's shapes get their kernels planned, and a reranker's documents their tokens cached
    (:mod:`stagewise.models.pair_tokens`), as in the repeated work the timing stands for."""

    def run() -> RoundResult:
        start = time.perf_counter()
        fn(items)
        return RoundResult(len(items) / max(time.perf_counter() - start, 1e-9))

    return RoundWork(run, lambda: fn(items))


def query_work(fn: Callable[[list], object], queries: list, statistic: str = "p50_ms",
               warm_up: Callable[[], object] | None = None) -> RoundWork:
    """Per-query use: ``fn([q])`` for each query of the round; the round's value is ``statistic`` of its
    milliseconds (p50 or p95), every query's milliseconds kept for the pooled percentiles.

    ``warm_up`` (when given) runs before the usual first queries: the warm-up a service does at load (a
    bi-encoder's every query length, :mod:`stagewise.models.warm_up`), so that the timing sees what it sees."""
    percent = _percent(statistic)

    def run() -> RoundResult:
        samples = []
        for q in queries:
            start = time.perf_counter()
            fn([q])
            samples.append((time.perf_counter() - start) * 1000)
        return RoundResult(float(np.percentile(samples, percent)), samples)

    def warm() -> None:  # first calls allocate and plan kernels for new shapes: not what a warm service sees
        if warm_up is not None:
            warm_up()
        for q in queries[:3]:
            fn([q])

    return RoundWork(run, warm)


def _percent(statistic: str) -> float:
    return float(statistic.removeprefix("p").removesuffix("_ms"))


def disturbed_rounds(values: list[float]) -> int:
    """How many of the reference's rounds are off their median by more than ``MAX_DEVIATION``."""
    middle = statistics.median(values)
    return sum(abs(v / middle - 1) > MAX_DEVIATION for v in values) if middle > 0 else 0


def interleaved(work: dict[str, RoundWork], reference: str, use: str, rounds: int = ROUNDS,
                sleep: Callable[[float], None] = time.sleep) -> dict:
    """Measure every candidate in ``work`` in ``rounds`` interleaved rounds; ``reference`` is PyTorch float32.

    Returns ``{"candidates": {label: {...}}, "disturbed": bool, "attempts": n, "reference_spread": ...}``; each
    candidate has its rounds, median, min, max and ``speedup`` (median of per-round ratios to the reference,
    above 1 is faster) with ``speedup_range``; per-query candidates also have pooled ``p50_ms`` and ``p95_ms``.
    A candidate whose work raises is left out with its error.
    """
    if use not in USES:
        raise ValueError(f"use must be one of {USES}, got {use!r}")
    errors: dict[str, str] = {}
    for label, w in work.items():
        try:
            w.warm_up()
        except Exception as e:  # noqa: BLE001 - a backend that fails on this CPU is a result, not a crash
            errors[label] = _error(e)
    ready = [label for label in work if label not in errors]
    best = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        measured = _rounds({label: work[label] for label in ready}, rounds, sleep, errors)
        ref = measured.get(reference)
        bad = disturbed_rounds([r.value for r in ref]) if ref else 0
        if best is None or bad < best[1]:
            best = (measured, bad, attempt)
        if bad <= 1:  # one slow round is what the medians are for
            break
    measured, bad, _ = best
    out = {"use": use, "rounds": rounds, "attempts": attempt, "disturbed": bad > 1,
           "reference_disturbed_rounds": bad, "candidates": {}, "errors": errors}
    ref_values = [r.value for r in measured.get(reference, [])]
    for label, results in measured.items():
        values = [r.value for r in results]
        row = {"rounds": [round(v, 3) for v in values], "median": round(statistics.median(values), 3),
               "min": round(min(values), 3), "max": round(max(values), 3)}
        if ref_values:
            # batch: a higher rate is faster; per query: a lower latency is faster
            ratios = [v / r if use == "batch" else r / v for v, r in zip(values, ref_values) if v > 0 and r > 0]
            if ratios:
                row.update(speedup=round(statistics.median(ratios), 3),
                           speedup_range=[round(min(ratios), 3), round(max(ratios), 3)])
        if use == "query":
            pooled = [s for r in results for s in r.samples_ms]
            row.update(queries=len(pooled), p50_ms=round(float(np.percentile(pooled, 50)), 3),
                       p95_ms=round(float(np.percentile(pooled, 95)), 3))
        out["candidates"][label] = row
    return out


def _rounds(work: dict[str, RoundWork], rounds: int, sleep, errors: dict) -> dict[str, list[RoundResult]]:
    labels = list(work)
    measured: dict[str, list[RoundResult]] = {label: [] for label in labels}
    for r in range(rounds):
        shift = r % max(len(labels), 1)
        for label in labels[shift:] + labels[:shift]:
            if label in errors:
                continue
            sleep(PAUSE_S)
            try:
                measured[label].append(work[label].run())
            except Exception as e:  # noqa: BLE001
                errors[label] = _error(e)
    return {label: values for label, values in measured.items() if label not in errors and values}


def _error(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
