"""First stages: retrieve candidates for a query from the whole corpus.

Every first stage has ``index(corpus)`` and ``retrieve(queries, k) -> [[(doc_id, score), …], …]``, best first.
``BM25Retriever`` (bm25s), ``DenseRetriever`` (a bi-encoder over a :class:`VectorIndex`: exact, HNSW, quantised)
and ``HybridRetriever`` (reciprocal rank fusion of others). ``save_index`` / ``load_index`` / ``update_index``
let :mod:`stagewise.serving.index` persist a stage and add or remove documents without re-encoding the rest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from stagewise.cache import CachedEmbeddings, EmbeddingCache, texts_hash
from stagewise.data.loaders import Document
from stagewise.errors import StagewiseError
from stagewise.models import batch_precision, per_query, warm_up
from stagewise.models.backends import Backend, fingerprints, stage_name
from stagewise.models.export import prepare
from stagewise.models.specs import ModelSpec, load_bi_encoder
from stagewise.progress import map_chunks, progress_bar
from stagewise.scale import engine
from stagewise.search import pipeline_schema
from stagewise.search.vector_index import VectorIndex, VectorIndexConfig, top_k
from stagewise.timing import span

logger = logging.getLogger(__name__)

Ranking = list[tuple[str, float]]


class FirstStage(Protocol):
    name: str

    def index(self, corpus: dict[str, Document]) -> None: ...

    def retrieve(self, queries: Sequence[str], k: int) -> list[Ranking]: ...

    def config(self) -> dict: ...

    def index_bytes(self) -> int: ...

    def save_index(self, folder: Path) -> None: ...

    def load_index(self, folder: Path, corpus: dict[str, Document]) -> None: ...

    def update_index(self, corpus: dict[str, Document], removed_rows: np.ndarray, added: list[Document]) -> None:
        """``corpus`` is the new corpus: the old one in order, less ``removed_rows``, then ``added``."""


def _require_index(ids: list[str] | None, name: str) -> list[str]:
    if ids is None:
        raise StagewiseError(f"first stage '{name}' has no index yet: call index(corpus) first")
    return ids


class BM25Retriever:
    """Lexical BM25 (bm25s, Lucene variant), English stop words removed: a strong, cheap baseline."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: str | None = "en"):
        self.name = "bm25"
        self.k1, self.b, self.stopwords = k1, b, stopwords
        self._ids: list[str] | None = None
        self._indexed: dict | None = None

    def config(self) -> dict:
        return {"type": "bm25", "name": self.name, "k1": self.k1, "b": self.b, "stopwords": self.stopwords}

    def index(self, corpus: dict[str, Document]) -> None:
        if self._indexed is corpus:
            return
        import bm25s
        from bm25s.tokenization import Tokenizer

        self._tokenizer = Tokenizer(stopwords=self.stopwords or [])
        self._ids = list(corpus)
        tokens = self._tokenizer.tokenize([d.full_text() for d in corpus.values()], return_as="ids", show_progress=False)
        self._bm25 = bm25s.BM25(k1=self.k1, b=self.b)
        self._bm25.index(tokens, show_progress=False)
        self._indexed = corpus

    def save_index(self, folder: Path) -> None:
        from bm25s.utils import json_functions

        _require_index(self._ids, self.name)
        dumps = json_functions.dumps  # bm25s writes with orjson when installed, which refuses its int-keyed vocab
        json_functions.dumps = json_functions.dumps_with_builtin
        try:
            self._bm25.save(str(folder), show_progress=False)
            self._tokenizer.save_vocab(str(folder))
        finally:
            json_functions.dumps = dumps

    def load_index(self, folder: Path, corpus: dict[str, Document]) -> None:
        import bm25s
        from bm25s.tokenization import Tokenizer

        self._bm25 = bm25s.BM25.load(str(folder), show_progress=False)
        self._tokenizer = Tokenizer(stopwords=self.stopwords or [])
        self._tokenizer.load_vocab(str(folder))
        self._ids, self._indexed = list(corpus), corpus

    def update_index(self, corpus: dict[str, Document], removed_rows: np.ndarray, added: list[Document]) -> None:
        """BM25's statistics are corpus-wide, so it is re-indexed from the stored text (seconds per 100k docs)."""
        self._indexed = None
        self.index(corpus)

    def index_bytes(self) -> int:
        """Memory of the sparse score matrix that answers queries."""
        _require_index(self._ids, self.name)
        return int(sum(getattr(v, "nbytes", 0) for v in self._bm25.scores.values()))

    def retrieve(self, queries: Sequence[str], k: int) -> list[Ranking]:
        ids = _require_index(self._ids, self.name)
        k = min(k, len(ids))
        tokens = self._tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
        docs, scores = self._bm25.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [[(ids[d], float(s)) for d, s in zip(row_d, row_s)] for row_d, row_s in zip(docs, scores)]


