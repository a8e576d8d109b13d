"""Per-use backends: a stage's batch work on one backend, its per-query work on another (``per_query``).

The recommendation round-trips through ``pipeline.yaml``, the index and the service; a backend chosen for batches
only does batch work (corpus encoding, micro-batches of several queries), and the per-query one answers single
queries."""

from __future__ import annotations

import httpx
import pytest
import yaml
from test_backends import (  # noqa: F401
    BI,
    CROSS,
    SEARCHES,
    _keep_torch_threads,
    calibration,
    calibration_dir,
    docs,
    exports,
    sources,
    spread_cross_encoder,
)

from conftest import running_server
from stagewise.errors import StagewiseError
from stagewise.models.backends import Backend
from stagewise.models.runtimes import OnnxRuntimeModel, transformer_module
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import DenseRetriever, build_first_stage
from stagewise.serving.index import Index

BF16 = Backend("torch", dtype="bfloat16")


@pytest.fixture(scope="module")
def per_use(exports, sources):  # noqa: F811 (the imported fixtures)
    """Both stages on ONNX for batches and PyTorch bf16 (their source model) per query."""
    bi, _ = exports(BI, "onnx")
    cross, _ = exports(CROSS, "onnx")
    first = DenseRetriever(str(bi), show_progress=False,
                           per_query_setting={"model": str(sources[BI]), **BF16.config()})
    reranker = CrossEncoderReranker(str(cross), per_query_setting={"model": str(sources[CROSS]), **BF16.config()})
    return Pipeline(first, reranker, depth=3)


def _calls(monkeypatch, stage, attribute: str) -> dict:
    """Count calls of ``attribute`` on the stage's batch model and on its per-query model."""
    counts = {"batch": 0, "query": 0}
    for use, model in (("batch", stage.model), ("query", stage.per_query.model)):
        original = getattr(model, attribute)

        def counted(*args, _use=use, _original=original, **kwargs):
            counts[_use] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, attribute, counted)
    return counts


def _scored(monkeypatch, reranker) -> dict:
    """Count the reranker's scoring calls on its batch model and on its per-query model."""
    counts, original = {"batch": 0, "query": 0}, reranker.tokens.predict

    def counted(model, pairs, batch_size):
        counts["batch" if model is reranker.model else "query"] += 1
        return original(model, pairs, batch_size)

    monkeypatch.setattr(reranker.tokens, "predict", counted)
    return counts


def test_the_batch_backend_does_batch_work_only(per_use, monkeypatch):
    first, reranker = per_use.first_stage, per_use.reranker
    assert isinstance(transformer_module(first.model).model, OnnxRuntimeModel)
    assert first.per_query.backend == BF16 and reranker.per_query.backend == BF16
    encode_docs, encode_queries = _calls(monkeypatch, first, "encode_document"), _calls(monkeypatch, first,
                                                                                       "encode_query")
    scored = _scored(monkeypatch, reranker)
    per_use.index(docs())
    assert encode_docs == {"batch": 1, "query": 0}  # the corpus: batch work
    per_use.search(SEARCHES[0], k=3)
    assert encode_queries == {"batch": 0, "query": 1} and scored == {"batch": 0, "query": 1}
    per_use.search_batch(SEARCHES[:3], k=3)  # a micro-batch of three queries' pairs: batch work for the reranker
    assert scored == {"batch": 1, "query": 1} and encode_queries["batch"] == 0
    assert reranker.score_pairs([(SEARCHES[0], "tea")] * 40).shape == (40,)  # more than a batch: batch work
    assert scored == {"batch": 2, "query": 1}


