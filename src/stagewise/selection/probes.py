"""Rates measured on this machine before the time budget is planned: a few real training steps and scoring batches
per model, on the user's own texts.

Training a step costs four to five forward passes on these CPUs, not three, and the ratio moves with the model, the
sequence length and the CPU (bf16 makes scoring faster and leaves training as it was), so nothing is derived from
another rate: each is timed, optimizer step included. A probe takes seconds: a few examples padded as a real
batch pads them (to its longest text), so that short texts alone cannot flatter the rate.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Sequence

from stagewise.progress import pair_length
from stagewise.selection.budget import Rates
from stagewise.timing import span

BI_PROBE_BATCH = 4  # examples per probed training step (a MiniLM step of 4 × 3 texts takes about 2 s here)
CROSS_PROBE_BATCH = 8  # pairs per probed training step
SCORE_PROBE_PAIRS = 64


MIN_BF16_SPEEDUP = 1.15  # bf16 mixed precision trains only where it is at least this much faster


def _training(step: Callable[[bool], object], examples: int, precision: str) -> tuple[float, bool, dict]:
    """Examples per second of a training step in float32 and, unless told otherwise, under bf16 autocast; the
    faster one where bf16 clearly wins (AMX / AVX-512 BF16: 1.5× for MiniLM here; emulated elsewhere: slower)."""
    fp32 = examples / _best(lambda: step(False)) if precision != "bfloat16" else None
    bf16 = examples / _best(lambda: step(True)) if precision != "float32" else None
    use = bf16 is not None and (fp32 is None or bf16 >= MIN_BF16_SPEEDUP * fp32)
    return (bf16 if use else fp32), use, {"train_float32": fp32, "train_bf16": bf16}


def _autocast(on: bool):
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _as_in_a_batch(texts: Sequence[str], count: int, batch: int, rng: random.Random, length=len) -> list:
    """``count`` texts padded as a real batch of ``batch`` would be: the longest of ``batch`` random ones, then
    random ones (a batch is padded to its longest text, so a few short texts alone would flatter the rate)."""
    drawn = rng.sample(list(texts), min(batch, len(texts)))
    longest = max(drawn, key=length)
    return [longest] + [t for t in drawn if t is not longest][:count - 1]


def _optimizer_step(model) -> Callable[[], None]:
    """What a training step does after the backward pass: an AdamW update (its cost is the trainer's too)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _best(fn: Callable[[], object], repeats: int = 2) -> float:
    """The fastest of ``repeats`` timed calls, after one untimed warm-up (first calls allocate and plan kernels)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def bi_training_rates(model: str, max_seq_length: int | None, anchors: Sequence[str], documents: Sequence[str],
                      negatives: int = 1, seed: int = 0, precision: str = "auto", batch_size: int = 32) -> Rates:
    """Training examples per second (an anchor, its positive and ``negatives`` hard negatives, through
    MultipleNegativesRankingLoss, backward pass included) for a bi-encoder on real texts, in float32 and bf16
    mixed precision (``precision``: auto measures both, float32 or bfloat16 only that one)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from stagewise.models.specs import load_bi_encoder

    encoder = load_bi_encoder(model, max_seq_length=max_seq_length)
    encoder.train()
    loss = MultipleNegativesRankingLoss(encoder)
    rng = random.Random(seed)
    columns = [_as_in_a_batch(anchors, BI_PROBE_BATCH, batch_size, rng)] + [
        _as_in_a_batch(documents, BI_PROBE_BATCH, batch_size, rng) for _ in range(1 + negatives)]
    update = _optimizer_step(encoder)

    def step(bf16: bool):
        features = [encoder.preprocess(texts) for texts in columns]
        with _autocast(bf16):
            value = loss(features, None)
        value.backward()
        update()

    with span("probe", f"{model}: training rate", 1, "probes"):
        train, bf16, measured = _training(step, BI_PROBE_BATCH, precision)
    return Rates(train=train, train_bf16=bf16, measured={"train": "probe", **measured})


def cross_rates(model: str, max_length: int, queries: Sequence[str], documents: Sequence[str],
                seed: int = 0, precision: str = "auto", batch_size: int = 16) -> Rates:
    """A cross-encoder start's training rate (pairs per second through BinaryCrossEntropyLoss, backward pass
    included), and its scoring rate on the batch path (bf16 where the batch precision in use chose it) and on the
    per-query path (latency runs score one query's candidates at a time, in float32)."""
    import torch
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from stagewise.models import batch_precision
    from stagewise.models.specs import load_cross_encoder, resolve_model

    rng = random.Random(seed)
    qs = list(queries)
    pairs = sorted((qs[i % len(qs)], d) for i, d in enumerate(rng.sample(list(documents),
                                                                          min(SCORE_PROBE_PAIRS, len(documents)))))
    with span("probe", f"{model}: training and scoring rates", 1, "probes"):
        cross = load_cross_encoder(model, max_length=max_length, warn_untrained=False)
        cross.train()
        loss = BinaryCrossEntropyLoss(cross)
        batch = _as_in_a_batch(pairs, CROSS_PROBE_BATCH, batch_size, rng, length=pair_length)
        inputs, labels = [[q for q, _ in batch], [d for _, d in batch]], torch.ones(len(batch))
        update = _optimizer_step(cross)

        def step(bf16: bool):
            with _autocast(bf16):
                value = loss(inputs, labels)
            value.backward()
            update()

        train, bf16, measured = _training(step, len(batch), precision)
        cross.eval()
        scorer, policy = cross, batch_precision.current()
        if policy is not None and batch_precision.transformer_model(cross):  # the key CrossEncoderReranker uses
            scorer = policy.batch_model(f"{resolve_model(model).fingerprint}-cross-{cross.max_length}", str(model),
                                        "cross-encoder", cross, *batch_precision.pair_sample(pairs))

        def predict(using, chunk):
            return using.predict(chunk, batch_size=32, show_progress_bar=False, convert_to_numpy=True)

        score = len(pairs) / _best(lambda: predict(scorer, pairs), repeats=1)
        one_query = [(pairs[0][0], d) for _, d in pairs[:20]]
        score_query = len(one_query) / _best(lambda: predict(cross, one_query))
    return Rates(train=train, train_bf16=bf16, score=score, score_query=score_query,
                 measured={"train": "probe", "score": "probe", "score_query": "probe", **measured})