class DenseRetriever:
    """A bi-encoder with exact search over cached corpus embeddings, using the similarity the model defines.

    ``backend`` runs it on ONNX Runtime, OpenVINO or bf16 (a plain model is exported once into the cache, see
    :func:`stagewise.models.export.prepare`); an exported folder runs on its own. ``per_query`` (a ``pipeline.yaml``
    setting, see :mod:`stagewise.models.per_query`) encodes queries on another backend than documents."""

    def __init__(
        self,
        model: str | ModelSpec,
        batch_size: int = 32,
        max_seq_length: int | None = None,
        device: str | None = None,
        cache: EmbeddingCache | None = None,
        show_progress: bool = True,
        vectors: VectorIndexConfig | None = None,
        backend: Backend | None = None,
        threads: int | None = None,
        per_query_setting: dict | None = None,
    ):
        self.spec, self.backend = prepare(model, backend)
        self.batch_size, self.device, self.show_progress = batch_size, device, show_progress
        self.model = load_bi_encoder(self.spec, device=device, max_seq_length=max_seq_length, backend=self.backend,
                                     threads=threads)
        self.per_query = per_query.load(
            per_query_setting, self.spec, "first stage", prepare,
            lambda spec, b: load_bi_encoder(spec, device=device, max_seq_length=self.model.max_seq_length, backend=b,
                                            threads=threads))
        self.query_model = self.per_query.model if self.per_query else self.model
        self.name = per_query.name(stage_name(self.spec, self.backend), self.per_query and self.per_query.label)
        self.cache = cache or EmbeddingCache()
        self.similarity = self.model.similarity_fn_name or "cosine"
        self.vector_config = vectors or VectorIndexConfig()
        if self.similarity not in ("cosine", "dot") and self.vector_config != VectorIndexConfig():
            raise StagewiseError(f"model '{self.name}' uses {self.similarity} similarity: only exact search supports it "
                                 "(HNSW and quantised indexes need cosine or dot)")
        self.vectors: VectorIndex | None = None
        self._ids: list[str] | None = None
        self._indexed: dict | None = None
        self.docs_per_second: float | None = None
        self.from_cache = False

    def config(self) -> dict:
        return {"type": "dense", "name": self.name, "model": self.spec.spec, "fingerprint": self.spec.fingerprint,
                "similarity": self.similarity, "max_seq_length": self.model.max_seq_length,
                **({} if self.backend.is_default else self.backend.config()),
                **({per_query.KEY: self.per_query.config()} if self.per_query else {})}

    def _normalize(self) -> bool:
        return self.similarity == "cosine"

    def encode_documents(self, texts: Sequence[str], show_progress: bool | None = None, model=None) -> np.ndarray:
        """Embed documents with the deployed model, or with ``model`` (its batch-precision copy)."""
        model = model or self.model
        with span("encode", self.name, len(texts), "docs"):
            if engine.distributed(len(texts)):  # a corpus: on Ray when it is the engine in use
                return engine.encode_documents(str(self.spec.path), texts, self.model.max_seq_length,
                                               self._normalize(), self.batch_size, self.backend)

            def encode(chunk) -> np.ndarray:  # sentence-transformers' own tqdm bar off: ours shows the progress
                return model.encode_document(list(chunk), batch_size=self.batch_size, convert_to_numpy=True,
                                             normalize_embeddings=self._normalize(), show_progress_bar=False)

            if self.show_progress if show_progress is None else show_progress:
                return map_chunks(encode, texts, f"{self.name}: encode documents", chunk_size=8 * self.batch_size,
                                  length=len)
            return encode(texts)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Queries are per-query work: on the per-query backend where the pipeline names one, one query at a time
        where that backend's outputs depend on the batch (so that an answer never depends on other requests)."""
        backend = self.per_query.backend if self.per_query else self.backend

        def encode(texts) -> np.ndarray:
            return self.query_model.encode_query(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                                 normalize_embeddings=self._normalize(), show_progress_bar=False)

        if backend.batch_invariant or len(queries) < 2:
            return encode(queries)
        return np.concatenate([encode([q]) for q in queries])

    def warm_up_queries(self, n: int = warm_up.QUERY_TOKENS) -> int:
        """Encode one query of each token length 1..``n`` as :meth:`encode_queries` encodes one query (on the
        per-query model where there is one), so that no request pays for a length's first kernels (see
        :mod:`stagewise.models.warm_up`); returns how many lengths were warmed."""
        texts = warm_up.query_texts(self.query_model, n)
        seconds = warm_up.warm_queries(self.encode_queries, texts)
        if texts:
            logger.info("%s: warmed %d query lengths in %.2f s", self.name, len(texts), seconds)
        return len(texts)

    def embed_corpus(self, texts: Sequence[str]) -> CachedEmbeddings:
        """A corpus's embeddings, from the cache or encoded (in bf16 where the batch precision in use chose it)."""
        options = {"max_seq_length": self.model.max_seq_length, "normalize": self._normalize(), "kind": "document",
                   **({} if self.backend.is_default else {"backend": self.backend.label})}
        encode = self.encode_documents
        policy = batch_precision.current()
        if policy and texts and self.backend.is_default and batch_precision.transformer_model(self.model):
            key = f"{self.spec.fingerprint}-bi-{self.model.max_seq_length}"
            model = policy.batch_model(key, self.name, "bi-encoder", self.model, batch_precision.spread_sample(texts))
            if model is not self.model:
                options["batch_dtype"] = "bfloat16"
                encode = functools.partial(self.encode_documents, model=model)
        if len(texts) > 0:
            logger.info("encoding %d documents with %s", len(texts), self.name)
        return self.cache.get_or_encode(self.spec.fingerprint, texts, options, encode)

    def index(self, corpus: dict[str, Document]) -> None:
        if self._indexed is corpus:
            return
        result = self.embed_corpus([d.full_text() for d in corpus.values()])
        self.vectors = VectorIndex.build(result.embeddings, self.vector_config)
        self.docs_per_second, self.from_cache = result.docs_per_second, result.from_cache
        self._ids = list(corpus)
        self._indexed = corpus

    def save_index(self, folder: Path) -> None:
        _require_index(self._ids, self.name)
        self.vectors.save(folder)

    def load_index(self, folder: Path, corpus: dict[str, Document]) -> None:
        vectors = VectorIndex.load(folder)
        dim = self.model.get_embedding_dimension()
        if len(vectors) != len(corpus) or (dim and vectors.dim != dim):
            raise StagewiseError(f"{folder}: {len(vectors)} vectors of {vectors.dim} dims do not fit "
                                 f"{len(corpus)} documents and model '{self.name}' ({dim} dims)")
        self.vectors, self.vector_config = vectors, vectors.config
        self._ids, self._indexed = list(corpus), corpus

    def update_index(self, corpus: dict[str, Document], removed_rows: np.ndarray, added: list[Document]) -> None:
        _require_index(self._ids, self.name)
        new = self.encode_documents([d.full_text() for d in added]) if added else np.zeros((0, self.vectors.dim))
        self.vectors = self.vectors.updated(removed_rows, new)
        self._ids, self._indexed = list(corpus), corpus

    def index_bytes(self) -> int:
        """Memory the vector search holds: float32 embeddings for exact search, else quantised codes and graph."""
        _require_index(self._ids, self.name)
        return self.vectors.memory_bytes()

    def retrieve(self, queries: Sequence[str], k: int) -> list[Ranking]:
        ids = _require_index(self._ids, self.name)
        q = self.encode_queries(queries)
        if self.similarity in ("cosine", "dot"):
            rows, scores = self.vectors.search(q, k)
        else:
            rows, scores = top_k(self.model.similarity(q, np.asarray(self.vectors.embeddings)).numpy(), k)
        return [[(ids[i], float(s)) for i, s in zip(r, row) if i >= 0] for r, row in zip(rows, scores)]  # -1: none


