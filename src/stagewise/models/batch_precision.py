"""Batch work on the fastest exact-enough path this CPU has: PyTorch float32 or bfloat16, measured per model.

A corpus to encode and many (query, document) pairs to score are most of what ``select`` costs. Where the CPU has
AMX or AVX-512 BF16, a bfloat16 copy of the model does that work two to three times faster than float32; where it
must emulate bf16 it is slower. So nothing is assumed: the first time a model does batch work, both precisions
run on a sample of that very job in interleaved rounds (float32 is timed in the same rounds, so a busy machine
slows both alike; rounds that disagree are measured again, and a measurement that stays disturbed keeps float32),
and bf16 is used only where it is clearly faster *and* agrees with float32 on the sample: every embedding's cosine
and each text's top 10 neighbours for a bi-encoder, the rank correlation of the scores and each query's top 10 for
a cross-encoder. The choice is checked once per model and remembered (for this CPU, in the cache folder).

Per-query work (one query's encoding, one request's reranking) and latency figures stay on the deployed model, and
stage 3 chooses its backend separately. Like ``engine.use("ray")``, ``use("auto")`` routes the batch work inside a
block; outside one, everything runs as before, in float32.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from stagewise.errors import StagewiseError
from stagewise.models.export import rank_correlation, top10_overlap
from stagewise.timing import span

logger = logging.getLogger(__name__)

MODES = ("auto", "float32", "bfloat16")
MIN_SPEEDUP = 1.15  # bf16 must be at least this much faster: a smaller edge is within the noise of 2 busy cores
MIN_COSINE = 0.99  # bi-encoder: the worst sample text's embedding cosine, bf16 against float32
MIN_RANK_CORRELATION = 0.99  # cross-encoder: Spearman correlation of the sample's scores
MIN_TOP10 = 0.9  # both: mean overlap of the top 10 (each text's neighbours; each query's candidates)
ROUNDS = 3  # interleaved timing rounds per attempt
MAX_SPREAD = 1.5  # float32's slowest round over its fastest: beyond this the machine's load disturbed the rounds
ATTEMPTS = 3
SAMPLE_TEXTS = 32
SAMPLE_PAIRS = 64


@dataclass
class PrecisionChoice:
    """What a model's batch work runs in, and the measurements that decided it."""

    dtype: str
    reason: str
    model: str = ""
    speedup: float | None = None
    agreement: dict = field(default_factory=dict)
    float32_s: list = field(default_factory=list)
    bfloat16_s: list = field(default_factory=list)
    sample: int = 0

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def as_dict(self) -> dict:
        return asdict(self)


def _cpu_key() -> str:
    import torch

    from stagewise.rundir import cpu

    info = cpu()
    return hashlib.sha256(f"{info['model']}|{' '.join(info['flags'])}|{torch.__version__}".encode()).hexdigest()[:12]


def bf16_copy(model):
    """A bfloat16 copy of a sentence-transformers model's transformer (tokenizer, pooling and head as they are)."""
    from stagewise.models.runtimes import to_bfloat16

    twin = copy.deepcopy(model)
    twin.eval()
    return to_bfloat16(twin)


def bi_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Embeddings of the same texts: the worst cosine, and each text's top 10 neighbours among the others."""
    ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    can = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    cosine = float(np.min(np.sum(ref * can, axis=1)))
    sims_ref, sims_can = ref @ ref.T, can @ can.T
    np.fill_diagonal(sims_ref, -np.inf)
    np.fill_diagonal(sims_can, -np.inf)
    return {"min_cosine": cosine, "top10": top10_overlap(sims_ref, sims_can)}


def cross_agreement(reference: np.ndarray, candidate: np.ndarray, groups: Sequence[int]) -> dict:
    """Scores of the same pairs: rank correlation, and each query's top 10 (``groups``: pairs per query, in order)."""
    overlaps, start = [], 0
    for size in groups:
        if size > 1:
            overlaps.append(top10_overlap(reference[None, start:start + size], candidate[None, start:start + size]))
        start += size
    return {"rank_correlation": rank_correlation(reference, candidate),
            "top10": float(np.mean(overlaps)) if overlaps else 1.0}


