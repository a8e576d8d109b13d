"""A two-stage pipeline: a first stage retrieves, an optional cross-encoder reranks the top ``depth``.

Saved as ``pipeline.yaml`` (first-stage and reranker configs, depth) so every command loads the same pipeline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from stagewise.cache import EmbeddingCache
from stagewise.data import Document
from stagewise.errors import StagewiseError
from stagewise.rerankers import CrossEncoderReranker
from stagewise.retrievers import FirstStage, build_first_stage, warn_if_changed


@dataclass
class Hit:
    doc_id: str
    score: float  # the final score: the reranker's where it reranked, else the first stage's
    rank: int  # 1-based final rank
    first_stage_score: float
    first_stage_rank: int
    rerank_score: float | None = None
    title: str = ""
    text: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StageTimings:
    first_stage_s: float
    rerank_s: float

    @property
    def total_s(self) -> float:
        return self.first_stage_s + self.rerank_s


class Pipeline:
    def __init__(self, first_stage: FirstStage, reranker: CrossEncoderReranker | None = None, depth: int = 20):
        if depth < 1:
            raise StagewiseError(f"rerank depth must be at least 1, got {depth}")
        self.first_stage, self.reranker, self.depth = first_stage, reranker, depth
        self.corpus: dict[str, Document] | None = None

    @property
    def name(self) -> str:
        if self.reranker is None:
            return self.first_stage.name
        return f"{self.first_stage.name} >> {self.reranker.name}@{self.depth}"

    def index(self, corpus: dict[str, Document]) -> "Pipeline":
        self.first_stage.index(corpus)
        self.corpus = corpus
        return self

    def search(self, query: str, k: int = 10) -> list[Hit]:
        return self.search_timed(query, k)[0]

    def search_timed(self, query: str, k: int = 10) -> tuple[list[Hit], StageTimings]:
        """Retrieve ``max(k, depth)``, rerank the top ``depth``, keep first-stage order below it."""
        if self.corpus is None:
            raise StagewiseError("the pipeline has no corpus yet: call index(corpus) first")
        start = time.perf_counter()
        candidates = self.first_stage.retrieve([query], max(k, self.depth if self.reranker else k))[0]
        first_done = time.perf_counter()
        first = {doc_id: (rank, score) for rank, (doc_id, score) in enumerate(candidates, start=1)}
        if self.reranker is not None:
            top = [(d, self.corpus[d].full_text()) for d, _ in candidates[: self.depth]]
            reranked = self.reranker.rerank(query, top, self.depth)
            order = [(d, s, s) for d, s in reranked] + [(d, s, None) for d, s in candidates[self.depth:]]
        else:
            order = [(d, s, None) for d, s in candidates]
        timings = StageTimings(first_done - start, time.perf_counter() - first_done)
        hits = []
        for rank, (doc_id, score, rerank_score) in enumerate(order[:k], start=1):
            doc = self.corpus[doc_id]
            first_rank, first_score = first[doc_id]
            hits.append(Hit(doc_id, score, rank, first_score, first_rank, rerank_score, doc.title, doc.text))
        return hits, timings

    # ---- persistence --------------------------------------------------------------------------

    def config(self) -> dict:
        return {
            "version": 1,
            "first_stage": self.first_stage.config(),
            "reranker": self.reranker.config() if self.reranker else None,
            "depth": self.depth,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``pipeline.yaml``; models inside its folder are named relative to it, so the folder can move."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        here = path.parent.resolve()

        def relative(model: str) -> str:
            p = Path(model)
            return p.resolve().relative_to(here).as_posix() if p.is_dir() and p.resolve().is_relative_to(here) else model

        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(_map_models(self.config(), relative), sort_keys=False))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, cache: EmbeddingCache | None = None, **options) -> "Pipeline":
        path = Path(path)
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise StagewiseError(f"{path}: cannot read pipeline ({e})") from None
        if not isinstance(config, dict) or "first_stage" not in config:
            raise StagewiseError(f"{path}: not a pipeline file (no 'first_stage')")
        here = path.parent
        config = _map_models(config, lambda m: str(here / m) if not Path(m).is_absolute() and (here / m).is_dir() else m)
        first_stage = build_first_stage(config["first_stage"], cache, **options)
        reranker_config = config.get("reranker")
        reranker = None
        if reranker_config:
            reranker = CrossEncoderReranker(reranker_config["model"], max_length=reranker_config.get("max_length"))
            reranker.name = reranker_config.get("name") or reranker.name
            warn_if_changed(reranker_config, reranker.spec)
        return cls(first_stage, reranker, int(config.get("depth", 20)))


def _map_models(config, fn):
    """A copy of a pipeline config with ``fn`` applied to every stage's ``model``."""
    if isinstance(config, dict):
        return {k: fn(v) if k == "model" and isinstance(v, str) else _map_models(v, fn) for k, v in config.items()}
    if isinstance(config, list):
        return [_map_models(v, fn) for v in config]
    return config
