"""Where a run's time goes: each expensive kind of work timed, with how much it processed and at what rate.

Code deep in the flow (encoding a corpus, scoring pairs, mining, a training loop, a dev evaluation, a latency run,
an export) wraps its work in :func:`span`; a command that wants the breakdown wraps its whole run in
:func:`recording`. Spans nest, and each keeps only its *own* time (a dev evaluation inside a training is the
evaluation's, not the training's), so the kinds add up to the time the spans cover. A span outside any recording
costs a clock read. ``step`` labels what the spans belong to ("stage 2 / cross bert-tiny"), so a selection can
say both what kind of work took the time and in which of its steps.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

#: The kinds of work, in the order a breakdown lists them, and the unit each one's rate is counted in by default.
KINDS = {
    "probe": "probes", "encode": "docs", "score": "pairs", "mine": "queries", "pretrain": "pairs", "train": "pairs",
    "dev-eval": "evaluations", "evaluate": "queries", "latency": "queries", "export": "models", "other": "items",
}


@dataclass
class _Entry:
    step: str
    kind: str
    what: str
    unit: str
    seconds: float = 0.0
    items: float = 0.0
    calls: int = 0

    def as_dict(self) -> dict:
        out = {"step": self.step, "kind": self.kind, "what": self.what, "seconds": round(self.seconds, 3),
               "calls": self.calls}
        if self.items:
            out.update(items=round(self.items, 1), unit=self.unit,
                       rate=round(self.items / self.seconds, 2) if self.seconds > 0 else None)
        return out


@dataclass
class Timings:
    """A recording: spans aggregated by (step, kind, what)."""

    started: float = field(default_factory=time.perf_counter)
    entries: dict = field(default_factory=dict)

    def add(self, step: str, kind: str, what: str, unit: str, seconds: float, items: float) -> None:
        entry = self.entries.setdefault((step, kind, what), _Entry(step, kind, what, unit))
        entry.seconds += seconds
        entry.items += items
        entry.calls += 1

    def rows(self) -> list[dict]:
        order = list(KINDS)
        return [e.as_dict() for e in sorted(self.entries.values(), key=lambda e: (
            order.index(e.kind) if e.kind in order else len(order), -e.seconds))]

    def breakdown(self) -> dict:
        """Seconds per kind of work (with its units and rate where they are one unit), per step, and the wall time
        none of the spans covered (loading models and data, BM25, fusion, the report)."""
        wall = time.perf_counter() - self.started
        kinds: dict[str, dict] = {}
        for e in self.entries.values():
            k = kinds.setdefault(e.kind, {"seconds": 0.0, "items": 0.0, "units": set(), "whats": set()})
            k["seconds"] += e.seconds
            k["items"] += e.items
            k["units"].add(e.unit)
            k["whats"].add(e.what)
        by_kind = {}
        for kind in sorted(kinds, key=lambda k: list(KINDS).index(k) if k in KINDS else len(KINDS)):
            k = kinds[kind]
            row = {"seconds": round(k["seconds"], 3), "share": round(k["seconds"] / wall, 3) if wall > 0 else None}
            if len(k["units"]) == 1 and k["items"]:  # a rate only where it is one model's (else see the spans)
                row.update(items=round(k["items"], 1), unit=k["units"].pop())
                if len(k["whats"]) == 1 and k["seconds"] > 0:
                    row["rate"] = round(k["items"] / k["seconds"], 2)
            by_kind[kind] = row
        steps: dict[str, float] = {}
        for e in self.entries.values():
            steps[e.step] = steps.get(e.step, 0.0) + e.seconds
        covered = sum(e.seconds for e in self.entries.values())
        return {"wall_seconds": round(wall, 1), "by_kind": by_kind,
                "by_step": {s: round(v, 1) for s, v in sorted(steps.items(), key=lambda x: -x[1])},
                "other_seconds": round(max(0.0, wall - covered), 1), "spans": self.rows()}


_recordings: list[Timings] = []
_steps: list[str] = []
_open: list["Span"] = []


@dataclass
class Span:
    """One timed piece of work; ``items`` may be set (or added to) while it runs, once the count is known."""

    kind: str
    what: str
    unit: str
    items: float = 0.0
    children: float = 0.0
    seconds: float = 0.0


@contextlib.contextmanager
def recording() -> Iterator[Timings]:
    """Record every span inside this block (nested recordings each get them all)."""
    timings = Timings()
    _recordings.append(timings)
    try:
        yield timings
    finally:
        _recordings.remove(timings)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Label the spans inside this block as belonging to ``name`` (nested labels join with ' / ')."""
    _steps.append(name)
    try:
        yield
    finally:
        _steps.pop()


def current_step() -> str:
    return " / ".join(_steps) or "-"


@contextlib.contextmanager
def span(kind: str, what: str, items: float = 0.0, unit: str | None = None) -> Iterator[Span]:
    """Time the block as ``kind`` of work on ``what``; its own time excludes the spans nested inside it."""
    s = Span(kind, what, unit or KINDS.get(kind, "items"), items)
    start = time.perf_counter()
    _open.append(s)
    try:
        yield s
    finally:
        _open.pop()
        s.seconds = time.perf_counter() - start
        if _open:
            _open[-1].children += s.seconds
        if _recordings:
            label = current_step()
            for timings in _recordings:
                timings.add(label, s.kind, s.what, s.unit, max(0.0, s.seconds - s.children), s.items)
