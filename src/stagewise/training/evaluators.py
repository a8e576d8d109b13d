"""Dev evaluation in and after training: the core's IR metrics inside the trainers' evaluation loop.

sentence-transformers keeps the best checkpoint by what an evaluator returns; ours returns pytrec_eval's nDCG@10
on the dev split (a bi-encoder's exact retrieval over a dev corpus sample, a cross-encoder's reranking of the first
stage's own candidates), and a finished reranker is checked for the collapse hard negatives can cause.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np

from stagewise.data.loaders import RetrievalDataset
from stagewise.evaluation.runs import compute_metrics, run_from_rankings
from stagewise.models import batch_precision
from stagewise.models.batch_precision import pair_sample, spread_sample
from stagewise.search.vector_index import inner_products
from stagewise.timing import span


def dev_corpus_subset(dataset: RetrievalDataset, qrels: dict, size: int, seed: int) -> dict[str, str]:
    """All judged documents plus a fixed random sample of the rest: cheap to re-encode at every evaluation."""
    judged = {d for docs in qrels.values() for d in docs}
    others = sorted(set(dataset.corpus) - judged)
    random.Random(seed).shuffle(others)
    keep = sorted(judged) + others[: max(0, size - len(judged))]
    return {d: dataset.corpus[d].full_text() for d in keep}


def _dev_evaluator(rank: Callable, qrels: dict, recall_cutoffs: tuple = (), on_metrics: Callable | None = None):
    """A sentence-transformers evaluator whose numbers are the core's: ``rank(model)`` gives rankings (and
    extra metrics), pytrec_eval scores them; nDCG@10 is the metric the trainer keeps the best checkpoint by."""
    from sentence_transformers.base.evaluation import BaseEvaluator

    class DevEvaluator(BaseEvaluator):
        def __init__(self):
            super().__init__()
            self.primary_metric = "ndcg@10"
            self.name = "dev"

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            with span("dev-eval", "dev split", 1, "evaluations"):
                rankings, extra = rank(model)
            metrics = {**compute_metrics(qrels, run_from_rankings(rankings), recall_cutoffs)[0], **extra}
            if on_metrics:
                on_metrics({"epoch": epoch, "steps": steps, **{f"dev_{k}": v for k, v in metrics.items()}})
            return self.prefix_name_to_metrics(metrics, self.name)

    return DevEvaluator()


def make_retrieval_evaluator(queries: dict[str, str], corpus: dict[str, str], qrels: dict,
                             on_metrics: Callable[[dict], None] | None = None, batch_size: int = 32):
    """Exact dense retrieval over ``corpus`` with the model being trained."""

    def rank(model):
        ids, qids = list(corpus), list(queries)
        texts = [corpus[d] for d in ids]
        encoder = _batch_copy(model, "bi-encoder", spread_sample(texts))
        with span("encode", "dev corpus sample (model in training)", len(ids), "docs"):
            docs = encoder.encode_document(texts, batch_size=batch_size, convert_to_numpy=True,
                                           normalize_embeddings=True, show_progress_bar=False)
        q = model.encode_query([queries[x] for x in qids], batch_size=batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
        top = np.argsort(-inner_products(q, docs), axis=1)[:, :100]
        return {qid: [ids[i] for i in row] for qid, row in zip(qids, top)}, {}

    return _dev_evaluator(rank, qrels, (), on_metrics)


def rerank_with(model, queries: dict[str, str], candidates: dict[str, list[str]], texts: dict[str, str],
                depth: int, batch_size: int = 64) -> tuple[dict[str, list[str]], list[np.ndarray]]:
    """Rerank each query's first-stage candidates (top ``depth``) with a CrossEncoder; return rankings and scores.

    Every query's pairs go through one ``predict``, which batches them by length (little padding), on the model's
    bf16 copy where the batch precision in use chose it."""
    pairs = [(queries[qid], texts[d]) for qid, ranked in candidates.items() for d in ranked[:depth]]
    scorer = _batch_copy(model, "cross-encoder", *pair_sample(pairs))
    flat = np.asarray(scorer.predict(pairs, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True),
                      dtype=np.float32).reshape(-1)
    rankings, all_scores, start = {}, [], 0
    for qid, ranked in candidates.items():
        top = ranked[:depth]
        scores = flat[start:start + len(top)]
        start += len(top)
        order = np.argsort(-scores, kind="stable")
        rankings[qid] = [top[i] for i in order] + ranked[depth:]
        all_scores.append(scores)
    return rankings, all_scores


def _batch_copy(model, kind: str, sample: list, groups: Sequence[int] = ()):
    """The model in training, or a bf16 copy of it for a dev evaluation where the batch precision in use chose bf16
    (measured at its first evaluation; copied anew each time, since its weights change)."""
    policy = batch_precision.current()
    if policy is None or not batch_precision.transformer_model(model):
        return model
    return policy.batch_model(None, "the model in training", kind, model, sample, groups)


def make_rerank_evaluator(queries, candidates, texts, qrels, depth, on_metrics=None):
    """Reranking of the first stage's own dev candidates (never injected positives)."""

    def rank(model):
        with span("score", "dev candidates (model in training)", len(candidates) * depth, "pairs"):
            rankings, scores = rerank_with(model, queries, candidates, texts, depth)
        return rankings, {"score_std": float(np.mean([s.std() for s in scores]))}

    return _dev_evaluator(rank, qrels, (depth,), on_metrics)


def detect_collapse(scores: list[np.ndarray], reranked_ndcg: float, first_stage_ndcg: float,
                    min_std: float = 0.02) -> dict:
    """The known failure of rerankers trained on hard negatives, checked on dev.

    ``collapsed``: near-constant scores: the mean per-query standard deviation of the (sigmoid, 0..1) scores
    is under ``min_std`` (a healthy reranker spreads a query's candidates by ~0.1 or more).
    ``no_gain``: reranking is no better than the first stage's own order (unless that order is already perfect).
    """
    spread = float(np.mean([s.std() for s in scores])) if scores else 0.0
    collapsed = spread < min_std
    no_gain = reranked_ndcg <= first_stage_ndcg and first_stage_ndcg < 1.0
    reasons = []
    if collapsed:
        reasons.append(f"near-constant scores (mean per-query std {spread:.2e} < {min_std:g})")
    if no_gain:
        reasons.append(f"dev nDCG@10 {reranked_ndcg:.4f} is no better than the first stage's {first_stage_ndcg:.4f}")
    return {"collapsed": collapsed, "no_gain": no_gain, "reasons": reasons, "mean_score_std": spread,
            "reranked_ndcg@10": reranked_ndcg, "first_stage_ndcg@10": first_stage_ndcg}


def health_warning(health: dict) -> str | None:
    """What a reranker's dev health says, in one line: a collapse is a failure; reranking alone below the first
    stage is not one yet (fused with the first stage's scores it may still add, which ``select`` measures)."""
    if health["collapsed"]:
        return "the reranker did not learn to rerank: " + "; ".join(health["reasons"])
    if health["no_gain"]:
        return ("reranking alone does not beat the first stage (" + "; ".join(health["reasons"])
                + "); fused with the first stage it may still add")
    return None
