"""Tests for stagewise.search.pipeline: two-stage search (retrieve, rerank the top depth), hits, persistence."""

from __future__ import annotations

import pytest
import yaml

from conftest import CORPUS
from stagewise.data.loaders import Document
from stagewise.errors import StagewiseError
from stagewise.search.fusion import Fusion
from stagewise.search.pipeline import Hit, Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import BM25Retriever

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
                                    "rerank_score", "fused_score", "title", "text"}
        assert h.fused_score is None  # pure reranking: no fusion


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

    assert saved["fusion"] == {"weight": 1.0, "normalization": "minmax", "first_stage": "score"}

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
    with pytest.raises(StagewiseError, match="pipeline.yaml:1: unknown key 'just'"):
        Pipeline.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(StagewiseError, match="must be a pipeline"):
        Pipeline.load(bad)
    with pytest.raises(StagewiseError, match="cannot read"):
        Pipeline.load(tmp_path / "missing.yaml")


def test_load_warns_when_a_saved_model_has_changed(tiny_bi_encoder, tmp_path):
    import shutil

    from stagewise.search.retrievers import DenseRetriever

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bi_encoder, model_dir)
    path = Pipeline(DenseRetriever(str(model_dir), show_progress=False)).save(tmp_path / "pipeline.yaml")
    with open(model_dir / "config_sentence_transformers.json", "a") as f:
        f.write("\n")  # any change to the model's files changes its fingerprint
    with pytest.warns(UserWarning, match="has changed since this config was saved"):
        Pipeline.load(path)


# ---- fusion: the reranked top ordered by both stages' scores --------------------------------------------------

QUERIES = (QUERY, "hot drink", "animals that bark", "memory safety language", "roasted beans")


def minmax(values: list[float]) -> list[float]:
    span = max(values) - min(values)
    return [(v - min(values)) / span if span > 0 else 0.0 for v in values]


def test_fusion_orders_the_reranked_top_by_both_stages_and_reports_every_score(reranker):
    """Each stage's raw score is kept; score and fused_score are the weighted min-max fusion, best first."""
    docs, bm25 = corpus(), BM25Retriever()
    pipeline = Pipeline(bm25, reranker, depth=4, fusion=Fusion(0.4)).index(docs)
    assert pipeline.name == f"bm25 >> {reranker.name}@4 fused 0.40"
    for query in QUERIES:
        hits = pipeline.search(query, k=6)
        first = bm25.retrieve([query], 6)[0]
        top = first[:4]
        rerank = list(reranker.score(query, [docs[d].full_text() for d, _ in top]))
        fused = {d: 0.4 * r + 0.6 * f for (d, _), r, f in zip(top, minmax(rerank), minmax([s for _, s in top]))}
        assert [h.doc_id for h in hits[:4]] == sorted(fused, key=lambda d: -fused[d])  # sorted() is stable too
        by_id = {h.doc_id: h for h in hits}
        for (d, first_score), r in zip(top, rerank):
            h = by_id[d]
            assert h.fused_score == pytest.approx(fused[d], abs=1e-6) and h.score == h.fused_score
            assert h.rerank_score == pytest.approx(r, abs=1e-5)
            assert h.first_stage_score == pytest.approx(first_score)
        assert [(h.doc_id, h.rank, h.first_stage_rank) for h in hits[4:]] == [(d, i, i) for i, (d, _) in
                                                                               enumerate(first[4:], start=5)]
        assert all(h.fused_score is None and h.rerank_score is None and h.score == h.first_stage_score
                   for h in hits[4:])
        assert all(h.fused_score is None for h in pipeline.search(query, k=6, rerank=False))


def test_fusion_weight_zero_keeps_the_first_stage_order_and_shows_reranker_scores(reranker):
    """Weight 0 is the first stage's own order, while the reranker's scores are still computed and shown."""
    docs, bm25 = corpus(), BM25Retriever()
    fused = Pipeline(bm25, reranker, depth=5, fusion=Fusion(0.0)).index(docs)
    pure = Pipeline(BM25Retriever(), reranker, depth=5).index(docs)
    reordered = 0
    for query in QUERIES:
        first = [d for d, _ in bm25.retrieve([query], 6)[0]]
        hits = fused.search(query, k=6)
        assert [h.doc_id for h in hits] == first and all(h.rank == h.first_stage_rank for h in hits)
        expected = reranker.score(query, [docs[d].full_text() for d in first[:5]])
        assert [h.rerank_score for h in hits[:5]] == pytest.approx(list(expected), abs=1e-5)
        assert all(h.fused_score is not None for h in hits[:5]) and hits[5].fused_score is None
        reordered += [h.doc_id for h in pure.search(query, k=6)] != first
    assert reordered > 0  # pure reranking does move hits here, so keeping the order is the fusion's doing


