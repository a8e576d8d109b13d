"""Cross-encoder inputs assembled from cached document tokens equal the tokenizer's own, and score the same."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from stagewise.models.pair_tokens import PairTokens, truncated_lengths

WORDS = "the cat sat on a mat while dogs bark at strangers and python code runs quickly over memory".split()


def _texts(n: int, seed: int, longest: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, longest))) for _ in range(n)]


@pytest.fixture(scope="module", params=[16, 17, 64])
def model(request, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=request.param)


def _pairs(n=120, seed=0):
    queries, docs = _texts(n, seed, 30), _texts(n, seed + 1, 60)
    return list(zip(queries, docs))


def test_features_equal_the_tokenizers_for_every_truncation_case(model):
    tokens = PairTokens(model)
    assert tokens.exact
    pairs = _pairs()
    ours, theirs = tokens.features(tokens.rows(pairs)), model.preprocess(pairs)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value


def test_scores_equal_sentence_transformers_predict(model):
    pairs = _pairs(seed=3)
    expected = model.predict(pairs, batch_size=8, show_progress_bar=False)
    got = PairTokens(model).predict(model, pairs, batch_size=8)
    assert got.shape == (len(pairs),)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_document_is_tokenized_once(tiny_cross_encoder, monkeypatch):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=32)
    tokens = PairTokens(model)
    seen: list[str] = []
    original = tokens._tokenize
    monkeypatch.setattr(tokens, "_tokenize", lambda texts: (seen.extend(texts), original(texts))[1])
    docs = _texts(10, 5, 40)
    tokens.predict(model, [("query one", d) for d in docs], batch_size=4)
    pairs = [("query two", d) for d in docs]
    second = tokens.predict(model, pairs, batch_size=4)
    assert sorted(set(seen) - {"query one", "query two"}) == sorted(set(docs))
    assert sum(text in docs for text in seen) == len(set(docs))  # the second call found them all cached
    np.testing.assert_allclose(second, model.predict(pairs, batch_size=4, show_progress_bar=False), atol=1e-6)


def test_the_cache_is_bounded_in_tokens(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=32)
    tokens = PairTokens(model, max_tokens=50)
    docs = [" ".join(["cat"] * 10) + f" {w}" for w in WORDS]  # 11 tokens each
    tokens.predict(model, [("q", d) for d in docs], batch_size=8)
    assert tokens._cached_tokens <= 50
    assert list(tokens._docs) == docs[-4:]  # least recently used out first


def test_longest_first_truncation_rule():
    assert truncated_lengths(3, 4, 10) == (3, 4)
    assert truncated_lengths(3, 20, 10) == (3, 7)
    assert truncated_lengths(20, 3, 10) == (7, 3)
    assert truncated_lengths(20, 30, 11) == (5, 6)  # the longer text gets the odd token
    assert truncated_lengths(30, 20, 11) == (6, 5)
    assert truncated_lengths(20, 20, 11) == (5, 6)


def test_a_tokenizer_it_cannot_reproduce_keeps_sentence_transformers_path(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=16)
    model.tokenizer.truncation_side = "left"  # keeps the ends: not what the assembly does
    tokens = PairTokens(model)
    assert not tokens.exact
    pairs = _pairs(40, seed=7)
    np.testing.assert_allclose(tokens.predict(model, pairs, batch_size=8),
                               model.predict(pairs, batch_size=8, show_progress_bar=False), atol=1e-6)


def test_the_reranker_scores_through_the_cache(tiny_cross_encoder, monkeypatch):
    from stagewise.search.rerankers import CrossEncoderReranker

    reranker = CrossEncoderReranker(str(tiny_cross_encoder), max_length=32)
    assert reranker.tokens.exact
    calls = []
    monkeypatch.setattr(type(reranker.model), "predict", lambda *a, **k: calls.append(1))
    scores = reranker.score("which animal purrs", ["cats purr", "dogs bark", "tea is hot"])
    assert scores.shape == (3,) and not calls  # sentence-transformers' predict (and its tokenizing) not used
