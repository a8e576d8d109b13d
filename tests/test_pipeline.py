"""Tests for stagewise.pipeline: two-stage search (retrieve, rerank the top depth), hits, persistence."""

from __future__ import annotations

import pytest
import yaml

from conftest import CORPUS
from stagewise.data import Document
from stagewise.errors import StagewiseError
from stagewise.pipeline import Hit, Pipeline
from stagewise.rerankers import CrossEncoderReranker
from stagewise.retrievers import BM25Retriever

QUERY = "domesticated programming language"


def corpus() -> dict[str, Document]:
    return {d["_id"]: Document(d["_id"], d.get("title", ""), d["text"]) for d in CORPUS}


@pytest.fixture(scope="module")
def reranker(tiny_cross_encoder) -> CrossEncoderReranker:
    return CrossEncoderReranker(str(tiny_cross_encoder), device="cpu")


def test_search_reranks_the_top_depth_and_keeps_first_stage_order_below(reranker):
    docs = corpus()
    bm25 = BM25Retriever()
    pipeline = Pipeline(bm25, reranker, depth=3).index(docs)
    hits = pipeline.search(QUERY, k=5)
    first = bm25.retrieve([QUERY], 5)[0]

    assert len(hits) == 5 and all(isinstance(h, Hit) for h in hits)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]

    top, rest = hits[:3], hits[3:]
    assert all(h.rerank_score is not None for h in top)
    assert [h.rerank_score for h in top] == sorted((h.rerank_score for h in top), reverse=True)
    assert all(h.score == h.rerank_score for h in top)
    assert {h.doc_id for h in top} == {d for d, _ in first[:3]}  # the reranker only reorders the top 3
    # the reranker's own scores, recomputed
    expected = reranker.score(QUERY, [docs[h.doc_id].full_text() for h in top])
    assert [h.rerank_score for h in top] == pytest.approx(list(expected), abs=1e-5)

    assert all(h.rerank_score is None for h in rest)
    assert [(h.doc_id, h.first_stage_rank) for h in rest] == [(first[3][0], 4), (first[4][0], 5)]
    assert all(h.score == h.first_stage_score for h in rest)

    first_rank = {d: (rank, score) for rank, (d, score) in enumerate(first, start=1)}
    for h in hits:
        assert (h.first_stage_rank, h.first_stage_score) == (first_rank[h.doc_id][0], pytest.approx(first_rank[h.doc_id][1]))
        assert h.title == docs[h.doc_id].title and h.text == docs[h.doc_id].text
        assert set(h.to_dict()) == {"doc_id", "score", "rank", "first_stage_score", "first_stage_rank",
                                    "rerank_score", "title", "text"}


def test_depth_larger_than_k_reranks_depth_and_returns_k(reranker):
    pipeline = Pipeline(BM25Retriever(), reranker, depth=6).index(corpus())
    hits, timings = pipeline.search_timed(QUERY, k=2)
    assert len(hits) == 2 and all(h.rerank_score is not None for h in hits)
    assert timings.first_stage_s >= 0 and timings.rerank_s >= 0
    assert timings.total_s == pytest.approx(timings.first_stage_s + timings.rerank_s)
    every = pipeline.search(QUERY, k=6)
    assert [h.doc_id for h in every[:2]] == [h.doc_id for h in hits]  # the best of all six reranked


def test_first_stage_only_keeps_its_order():
    bm25 = BM25Retriever()
    pipeline = Pipeline(bm25).index(corpus())
    assert pipeline.name == "bm25"
    hits = pipeline.search(QUERY, k=4)
    assert [(h.doc_id, h.score) for h in hits] == [(d, pytest.approx(s)) for d, s in bm25.retrieve([QUERY], 4)[0]]
    assert all(h.rerank_score is None and h.rank == h.first_stage_rank for h in hits)


def test_search_before_index_raises(reranker):
    with pytest.raises(StagewiseError, match="index"):
        Pipeline(BM25Retriever(), reranker, depth=3).search(QUERY)


@pytest.mark.parametrize("depth", [0, -1])
def test_depth_below_one_raises(depth):
    with pytest.raises(StagewiseError, match="depth"):
        Pipeline(BM25Retriever(), None, depth=depth)


def test_save_and_load_give_the_same_results(reranker, tiny_cross_encoder, tmp_path):
    docs = corpus()
    pipeline = Pipeline(BM25Retriever(k1=1.2, b=0.7), reranker, depth=3).index(docs)
    path = pipeline.save(tmp_path / "out" / "pipeline.yaml")
    assert path == tmp_path / "out" / "pipeline.yaml" and path.is_file()
    saved = yaml.safe_load(path.read_text())
    assert saved["depth"] == 3 and saved["first_stage"]["type"] == "bm25"
    assert saved["reranker"]["model"] == str(tiny_cross_encoder)

    loaded = Pipeline.load(path).index(docs)
    assert loaded.depth == 3 and loaded.name == pipeline.name
    assert loaded.config() == pipeline.config()
    for query in (QUERY, "hot drink", "animals that bark"):
        a, b = pipeline.search(query, k=5), loaded.search(query, k=5)
        assert [h.doc_id for h in a] == [h.doc_id for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
        assert [h.rerank_score is None for h in a] == [h.rerank_score is None for h in b]


def test_load_rejects_a_file_that_is_not_a_pipeline(tmp_path):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("just: a mapping\n")
    with pytest.raises(StagewiseError, match="not a pipeline"):
        Pipeline.load(bad)
    with pytest.raises(StagewiseError, match="cannot read"):
        Pipeline.load(tmp_path / "missing.yaml")


def test_load_warns_when_a_saved_model_has_changed(tiny_bi_encoder, tmp_path):
    import shutil

    from stagewise.retrievers import DenseRetriever

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bi_encoder, model_dir)
    path = Pipeline(DenseRetriever(str(model_dir), show_progress=False)).save(tmp_path / "pipeline.yaml")
    with open(model_dir / "config_sentence_transformers.json", "a") as f:
        f.write("\n")  # any change to the model's files changes its fingerprint
    with pytest.warns(UserWarning, match="has changed since this config was saved"):
        Pipeline.load(path)