def _disagrees(kind: str, agreement: dict) -> str | None:
    if kind == "bi-encoder" and agreement["min_cosine"] < MIN_COSINE:
        return f"bf16 embeddings drift (worst cosine {agreement['min_cosine']:.4f} < {MIN_COSINE})"
    if kind == "cross-encoder" and agreement["rank_correlation"] < MIN_RANK_CORRELATION:
        return (f"bf16 scores reorder pairs (rank correlation {agreement['rank_correlation']:.4f} "
                f"< {MIN_RANK_CORRELATION})")
    if agreement["top10"] < MIN_TOP10:
        return f"bf16 changes the top 10 (overlap {agreement['top10']:.2f} < {MIN_TOP10})"
    return None


def measure(kind: str, run32: Callable[[], np.ndarray], run16: Callable[[], np.ndarray], sample: int,
            groups: Sequence[int] = (), clock: Callable[[], float] = time.perf_counter) -> PrecisionChoice:
    """Time float32 and bf16 on the same sample in interleaved rounds and check that they agree."""
    ref, can = np.asarray(run32(), dtype=np.float32), np.asarray(run16(), dtype=np.float32)  # warm-up and outputs
    agreement = bi_agreement(ref, can) if kind == "bi-encoder" else cross_agreement(ref, can, groups or [len(ref)])
    problem = _disagrees(kind, agreement)
    if problem:
        return PrecisionChoice("float32", problem, agreement=agreement, sample=sample)
    for attempt in range(ATTEMPTS):
        t32, t16 = [], []
        for _ in range(ROUNDS):
            for fn, times in ((run32, t32), (run16, t16)):
                start = clock()
                fn()
                times.append(clock() - start)
        if max(t32) <= MAX_SPREAD * min(t32) and max(t16) <= MAX_SPREAD * min(t16):
            break
    else:
        return PrecisionChoice("float32", f"the machine's load disturbed every timing ({ATTEMPTS} attempts): float32 "
                               "kept", agreement=agreement, float32_s=t32, bfloat16_s=t16, sample=sample)
    speedup = float(np.median(t32) / max(np.median(t16), 1e-9))
    if speedup < MIN_SPEEDUP:
        why = f"bf16 is {speedup:.2f}× float32 here (under {MIN_SPEEDUP}×): float32 kept"
        return PrecisionChoice("float32", why, speedup=speedup, agreement=agreement, float32_s=t32, bfloat16_s=t16,
                               sample=sample)
    return PrecisionChoice("bfloat16", f"bf16 is {speedup:.2f}× float32 here and agrees with it", speedup=speedup,
                           agreement=agreement, float32_s=t32, bfloat16_s=t16, sample=sample)


