"""Batch work on the fastest exact-enough path: the float32 / bf16 choice, length-grouped batches, rate probes."""

from __future__ import annotations

import numpy as np
import pytest

from stagewise.models import batch_precision
from stagewise.models.batch_precision import BatchPrecision, measure
from stagewise.progress import map_chunks, pair_length


class ScriptedClock:
    """Each run advances time by the next duration of its kind: interleaved rounds with known timings."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def runs(clock, out32, out16, t32, t16):
    times32, times16 = iter(t32), iter(t16)

    def run32():
        clock.now += next(times32, t32[-1])
        return out32

    def run16():
        clock.now += next(times16, t16[-1])
        return out16

    return run32, run16


EMB = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)


def test_bf16_is_chosen_where_it_is_faster_and_agrees():
    clock = ScriptedClock()
    run32, run16 = runs(clock, EMB, EMB + 1e-4, [0, 1.0, 1.0, 1.0], [0, 0.4, 0.4, 0.4])  # warm-up runs first
    choice = measure("bi-encoder", run32, run16, 32, clock=clock)
    assert choice.bf16 and choice.speedup == pytest.approx(2.5) and choice.agreement["min_cosine"] > 0.999


def test_float32_is_kept_where_bf16_is_not_clearly_faster():
    clock = ScriptedClock()
    run32, run16 = runs(clock, EMB, EMB, [0, 1.0, 1.0, 1.0], [0, 0.95, 0.95, 0.95])
    choice = measure("bi-encoder", run32, run16, 32, clock=clock)
    assert choice.dtype == "float32" and "1.05×" in choice.reason


def test_float32_is_kept_where_bf16_disagrees():
    noisy = EMB + np.random.default_rng(1).normal(scale=0.5, size=EMB.shape).astype(np.float32)
    choice = measure("bi-encoder", lambda: EMB, lambda: noisy, 32)
    assert choice.dtype == "float32" and "cosine" in choice.reason
    scores = np.linspace(0, 1, 32)
    choice = measure("cross-encoder", lambda: scores, lambda: scores[::-1], 32, groups=[16, 16])
    assert choice.dtype == "float32" and "rank correlation" in choice.reason


def test_a_machine_too_busy_to_measure_keeps_float32():
    clock = ScriptedClock()
    run32, run16 = runs(clock, EMB, EMB, [0] + [1.0, 3.0, 1.0] * 10, [0] + [0.3] * 30)
    choice = measure("bi-encoder", run32, run16, 32, clock=clock)
    assert choice.dtype == "float32" and "load" in choice.reason


def test_a_choice_is_measured_once_per_model_and_remembered_on_disk(tiny_bi_encoder, tmp_path, monkeypatch):
    import torch

    from stagewise.models.specs import load_bi_encoder

    model = load_bi_encoder(str(tiny_bi_encoder))
    calls = []
    real = batch_precision.measure
    monkeypatch.setattr(batch_precision, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    texts = [f"text number {i} " * (i % 7 + 1) for i in range(40)]
    first = BatchPrecision("auto", tmp_path).choose("key", "tiny", "bi-encoder", model, texts[:8])
    again = BatchPrecision("auto", tmp_path).choose("key", "tiny", "bi-encoder", model, texts[:8])
    assert calls == [1] and again.dtype == first.dtype and again.model == "tiny"
    forced = BatchPrecision("bfloat16", tmp_path)
    twin = forced.batch_model("key", "tiny", "bi-encoder", model, texts[:8])
    assert twin is not model and any(p.dtype == torch.bfloat16 for p in twin.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the deployed model stays as it was
    assert forced.batch_model("key", "tiny", "bi-encoder", model, texts[:8]) is twin  # one copy per model
    assert BatchPrecision("float32", tmp_path).batch_model("key", "tiny", "bi-encoder", model, texts) is model


def test_length_grouped_batches_give_the_same_scores_as_unsorted_ones(tiny_cross_encoder, tiny_bi_encoder):
    from stagewise.models.specs import load_bi_encoder, load_cross_encoder

    cross = load_cross_encoder(str(tiny_cross_encoder), max_length=64)
    pairs = [(f"query {i % 5}", "word " * (3 + (i * 7) % 40)) for i in range(50)]

    def score(chunk):
        return cross.predict(list(chunk), batch_size=4, show_progress_bar=False, convert_to_numpy=True)

    unsorted = map_chunks(score, pairs, "score", chunk_size=8)
    grouped = map_chunks(score, pairs, "score", chunk_size=8, length=pair_length)
    np.testing.assert_allclose(grouped, unsorted, atol=1e-5)
    assert not np.allclose(grouped, grouped[0])  # the scores differ, so an order mix-up would show

    bi = load_bi_encoder(str(tiny_bi_encoder))
    texts = [text for _, text in pairs]

    def encode(chunk):
        return bi.encode_document(list(chunk), batch_size=4, show_progress_bar=False, convert_to_numpy=True)

    np.testing.assert_allclose(map_chunks(encode, texts, "encode", 8, length=len), map_chunks(encode, texts, "encode", 8),
                               atol=1e-5)


def test_pair_sample_keeps_whole_queries():
    pairs = [(f"q{q}", f"d{d}") for q in range(10) for d in range(20)]
    sample, groups = batch_precision.pair_sample(pairs, size=64, per_query=16)
    assert groups == [16, 16, 16, 16] and len(sample) == 64
    assert all(len({q for q, _ in sample[i * 16:(i + 1) * 16]}) == 1 for i in range(4))


def test_the_probes_measure_positive_rates_on_tiny_models(tiny_bi_encoder, tiny_cross_encoder):
    from stagewise.selection import probes
    queries = [f"what about topic {i}" for i in range(12)]
    documents = [f"a document on topic {i} with some more words" for i in range(30)]
    bi = probes.bi_training_rates(str(tiny_bi_encoder), 32, queries, documents, negatives=1)
    assert bi.train > 0 and bi.measured["train_float32"] > 0 and bi.measured["train_bf16"] > 0
    assert bi.train == (bi.measured["train_bf16"] if bi.train_bf16 else bi.measured["train_float32"])
    only = probes.bi_training_rates(str(tiny_bi_encoder), 32, queries, documents, precision="float32")
    assert not only.train_bf16 and only.measured["train_bf16"] is None
    with batch_precision.use("auto"):
        rates = probes.cross_rates(str(tiny_cross_encoder), 32, queries, documents)
    assert rates.train > 0 and rates.score > 0 and rates.score_query > 0


def test_pair_sample_takes_more_queries_when_each_has_few_pairs():
    pairs = [(f"q{q}", f"d{q}") for q in range(100)]  # one pair per query
    sample, groups = batch_precision.pair_sample(pairs, size=64)
    assert len(sample) == 64 and groups == [1] * 64 and len(set(sample)) == 64
