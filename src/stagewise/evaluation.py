"""Evaluation that can be trusted: pytrec_eval metrics per stage and end to end, latency, per-query results.

Reranking is evaluated as deployed: the reranker only sees what the first stage returned, so the first
stage's recall at the rerank depth is the ceiling it cannot exceed (reported as ``recall@depth``).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pytrec_eval

from stagewise.data import RetrievalDataset
from stagewise.errors import StagewiseError
from stagewise.pipeline import Pipeline
from stagewise.progress import progress_bar
from stagewise.rerankers import CrossEncoderReranker
from stagewise.retrievers import FirstStage

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]  # query id -> doc id -> score (higher is better)


def compute_metrics(
    qrels: dict[str, dict[str, int]], run: Run, recall_cutoffs: Sequence[int] = ()
) -> tuple[dict, dict]:
    """Mean and per-query nDCG@10, MRR@10, Recall@10/100 (and at ``recall_cutoffs``), MAP@100 by pytrec_eval.

    Every judged query counts: a query missing from the run scores 0 (pytrec_eval alone would skip it).
    The run's scores must order documents as ranked; ``run_from_rankings`` guarantees that.
    """
    cutoffs = sorted({10, 100, *recall_cutoffs})
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


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean())}


@dataclass
class SystemResult:
    """One evaluated system: a first stage alone, or a first stage plus a reranker at a depth."""

    name: str
    stage: str  # "first_stage" or "pipeline"
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    rankings: dict[str, list[str]] = field(repr=False)
    latency: dict[str, dict[str, float]]
    depth: int | None = None
    first_stage: str | None = None
    encoding: dict = field(default_factory=dict)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("per_query"), data.pop("rankings")
        return data


@dataclass
class Comparison:
    """Paired comparison of two systems on the same queries (b minus a)."""

    metric: str
    a: str
    b: str
    mean_a: float
    mean_b: float
    mean_diff: float
    ci95: tuple[float, float]
    p_value: float
    wins: int
    losses: int
    ties: int


def compare(a: SystemResult, b: SystemResult, metric: str = "ndcg@10", seed: int = 0) -> Comparison:
    """Per-query differences of b over a: paired t-test and a bootstrap 95% interval of the mean difference."""
    return compare_per_query(a.name, a.per_query, b.name, b.per_query, metric, seed)


def compare_per_query(name_a: str, per_query_a: dict, name_b: str, per_query_b: dict, metric: str = "ndcg@10",
                      seed: int = 0) -> Comparison:
    from scipy import stats

    qids = sorted(set(per_query_a) & set(per_query_b))
    if not qids:
        raise StagewiseError(f"'{name_a}' and '{name_b}' share no query: they were not run on the same split")
    if metric not in per_query_a[qids[0]] or metric not in per_query_b[qids[0]]:
        raise StagewiseError(f"metric '{metric}' is not in both per-query results "
                             f"(available: {', '.join(sorted(per_query_a[qids[0]]))})")
    va = np.array([per_query_a[q][metric] for q in qids])
    vb = np.array([per_query_b[q][metric] for q in qids])
    diff = vb - va
    boot = np.random.default_rng(seed).choice(diff, size=(2000, len(diff)), replace=True).mean(axis=1)
    p = float(stats.ttest_rel(vb, va).pvalue) if len(diff) > 1 and np.any(diff != diff[0]) else 1.0
    return Comparison(
        metric, name_a, name_b, float(va.mean()), float(vb.mean()), float(diff.mean()),
        (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))), 1.0 if math.isnan(p) else p,
        int((diff > 1e-12).sum()), int((diff < -1e-12).sum()), int((np.abs(diff) <= 1e-12).sum()),
    )


def evaluate(
    dataset: RetrievalDataset,
    split: str,
    first_stages: Sequence[FirstStage],
    reranker: CrossEncoderReranker | None = None,
    depths: Sequence[int] = (20,),
    k: int = 100,
    max_queries: int | None = None,
    recall_cutoffs: Sequence[int] = (),
) -> list[SystemResult]:
    """Evaluate each first stage alone and, with a reranker, each first stage reranked at each depth.

    Queries run one at a time, as a search service would see them, so stage latencies are per query.
    ``recall_cutoffs`` adds Recall@c for each c (the rerank depths being considered: their ceilings).
    """
    queries, qrels = split_queries(dataset, split, max_queries)
    retrieve_k = max([k, *depths, *recall_cutoffs]) if reranker else max([k, *recall_cutoffs])
    ceilings = tuple(recall_cutoffs) + (tuple(depths) if reranker else ())
    results = []
    for stage in first_stages:
        pipeline = Pipeline(stage).index(dataset.corpus)
        rankings, seconds = {}, []
        with progress_bar() as bar:
            for qid in bar.track(queries, description=f"{stage.name}: retrieve"):
                hits, timings = pipeline.search_timed(queries[qid], retrieve_k)
                rankings[qid] = [h.doc_id for h in hits]
                seconds.append(timings.first_stage_s)
        encoding = {}
        if getattr(stage, "docs_per_second", None) is not None:
            encoding = {"docs_per_second": stage.docs_per_second, "from_cache": stage.from_cache}
        metrics, per_query = compute_metrics(qrels, run_from_rankings(rankings), ceilings)
        results.append(SystemResult(stage.name, "first_stage", metrics, per_query, rankings,
                                    {"first_stage": latency_summary(seconds)}, encoding=encoding))
        for depth in depths if reranker else ():
            results.append(_rerank(dataset, queries, qrels, stage.name, rankings, seconds, reranker, depth))
    return results


def split_queries(dataset: RetrievalDataset, split: str, max_queries: int | None = None) -> tuple[dict, dict]:
    """The split's queries and qrels; with ``max_queries``, the first N by id (the same N every time)."""
    queries, qrels = dataset.split(split)
    if max_queries:
        keep = sorted(queries)[:max_queries]
        queries, qrels = {q: queries[q] for q in keep}, {q: qrels[q] for q in keep}
    return queries, qrels


