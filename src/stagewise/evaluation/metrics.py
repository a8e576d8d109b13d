"""IR metrics by pytrec_eval: the numbers every stage, fusion and pipeline is judged by.

Kept apart from ``evaluation`` (which runs pipelines) so that lower layers, such as fusion, can score rankings
without importing the pipeline.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import pytrec_eval

Run = dict[str, dict[str, float]]  # query id -> doc id -> score (higher is better)


def compute_metrics(
    qrels: dict[str, dict[str, int]], run: Run, recall_cutoffs: Sequence[int] = ()
) -> tuple[dict, dict]:
    """Mean and per-query nDCG@10, MRR@10, Recall@10/100 (and at ``recall_cutoffs``), MAP@100 by pytrec_eval.

    Every judged query counts: a query missing from the run scores 0 (pytrec_eval alone would skip it).
    The run's scores must order documents as ranked; ``run_from_rankings`` guarantees that.
    """
    cutoffs = sorted({10, 100, *recall_cutoffs})
    if any(rel < -1 for docs in qrels.values() for rel in docs.values()):
        # trec_eval reads every negative relevance as "judged, not relevant" (-1, 0 and no judgement score alike),
        # but crashes (segfault) on a query whose judgements are all below -1
        qrels = {qid: {did: max(rel, -1) for did, rel in docs.items()} for qid, docs in qrels.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.10", "map_cut.100", "recall." + ",".join(map(str, cutoffs))}
    )
    top10 = {q: dict(sorted(docs.items(), key=lambda x: -x[1])[:10]) for q, docs in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    raw = evaluator.evaluate(run)
    names = {"ndcg_cut_10": "ndcg@10", "map_cut_100": "map@100", **{f"recall_{c}": f"recall@{c}" for c in cutoffs}}
    per_query = {}
    for qid in qrels:
        values = {ours: raw.get(qid, {}).get(theirs, 0.0) for theirs, ours in names.items()}
        values["mrr@10"] = mrr.get(qid, {}).get("recip_rank", 0.0)
        per_query[qid] = values
    keys = list(next(iter(per_query.values())))
    means = {key: statistics.fmean(v[key] for v in per_query.values()) for key in keys}
    return means, per_query


def run_from_rankings(rankings: dict[str, list[str]]) -> Run:
    """Scores from ranks (n, n-1, …): trec_eval re-sorts by score, so raw scores with ties could reorder our ranking."""
    return {q: {d: float(len(docs) - i) for i, d in enumerate(docs)} for q, docs in rankings.items()}