class HybridRetriever:
    """Reciprocal rank fusion (Cormack et al. 2009): score = sum over stages of 1 / (rrf_k + rank).

    Rank-based, so it needs no score calibration between lexical and dense stages.
    """

    def __init__(self, stages: Sequence[FirstStage], rrf_k: int = 60, fusion_depth: int = 100):
        if len(stages) < 2:
            raise StagewiseError("a hybrid first stage fuses at least two stages")
        self.stages = list(stages)
        self.rrf_k, self.fusion_depth = rrf_k, fusion_depth
        self.name = "+".join(s.name for s in self.stages)

    def config(self) -> dict:
        return {"type": "hybrid", "name": self.name, "rrf_k": self.rrf_k, "fusion_depth": self.fusion_depth,
                "stages": [s.config() for s in self.stages]}

    def index(self, corpus: dict[str, Document]) -> None:
        for stage in self.stages:
            stage.index(corpus)

    def index_bytes(self) -> int:
        return sum(stage.index_bytes() for stage in self.stages)

    def save_index(self, folder: Path) -> None:
        for i, stage in enumerate(self.stages):
            stage.save_index(_stage_folder(folder, i))

    def load_index(self, folder: Path, corpus: dict[str, Document]) -> None:
        for i, stage in enumerate(self.stages):
            stage.load_index(_stage_folder(folder, i), corpus)

    def update_index(self, corpus: dict[str, Document], removed_rows: np.ndarray, added: list[Document]) -> None:
        for stage in self.stages:
            stage.update_index(corpus, removed_rows, added)

    def warm_up_queries(self, n: int = warm_up.QUERY_TOKENS) -> int:
        """Each stage's per-query path warmed (a stage without one, BM25, needs none)."""
        return sum(stage.warm_up_queries(n) for stage in self.stages if hasattr(stage, "warm_up_queries"))

    def retrieve(self, queries: Sequence[str], k: int) -> list[Ranking]:
        depth = max(k, self.fusion_depth)
        per_stage = [stage.retrieve(queries, depth) for stage in self.stages]
        fused = []
        for rankings in zip(*per_stage):
            scores: dict[str, float] = {}
            for ranking in rankings:
                for rank, (doc_id, _) in enumerate(ranking, start=1):
                    scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (self.rrf_k + rank)
            fused.append(sorted(scores.items(), key=lambda x: (-x[1], x[0]))[:k])
        return fused


