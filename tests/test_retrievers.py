"""Tests for stagewise.search.retrievers and the embedding cache: BM25, exact dense search, RRF fusion, building stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS
from stagewise.cache import EmbeddingCache
from stagewise.data.loaders import Document
from stagewise.errors import StagewiseError
from stagewise.search.retrievers import BM25Retriever, DenseRetriever, HybridRetriever, build_first_stage

QUERIES = ["which animal purrs", "systems language memory safety", "roasted coffee beans", "hot water leaves"]


def corpus(docs=CORPUS) -> dict[str, Document]:
    return {d["_id"]: Document(d["_id"], d.get("title", ""), d["text"]) for d in docs}


@pytest.fixture
def count_encodes(monkeypatch):
    """Counts calls to DenseRetriever.encode_documents (any instance) and the texts they encoded."""
    calls: list[list[str]] = []
    original = DenseRetriever.encode_documents

    def counting(self, texts, show_progress=None):
        calls.append(list(texts))
        return original(self, texts, show_progress=False)

    monkeypatch.setattr(DenseRetriever, "encode_documents", counting)
    return calls


def dense(path: Path, **options) -> DenseRetriever:
    return DenseRetriever(str(path), device="cpu", show_progress=False, **options)


# --------------------------------------------------------------------------------------------
# BM25
# --------------------------------------------------------------------------------------------


def test_bm25_ranks_the_exact_term_match_first():
    bm25 = BM25Retriever()
    bm25.index(corpus())
    rankings = bm25.retrieve(["purr", "memory safety", "roasted beans"], k=3)
    assert [r[0][0] for r in rankings] == ["d1", "d4", "d6"]
    for ranking in rankings:
        scores = [s for _, s in ranking]
        assert scores == sorted(scores, reverse=True)
        assert ranking[0][1] > 0 and ranking[0][1] > ranking[1][1]


def test_bm25_returns_min_of_k_and_corpus_size():
    bm25 = BM25Retriever()
    bm25.index(corpus())
    assert [len(r) for r in bm25.retrieve(["purr"], k=2)] == [2]
    full = bm25.retrieve(["purr", "tea"], k=100)
    assert [len(r) for r in full] == [6, 6]
    assert all(len({d for d, _ in r}) == 6 for r in full)  # every document once


def test_bm25_retrieve_before_index_raises():
    with pytest.raises(StagewiseError, match="index"):
        BM25Retriever().retrieve(["purr"], k=3)


# --------------------------------------------------------------------------------------------
# Dense retrieval
# --------------------------------------------------------------------------------------------


def test_dense_retrieval_matches_brute_force(tiny_bi_encoder):
    docs = corpus()
    retriever = dense(tiny_bi_encoder)
    retriever.index(docs)
    k = 4
    rankings = retriever.retrieve(QUERIES, k)

    model = retriever.model
    doc_emb = model.encode([d.full_text() for d in docs.values()], convert_to_tensor=True)
    query_emb = model.encode(QUERIES, convert_to_tensor=True)
    expected = model.similarity(query_emb, doc_emb).numpy()
    ids = list(docs)
    for row, ranking in zip(expected, rankings):
        order = np.argsort(-row, kind="stable")[:k]
        assert [d for d, _ in ranking] == [ids[i] for i in order]
        np.testing.assert_allclose([s for _, s in ranking], row[order], atol=1e-5)
    assert [len(r) for r in retriever.retrieve(QUERIES[:1], 100)] == [6]


def test_dense_retrieve_before_index_raises(tiny_bi_encoder):
    with pytest.raises(StagewiseError, match="index"):
        dense(tiny_bi_encoder).retrieve(["anything"], k=3)


def test_embedding_cache_is_read_by_a_new_retriever(tiny_bi_encoder, count_encodes):
    first = dense(tiny_bi_encoder)
    first.index(corpus())
    assert first.from_cache is False and len(count_encodes) == 1
    expected = first.retrieve(QUERIES, 6)

    second = dense(tiny_bi_encoder)  # a new instance, an equal (not identical) corpus
    second.index(corpus())
    assert second.from_cache is True
    assert len(count_encodes) == 1  # no encoding: read from the cache
    assert second.docs_per_second == pytest.approx(first.docs_per_second)
    got = second.retrieve(QUERIES, 6)
    assert [[d for d, _ in r] for r in got] == [[d for d, _ in r] for r in expected]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in expected], atol=1e-6)

    second.index(second._indexed)  # the same corpus object again: nothing to do
    assert len(count_encodes) == 1


def test_a_changed_document_re_encodes(tiny_bi_encoder, count_encodes):
    dense(tiny_bi_encoder).index(corpus())
    changed = [dict(d) for d in CORPUS]
    changed[2]["text"] = "Python is a programming language with dynamic typing and garbage collection."
    retriever = dense(tiny_bi_encoder)
    retriever.index(corpus(changed))
    assert retriever.from_cache is False and len(count_encodes) == 2


def test_a_different_model_re_encodes(tiny_bi_encoder, tmp_path, count_encodes):
    import torch
    from sentence_transformers import SentenceTransformer

    dense(tiny_bi_encoder).index(corpus())
    model = SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # a changed weight file
    other = tmp_path / "other-model"
    model.save(str(other))

    retriever = dense(other)
    retriever.index(corpus())
    assert retriever.from_cache is False and len(count_encodes) == 2


def test_a_different_max_seq_length_re_encodes(tiny_bi_encoder, count_encodes):
    dense(tiny_bi_encoder).index(corpus())
    retriever = dense(tiny_bi_encoder, max_seq_length=8)
    retriever.index(corpus())
    assert retriever.from_cache is False and len(count_encodes) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong-shape"])
def test_a_corrupted_cache_entry_is_ignored_and_re_encoded(tiny_bi_encoder, count_encodes, damage):
    first = dense(tiny_bi_encoder)
    first.index(corpus())
    expected = first.retrieve(QUERIES, 6)
    entries = list(first.cache.root.glob("*.npy"))
    assert len(entries) == 1
    npy = entries[0]
    if damage == "garbage":
        npy.write_bytes(b"not an array at all" * 10)
    elif damage == "truncated":
        npy.write_bytes(npy.read_bytes()[:200])
    elif damage == "empty":
        npy.write_bytes(b"")
    else:
        np.save(npy, np.zeros((2, 32), dtype=np.float32))

    second = dense(tiny_bi_encoder)
    second.index(corpus())
    assert second.from_cache is False and len(count_encodes) == 2
    got = second.retrieve(QUERIES, 6)
    assert [[d for d, _ in r] for r in got] == [[d for d, _ in r] for r in expected]

    third = dense(tiny_bi_encoder)  # the entry was rewritten and is good again
    third.index(corpus())
    assert third.from_cache is True and len(count_encodes) == 2


def test_cache_root_can_be_given(tiny_bi_encoder, tmp_path, count_encodes):
    cache = EmbeddingCache(tmp_path / "emb")
    dense(tiny_bi_encoder, cache=cache).index(corpus())
    assert len(list((tmp_path / "emb").glob("*.npy"))) == 1
    assert dense(tiny_bi_encoder, cache=cache).from_cache is False  # nothing indexed yet
    again = dense(tiny_bi_encoder, cache=EmbeddingCache(tmp_path / "emb"))
    again.index(corpus())
    assert again.from_cache is True and len(count_encodes) == 1


# --------------------------------------------------------------------------------------------
# Hybrid (reciprocal rank fusion)
# --------------------------------------------------------------------------------------------


class StubStage:
    """A first stage that returns fixed rankings (scores are irrelevant to RRF)."""

    def __init__(self, name: str, ranking: list[str]):
        self.name, self.ranking = name, ranking
        self.indexed = None
        self.asked: list[int] = []

    def index(self, corpus):
        self.indexed = corpus

    def retrieve(self, queries, k):
        self.asked.append(k)
        return [[(d, 100.0 - i) for i, d in enumerate(self.ranking[:k])] for _ in queries]

    def config(self):
        return {"type": "stub", "name": self.name}


def test_hybrid_rrf_scores_and_order():
    a = StubStage("a", ["d1", "d2", "d3", "d4"])
    b = StubStage("b", ["d3", "d5", "d1"])
    hybrid = HybridRetriever([a, b])
    assert hybrid.name == "a+b"
    docs = corpus()
    hybrid.index(docs)
    assert a.indexed is docs and b.indexed is docs

    fused = hybrid.retrieve(["q1", "q2"], k=10)
    assert len(fused) == 2 and fused[0] == fused[1]
    expected = {
        "d1": 1 / 61 + 1 / 63,
        "d3": 1 / 63 + 1 / 61,
        "d2": 1 / 62,
        "d5": 1 / 62,
        "d4": 1 / 64,
    }
    ranking = fused[0]
    assert dict(ranking) == pytest.approx(expected, abs=1e-15)
    for doc_id, score in ranking:  # exactly the formula, not just close
        assert score == expected[doc_id]
    # ties (d1/d3, d2/d5) break by document id, so the order is deterministic
    assert [d for d, _ in ranking] == ["d1", "d3", "d2", "d5", "d4"]
    assert a.asked == [100] and b.asked == [100]  # each stage is asked for fusion_depth candidates

    top2 = hybrid.retrieve(["q"], k=2)[0]
    assert [d for d, _ in top2] == ["d1", "d3"]


def test_hybrid_rrf_k_and_depth():
    a = StubStage("a", ["x", "y"])
    b = StubStage("b", ["y", "x"])
    hybrid = HybridRetriever([a, b], rrf_k=10, fusion_depth=5)
    ranking = hybrid.retrieve(["q"], k=200)[0]
    assert dict(ranking) == {"x": 1 / 11 + 1 / 12, "y": 1 / 12 + 1 / 11}
    assert a.asked == [200]  # max(k, fusion_depth)


def test_hybrid_needs_two_stages():
    with pytest.raises(StagewiseError):
        HybridRetriever([StubStage("a", ["d1"])])


# --------------------------------------------------------------------------------------------
# Building first stages
# --------------------------------------------------------------------------------------------


def test_build_first_stage_shares_the_dense_model(tiny_bi_encoder):
    shared: dict = {}
    path = str(tiny_bi_encoder)
    hybrid = build_first_stage(f"bm25+{path}", shared=shared, device="cpu", show_progress=False)
    single = build_first_stage(path, shared=shared, device="cpu", show_progress=False)
    assert isinstance(hybrid, HybridRetriever) and isinstance(single, DenseRetriever)
    assert isinstance(hybrid.stages[0], BM25Retriever)
    assert hybrid.stages[1] is single
    assert build_first_stage("bm25", shared=shared) is hybrid.stages[0]
    assert build_first_stage(f"bm25+{path}", shared=shared) is hybrid


def test_unknown_first_stage_type_raises():
    with pytest.raises(StagewiseError, match="unknown first-stage type"):
        build_first_stage({"type": "splade"})


def test_config_round_trips_through_build_first_stage(tiny_bi_encoder):
    path = str(tiny_bi_encoder)
    stages = [
        BM25Retriever(k1=1.2, b=0.6, stopwords=None),
        dense(tiny_bi_encoder, max_seq_length=32),
        HybridRetriever([BM25Retriever(), dense(tiny_bi_encoder)], rrf_k=30, fusion_depth=50),
    ]
    for stage in stages:
        config = stage.config()
        rebuilt = build_first_stage(config, device="cpu", show_progress=False)
        assert type(rebuilt) is type(stage)
        assert rebuilt.config() == config
    dense_config = stages[1].config()
    assert dense_config["model"] == path and dense_config["max_seq_length"] == 32

    # the rebuilt stage retrieves exactly as the original
    docs = corpus()
    original, rebuilt = stages[2], build_first_stage(stages[2].config(), device="cpu", show_progress=False)
    original.index(docs)
    rebuilt.index(docs)
    assert original.retrieve(QUERIES, 6) == rebuilt.retrieve(QUERIES, 6)


def test_copy_of_a_model_resolves_and_shares_cache(tiny_bi_encoder, tmp_path, count_encodes):
    """An identical copy of a model has the same fingerprint, so it reads the same cached embeddings."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bi_encoder, copy)
    dense(tiny_bi_encoder).index(corpus())
    retriever = dense(copy)
    retriever.index(corpus())
    assert retriever.from_cache is True and len(count_encodes) == 1


def test_retrieve_once_searches_each_batch_once(beir_dir, monkeypatch):
    from stagewise.data.loaders import load_dataset
    from stagewise.search.retrievers import BM25Retriever, retrieve_once

    corpus = load_dataset(str(beir_dir)).corpus
    stage = BM25Retriever()
    stage.index(corpus)
    calls = []
    real = stage.retrieve
    monkeypatch.setattr(stage, "retrieve", lambda q, k: calls.append((len(q), k)) or real(q, k))
    queries = ["which animal purrs", "language with memory safety", "roasted beans"]
    first = retrieve_once(stage, queries, 5)
    assert retrieve_once(stage, queries, 3) == [r[:3] for r in first]  # shallower: from the deeper one
    assert retrieve_once(stage, queries, 5) == first
    assert calls == [(3, 5)] and first == real(queries, 5)
    retrieve_once(stage, queries[:2], 5)  # other queries, and deeper, search again
    retrieve_once(stage, queries, 6)
    assert calls == [(3, 5), (2, 5), (3, 6)]
    other = BM25Retriever()
    other.index(dict(list(corpus.items())[:4]))  # the same settings over another corpus: not the same rankings
    assert retrieve_once(other, queries, 3) == other.retrieve(queries, 3)
