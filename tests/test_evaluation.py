"""Tests for stagewise.evaluation.runs: metrics against hand-computed values, evaluation as deployed, saving, comparing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stagewise.data.loaders import load_beir
from stagewise.evaluation.runs import (
    SystemResult,
    _slug,
    compare,
    compute_metrics,
    evaluate,
    evaluate_depths,
    evaluate_pipeline,
    latency_summary,
    run_from_rankings,
    save_results,
)
from stagewise.search.fusion import WEIGHT_GRID, Fusion, choose_fusion, fused_rankings
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import BM25Retriever

# --------------------------------------------------------------------------------------------
# compute_metrics against hand-computed values
# --------------------------------------------------------------------------------------------


def ranked(*docs: str) -> dict[str, float]:
    return run_from_rankings({"q": list(docs)})["q"]


def test_perfect_ranking():
    means, per_query = compute_metrics({"q": {"d1": 1}}, {"q": ranked("d1", "d2", "d3")})
    assert means["ndcg@10"] == pytest.approx(1.0)
    assert means["mrr@10"] == pytest.approx(1.0)
    assert means["recall@10"] == pytest.approx(1.0) and means["recall@100"] == pytest.approx(1.0)
    assert means["map@100"] == pytest.approx(1.0)
    assert set(means) == {"ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100"}
    assert per_query == {"q": means}


def test_relevant_document_at_rank_two():
    means, _ = compute_metrics({"q": {"d1": 1}}, {"q": ranked("d2", "d1", "d3")})
    assert means["mrr@10"] == pytest.approx(0.5)
    assert means["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert means["map@100"] == pytest.approx(0.5)
    assert means["recall@10"] == pytest.approx(1.0)


def test_graded_relevance_ndcg():
    # rels 1 at rank 1 and 2 at rank 2; ideal puts 2 first. DCG uses gain = rel (trec_eval).
    means, _ = compute_metrics({"q": {"a": 1, "b": 2}}, {"q": ranked("a", "b", "c")})
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert means["ndcg@10"] == pytest.approx(dcg / idcg)


def test_relevant_document_at_rank_eleven():
    docs = [f"n{i}" for i in range(10)] + ["rel"]
    means, _ = compute_metrics({"q": {"rel": 1}}, {"q": ranked(*docs)}, recall_cutoffs=(5, 11))
    assert means["mrr@10"] == 0.0
    assert means["ndcg@10"] == 0.0
    assert means["recall@10"] == 0.0 and means["recall@5"] == 0.0
    assert means["recall@11"] == pytest.approx(1.0) and means["recall@100"] == pytest.approx(1.0)
    assert means["map@100"] == pytest.approx(1 / 11)


def test_a_judged_query_missing_from_the_run_counts_as_zero():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    means, per_query = compute_metrics(qrels, {"q1": ranked("d1", "d2")})
    assert set(per_query) == {"q1", "q2"}
    assert all(v == 0.0 for v in per_query["q2"].values())
    assert per_query["q1"]["ndcg@10"] == pytest.approx(1.0)
    for key in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100"):
        assert means[key] == pytest.approx(0.5)


def test_unjudged_queries_in_the_run_are_ignored():
    qrels = {"q1": {"d1": 1}}
    means, per_query = compute_metrics(qrels, {"q1": ranked("d1"), "extra": ranked("d9")})
    assert set(per_query) == {"q1"} and means["ndcg@10"] == pytest.approx(1.0)


def test_run_from_rankings_keeps_our_order_when_raw_scores_tie():
    qrels = {"q": {"a": 1}}
    ours = ["a", "b", "c"]
    tied = {"q": {d: 1.0 for d in ours}}  # what a reranker with tied scores could produce
    tied_means, _ = compute_metrics(qrels, tied)
    assert tied_means["mrr@10"] < 1.0  # trec_eval breaks ties by document id, not by our order

    run = run_from_rankings({"q": ours})
    scores = list(run["q"].values())
    assert list(run["q"]) == ours and scores == sorted(scores, reverse=True) and len(set(scores)) == 3
    means, _ = compute_metrics(qrels, run)
    assert means["mrr@10"] == pytest.approx(1.0) and means["ndcg@10"] == pytest.approx(1.0)

    reverse = ["c", "b", "a"]
    means, _ = compute_metrics(qrels, run_from_rankings({"q": reverse}))
    assert means["mrr@10"] == pytest.approx(1 / 3)


def test_latency_summary():
    summary = latency_summary([0.001, 0.002, 0.003, 0.004, 0.1])
    assert summary["p50_ms"] == pytest.approx(3.0)
    assert summary["p95_ms"] == pytest.approx(float(np.percentile([1, 2, 3, 4, 100], 95)))
    assert summary["mean_ms"] == pytest.approx(22.0)
    assert latency_summary([]) == {}


# --------------------------------------------------------------------------------------------
# evaluate: first stage and pipelines, as deployed
# --------------------------------------------------------------------------------------------


class OracleReranker:
    """Knows the qrels: scores each candidate by its relevance. Records what it was shown."""

    name = "oracle"

    def __init__(self, dataset, split):
        queries, qrels = dataset.split(split)
        self.relevance = {queries[q]: qrels[q] for q in queries}
        self.seen: list[tuple[str, list[str], int]] = []

    def rerank(self, query, candidates, depth):
        top = list(candidates)[:depth]
        self.seen.append((query, [d for d, _ in top], depth))
        rel = self.relevance.get(query, {})
        order = sorted(range(len(top)), key=lambda i: (-rel.get(top[i][0], 0), i))
        return [(top[i][0], float(rel.get(top[i][0], 0))) for i in order]


class FixedStage:
    """A poor first stage: the same ranking for every query."""

    name = "fixed"

    def __init__(self, ranking):
        self.ranking = ranking

    def index(self, corpus):
        assert set(self.ranking) <= set(corpus)

    def retrieve(self, queries, k):
        return [[(d, float(len(self.ranking) - i)) for i, d in enumerate(self.ranking[:k])] for _ in queries]

    def config(self):
        return {"type": "fixed"}


@pytest.fixture
def dataset(beir_dir):
    return load_beir(beir_dir)


@pytest.fixture(scope="module")
def reranker(tiny_cross_encoder):
    return CrossEncoderReranker(str(tiny_cross_encoder), device="cpu")


def _recall_at(result: SystemResult, depth: int) -> float:
    return result.metrics[f"recall@{depth}"]


def test_evaluate_bm25_with_a_cross_encoder(dataset, reranker):
    results = evaluate(dataset, "dev", [BM25Retriever()], reranker, depths=(2, 4))
    assert [r.stage for r in results] == ["first_stage", "pipeline", "pipeline"]
    first, at2, at4 = results
    assert first.name == "bm25" and first.depth is None
    assert (at2.depth, at4.depth) == (2, 4) and at2.first_stage == at4.first_stage == "bm25"
    assert at2.name == f"bm25 >> {reranker.name}@2"
    queries, qrels = dataset.split("dev")
    for r in results:
        assert set(r.per_query) == set(qrels) == set(r.rankings)
        assert all(len(r.rankings[q]) == len(dataset.corpus) for q in qrels)  # k=100 > corpus size
        for key in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100"):
            assert 0.0 <= r.metrics[key] <= 1.0
    # the reranker reorders only the top depth
    for r, depth in ((at2, 2), (at4, 4)):
        assert _recall_at(r, depth) == pytest.approx(_recall_at(first, depth))
        for q in qrels:
            assert set(r.rankings[q][:depth]) == set(first.rankings[q][:depth])
            assert r.rankings[q][depth:] == first.rankings[q][depth:]
            assert r.per_query[q][f"recall@{depth}"] == pytest.approx(first.per_query[q][f"recall@{depth}"])

    assert set(first.latency) == {"first_stage"}
    assert set(at2.latency) == {"first_stage", "rerank", "total"}
    for r in results:
        for stage in r.latency.values():
            assert {"p50_ms", "p95_ms"} <= set(stage) and stage["p95_ms"] >= stage["p50_ms"] >= 0
    assert at2.latency["total"]["p50_ms"] >= at2.latency["rerank"]["p50_ms"]


def test_oracle_reranker_cannot_find_what_the_first_stage_missed(dataset):
    # relevant in dev: q1 -> d1 (rank 3 here), q2 -> d2 (rank 4), q3 -> d4 (rank 5)
    stage = FixedStage(["d5", "d3", "d1", "d2", "d4", "d6"])
    oracle = OracleReranker(dataset, "dev")
    first, at2, at4 = evaluate(dataset, "dev", [stage], oracle, depths=(2, 4))

    assert _recall_at(first, 2) == 0.0 and _recall_at(first, 4) == pytest.approx(2 / 3)
    # the oracle sees only the first stage's top depth: it cannot raise recall@depth
    assert _recall_at(at2, 2) == 0.0
    assert _recall_at(at4, 4) == pytest.approx(2 / 3)
    for query, shown, depth in oracle.seen:
        assert shown == stage.ranking[:depth]
    # at depth 2 nothing relevant is in reach: the ranking's quality is unchanged
    assert at2.metrics["ndcg@10"] == pytest.approx(first.metrics["ndcg@10"])
    assert all(at2.per_query[q][m] == first.per_query[q][m] for q in at2.per_query for m in at2.per_query[q])
    # at depth 4 the oracle lifts q1 and q2 to rank 1, but q3's d4 (rank 5) stays where it was
    assert at4.rankings["q1"][0] == "d1" and at4.rankings["q2"][0] == "d2"
    assert at4.rankings["q3"] == stage.ranking
    assert at4.per_query["q1"]["ndcg@10"] == pytest.approx(1.0)
    assert at4.per_query["q3"]["ndcg@10"] == pytest.approx(first.per_query["q3"]["ndcg@10"])
    assert at4.metrics["ndcg@10"] > first.metrics["ndcg@10"]
    assert at4.metrics["mrr@10"] == pytest.approx((1 + 1 + 1 / 5) / 3)


def test_oracle_on_bm25_never_beats_the_ceiling_and_never_hurts(dataset):
    for split in ("dev", "test"):
        oracle = OracleReranker(dataset, split)
        depths = (1, 2, 3)
        first, *reranked = evaluate(dataset, split, [BM25Retriever()], oracle, depths=depths)
        for r, depth in zip(reranked, depths):
            assert _recall_at(r, depth) == pytest.approx(_recall_at(first, depth))
            assert r.metrics["ndcg@10"] >= first.metrics["ndcg@10"] - 1e-12
            for q in r.per_query:
                assert r.per_query[q][f"recall@{depth}"] <= first.per_query[q][f"recall@{depth}"] + 1e-12
                assert r.per_query[q]["ndcg@10"] >= first.per_query[q]["ndcg@10"] - 1e-12


def test_evaluate_without_reranker_and_max_queries(dataset):
    results = evaluate(dataset, "dev", [BM25Retriever(), FixedStage(["d1", "d2", "d3", "d4", "d5", "d6"])],
                       depths=(2,), k=3, max_queries=2)
    assert [(r.name, r.stage) for r in results] == [("bm25", "first_stage"), ("fixed", "first_stage")]
    for r in results:
        assert set(r.per_query) == {"q1", "q2"}
        assert all(len(docs) == 3 for docs in r.rankings.values())
        assert "recall@2" not in r.metrics  # no reranker, no ceiling to report
    fixed = results[1]
    assert fixed.per_query["q1"]["mrr@10"] == 1.0 and fixed.per_query["q2"]["mrr@10"] == 0.5


# --------------------------------------------------------------------------------------------
# Saving and comparing
# --------------------------------------------------------------------------------------------


def test_save_results_writes_summaries_per_query_and_runs(dataset, tmp_path):
    oracle = OracleReranker(dataset, "dev")
    results = evaluate(dataset, "dev", [BM25Retriever()], oracle, depths=(2, 4), k=5)
    path = save_results(results, tmp_path / "out", config={"dataset": "toy"})
    assert path == tmp_path / "out" / "results.json"
    data = json.loads(path.read_text())
    assert data["config"] == {"dataset": "toy"}
    assert [s["name"] for s in data["systems"]] == [r.name for r in results]
    for system in data["systems"]:
        assert "per_query" not in system and "rankings" not in system
        assert {"metrics", "latency", "stage", "depth"} <= set(system)

    per_query = sorted((tmp_path / "out" / "per_query").glob("*.json"))
    runs = sorted((tmp_path / "out" / "runs").glob("*.trec"))
    assert len(per_query) == len(runs) == len(results) == 3
    for r in results:
        slug = _slug(r.name)
        assert json.loads((tmp_path / "out" / "per_query" / f"{slug}.json").read_text()) == r.per_query
        lines = (tmp_path / "out" / "runs" / f"{slug}.trec").read_text().splitlines()
        assert len(lines) == sum(len(docs) for docs in r.rankings.values()) == 3 * 5
        first_query = next(iter(r.rankings))
        rows = [line.split() for line in lines if line.split()[0] == first_query]
        assert [row[2] for row in rows] == r.rankings[first_query]
        assert [int(row[3]) for row in rows] == list(range(1, 6))
        assert all(len(row) == 6 and row[1] == "Q0" and row[5] == slug for row in rows)
        assert [float(row[4]) for row in rows] == sorted((float(row[4]) for row in rows), reverse=True)


def _system(name: str, values: dict[str, float]) -> SystemResult:
    per_query = {q: {"ndcg@10": v} for q, v in values.items()}
    return SystemResult(name, "first_stage", {"ndcg@10": float(np.mean(list(values.values())))}, per_query,
                        rankings={}, latency={})


def test_compare_two_systems():
    a = _system("a", {"q1": 0.5, "q2": 0.2, "q3": 0.7, "q4": 0.4, "q5": 0.3})
    b = _system("b", {"q1": 0.7, "q2": 0.2, "q3": 0.6, "q4": 0.9, "q5": 0.5})
    c = compare(a, b)
    assert (c.metric, c.a, c.b) == ("ndcg@10", "a", "b")
    assert c.mean_a == pytest.approx(0.42) and c.mean_b == pytest.approx(0.58)
    assert c.mean_diff == pytest.approx(0.16)
    assert (c.wins, c.losses, c.ties) == (3, 1, 1)
    assert 0.0 <= c.p_value <= 1.0
    from scipy import stats

    expected_p = stats.ttest_rel([0.7, 0.2, 0.6, 0.9, 0.5], [0.5, 0.2, 0.7, 0.4, 0.3]).pvalue
    assert c.p_value == pytest.approx(expected_p)
    low, high = c.ci95
    assert low <= c.mean_diff <= high
    assert compare(a, b) == c  # seeded bootstrap: reproducible

    reverse = compare(b, a)
    assert reverse.mean_diff == pytest.approx(-0.16) and (reverse.wins, reverse.losses) == (1, 3)
    assert reverse.p_value == pytest.approx(c.p_value)


def test_compare_identical_systems_and_partial_overlap():
    a = _system("a", {"q1": 0.5, "q2": 0.2})
    same = compare(a, a)
    assert same.mean_diff == 0.0 and same.p_value == 1.0 and (same.wins, same.losses, same.ties) == (0, 0, 2)
    b = _system("b", {"q2": 0.4, "q9": 1.0})  # only q2 is shared
    c = compare(a, b)
    assert c.mean_diff == pytest.approx(0.2) and (c.wins, c.losses, c.ties) == (1, 0, 0)
    assert 0.0 <= c.p_value <= 1.0


# --------------------------------------------------------------------------------------------
# Fusion: chosen on dev, never worse than the first stage there; the deployed pipeline evaluated as is
# --------------------------------------------------------------------------------------------


def synthetic_candidates(kind: str, queries: int = 40, depth: int = 20, seed: int = 0):
    """One relevant document per query, placed by the first stage at a geometric rank (often near the top); the
    reranker scores either noise or an oracle's judgement (the relevant document highest)."""
    rng = np.random.default_rng(seed)
    qrels, candidates = {}, {}
    for q in range(queries):
        docs = [f"q{q}-d{i}" for i in range(depth)]
        relevant = docs[min(int(rng.geometric(0.5)) - 1, depth - 1)]
        qrels[f"q{q}"] = {relevant: 1}
        rerank = rng.normal(size=depth) if kind == "noise" else [float(d == relevant) for d in docs]
        candidates[f"q{q}"] = [(d, float(depth - i), float(s)) for i, (d, s) in enumerate(zip(docs, rerank))]
    return qrels, candidates


