"""A two-stage pipeline: a first stage retrieves, an optional cross-encoder reranks the top ``depth``.

The reranked candidates are ordered by a ``Fusion`` of both stages' scores (pure reranking by default). Saved as
``pipeline.yaml`` (first-stage and reranker configs, depth, fusion) so every command loads the same pipeline, each
checking the whole file against one schema (:mod:`stagewise.search.pipeline_schema`) first.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from stagewise.cache import EmbeddingCache
from stagewise.data.dataset import is_blank
from stagewise.data.loaders import Document
from stagewise.errors import StagewiseError
from stagewise.models import per_query
from stagewise.models.backends import Backend
from stagewise.search import pipeline_schema
from stagewise.search.fusion import Fusion
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import FirstStage, build_first_stage, warn_if_changed

WARM_UP_QUERIES = ("warm up", "how does a two stage search pipeline choose its backends",
                   " ".join(["a long query that fills the first stage's and the reranker's longer inputs"] * 6))


@dataclass
class Hit:
    """One result: its final score and rank, and each stage's own score and rank, so a ranking can be explained."""

    doc_id: str
    score: float  # the final score: fused where fused, the reranker's where purely reranked, else the first stage's
    rank: int  # 1-based final rank
    first_stage_score: float
    first_stage_rank: int
    rerank_score: float | None = None
    fused_score: float | None = None  # set only where a fusion (weight < 1) ordered the hit
    title: str = ""
    text: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Query:
    """One search request: ``depth`` None means the pipeline's own; ``rerank`` False skips the reranker."""

    text: str
    k: int = 10
    depth: int | None = None
    rerank: bool = True


@dataclass
class StageTimings:
    first_stage_s: float
    rerank_s: float

    @property
    def total_s(self) -> float:
        return self.first_stage_s + self.rerank_s