def test_a_fusion_is_saved_and_loaded_with_the_same_results(reranker, tmp_path):
    docs = corpus()
    fusion = Fusion(0.25, "zscore", "rank")
    pipeline = Pipeline(BM25Retriever(), reranker, depth=4, fusion=fusion).index(docs)
    path = pipeline.save(tmp_path / "pipeline.yaml")
    assert yaml.safe_load(path.read_text())["fusion"] == {"weight": 0.25, "normalization": "zscore",
                                                          "first_stage": "rank"}
    loaded = Pipeline.load(path).index(docs)
    assert loaded.fusion == fusion and loaded.config() == pipeline.config() and loaded.name == pipeline.name
    assert "fused 0.25 zscore first-stage rank" in loaded.name
    for query in QUERIES:
        a, b = pipeline.search(query, k=5), loaded.search(query, k=5)
        assert [(h.doc_id, h.fused_score is None) for h in a] == [(h.doc_id, h.fused_score is None) for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-6)
        assert any(h.fused_score is not None for h in b)


def test_a_pipeline_file_without_fusion_is_pure_reranking(reranker, tiny_cross_encoder, tmp_path):
    """pipeline.yaml files written before fusion existed still load, and rerank as they did."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"first_stage: {{type: bm25}}\nreranker: {{type: cross-encoder, model: {tiny_cross_encoder}}}\n"
                    "depth: 3\n")
    loaded = Pipeline.load(path)
    assert loaded.fusion == Fusion() and loaded.name == f"bm25 >> {loaded.reranker.name}@3"
    hits = loaded.index(corpus()).search(QUERY, k=4)
    assert all(h.fused_score is None for h in hits) and all(h.score == h.rerank_score for h in hits[:3])
    assert Pipeline(BM25Retriever()).config().get("fusion") is None  # nothing to fuse without a reranker


@pytest.mark.parametrize("lines, words", [
    ("fusion: {weight: 2}", ["field 'fusion'", "weight", "2"]),
    ("fusion: {weight: 0.5, blend: sum}", ["field 'fusion'", "unknown key 'blend'"]),
    ("fusion: 0.5", ["field 'fusion'", "mapping"]),
    ("fusion: {normalization: softmax}", ["field 'fusion'", "normalization", "softmax"]),
    ("depth: zero", ["field 'depth'", "'zero'"]),
    ("depth: 0", ["field 'depth'", "at least 1"]),
    ("depth: 2.5", ["field 'depth'", "2.5"]),
], ids=["weight-2", "unknown-key", "not-a-mapping", "bad-normalization", "depth-zero-word", "depth-0", "depth-float"])
def test_a_bad_fusion_or_depth_in_pipeline_yaml_is_one_line_naming_the_field(lines, words, tiny_cross_encoder,
                                                                             tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"first_stage: {{type: bm25}}\nreranker: {{type: cross-encoder, model: {tiny_cross_encoder}}}\n"
                    f"depth: 3\n{lines}\n".replace("depth: 3\ndepth", "depth"))
    with pytest.raises(StagewiseError) as e:
        Pipeline.load(path)
    message = str(e.value)
    line = 3 if lines.startswith("depth") else 4  # the line of the field at fault
    assert message.startswith(f"{path}:{line}: ") and "\n" not in message
    for word in words:
        assert word in message, message


def test_fusion_without_a_reranker_is_refused(tmp_path):
    """A fusion with nothing to fuse would be silently ignored: refuse it instead."""
    with pytest.raises(StagewiseError, match="needs a reranker"):
        Pipeline(BM25Retriever(), None, fusion=Fusion(0.5))
    path = tmp_path / "pipeline.yaml"
    path.write_text("first_stage: {type: bm25}\nfusion: {weight: 0.5}\n")
    with pytest.raises(StagewiseError, match=r"field 'fusion': needs a reranker"):
        Pipeline.load(path)
    path.write_text("first_stage: {type: bm25}\nfusion: {weight: 1.0}\n")  # pure reranking: harmless
    assert Pipeline.load(path).reranker is None