def test_choose_fusion_ignores_noise_and_follows_an_oracle():
    qrels, noise = synthetic_candidates("noise")
    first_ndcg = compute_metrics(qrels, run_from_rankings({q: [d for d, _, _ in c] for q, c in noise.items()}))[0]
    chosen, table = choose_fusion(qrels, noise, 20)
    assert chosen.weight == 0.0  # on this draw no weight beats the first stage: the noise is not let in
    assert fused_rankings(noise, chosen, 20) == {q: [d for d, _, _ in c] for q, c in noise.items()}
    assert max(row["ndcg@10"] for row in table) == pytest.approx(first_ndcg["ndcg@10"])
    assert len(table) == 2 * len(WEIGHT_GRID)  # every weight, both normalisations

    qrels, oracle = synthetic_candidates("oracle")
    chosen, table = choose_fusion(qrels, oracle, 20)
    assert 0.0 < chosen.weight < 1.0  # the smallest weight that lifts every relevant document to the top
    means, _ = compute_metrics(qrels, run_from_rankings(fused_rankings(oracle, chosen, 20)))
    assert means["ndcg@10"] == pytest.approx(1.0)
    smaller = [r for r in table if r["weight"] < chosen.weight and r["normalization"] == chosen.normalization]
    assert smaller and all(r["ndcg@10"] < 1.0 for r in smaller)