class BatchPrecision:
    """The precision each model's batch work runs in: ``auto`` measures it, ``float32`` / ``bfloat16`` force it."""

    def __init__(self, mode: str = "auto", root: Path | None = None):
        if mode not in MODES:
            raise StagewiseError(f"field 'batch_precision': one of {', '.join(MODES)}, not {mode!r}")
        from stagewise.cache import cache_dir

        self.mode = mode
        self.root = root or cache_dir() / "batch-precision"
        self.choices: dict[str, PrecisionChoice] = {}
        self._twins: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _stored(self, key: str) -> PrecisionChoice | None:
        path = self.root / f"{key}.json"
        try:
            return PrecisionChoice(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _store(self, key: str, choice: PrecisionChoice) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{key}.tmp"
            tmp.write_text(json.dumps(choice.as_dict()))
            tmp.replace(self.root / f"{key}.json")
        except OSError as e:  # a read-only cache only means measuring again next time
            logger.warning("cannot store the batch precision choice in %s (%s)", self.root, e)

    def choose(self, key: str | None, name: str, kind: str, model, sample: list,
               groups: Sequence[int] = ()) -> PrecisionChoice:
        """The choice for one model (``key``: its fingerprint and settings; None: a model in training, remembered
        for as long as it lives)."""
        memo = key or f"live-{id(model)}"
        if memo in self.choices:
            return self.choices[memo]
        if self.mode != "auto":
            choice = PrecisionChoice(self.mode, f"batch_precision: {self.mode}")
        else:
            stored_key = f"{key}-{_cpu_key()}" if key else None
            choice = self._stored(stored_key) if stored_key else None
            if choice is None:
                twin = self.twin(model)
                with span("probe", f"{name}: batch precision", 1, "probes"):
                    choice = measure(kind, lambda: _run(model, kind, sample), lambda: _run(twin, kind, sample),
                                     len(sample), groups)
                if stored_key:
                    self._store(stored_key, choice)
            logger.info("batch precision for %s: %s (%s)", name, choice.dtype, choice.reason)
        choice.model = name
        self.choices[memo] = choice
        return choice

    def twin(self, model, fresh: bool = False):
        """The model's bf16 copy, made once per model object (``fresh``: anew, for a model whose weights change)."""
        if fresh:
            return bf16_copy(model)
        if model not in self._twins:
            self._twins[model] = bf16_copy(model)
        return self._twins[model]

    def batch_model(self, key: str | None, name: str, kind: str, model, sample: list, groups: Sequence[int] = ()):
        """The model that should do this batch work: ``model`` itself, or its bf16 copy. A model in training
        (``key`` None) is measured at its first batch job and copied anew at each one."""
        if not self.choose(key, name, kind, model, sample, groups).bf16:
            return model
        return self.twin(model, fresh=key is None)

    def speedup(self, name: str) -> float:
        """How much faster than float32 the model called ``name`` does its batch work here (1: float32)."""
        return max((c.speedup or 1.0 for c in self.choices.values() if c.model == name and c.bf16), default=1.0)

    def summary(self) -> dict:
        return {key: choice.as_dict() for key, choice in self.choices.items() if not key.startswith("live-")}


def _run(model, kind: str, sample: list) -> np.ndarray:
    if kind == "bi-encoder":
        return model.encode_document(sample, batch_size=len(sample), convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(model.predict(sample, batch_size=len(sample), show_progress_bar=False, convert_to_numpy=True),
                      dtype=np.float32).reshape(-1)


def spread_sample(items: Sequence, size: int = SAMPLE_TEXTS) -> list:
    """Every n-th item: a sample with the job's own mix of lengths."""
    items = list(items)
    if len(items) <= size:
        return items
    step = len(items) / size
    return [items[int(i * step)] for i in range(size)]


def pair_sample(pairs: Sequence[tuple[str, str]], size: int = SAMPLE_PAIRS, per_query: int = 16
                ) -> tuple[list, list[int]]:
    """Whole queries' candidates (consecutive pairs sharing a query), spread over the job, up to ``per_query`` each:
    so that each query's top 10 can be compared. Returns the pairs and how many belong to each query."""
    groups: list[list] = []
    for pair in pairs:
        if groups and groups[-1][0][0] == pair[0]:
            groups[-1].append(pair)
        else:
            groups.append([pair])
    out: list[list] = []
    step = max(1, len(groups) // max(1, size // per_query))
    for group in groups[::step] + [g for i, g in enumerate(groups) if i % step]:  # spread first, then the rest
        if sum(map(len, out)) >= size:
            break
        out.append(group[:per_query])
    return [p for g in out for p in g], [len(g) for g in out]


def transformer_model(model) -> bool:
    """Whether a model has a transformer whose precision can change (a static embedding model has none)."""
    from stagewise.errors import ModelError
    from stagewise.models.runtimes import transformer_module

    try:
        transformer_module(model)
    except ModelError:
        return False
    return True


_current: BatchPrecision | None = None


def current() -> BatchPrecision | None:
    return _current


@contextlib.contextmanager
def use(mode: str = "auto") -> Iterator[BatchPrecision]:
    """Route the batch work inside this block through ``BatchPrecision(mode)``."""
    global _current
    previous, _current = _current, BatchPrecision(mode)
    try:
        yield _current
    finally:
        _current = previous
