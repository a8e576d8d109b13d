"""Evaluation that can be trusted: pytrec_eval metrics per stage and end to end, latency, per-query results.

Reranking is evaluated as deployed: the reranker only sees what the first stage returned, so the first
stage's recall at the rerank depth is the ceiling it cannot exceed (reported as ``recall@depth``).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from stagewise.data.loaders import RetrievalDataset
from stagewise.errors import StagewiseError
from stagewise.evaluation.metrics import Run, compute_metrics, run_from_rankings  # noqa: F401 (re-exported)
from stagewise.progress import progress_bar
from stagewise.search.fusion import Fusion, choose_fusion, fused_rankings
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import FirstStage
from stagewise.timing import span

logger = logging.getLogger(__name__)

def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean())}


@dataclass
class SystemResult:
    """One evaluated system: a first stage alone, or a first stage plus a reranker at a depth.

    A first stage keeps its own ``scores`` (aligned with ``rankings``): fusion needs them. A pipeline's ``mode``
    says how its reranked candidates are ordered: "rerank" (the reranker alone) or "fusion" (``fusion``, the
    ``Fusion`` config, combining both stages' scores).
    """

    name: str
    stage: str  # "first_stage" or "pipeline"
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    rankings: dict[str, list[str]] = field(repr=False)
    latency: dict[str, dict[str, float]]
    depth: int | None = None
    first_stage: str | None = None
    encoding: dict = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict, repr=False)
    mode: str = "rerank"
    fusion: dict | None = None

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("per_query"), data.pop("rankings"), data.pop("scores")
        if self.stage == "first_stage":  # nothing reranked: no mode
            data.pop("mode"), data.pop("fusion")
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
        rankings, scores, seconds = {}, {}, []
        with progress_bar() as bar, span("evaluate", stage.name, len(queries), "queries"):
            for qid in bar.track(queries, description=f"{stage.name}: retrieve"):
                hits, timings = pipeline.search_timed(queries[qid], retrieve_k)
                rankings[qid] = [h.doc_id for h in hits]
                scores[qid] = [h.first_stage_score for h in hits]
                seconds.append(timings.first_stage_s)
        metrics, per_query = compute_metrics(qrels, run_from_rankings(rankings), ceilings)
        results.append(SystemResult(stage.name, "first_stage", metrics, per_query, rankings,
                                    {"first_stage": latency_summary(seconds)}, encoding=_encoding(stage),
                                    scores=scores))
        for depth in depths if reranker else ():
            results.append(_rerank(dataset, queries, qrels, stage.name, rankings, seconds, reranker, depth))
    return results


def _encoding(stage: FirstStage) -> dict:
    if getattr(stage, "docs_per_second", None) is None:
        return {}
    return {"docs_per_second": stage.docs_per_second, "from_cache": stage.from_cache}


def split_queries(dataset: RetrievalDataset, split: str, max_queries: int | None = None) -> tuple[dict, dict]:
    """The split's queries and qrels; with ``max_queries``, the first N by id (the same N every time)."""
    queries, qrels = dataset.split(split)
    if max_queries is not None:
        try:  # 0 used to mean all queries and -1 all but one: neither is what was asked for
            count = -1 if isinstance(max_queries, bool) else operator.index(max_queries)
        except TypeError:
            count = -1
        if count < 1:
            raise StagewiseError(f"max_queries must be a whole number of at least 1, got {max_queries!r}")
        keep = sorted(queries)[:count]
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
    fusion: bool = True,
) -> list[SystemResult]:
    """Rerank ``first``'s own candidates at every depth, scoring each (query, candidate) pair once.

    A cross-encoder scores each pair on its own, so reranking at depth d orders the top d by the same scores
    that reranking the top ``max(depths)`` gives them: quality at every depth comes from one pass over all
    queries. Latency is measured, not derived: ``pipeline`` (the first stage and this reranker) runs end to
    end at each depth on the first ``latency_queries`` queries.

    With ``fusion``, each depth's pure reranking (mode "rerank") is followed by a fused result (mode "fusion"):
    both stages' scores combined at the weight ``choose_fusion`` picks on these same queries, so it is never
    worse than ``first`` on them (and optimistic by as much: confirm it on queries it was not chosen on).
    ``first`` without scores (a record stored before they were kept) is fused by its ranks instead.
    """
    queries, qrels = split_queries(dataset, split, max_queries)
    reranker, deepest = pipeline.reranker, max(depths)
    tops = {qid: first.rankings[qid][:deepest] for qid in queries}
    pairs = [(queries[qid], dataset.corpus[d].full_text()) for qid, top in tops.items() for d in top]
    logger.info("%s: scoring the top %d of %d queries (%d pairs)", reranker.name, deepest, len(queries), len(pairs))
    flat = iter(reranker.score_pairs(pairs, batch_job=True).tolist())  # one batch job: on Ray when in use
    signal = "score" if all(qid in first.scores for qid in queries) else "rank"
    candidates = {qid: [(d, first.scores[qid][i] if signal == "score" else 0.0, next(flat)) for i, d in enumerate(top)]
                  for qid, top in tops.items()}
    sample = sorted(queries)[:latency_queries]
    timings: dict[int, list] = {d: [] for d in depths}
    configured_depth = pipeline.depth
    try:
        with progress_bar() as bar, span("latency", reranker.name, len(depths) * len(sample), "queries"):
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
        t = timings[depth]
        # fusion does the same work as reranking at this depth (normalising and adding 2 × depth numbers takes
        # microseconds), so both modes share the reranking latency measured above
        latency = {"first_stage": latency_summary([x.first_stage_s for x in t]),
                   "rerank": latency_summary([x.rerank_s for x in t]), "total": latency_summary([x.total_s for x in t]),
                   "queries": len(t)}
        below = {qid: first.rankings[qid][depth:] for qid in queries}
        modes = [("rerank", Fusion())]
        if fusion:
            modes.append(("fusion", choose_fusion(qrels, candidates, depth, below, first_stage=(signal,))[0]))
        for mode, chosen in modes:
            ranked = fused_rankings(candidates, chosen, depth, below)  # weight 1: the reranker's order, ties stable
            metrics, per_query = compute_metrics(qrels, run_from_rankings(ranked), (depth,))
            # named as the deployed pipeline names itself (Pipeline.name), on this result's first stage
            name = first.name + Pipeline(pipeline.first_stage, reranker, depth, chosen).name[
                len(pipeline.first_stage.name):]
            results.append(SystemResult(name, "pipeline", metrics, per_query, ranked, latency, depth=depth,
                                        first_stage=first.name, mode=mode,
                                        fusion=chosen.config() if mode == "fusion" else None))
    return results