class OracleScorer:
    """A cross-encoder that knows the qrels: 1 for a relevant (query, document) pair, 0 otherwise."""

    name = "oracle"

    def __init__(self, dataset, split):
        queries, qrels = dataset.split(split)
        self.relevant = {(queries[q], dataset.corpus[d].full_text()) for q in qrels for d in qrels[q]}

    def score_pairs(self, pairs, batch_job=False):
        return np.array([float(pair in self.relevant) for pair in pairs])


def _fused(results):
    return {r.depth: r for r in results if r.mode == "fusion"}


def test_evaluate_depths_fuses_never_below_the_first_stage(dataset, reranker):
    first = evaluate(dataset, "dev", [BM25Retriever()], recall_cutoffs=(2, 6))[0]
    assert set(first.scores) == set(first.rankings) and all(
        len(first.scores[q]) == len(first.rankings[q]) and first.scores[q] == sorted(first.scores[q], reverse=True)
        for q in first.rankings)
    pipeline = Pipeline(BM25Retriever(), reranker).index(dataset.corpus)
    results = evaluate_depths(dataset, "dev", first, pipeline, [2, 6], latency_queries=1)
    pure = {r.depth: r for r in results if r.mode == "rerank"}
    for d, f in _fused(results).items():
        # weights 0 (the first stage's order) and 1 (pure reranking) are both options chosen from on these queries
        assert f.metrics["ndcg@10"] >= max(first.metrics["ndcg@10"], pure[d].metrics["ndcg@10"]) - 1e-12
        assert f.latency == pure[d].latency  # the same work: the reranking latency measured at that depth
        assert f.fusion["first_stage"] == "score" and f.first_stage == "bm25"
        assert f.rankings[next(iter(f.rankings))][d:] == first.rankings[next(iter(f.rankings))][d:]