def _stage_folder(folder: Path, i: int) -> Path:
    return folder / f"stage-{i}"


_RANKINGS: dict[tuple[str, int], list[Ranking]] = {}  # the last few batch retrievals: first stage, queries, k
_RANKINGS_KEPT = 8


def retrieve_once(stage: FirstStage, queries: Sequence[str], k: int, description: str | None = None,
                  chunk: int = 64) -> list[Ranking]:
    """``stage.retrieve`` for batch work (mining, dev candidates), in chunks on one of our bars (``description``),
    answered from memory when the same first stage (its config: models by fingerprint) has already retrieved the
    same queries at least as deep in this process: every cross-encoder start of a selection mines from the same
    first stage, and none should search twice."""
    queries = list(queries)
    key = None
    if hasattr(stage, "config"):  # a stage that cannot say what it is is never answered from memory
        ids = getattr(stage, "_ids", None) or next((s._ids for s in getattr(stage, "stages", []) if s._ids), [])
        key = hashlib.sha256(f"{json.dumps(stage.config(), sort_keys=True, default=str)}|{texts_hash(ids)}|"
                             f"{texts_hash(queries)}".encode()).hexdigest()
    for (known, depth), rankings in _RANKINGS.items():
        if key is not None and known == key and depth >= k:
            return [r[:k] for r in rankings]
    rankings: list[Ranking] = []
    with progress_bar() if description else contextlib.nullcontext() as bar:
        task = bar.add_task(description, total=len(queries)) if bar else None
        for start in range(0, len(queries), chunk):  # a dense stage encodes each chunk's queries together
            rankings += stage.retrieve(queries[start:start + chunk], k)
            if bar:
                bar.advance(task, len(queries[start:start + chunk]))
    if key is not None:
        _RANKINGS[(key, k)] = rankings
    while len(_RANKINGS) > _RANKINGS_KEPT:
        _RANKINGS.pop(next(iter(_RANKINGS)))
    return rankings


