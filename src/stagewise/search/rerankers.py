"""Second stage: a cross-encoder reads each (query, candidate) pair and reorders the top candidates."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from stagewise.errors import StagewiseError
from stagewise.models import batch_precision, per_query
from stagewise.models.backends import Backend, stage_name
from stagewise.models.export import prepare
from stagewise.models.pair_tokens import PairTokens
from stagewise.models.specs import ModelSpec, load_cross_encoder, model_kind
from stagewise.progress import map_chunks, pair_length
from stagewise.scale import engine
from stagewise.timing import span


class CrossEncoderReranker:
    """A sentence-transformers ``CrossEncoder``; one forward pass per pair, so it only sees the top ``depth``.

    ``backend`` runs it on ONNX Runtime, OpenVINO or bf16, like :class:`~stagewise.search.retrievers.DenseRetriever`;
    ``per_query_setting`` scores one request's pairs on another backend than batches (see
    :mod:`stagewise.models.per_query`)."""

    def __init__(self, model: str | ModelSpec, batch_size: int = 32, max_length: int | None = None,
                 device: str | None = None, backend: Backend | None = None, threads: int | None = None,
                 per_query_setting: dict | None = None):
        self.spec, self.backend = prepare(model, backend)
        self.batch_size = batch_size
        # a base encoder or bi-encoder has no trained scoring head: its scores mean nothing until it is trained
        self.trained = model_kind(self.spec.path) == "cross-encoder"
        self.model = load_cross_encoder(self.spec, device=device, max_length=max_length, backend=self.backend,
                                        threads=threads)
        self.per_query = per_query.load(
            per_query_setting, self.spec, "reranker", prepare,
            lambda spec, b: load_cross_encoder(spec, device=device, max_length=self.model.max_length, backend=b,
                                               threads=threads))
        self.name = per_query.name(stage_name(self.spec, self.backend), self.per_query and self.per_query.label)
        self.tokens = PairTokens(self.model)  # documents tokenized once, shared by every copy of this model

    def config(self) -> dict:
        return {"type": "cross-encoder", "name": self.name, "model": self.spec.spec, "fingerprint": self.spec.fingerprint,
                "max_length": self.model.max_length, **({} if self.backend.is_default else self.backend.config()),
                **({per_query.KEY: self.per_query.config()} if self.per_query else {})}

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        return self.score_pairs([(query, t) for t in texts])

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_job: bool = False,
                    per_query_work: bool | None = None) -> np.ndarray:
        """One score per (query, text) pair; pairs of many queries go through the model in shared batches.

        A ``batch_job`` (an evaluation's pairs, not a query being answered) shows progress, and goes to Ray when it
        is the engine in use and the set is large enough. Otherwise ``per_query_work`` (default: at most one model
        batch of pairs, as one request's reranking is) runs on the per-query backend where there is one."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)

        if per_query_work is None:
            per_query_work = len(pairs) <= self.batch_size
        on_query = self.per_query and per_query_work and not batch_job
        model = self.per_query.model if on_query else self.model
        if not batch_job and not (self.per_query.backend if on_query else self.backend).batch_invariant:
            return self._per_query_batches(pairs, model)

        def predict(chunk) -> np.ndarray:
            return self.tokens.predict(model, chunk, self.batch_size)

        if not batch_job:
            return predict(pairs)
        with span("score", self.name, len(pairs), "pairs"):
            if engine.distributed(len(pairs)):
                return engine.score_pairs(str(self.spec.path), pairs, self.model.max_length, self.batch_size,
                                          self.backend)
            model = self.batch_model(pairs)
            return map_chunks(predict, pairs, f"{self.name}: score pairs", chunk_size=8 * self.batch_size,
                              length=pair_length)

    def _per_query_batches(self, pairs: Sequence[tuple[str, str]], model) -> np.ndarray:
        """Each query's pairs in batches of their own, for a backend whose outputs depend on the batch: a
        request's scores then do not depend on the requests micro-batched with it."""
        groups: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            groups.setdefault(query, []).append(i)
        out = np.zeros(len(pairs), dtype=np.float32)
        for rows in groups.values():
            out[rows] = self.tokens.predict(model, [pairs[i] for i in rows], self.batch_size)
        return out

    def batch_model(self, pairs: Sequence[tuple[str, str]]):
        """What scores a batch job: the model, or its bf16 copy where the batch precision in use chose it."""
        policy = batch_precision.current()
        if policy is None or not self.backend.is_default or not batch_precision.transformer_model(self.model):
            return self.model
        sample, groups = batch_precision.pair_sample(pairs)
        return policy.batch_model(f"{self.spec.fingerprint}-cross-{self.model.max_length}", self.name,
                                  "cross-encoder", self.model, sample, groups)

    def rerank(self, query: str, candidates: Sequence[tuple[str, str]], depth: int) -> list[tuple[str, float]]:
        """Score the first ``depth`` of ``(doc_id, text)`` candidates; return them best first with their scores."""
        top = list(candidates)[:depth]
        scores = self.score(query, [text for _, text in top])
        order = np.argsort(-scores, kind="stable")
        return [(top[i][0], float(scores[i])) for i in order]


def require_trained(reranker: CrossEncoderReranker | None, allowed: bool, what: str) -> None:
    """Refuse to deploy a reranker without a trained head (``what``: the command), unless the user allows it."""
    if reranker is not None and not reranker.trained and not allowed:
        raise StagewiseError(
            f"{what}: the reranker '{reranker.spec.spec}' is not a trained cross-encoder (a base model gets an "
            "untrained scoring head, so its scores mean nothing): train one with `stagewise train cross`, or pass "
            "--allow-untrained-reranker")