def test_evaluate_depths_fuses_an_informative_reranker_and_falls_back_to_ranks(dataset):
    stage = FixedStage(["d5", "d3", "d1", "d2", "d4", "d6"])  # relevant at ranks 3, 4 and 5
    first = evaluate(dataset, "dev", [stage], recall_cutoffs=(2, 6))[0]
    pipeline = Pipeline(stage, OracleScorer(dataset, "dev")).index(dataset.corpus)
    fused = _fused(evaluate_depths(dataset, "dev", first, pipeline, [2, 6], latency_queries=1))
    assert fused[2].fusion["weight"] == 0.0 and fused[2].rankings == first.rankings  # nothing in reach at depth 2
    assert 0.0 < fused[6].fusion["weight"] < 1.0 and fused[6].metrics["ndcg@10"] == pytest.approx(1.0)
    assert fused[6].name == f"fixed >> oracle@6 fused {fused[6].fusion['weight']:.2f}" and fused[6].mode == "fusion"

    stored = SystemResult(**{**first.__dict__, "scores": {}})  # a record kept before first-stage scores were
    again = _fused(evaluate_depths(dataset, "dev", stored, pipeline, [6], latency_queries=1))[6]
    assert again.fusion["first_stage"] == "rank" and again.metrics["ndcg@10"] == pytest.approx(1.0)


