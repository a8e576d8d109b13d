"""Warming the per-query path for every query length: the texts hit each length, the service's pipeline and
``select``'s per-query timing both warm the model that answers one query, and nothing else pays for it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from sentence_transformers import SentenceTransformer

from conftest import CORPUS
from stagewise.data.loaders import Document
from stagewise.models.backends import Backend
from stagewise.models.warm_up import QUERY_TOKENS, length_texts, query_lengths, query_texts, token_counts, warm_queries
from stagewise.search.pipeline import WARM_UP_QUERIES, Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import BM25Retriever, DenseRetriever, HybridRetriever
from stagewise.selection.backend_stage import BackendSelection
from stagewise.selection.config import SelectConfig

EVERY_LENGTH = set(range(1, QUERY_TOKENS + 1))


def _corpus() -> dict[str, Document]:
    return {d["_id"]: Document(d["_id"], d["title"], d["text"]) for d in CORPUS}


class _TwoTokenWords:
    """A tokenizer in which the common words are two tokens each and other words one token per three
    characters: repeating a word skips every odd length, so only the fallback can hit them."""

    def __call__(self, texts, add_special_tokens=False, truncation=False):
        assert not add_special_tokens and not truncation

        def count(word: str) -> int:
            return 2 if word in ("the", "a", "of", "x", "1", ".") else math.ceil(len(word) / 3)

        return {"input_ids": [[0] * sum(count(w) for w in text.split()) for text in texts]}


class _Merging:
    """A tokenizer that merges a run of one repeated word into one token: repeats only ever make length 1."""

    def __call__(self, texts, add_special_tokens=False, truncation=False):
        def runs(words: list[str]) -> int:
            return sum(1 for i, w in enumerate(words) if i == 0 or words[i - 1] != w)

        return {"input_ids": [[0] * runs(text.split()) for text in texts]}


@pytest.fixture(scope="module")
def tiny(tiny_bi_encoder):
    return SentenceTransformer(str(tiny_bi_encoder), device="cpu")


def test_the_texts_hit_every_length_as_the_model_tokenizer_counts_them(tiny):
    texts = length_texts(tiny.tokenizer, QUERY_TOKENS)
    assert set(texts) == EVERY_LENGTH
    assert token_counts(tiny.tokenizer, list(texts.values())) == list(texts)
    # with the special tokens, one query of each is one input shape of each length
    shapes = {len(ids) for ids in tiny.tokenizer(list(texts.values()))["input_ids"]}
    assert shapes == {k + 2 for k in EVERY_LENGTH}


@pytest.mark.parametrize("tokenizer", [_TwoTokenWords(), _Merging()], ids=["two-token-words", "merging"])
def test_lengths_a_repeated_word_misses_are_still_hit(tokenizer):
    texts = length_texts(tokenizer, 40)
    assert set(texts) == set(range(1, 41))
    assert token_counts(tokenizer, list(texts.values())) == list(range(1, 41))


def test_the_lengths_stop_at_what_the_model_reads(tiny, tiny_bi_encoder):
    assert query_lengths(tiny) == min(QUERY_TOKENS, tiny.max_seq_length)
    short = SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    short.max_seq_length = 16  # a longer query is truncated to the same shape
    assert query_lengths(short) == 16 and len(query_texts(short)) == 16
    assert length_texts(tiny.tokenizer, 0) == {}


def test_a_static_embedding_model_has_nothing_to_warm():
    from sentence_transformers.sentence_transformer import modules
    from tokenizers import Tokenizer

    from stagewise.models.specs import resolve_model

    tokenizer = Tokenizer.from_file(str(resolve_model("minilm-l6").path / "tokenizer.json"))
    static = SentenceTransformer(modules=[modules.StaticEmbedding(tokenizer, embedding_dim=8)], device="cpu")
    assert query_lengths(static) == 0 and query_texts(static) == []


def test_warm_queries_encodes_each_text_alone():
    calls = []
    seconds = warm_queries(calls.append, ["a", "a b", "a b c"])
    assert calls == [["a"], ["a b"], ["a b c"]] and seconds >= 0


def _lengths_encoded(monkeypatch, model, tokenizer) -> list[int]:
    """The token length of every single query ``model.encode_query`` is given, in call order."""
    seen: list[int] = []
    original = model.encode_query

    def counted(texts, *args, **kwargs):
        if len(texts) == 1:
            seen.extend(token_counts(tokenizer, texts))
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(model, "encode_query", counted)
    return seen


def _scored(monkeypatch, reranker) -> list[int]:
    calls: list[int] = []
    original = reranker.score_pairs

    def counted(pairs, *args, **kwargs):
        calls.append(len(pairs))
        return original(pairs, *args, **kwargs)

    monkeypatch.setattr(reranker, "score_pairs", counted)
    return calls


def test_pipeline_warm_up_encodes_every_query_length_and_reranks_only_its_few_searches(tiny_bi_encoder,
                                                                                        tiny_cross_encoder,
                                                                                        monkeypatch):
    first = DenseRetriever(str(tiny_bi_encoder), show_progress=False)
    pipeline = Pipeline(first, CrossEncoderReranker(str(tiny_cross_encoder)), depth=3).index(_corpus())
    lengths = _lengths_encoded(monkeypatch, first.query_model, first.query_model.tokenizer)
    scored = _scored(monkeypatch, pipeline.reranker)
    pipeline.warm_up()
    assert EVERY_LENGTH <= set(lengths)
    assert lengths[:QUERY_TOKENS] == sorted(EVERY_LENGTH)  # each once, before the searches
    assert len(scored) == len(WARM_UP_QUERIES) + 1  # its searches (one query each; one micro-batch), no more


def test_the_per_query_model_is_the_one_warmed(tiny_bi_encoder, monkeypatch):
    bf16 = Backend("torch", dtype="bfloat16")
    first = DenseRetriever(str(tiny_bi_encoder), show_progress=False,
                           per_query_setting={"model": str(tiny_bi_encoder), **bf16.config()})
    assert first.query_model is not first.model
    on_query = _lengths_encoded(monkeypatch, first.query_model, first.query_model.tokenizer)
    on_batch = _lengths_encoded(monkeypatch, first.model, first.model.tokenizer)
    Pipeline(first).index(_corpus()).warm_up()
    assert EVERY_LENGTH <= set(on_query) and on_batch == []


def test_a_hybrid_warms_its_dense_part_and_bm25_alone_needs_nothing(tiny_bi_encoder, monkeypatch):
    dense = DenseRetriever(str(tiny_bi_encoder), show_progress=False)
    lengths = _lengths_encoded(monkeypatch, dense.query_model, dense.query_model.tokenizer)
    assert HybridRetriever([BM25Retriever(), dense]).warm_up_queries() == QUERY_TOKENS
    assert set(lengths) == EVERY_LENGTH
    bm25 = Pipeline(BM25Retriever()).index(_corpus())
    bm25.warm_up()  # its searches only
    assert bm25.search("cats", k=1)[0].doc_id == "d1"
    Pipeline(BM25Retriever()).warm_up()  # no corpus yet: nothing to search, nothing fails


def test_select_times_per_query_work_after_the_service_warm_up(tiny_bi_encoder, monkeypatch):
    dense = DenseRetriever(str(tiny_bi_encoder), show_progress=False)
    chooser = BackendSelection.__new__(BackendSelection)
    chooser.config = SelectConfig()
    queries = {"q1": "which animal purrs", "q2": "animals that bark", "q3": "drink from roasted beans"}
    chooser.s = SimpleNamespace(dataset=SimpleNamespace(corpus=_corpus()), dev_queries=queries)
    lengths = _lengths_encoded(monkeypatch, dense.query_model, dense.query_model.tokenizer)
    work = chooser._work("first_stage", dense, "query")
    work.warm_up()
    assert lengths[:QUERY_TOKENS] == sorted(EVERY_LENGTH)  # as Pipeline.warm_up does, then the usual few queries
    assert len(lengths) == QUERY_TOKENS + len(queries)
    lengths.clear()
    assert len(work.run().samples_ms) == len(queries) and len(lengths) == len(queries)