def evaluate_depths(
    dataset: RetrievalDataset,
    split: str,
    first: SystemResult,
    pipeline: Pipeline,
    depths: Sequence[int],
    latency_queries: int = 20,
    max_queries: int | None = None,
) -> list[SystemResult]:
    """Rerank ``first``'s own candidates at every depth, scoring each (query, candidate) pair once.

    A cross-encoder scores each pair on its own, so reranking at depth d orders the top d by the same scores
    that reranking the top ``max(depths)`` gives them: quality at every depth comes from one pass over all
    queries. Latency is measured, not derived: ``pipeline`` (the first stage and this reranker) runs end to
    end at each depth on the first ``latency_queries`` queries.
    """
    queries, qrels = split_queries(dataset, split, max_queries)
    reranker, deepest = pipeline.reranker, max(depths)
    tops = {qid: first.rankings[qid][:deepest] for qid in queries}
    pairs = [(queries[qid], dataset.corpus[d].full_text()) for qid, top in tops.items() for d in top]
    logger.info("%s: scoring the top %d of %d queries (%d pairs)", reranker.name, deepest, len(queries), len(pairs))
    flat = iter(reranker.score_pairs(pairs, batch_job=True).tolist())  # one batch job: on Ray when in use
    scores = {qid: [(d, next(flat)) for d in top] for qid, top in tops.items()}
    sample = sorted(queries)[:latency_queries]
    timings: dict[int, list] = {d: [] for d in depths}
    configured_depth = pipeline.depth
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"{reranker.name}: latency at depths {list(depths)}", total=len(depths) * len(sample))
            for depth in depths:
                pipeline.depth = depth
                for qid in sample:
                    timings[depth].append(pipeline.search_timed(queries[qid], 10)[1])
                    bar.advance(task)
    finally:
        pipeline.depth = configured_depth
    results = []
    for depth in depths:
        reranked = {}
        for qid in queries:
            top = sorted(scores[qid][:depth], key=lambda x: -x[1])  # stable: ties keep first-stage order
            reranked[qid] = [d for d, _ in top] + first.rankings[qid][depth:]
        metrics, per_query = compute_metrics(qrels, run_from_rankings(reranked), (depth,))
        t = timings[depth]
        latency = {"first_stage": latency_summary([x.first_stage_s for x in t]),
                   "rerank": latency_summary([x.rerank_s for x in t]), "total": latency_summary([x.total_s for x in t]),
                   "queries": len(t)}
        results.append(SystemResult(f"{first.name} >> {reranker.name}@{depth}", "pipeline", metrics, per_query,
                                    reranked, latency, depth=depth, first_stage=first.name))
    return results


def _rerank(dataset, queries, qrels, stage_name, rankings, first_seconds, reranker, depth) -> SystemResult:
    """Rerank the first stage's own candidates (never injected positives) and score the end-to-end ranking."""
    reranked, seconds = {}, []
    with progress_bar() as bar:
        for qid in bar.track(queries, description=f"{reranker.name}@{depth}: rerank"):
            candidates = [(d, dataset.corpus[d].full_text()) for d in rankings[qid][:depth]]
            start = time.perf_counter()
            order = reranker.rerank(queries[qid], candidates, depth)
            seconds.append(time.perf_counter() - start)
            reranked[qid] = [d for d, _ in order] + rankings[qid][depth:]
    metrics, per_query = compute_metrics(qrels, run_from_rankings(reranked), (depth,))
    total = [a + b for a, b in zip(first_seconds, seconds)]
    latency = {"first_stage": latency_summary(first_seconds), "rerank": latency_summary(seconds),
               "total": latency_summary(total)}
    return SystemResult(f"{stage_name} >> {reranker.name}@{depth}", "pipeline", metrics, per_query, reranked,
                        latency, depth=depth, first_stage=stage_name)


def save_results(results: Sequence[SystemResult], out: str | Path, config: dict | None = None,
                 comparisons: Sequence[Comparison] = ()) -> Path:
    """``results.json`` (metrics, latency, comparisons, config), ``per_query/<system>.json`` and TREC runs."""
    out = Path(out)
    (out / "per_query").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for r in results:
        slug = _slug(r.name)
        (out / "per_query" / f"{slug}.json").write_text(json.dumps(r.per_query, indent=1, sort_keys=True))
        with (out / "runs" / f"{slug}.trec").open("w") as f:
            for qid, docs in r.rankings.items():
                for rank, doc in enumerate(docs, start=1):
                    f.write(f"{qid} Q0 {doc} {rank} {len(docs) - rank + 1} {slug}\n")
    path = out / "results.json"
    path.write_text(json.dumps({"config": config or {}, "systems": [r.summary() for r in results],
                                "comparisons": [asdict(c) for c in comparisons]}, indent=2))
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def load_per_query(path: str | Path) -> dict[str, dict[str, float]]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StagewiseError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StagewiseError(f"{path}: not a per-query results file ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise StagewiseError(f"{path}: not a per-query results file (expected {{query id: {{metric: value}}}})")
    return data