def warn_if_changed(saved: dict, spec: ModelSpec) -> None:
    """A saved config names a model by spec and fingerprint: say so when the files have changed since."""
    if saved.get("fingerprint") and saved["fingerprint"] not in fingerprints(spec):
        warnings.warn(
            f"model '{spec.spec}' has changed since this config was saved (fingerprint {saved['fingerprint']} "
            f"→ {spec.fingerprint}): results may differ from the ones recorded",
            stacklevel=3,
        )


def build_first_stage(
    spec: str | dict, cache: EmbeddingCache | None = None, shared: dict | None = None, **dense_options
) -> FirstStage:
    """``bm25`` | a model spec (dense) | ``a+b`` (hybrid of a and b), or a saved ``config()`` dict.

    ``shared`` maps specs to stages already built, so ``minilm-l6`` and ``bm25+minilm-l6`` load one model.
    """
    shared = {} if shared is None else shared
    if isinstance(spec, dict):
        pipeline_schema.check(spec, pipeline_schema.FIRST_STAGE, "first_stage")
        stage = _first_stage_from_config(spec, cache, shared, dense_options)
        stage.name = spec.get("name") or stage.name
        return stage
    if not pipeline_schema.first_stage_spec_ok(spec):
        raise StagewiseError(f"first stage {spec!r}: expected bm25, a model or a+b, with nothing empty between '+' "
                             "(or a saved stage's mapping)")
    spec = spec.strip()
    if spec not in shared:
        if "+" in spec:
            shared[spec] = HybridRetriever([build_first_stage(p, cache, shared, **dense_options) for p in spec.split("+")])
        elif spec.lower() == "bm25":
            shared[spec] = BM25Retriever()
        else:
            shared[spec] = DenseRetriever(spec, cache=cache, **dense_options)
    return shared[spec]


def _given(spec: dict, *keys: str) -> dict:
    """The settings a saved config gives (checked by its schema); the others keep the constructor's defaults."""
    return {k: spec[k] for k in keys if k in spec}


def _first_stage_from_config(spec: dict, cache, shared, dense_options) -> FirstStage:
    if spec["type"] == "bm25":
        return BM25Retriever(**_given(spec, "k1", "b", "stopwords"))
    if spec["type"] == "dense":
        options = {**dense_options, "max_seq_length": spec.get("max_seq_length")}
        if not options.get("backend"):  # an explicit backend option overrides the saved ones (both uses)
            options["backend"] = pipeline_schema.saved_backend(spec)
            options["per_query_setting"] = spec.get(per_query.KEY)
        stage = DenseRetriever(spec["model"], cache=cache, **options)
        warn_if_changed(spec, stage.spec)
        return stage
    stages = [build_first_stage(s, cache, shared, **dense_options) for s in spec["stages"]]
    return HybridRetriever(stages, **_given(spec, "rrf_k", "fusion_depth"))