def test_per_use_backends_round_trip_through_the_yaml_the_index_and_the_service(per_use, tmp_path):
    per_use.save(tmp_path / "pipeline.yaml")
    saved = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    for stage in (saved["first_stage"], saved["reranker"]):
        assert Backend.from_config(stage) == Backend("onnx")
        assert Backend.from_config(stage["per_query"]) == BF16
    reloaded = Pipeline.load(tmp_path / "pipeline.yaml")
    assert reloaded.first_stage.per_query.backend == BF16 and reloaded.reranker.per_query.backend == BF16

    built = Index.build(per_use, docs(), tmp_path / "idx")
    version = (tmp_path / "idx" / built.version).resolve()
    for stage in (built.pipeline.first_stage, built.pipeline.reranker):  # both folders are the index's own copies
        assert stage.backend == Backend("onnx") and stage.per_query.backend == BF16
        assert stage.spec.path.is_relative_to(version) and stage.per_query.spec.path.is_relative_to(version)
    expected = [[(h.doc_id, round(h.score, 4)) for h in built.search(q, k=5)] for q in SEARCHES[:4]]
    from stagewise.serving.service import create_app

    with running_server(create_app(tmp_path / "idx")) as base:
        stats = httpx.get(base + "/stats", timeout=30).json()
        assert "per query: torch-bf16" in stats["index"]["first_stage"]
        for query, want in zip(SEARCHES[:4], expected):
            response = httpx.post(base + "/search", json={"query": query, "k": 5}, timeout=30)
            assert response.status_code == 200, response.text
            assert [(h["doc_id"], round(h["score"], 4)) for h in response.json()["hits"]] == want


def test_an_explicit_backend_replaces_both_uses(per_use, tmp_path):
    per_use.save(tmp_path / "pipeline.yaml")
    pipeline = Pipeline.load(tmp_path / "pipeline.yaml", backend=Backend("onnx"))
    assert pipeline.reranker.per_query is None and pipeline.first_stage.per_query is None
    assert pipeline.first_stage.query_model is pipeline.first_stage.model


def test_a_per_query_model_must_be_the_same_model(exports, sources, tiny_bi_encoder):  # noqa: F811
    cross, _ = exports(CROSS, "onnx")
    with pytest.raises(StagewiseError, match="field 'per_query': .* is not the stage's model"):
        CrossEncoderReranker(str(cross), per_query_setting={"model": str(tiny_bi_encoder)})


@pytest.mark.parametrize("setting, words", [
    ("torch", "a mapping with a 'model'"),
    ({"backend": "torch"}, "a mapping with a 'model'"),
    ({"model": "x", "dtyp": "bfloat16"}, "unknown key 'dtyp'"),
    ({"model": "x", "backend": "tensorrt"}, "'per_query.backend' must be one of torch, onnx, openvino"),
])
def test_a_bad_per_query_setting_is_one_line_naming_it(setting, words, sources):  # noqa: F811
    config = {"type": "dense", "model": str(sources[BI]), "per_query": setting}
    with pytest.raises(StagewiseError, match=words):
        build_first_stage(config)


def test_on_a_batch_variant_backend_each_query_is_computed_alone(sources, monkeypatch):  # noqa: F811
    """bf16 (like ONNX dynamic int8) rounds differently for other batch shapes: a micro-batch of queries must not
    change any one query's answer, so its queries are encoded, and its pairs scored, one query at a time."""
    pipeline = Pipeline(DenseRetriever(str(sources[BI]), backend=BF16, show_progress=False),
                        CrossEncoderReranker(str(sources[CROSS]), backend=BF16), depth=3).index(docs())
    assert not BF16.batch_invariant and Backend().batch_invariant
    seen = {"encode_query": [], "predict": []}
    for owner, attribute in ((pipeline.first_stage.model, "encode_query"), (pipeline.reranker.tokens, "predict")):
        original = getattr(owner, attribute)

        def spy(*args, _original=original, _name=attribute, **kwargs):
            seen[_name].append(list(args[0] if _name == "encode_query" else args[1]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, attribute, spy)
    together = pipeline.search_batch(SEARCHES[:3], k=3)
    assert [len(texts) for texts in seen["encode_query"]] == [1, 1, 1]
    assert [len({q for q, _ in pairs}) for pairs in seen["predict"]] == [1, 1, 1]
    alone = [pipeline.search(q, k=3) for q in SEARCHES[:3]]
    assert [[(h.doc_id, h.score) for h in hits] for hits in together] == \
        [[(h.doc_id, h.score) for h in hits] for hits in alone]