class Pipeline:
    """A first stage, an optional cross-encoder over its top ``depth`` and the fusion of both scores; ``search``.

    Saved as ``pipeline.yaml`` (:meth:`save`, :meth:`load`), which every command and the index read.
    """

    def __init__(self, first_stage: FirstStage, reranker: CrossEncoderReranker | None = None, depth: int = 20,
                 fusion: Fusion | None = None):
        if depth < 1:
            raise StagewiseError(f"rerank depth must be at least 1, got {depth}")
        fusion = fusion or Fusion()
        if not isinstance(fusion, Fusion):
            raise StagewiseError(f"fusion must be a Fusion, got {fusion!r}")
        if reranker is None and not fusion.pure_rerank:  # would be silently ignored: nothing to fuse with
            raise StagewiseError("fusion needs a reranker: there is no reranker score to fuse")
        self.first_stage, self.reranker, self.depth, self.fusion = first_stage, reranker, depth, fusion
        self.corpus: dict[str, Document] | None = None
        # first stages are not all safe to call from two threads at once (a service runs first-stage-only
        # requests beside reranked ones); the reranker, the long part, runs outside it
        self.first_stage_lock = threading.Lock()

    @property
    def name(self) -> str:
        if self.reranker is None:
            return self.first_stage.name
        name = f"{self.first_stage.name} >> {self.reranker.name}@{self.depth}"
        if self.fusion.pure_rerank:
            return name
        f = self.fusion
        return (name + f" fused {f.weight:.2f}" + ("" if f.normalization == "minmax" else f" {f.normalization}")
                + ("" if f.first_stage == "score" else f" first-stage {f.first_stage}"))

    def index(self, corpus: dict[str, Document]) -> "Pipeline":
        self.first_stage.index(corpus)
        self.corpus = corpus
        return self

    def search(self, query: str, k: int = 10, depth: int | None = None, rerank: bool = True) -> list[Hit]:
        return self.search_many([Query(query, k, depth, rerank)])[0][0]

    def search_timed(self, query: str, k: int = 10) -> tuple[list[Hit], StageTimings]:
        hits, timings = self.search_many([Query(query, k)])
        return hits[0], timings

    def search_batch(self, queries: Sequence[str], k: int = 10, depth: int | None = None,
                     rerank: bool = True) -> list[list[Hit]]:
        """Many queries at once: one encoder batch for the first stage, one cross-encoder batch for all pairs."""
        return self.search_many([Query(q, k, depth, rerank) for q in queries])[0]

    def search_many(self, queries: Sequence[Query], cancelled: Callable[[int], bool] | None = None
                    ) -> tuple[list[list[Hit]], StageTimings]:
        """Answer queries that may differ in ``k``, ``depth`` and ``rerank``, batched through both models.

        Each query retrieves ``max(k, depth)``; its top ``depth`` are reranked (ordered by the fusion); first-stage
        order is kept below it. ``cancelled(i)`` is asked between reranker chunks: once it is true, query ``i``'s
        remaining pairs are not scored and it gets no hits (a service stops work whose deadline has passed).
        """
        if self.corpus is None:
            raise StagewiseError("the pipeline has no corpus yet: call index(corpus) first")
        if not queries:
            return [], StageTimings(0.0, 0.0)
        blank = next((i for i, q in enumerate(queries) if is_blank(q.text)), None)
        if blank is not None:
            where = "query" if len(queries) == 1 else f"query {blank}"
            raise StagewiseError(f"{where}: is blank (only spaces or invisible characters): nothing to search for")
        depths = [(q.depth if q.depth is not None else self.depth) if q.rerank and self.reranker else 0
                  for q in queries]
        start = time.perf_counter()
        wanted = max(max(q.k, depth) for q, depth in zip(queries, depths))
        with self.first_stage_lock:
            retrieved = self.first_stage.retrieve([q.text for q in queries], wanted)
        first_done = time.perf_counter()
        reranked = self._rerank_all(queries, retrieved, depths, cancelled or (lambda i: False))
        timings = StageTimings(first_done - start, time.perf_counter() - first_done)
        results = []
        for query, candidates, top in zip(queries, retrieved, reranked):
            if top is None:  # cancelled
                results.append([])
                continue
            first = {doc_id: (rank, score) for rank, (doc_id, score) in enumerate(candidates, start=1)}
            order = top + [(d, s, None, None) for d, s in candidates[len(top):]]
            hits = []
            for rank, (doc_id, score, rerank_score, fused_score) in enumerate(order[:query.k], start=1):
                doc = self.corpus[doc_id]
                first_rank, first_score = first[doc_id]
                hits.append(Hit(doc_id, score, rank, first_score, first_rank, rerank_score=rerank_score,
                                fused_score=fused_score, title=doc.title, text=doc.text))
            results.append(hits)
        return results, timings

    def _rerank_all(self, queries, retrieved, depths, cancelled: Callable[[int], bool]
                    ) -> list[list[tuple[str, float, float, float | None]] | None]:
        """The top ``depth`` of every query scored in shared cross-encoder chunks, each query's best first.

        Each entry is (doc id, final score, reranker score, fused score or None when purely reranked), or None for a
        query cancelled before all its pairs were scored.
        """
        pairs = [(i, q.text, self.corpus[d].full_text()) for i, (q, cands, depth)
                 in enumerate(zip(queries, retrieved, depths)) for d, _ in cands[:depth]]
        if not pairs:
            return [[] for _ in queries]
        scores: dict[int, list[float]] = {i: [] for i in range(len(queries))}
        dropped: set[int] = set()
        chunk = getattr(self.reranker, "batch_size", None) or len(pairs)  # deadlines are checked between chunks
        # one query's reranking is per-query work, a micro-batch of several is batch work (for a reranker that has
        # a per-query backend; any other scorer is called as it always was)
        options = {"per_query_work": len({i for i, _, _ in pairs}) == 1} if getattr(self.reranker, "per_query",
                                                                                      None) else {}
        for part in _whole_queries(pairs, chunk):
            dropped |= {i for i, _, _ in part if i not in dropped and cancelled(i)}
            todo = [p for p in part if p[0] not in dropped]
            if todo:
                for (i, _, _), score in zip(todo, self.reranker.score_pairs([(q, t) for _, q, t in todo],
                                                                                  **options).tolist()):
                    scores[i].append(score)
        out = []
        fused = not self.fusion.pure_rerank
        for i, (cands, depth) in enumerate(zip(retrieved, depths)):
            if i in dropped:
                out.append(None)
                continue
            top, rerank = cands[:depth], scores[i]
            order, final = self.fusion.order([s for _, s in top], rerank)  # stable: ties keep first-stage order
            out.append([(top[j][0], float(final[j]), rerank[j], float(final[j]) if fused else None) for j in order])
        return out

    def warm_up(self) -> None:
        """The first requests should not pay first-call costs (allocations, kernels planned per input shape,
        runtime thread pools starting): the first stage's per-query encoder gets one query of every token length up
        to :data:`stagewise.models.warm_up.QUERY_TOKENS` (encoded alone: a search each would run the reranker as
        often), then a few searches of different lengths go through every model and path (one query; a
        micro-batch)."""
        warm = getattr(self.first_stage, "warm_up_queries", None)  # BM25 has no encoder to warm
        if warm is not None:
            with self.first_stage_lock:
                warm()
        if self.corpus is None or not self.corpus:
            return
        for text in WARM_UP_QUERIES:
            self.search(text, k=1)
        self.search_batch(list(WARM_UP_QUERIES), k=1)

    # ---- persistence --------------------------------------------------------------------------

    def config(self) -> dict:
        config = {
            "version": 1,
            "first_stage": self.first_stage.config(),
            "reranker": self.reranker.config() if self.reranker else None,
            "depth": self.depth,
        }
        if self.reranker:
            config["fusion"] = self.fusion.config()
        return config

    def save(self, path: str | Path, rename: dict[str, str] | None = None) -> Path:
        """Write ``pipeline.yaml``; models inside its folder are named relative to it, so the folder can move.

        ``rename`` maps model specs to copies of them (an index stores its own copies).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        here = path.parent.resolve()

        def relative(model: str) -> str:
            model = (rename or {}).get(model, model)
            p = Path(model)
            return p.resolve().relative_to(here).as_posix() if p.is_dir() and p.resolve().is_relative_to(here) else model

        try:  # what load would refuse is never written (an index would commit a version it cannot load)
            text = pipeline_schema.dump(_map_models(self.config(), relative))
        except StagewiseError as e:
            raise StagewiseError(f"{path}: not saved: {e}") from None
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, cache: EmbeddingCache | None = None, backend: Backend | None = None,
             threads: int | None = None, **options) -> "Pipeline":
        """``backend`` (when given) runs every model stage on it instead of the backends the file names.

        The whole file is checked against its schema (:mod:`stagewise.search.pipeline_schema`) before any model loads; a
        model that cannot serve its stage (missing, the wrong kind) is then refused naming the file, line and stage."""
        file = pipeline_schema.read(path)
        here = file.path.parent
        config = _map_models(file.config, lambda m: str(here / m) if not Path(m).is_absolute() and (here / m).is_dir()
                             else m)
        try:
            first_stage = build_first_stage(config["first_stage"], cache, backend=backend, threads=threads, **options)
        except StagewiseError as e:
            raise file.error(("first_stage",), str(e)) from None
        reranker, saved = None, config.get("reranker")
        if saved:
            try:
                reranker = CrossEncoderReranker(saved["model"], max_length=saved.get("max_length"),
                                                backend=backend or pipeline_schema.saved_backend(saved),
                                                threads=threads,
                                                per_query_setting=None if backend else saved.get(per_query.KEY))
            except StagewiseError as e:  # its model (missing, the wrong kind) or what goes with it
                raise file.error(("reranker",), str(e), line_at=("reranker", "model")) from None
            reranker.name = saved.get("name") or reranker.name
            warn_if_changed(saved, reranker.spec)
        given = {"depth": config["depth"]} if "depth" in config else {}  # else the constructor's default
        return cls(first_stage, reranker, fusion=Fusion.from_config(config.get("fusion")), **given)


def _whole_queries(pairs: list, size: int) -> list[list]:
    """Consecutive chunks of about ``size`` pairs that never split one query's pairs, so a query's scores do not
    depend on where its neighbours' pairs end (a query with more pairs than ``size`` is a chunk of its own)."""
    by_query: dict[int, list] = {}
    for pair in pairs:
        by_query.setdefault(pair[0], []).append(pair)
    chunks: list[list] = [[]]
    for mine in by_query.values():
        if chunks[-1] and len(chunks[-1]) + len(mine) > size:
            chunks.append([])
        chunks[-1] += mine
    return [c for c in chunks if c]


def _map_models(config, fn):
    """A copy of a pipeline config with ``fn`` applied to every stage's ``model``."""
    if isinstance(config, dict):
        return {k: fn(v) if k == "model" and isinstance(v, str) else _map_models(v, fn) for k, v in config.items()}
    if isinstance(config, list):
        return [_map_models(v, fn) for v in config]
    return config