def evaluate_pipeline(dataset: RetrievalDataset, split: str, pipeline: Pipeline, max_queries: int | None = None,
                      k: int = 100) -> tuple[SystemResult, SystemResult | None, Comparison | None]:
    """Exactly this pipeline (first stage, reranker, depth, fusion), as deployed, and its first stage alone.

    Both come from the same searches (the first stage's order is the hits' first-stage ranks), compared query by
    query. ``eval --pipeline`` and select's confirmation split both call this, so they give identical numbers.
    A pipeline without a reranker is its first stage: the pipeline result and the comparison are then None.
    """
    queries, qrels = split_queries(dataset, split, max_queries)
    if pipeline.corpus is not dataset.corpus:
        pipeline.index(dataset.corpus)
    depth = pipeline.depth if pipeline.reranker else None
    k = max(k, depth or 0)  # the first stage retrieves max(k, depth): every candidate comes back as a hit
    first_rankings, first_scores, final, timings = {}, {}, {}, []
    with progress_bar() as bar, span("evaluate", pipeline.name, len(queries), "queries"):
        for qid in bar.track(queries, description=f"{pipeline.name}: search"):
            hits, t = pipeline.search_timed(queries[qid], k)
            final[qid] = [h.doc_id for h in hits]
            by_first = sorted(hits, key=lambda h: h.first_stage_rank)
            first_rankings[qid] = [h.doc_id for h in by_first]
            first_scores[qid] = [h.first_stage_score for h in by_first]
            timings.append(t)
    cutoffs = (depth,) if depth else ()
    metrics, per_query = compute_metrics(qrels, run_from_rankings(first_rankings), cutoffs)
    first_latency = latency_summary([t.first_stage_s for t in timings])
    first = SystemResult(pipeline.first_stage.name, "first_stage", metrics, per_query, first_rankings,
                         {"first_stage": first_latency}, encoding=_encoding(pipeline.first_stage), scores=first_scores)
    if pipeline.reranker is None:
        return first, None, None
    metrics, per_query = compute_metrics(qrels, run_from_rankings(final), cutoffs)
    latency = {"first_stage": first_latency, "rerank": latency_summary([t.rerank_s for t in timings]),
               "total": latency_summary([t.total_s for t in timings])}
    fused = not pipeline.fusion.pure_rerank
    result = SystemResult(pipeline.name, "pipeline", metrics, per_query, final, latency, depth=depth,
                          first_stage=first.name, mode="fusion" if fused else "rerank",
                          fusion=pipeline.fusion.config() if fused else None)
    return first, result, compare(first, result)


def _rerank(dataset, queries, qrels, stage_name, rankings, first_seconds, reranker, depth) -> SystemResult:
    """Rerank the first stage's own candidates (never injected positives) and score the end-to-end ranking."""
    reranked, seconds = {}, []
    with progress_bar() as bar, span("evaluate", f"{reranker.name}@{depth}", len(queries), "queries"):
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
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise StagewiseError(f"{path}: not a per-query results file ({e})") from None
    except IsADirectoryError:
        raise StagewiseError(f"{path}: a folder, not a per-query results file") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise StagewiseError(f"{path}: not a per-query results file (expected {{query id: {{metric: value}}}})")
    return data