def test_evaluate_pipeline_is_the_pipeline_as_deployed(dataset):
    stage = FixedStage(["d5", "d3", "d1", "d2", "d4", "d6"])
    pipeline = Pipeline(stage, OracleScorer(dataset, "dev"), depth=4, fusion=Fusion(0.6))
    first, result, comparison = evaluate_pipeline(dataset, "dev", pipeline)
    alone = evaluate(dataset, "dev", [stage], recall_cutoffs=(4,))[0]
    assert (first.name, first.stage, first.rankings, first.metrics) == ("fixed", "first_stage", alone.rankings,
                                                                          alone.metrics)
    assert first.scores == alone.scores and set(first.latency) == {"first_stage"}
    queries, _ = dataset.split("dev")
    assert result.rankings == {q: [h.doc_id for h in pipeline.search(queries[q], k=100)] for q in queries}
    assert (result.name, result.mode, result.depth) == ("fixed >> oracle@4 fused 0.60", "fusion", 4)
    assert result.fusion == Fusion(0.6).config() and set(result.latency) == {"first_stage", "rerank", "total"}
    # at weight 0.6 the oracle lifts d1 (rank 3) and d2 (rank 4) to the top; d4 (rank 5) is out of reach
    assert result.rankings["q1"][0] == "d1" and result.rankings["q2"][0] == "d2"
    assert comparison == compare(first, result) and comparison.mean_diff > 0 and comparison.wins == 2

    alone_first, none, no_comparison = evaluate_pipeline(dataset, "dev", Pipeline(stage), max_queries=2)
    assert none is None and no_comparison is None and set(alone_first.per_query) == {"q1", "q2"}
