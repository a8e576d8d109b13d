"""The rules of model selection, checked on hand-built records: the verdict, the Pareto front, the time budget,
the config loader; and the helpers it relies on (reranking every depth in one pass, relocatable pipelines)."""

from __future__ import annotations

import math
import shutil
import warnings
from dataclasses import asdict

import pytest
import yaml

from conftest import CORPUS
from stagewise.data.loaders import Document, load_dataset
from stagewise.errors import StagewiseError
from stagewise.evaluation.runs import Comparison, evaluate, evaluate_depths
from stagewise.models.specs import display_name
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import BM25Retriever, DenseRetriever
from stagewise.selection.budget import TimeBudget
from stagewise.selection.config import CROSS_TRAINING, PRESETS, SelectConfig, load_select_config
from stagewise.selection.verdict import pareto_front, verdict

# --------------------------------------------------------------------------------------------
# Hand-built records, shaped like the ones Selection stores
# --------------------------------------------------------------------------------------------

FIRST = "bm25"
FIRST_NDCG = 0.5


def latency(p50: float, p95: float | None = None) -> dict:
    p95 = 1.5 * p50 if p95 is None else p95
    return {"p50_ms": p50, "p95_ms": p95, "mean_ms": (p50 + p95) / 2}


def first_stage(name: str = FIRST, ndcg: float = FIRST_NDCG, p50: float = 2.0, p95: float = 3.0) -> dict:
    return {"name": name, "metrics": {"ndcg@10": ndcg}, "latency": {"first_stage": latency(p50, p95)}}


def depth(d: int, ndcg: float, p: float = 0.001, ms: float | None = None, wins: int = 6, losses: int = 2,
          recall: float = 0.8) -> dict:
    """One rerank depth, before its reranker names it: total latency ``ms`` p50 (default 8 ms per candidate)."""
    ms = 8.0 * d if ms is None else ms
    gain = ndcg - FIRST_NDCG
    comparison = Comparison("ndcg@10", FIRST, "", FIRST_NDCG, ndcg, gain, (gain - 0.01, gain + 0.01), p, wins, losses,
                            10 - wins - losses)
    return {"depth": d, "metrics": {"ndcg@10": ndcg}, "recall_ceiling": recall, "comparison": asdict(comparison),
            "latency": {"first_stage": latency(2.0, 3.0), "rerank": latency(ms - 2.0), "total": latency(ms),
                        "queries": 10}}


def fused(d: int, ndcg: float, weight: float = 0.4, normalization: str = "minmax", **options) -> dict:
    """One depth fused with the first stage at ``weight`` (same latency as reranking at that depth)."""
    return {**depth(d, ndcg, **options), "mode": "fusion",
            "fusion": {"weight": weight, "normalization": normalization, "first_stage": "score"}}


def reranker(name: str, depths: list[dict], init: str = "base", collapsed: bool = False,
             train_seconds: float | None = 12.0, status: str = "ok") -> dict:
    for d in depths:
        suffix = f" fused {d['fusion']['weight']:.2f}" if d.get("mode") == "fusion" else ""
        d["name"] = d["comparison"]["b"] = f"{FIRST} >> {name}@{d['depth']}{suffix}"
    return {"name": name, "init": init, "label": f"label of {name}", "status": status,
            "health": {"collapsed": collapsed} if depths else None, "train_seconds": train_seconds, "depths": depths}


def curve(gains: list[float], depths=(5, 10, 20, 50), **options) -> dict:
    """A reranker whose nDCG@10 gain over the first stage at each depth is ``gains``."""
    return reranker("cross a", [depth(d, FIRST_NDCG + g) for d, g in zip(depths, gains)], **options)


def text(v: dict) -> str:
    return " ".join(v["summary"])


# --------------------------------------------------------------------------------------------
# verdict
# --------------------------------------------------------------------------------------------


def test_a_significant_gain_recommends_the_reranker_at_its_best_depth():
    best = depth(10, 0.56, p=0.002, wins=7, losses=1, recall=0.9)
    r = reranker("cross a", [depth(5, 0.52), best, depth(20, 0.55)])
    v = verdict(SelectConfig(), first_stage(), [r])

    assert v["reranker_worth_it"] is True
    assert (v["reranker"], v["depth"], v["name"], v["best_reranked"]) == ("cross a", 10, "bm25 >> cross a@10",
                                                                           "bm25 >> cross a@10")
    assert v["ndcg@10"] == 0.56 and v["latency_ms"] == best["latency"]["total"]["p95_ms"] == 120.0
    assert v["gain"] == pytest.approx(0.06) and v["ci95"] == pytest.approx((0.05, 0.07))
    assert (v["p_value"], v["wins"], v["losses"], v["ties"], v["recall_ceiling"]) == (0.002, 7, 1, 2, 0.9)
    assert (v["first_stage"], v["first_stage_ndcg@10"], v["first_stage_latency_ms"]) == ("bm25", 0.5, 3.0)
    assert all(d["within_budget"] for d in r["depths"])
    assert "reranked by cross a at depth 10" in v["summary"][0] and "0.560" in v["summary"][0]
    assert "+0.060 nDCG@10" in text(v) and "90% of the relevant documents" in text(v)


@pytest.mark.parametrize("ndcg, p, why", [
    (0.56, 0.2, "the gain is not significant (p ≥ 0.05)"),
    (0.503, 1e-6, "the gain is below the 0.005 minimum"),
    (0.49, 1e-6, "reranking lowers nDCG@10"),
])
def test_a_gain_too_small_or_not_significant_keeps_the_first_stage_alone(ndcg, p, why):
    v = verdict(SelectConfig(), first_stage(), [reranker("cross a", [depth(10, ndcg, p=p)])])

    assert v["reranker_worth_it"] is False and v["reranker"] is None and v["depth"] is None
    assert (v["name"], v["ndcg@10"], v["latency_ms"]) == ("bm25", 0.5, 3.0)
    assert v["best_reranked"] == "bm25 >> cross a@10" and v["gain"] == pytest.approx(ndcg - 0.5) and v["p_value"] == p
    assert "bm25 alone" in v["summary"][0] and f"The reranker is not worth it: {why}." in v["summary"][0]


def test_a_collapsed_reranker_is_not_recommended_however_large_its_gain():
    v = verdict(SelectConfig(), first_stage(), [reranker("cross a", [depth(10, 0.8, p=1e-9)], collapsed=True)])
    assert v["reranker_worth_it"] is False and v["reranker"] is None and v["name"] == "bm25"
    assert "not worth it: its scores collapsed" in v["summary"][0]


def test_a_collapsed_reranker_does_not_hide_a_healthy_one():
    broken = reranker("cross broken", [depth(10, 0.8, p=1e-9)], collapsed=True)
    healthy = reranker("cross ok", [depth(10, 0.56, p=0.001)])
    v = verdict(SelectConfig(), first_stage(), [broken, healthy])
    assert v["reranker"] == "cross ok" and v["reranker_worth_it"]


@pytest.mark.parametrize("metric, chosen, within", [("p50_ms", 10, [True, True, False]),
                                                     ("p95_ms", 5, [True, False, False])])
def test_the_latency_budget_picks_the_best_depth_that_fits(metric, chosen, within):
    # total p50 = 8 ms per candidate (40, 80, 160), p95 = 1.5 × p50 (60, 120, 240); the deepest is the best
    r = reranker("cross a", [depth(5, 0.53), depth(10, 0.55), depth(20, 0.58)])
    config = SelectConfig(latency_budget_ms=100, latency_metric=metric)
    v = verdict(config, first_stage(), [r])

    assert [d["within_budget"] for d in r["depths"]] == within
    assert v["reranker_worth_it"] and v["depth"] == chosen and v["best_reranked"] == f"bm25 >> cross a@{chosen}"
    assert v["latency_ms"] == next(d for d in r["depths"] if d["depth"] == chosen)["latency"]["total"][metric]
    assert v["first_stage_latency_ms"] == {"p50_ms": 2.0, "p95_ms": 3.0}[metric]


def test_nothing_within_the_latency_budget_keeps_the_first_stage_alone():
    rerankers = [reranker("cross a", [depth(5, 0.6), depth(10, 0.7)]), reranker("cross b", [depth(5, 0.65)])]
    v = verdict(SelectConfig(latency_budget_ms=10), first_stage(), rerankers)
    assert not any(d["within_budget"] for r in rerankers for d in r["depths"])
    assert v["reranker"] is None and v["name"] == "bm25" and "best_reranked" not in v
    assert v["summary"][0].endswith("no reranker fits the latency budget.")


def test_a_significant_fused_option_is_recommended_with_its_weight():
    r = reranker("cross a", [depth(10, 0.51, p=0.3), fused(10, 0.56, weight=0.4, p=0.002), depth(20, 0.52, p=0.2),
                             fused(20, 0.555, weight=0.6)])
    v = verdict(SelectConfig(), first_stage(), [r])

    assert v["reranker_worth_it"] and (v["reranker"], v["depth"], v["mode"]) == ("cross a", 10, "fusion")
    assert v["fusion"] == {"weight": 0.4, "normalization": "minmax", "first_stage": "score"}
    assert v["name"] == v["best_reranked"] == "bm25 >> cross a@10 fused 0.40" and v["ndcg@10"] == 0.56
    assert v["gain"] == pytest.approx(0.06) and v["p_value"] == 0.002
    assert v["summary"][0].startswith("Recommended: bm25, reranked by cross a at depth 10, fused with the first stage "
                                      "at weight 0.40 (dev nDCG@10 0.560")
    assert "Fusion adds +0.060 nDCG@10" in text(v)
    assert "Reranking alone at depth 10 reaches 0.510 (+0.010)" in text(v) and "optimistic" in text(v)
    # the depth curve is the chosen mode's: fused, peak at 10 (0.06), declining at 20 (pure reranking rises)
    assert (v["peak_depth"], v["peak_gain"], v["peaks_and_declines"]) == (10, pytest.approx(0.06), True)
    assert "reaches 90% of cross a's peak gain when fused" in text(v)


def test_pure_reranking_wins_a_tie_with_its_fusion():
    r = reranker("cross a", [depth(10, 0.56), fused(10, 0.56, weight=1.0)])
    v = verdict(SelectConfig(), first_stage(), [r])
    assert (v["mode"], v["fusion"], v["name"]) == ("rerank", None, "bm25 >> cross a@10")
    assert "fused" not in v["summary"][0] and "Reranking adds" in text(v)


def test_a_fused_gain_faces_the_same_rules():
    r = reranker("cross a", [depth(10, 0.49, p=1e-6), fused(10, 0.52, p=0.3)])
    v = verdict(SelectConfig(), first_stage(), [r])
    assert not v["reranker_worth_it"] and v["name"] == "bm25" and (v["mode"], v["fusion"]) == (None, None)
    assert v["best_reranked"] == "bm25 >> cross a@10 fused 0.40" and v["best_mode"] == "fusion"
    assert "not worth it: the gain is not significant (p ≥ 0.05)" in v["summary"][0]
    nothing = verdict(SelectConfig(), first_stage(), [reranker("cross a", [depth(10, 0.45), fused(10, 0.5, weight=0.0,
                                                                                                   p=1.0)])])
    assert not nothing["reranker_worth_it"] and "its best weight on dev is 0" in nothing["summary"][0]
    assert "Reranking alone at depth 10 reaches 0.450 (-0.050)." in text(nothing)
    over = verdict(SelectConfig(latency_budget_ms=50), first_stage(), [reranker("cross b", [fused(10, 0.6)])])
    assert over["name"] == "bm25" and over["summary"][0].endswith("no reranker fits the latency budget.")


def test_a_collapsed_reranker_may_be_fused_but_never_reranks_alone():
    r = reranker("cross a", [depth(10, 0.8, p=1e-9), fused(10, 0.55, weight=0.2, p=0.001)], collapsed=True)
    v = verdict(SelectConfig(), first_stage(), [r])
    assert v["reranker_worth_it"] and v["mode"] == "fusion" and v["fusion"]["weight"] == 0.2 and v["ndcg@10"] == 0.55
    assert "its scores collapsed" in text(v)
    alone = verdict(SelectConfig(), first_stage(), [reranker("cross a", [depth(10, 0.8, p=1e-9)], collapsed=True)])
    assert not alone["reranker_worth_it"]


def test_init_costs_judge_the_cross_encoders_reranking_alone():
    rerankers = [reranker("cross a", [depth(10, 0.55), fused(10, 0.60)]),
                 reranker("cross same", [depth(10, 0.52), fused(10, 0.58)], init="same-as-bi")]
    cost = verdict(SelectConfig(), first_stage(), rerankers)["init_costs"][0]
    assert cost["best_ndcg@10"] == 0.52 and cost["vs_best_other"] == pytest.approx(0.52 - 0.55)


def test_equal_quality_prefers_the_faster_depth():
    v = verdict(SelectConfig(), first_stage(), [reranker("cross a", [depth(20, 0.55), depth(10, 0.55), depth(5, 0.5)])])
    assert v["depth"] == 10


@pytest.mark.parametrize("rerankers", [[], [reranker("cross a", [], init="same-as-bi", status="skipped")]])
def test_no_reranker_evaluated(rerankers):
    v = verdict(SelectConfig(), first_stage(), rerankers)
    assert v["reranker"] is None and v["name"] == "bm25" and v["ndcg@10"] == 0.5
    assert v["summary"][0].endswith("no reranker was evaluated.")
    assert [c["vs_best_other"] for c in v["init_costs"]] == [None] * len(rerankers)


@pytest.mark.parametrize("gains, peak, at_90, declines", [
    ([0.01, 0.03, 0.028, 0.01], 10, 10, True),  # rises, then falls
    ([0.01, 0.02, 0.028, 0.03], 50, 20, False),  # monotone: 20 is the first to reach 0.9 × 0.03
    ([0.01, 0.03, 0.0295, 0.0295], 10, 10, False),  # a plateau within 0.001 of the peak is no decline
    ([0.01, 0.03, 0.03, 0.03], 10, 10, False),  # equal peaks: the shallowest
])
def test_the_depth_curve(gains, peak, at_90, declines):
    v = verdict(SelectConfig(), first_stage(), [curve(gains)])
    assert (v["peak_depth"], v["depth_90pct"], v["peaks_and_declines"]) == (peak, at_90, declines)
    assert v["peak_gain"] == pytest.approx(max(gains))
    assert f"Depth {at_90} reaches 90% of cross a's peak gain (+{max(gains):.3f} at depth {peak})" in text(v)
    assert ("declines deeper" in text(v)) is declines


def test_a_curve_with_no_positive_gain_has_no_90pct_depth():
    v = verdict(SelectConfig(), first_stage(), [curve([-0.01, -0.02, 0.0, -0.005])])
    assert v["depth_90pct"] is None and v["peaks_and_declines"] is False and v["peak_gain"] <= 0
    assert "90%" not in text(v)


def test_init_costs_compare_each_shared_start_with_the_best_other_start():
    rerankers = [
        reranker("cross a", [depth(5, 0.54), depth(10, 0.55)]),
        reranker("cross same", [depth(5, 0.57), depth(10, 0.56)], init="same-as-bi", train_seconds=40.0),
        reranker("cross tuned", [depth(5, 0.53)], init="from-finetuned-bi", collapsed=True, train_seconds=None),
        reranker("cross skipped", [], init="from-finetuned-bi", status="skipped", train_seconds=None),
    ]
    costs = verdict(SelectConfig(), first_stage(), rerankers)["init_costs"]

    assert [(c["init"], c["label"], c["status"]) for c in costs] == [
        ("same-as-bi", "label of cross same", "ok"), ("from-finetuned-bi", "label of cross tuned", "ok"),
        ("from-finetuned-bi", "label of cross skipped", "skipped")]
    same, tuned, skipped = costs
    assert same["best_ndcg@10"] == 0.57 and same["vs_best_other"] == pytest.approx(0.57 - 0.55)
    assert (same["train_seconds"], same["collapsed"]) == (40.0, False)
    assert tuned["best_ndcg@10"] == 0.53 and tuned["vs_best_other"] == pytest.approx(0.53 - 0.57) and tuned["collapsed"]
    assert skipped["best_ndcg@10"] is None and skipped["vs_best_other"] is None

    summary = text(verdict(SelectConfig(), first_stage(), rerankers))
    assert ("The same-as-bi start (label of cross same) reached 0.570 nDCG@10, +0.020 against the best other start "
            "(40 s of training).") in summary
    assert ("The from-finetuned-bi start (label of cross tuned) reached 0.530 nDCG@10, -0.040 against the best other "
            "start, and its scores collapsed.") in summary
    assert "label of cross skipped" not in summary


def test_a_shared_start_with_nothing_to_compare_against_has_no_cost():
    costs = verdict(SelectConfig(), first_stage(), [reranker("cross same", [depth(5, 0.6)], init="same-as-bi")])
    assert costs["init_costs"][0]["best_ndcg@10"] == 0.6 and costs["init_costs"][0]["vs_best_other"] is None


# --------------------------------------------------------------------------------------------
# pareto_front
# --------------------------------------------------------------------------------------------


def test_pareto_front_marks_exactly_the_non_dominated_rows():
    rows = [{"name": n, "ndcg@10": q, "latency_ms": ms} for n, q, ms in [
        ("fastest", 0.50, 5), ("slower same quality", 0.50, 8), ("as fast but worse", 0.45, 5),
        ("middle", 0.55, 20), ("middle twin", 0.55, 20), ("dominated by middle", 0.54, 25), ("best", 0.60, 100),
        ("best but slower", 0.60, 101)]]
    assert pareto_front(rows) is None
    assert {r["name"] for r in rows if r["pareto"]} == {"fastest", "middle", "middle twin", "best"}
    single = [{"ndcg@10": 0.1, "latency_ms": 1}]
    pareto_front(single)
    assert single[0]["pareto"] is True


# --------------------------------------------------------------------------------------------
# TimeBudget
# --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_no_time_budget_always_runs():
    budget = TimeBudget(None, FakeClock())
    assert budget.remaining() == math.inf and budget.plan(1e9, later=1e9) == ("run", None)


def test_the_time_budget_shares_what_remains_by_estimated_cost():
    clock = FakeClock()
    budget = TimeBudget(10, clock)  # 600 s
    clock.now += 100
    assert budget.remaining() == 500
    assert budget.plan(100, later=400) == ("run", pytest.approx(100))  # a share of exactly 100 s fits
    assert budget.plan(200, later=300) == ("run", pytest.approx(200))  # held to its share all the same
    assert budget.plan(200, later=800) == ("shorten", pytest.approx(500 * 200 / 1000))
    assert budget.plan(200, later=3800) == ("skip", pytest.approx(25))  # 25 s < a quarter of 200 s
    assert budget.plan(200, later=3800, minimum=0.1) == ("shorten", pytest.approx(25))
    clock.now += 10_000
    assert budget.remaining() == 0.0 and budget.plan(1.0) == ("skip", 0.0)


# --------------------------------------------------------------------------------------------
# load_select_config
# --------------------------------------------------------------------------------------------


def write(tmp_path, content: str, name: str = "select.yaml"):
    path = tmp_path / name
    path.write_text(content)
    return path


def test_defaults_and_the_quick_preset():
    assert load_select_config() == SelectConfig()
    quick = load_select_config(preset="quick")
    assert {k: getattr(quick, k) for k in PRESETS["quick"]} == PRESETS["quick"]
    assert quick.bi_encoders == ["minilm-l6", "static-64"] and quick.seed == SelectConfig().seed
    assert load_select_config(preset="full") == SelectConfig()


def test_the_file_overrides_the_preset_and_keywords_override_the_file(tmp_path):
    path = write(tmp_path, "depths: [50, 5, 10, 5]\nlatency_queries: 7\nmin_gain: 0.01\nalpha: 0.01\n")
    config = load_select_config(path, preset="quick", latency_queries=3, min_gain=None, seed=None, alpha=0.1)
    assert config.depths == [5, 10, 50]  # de-duplicated and sorted
    assert (config.latency_queries, config.min_gain, config.alpha, config.seed) == (3, 0.01, 0.1, 42)
    assert config.finetune_top == 1 and config.time_budget_min == 10  # from the preset
    # the quick preset asks for the full recipe too: its time budget's plan cuts it to what fits
    assert config.cross_training == CROSS_TRAINING and config.init_strategies == ["base"]
    # the full preset (the default) pre-trains, and a file's cross_training keeps that unless it says otherwise
    full = load_select_config(write(tmp_path, "cross_training: {epochs: 2}\n", "full.yaml"))
    assert full.cross_training == {**CROSS_TRAINING, "epochs": 2} and full.cross_training["pretrain_queries"] == 2000
    assert load_select_config(write(tmp_path, "", "empty.yaml"), preset="quick") == load_select_config(preset="quick")


def test_an_unknown_setting_names_the_file_and_the_field(tmp_path):
    path = write(tmp_path, "depths: [5]\ncolour: blue\n")
    with pytest.raises(StagewiseError, match="field 'colour': unknown setting") as e:
        load_select_config(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content, match", [
    ("seed: 1\nalpha: 0.1\n  bad: indent\n", r"select\.yaml:3: invalid YAML"),
    ("- a list\n- of things\n", "expected a mapping of settings, got list"),
])
def test_a_malformed_file_names_the_file(tmp_path, content, match):
    path = write(tmp_path, content)
    with pytest.raises(StagewiseError, match=match) as e:
        load_select_config(path)
    assert str(e.value).startswith(str(path))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(StagewiseError, match="cannot read") as e:
        load_select_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(e.value)


@pytest.mark.parametrize("override, match", [
    ({"depths": [0]}, "field 'depths'"),
    ({"depths": [10, -5]}, "field 'depths'"),
    ({"depths": []}, "field 'depths'"),
    ({"depths": [2.5]}, "field 'depths'"),
    ({"latency_metric": "p99_ms"}, "field 'latency_metric'.*not 'p99_ms'"),
    ({"init_strategies": ["base", "magic"]}, "field 'init_strategies': 'magic'"),
    ({"bi_training": {"epochs": 1, "bogus": 2}}, r"field 'bi_training'.*\['bogus'\]"),
    ({"cross_training": {"nope": 1}}, r"field 'cross_training'.*\['nope'\]"),
    ({"bm25": False, "bi_encoders": []}, "no first stage"),
    ({"fusion": "yes"}, "field 'fusion'"),
    ({"test_split": "dev"}, "field 'test_split'"),
    ({"test_split": "train"}, "field 'test_split'"),
    ({"test_split": 3}, "field 'test_split'"),
])
def test_invalid_settings_are_refused(override, match):
    with pytest.raises(StagewiseError, match=match):
        load_select_config(**override)


def test_an_invalid_value_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "depths: [5, 0]\n")
    with pytest.raises(StagewiseError, match=r"select\.yaml: field 'depths'"):
        load_select_config(path)


def test_an_unknown_preset_is_refused():
    with pytest.raises(StagewiseError, match="unknown preset 'huge'.*quick"):
        load_select_config(preset="huge")


def test_a_scalar_where_a_list_is_needed_is_a_clear_error(tmp_path):
    with pytest.raises(StagewiseError, match="field 'depths'"):
        load_select_config(write(tmp_path, "depths: 20\n"))


def test_a_config_does_not_share_mutable_settings_with_its_preset():
    load_select_config(preset="quick").bi_training["epochs"] = 5
    assert load_select_config(preset="quick").bi_training["epochs"] == 1


def test_latency_queries_must_be_positive():
    with pytest.raises(StagewiseError, match="latency_queries"):
        load_select_config(latency_queries=0)


# --------------------------------------------------------------------------------------------
# evaluate_depths: one scoring pass gives what reranking separately at each depth gives
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross(tiny_cross_encoder) -> CrossEncoderReranker:
    return CrossEncoderReranker(str(tiny_cross_encoder), device="cpu")


def test_evaluate_depths_equals_reranking_at_each_depth(beir_dir, cross):
    dataset = load_dataset(beir_dir)
    depths = [1, 2, 4, 6]
    first = evaluate(dataset, "dev", [BM25Retriever()], recall_cutoffs=depths)[0]
    pipeline = Pipeline(BM25Retriever(), cross, depth=3).index(dataset.corpus)

    both = evaluate_depths(dataset, "dev", first, pipeline, depths, latency_queries=2)
    fast = [r for r in both if r.mode == "rerank"]
    slow = evaluate(dataset, "dev", [BM25Retriever()], cross, depths=depths)[1:]
    assert [(r.depth, r.mode) for r in both] == [(d, m) for d in depths for m in ("rerank", "fusion")]
    alone = evaluate_depths(dataset, "dev", first, pipeline, depths, latency_queries=2, fusion=False)
    assert [(r.name, r.rankings) for r in alone] == [(r.name, r.rankings) for r in fast]

    assert [r.depth for r in fast] == [r.depth for r in slow] == depths
    assert any(r.rankings != first.rankings for r in fast)  # the reranker does reorder: the comparison means something
    for f, s in zip(fast, slow):
        assert (f.name, f.stage, f.first_stage) == (s.name, s.stage, s.first_stage)
        assert f.rankings == s.rankings
        assert f.metrics == pytest.approx(s.metrics) and f.per_query == s.per_query
        assert set(f.latency) == {"first_stage", "rerank", "total", "queries"} and f.latency["queries"] == 2
        assert all(f.latency[k]["p50_ms"] > 0 for k in ("first_stage", "rerank", "total"))
    assert pipeline.depth == 3

    again = evaluate_depths(dataset, "dev", first, pipeline, [2], latency_queries=20)
    assert again[0].latency["queries"] == 3 and again[0].rankings == fast[1].rankings and pipeline.depth == 3


# --------------------------------------------------------------------------------------------
# Pipeline.save / load: models inside the yaml's folder travel with it
# --------------------------------------------------------------------------------------------

QUERY = "domesticated programming language"


def corpus() -> dict[str, Document]:
    return {d["_id"]: Document(d["_id"], d.get("title", ""), d["text"]) for d in CORPUS}


@pytest.mark.parametrize("given", ["absolute", "relative to the working directory"])
def test_a_model_inside_the_folder_is_saved_relatively_and_survives_a_move(
        given, tiny_bi_encoder, tiny_cross_encoder, cross, tmp_path, monkeypatch):
    run = tmp_path / "run"
    model = run / "train" / "bi" / "model"
    shutil.copytree(tiny_bi_encoder, model)
    monkeypatch.chdir(tmp_path)
    spec = str(model) if given == "absolute" else "run/train/bi/model"
    pipeline = Pipeline(DenseRetriever(spec, device="cpu", show_progress=False), cross, depth=3)
    path = pipeline.save(run / "pipeline.yaml")

    saved = yaml.safe_load(path.read_text())
    assert saved["first_stage"]["model"] == "train/bi/model"
    assert saved["reranker"]["model"] == str(tiny_cross_encoder)  # outside the folder: as written
    expected = pipeline.index(corpus()).search(QUERY, k=5)

    moved = tmp_path / "elsewhere" / "moved-run"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    assert not model.exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = Pipeline.load(moved / "pipeline.yaml")
    assert not [w for w in caught if "has changed" in str(w.message)]
    assert loaded.first_stage.spec.path == (moved / "train" / "bi" / "model").resolve()
    assert loaded.depth == 3 and loaded.reranker.spec.spec == str(tiny_cross_encoder)
    hits = loaded.index(corpus()).search(QUERY, k=5)
    assert [h.doc_id for h in hits] == [h.doc_id for h in expected]
    assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)


def test_an_alias_is_saved_as_written(tmp_path):
    stage = DenseRetriever("static-64", device="cpu", show_progress=False)
    path = Pipeline(stage).save(tmp_path / "p" / "pipeline.yaml")
    assert yaml.safe_load(path.read_text())["first_stage"]["model"] == "static-64"
    assert Pipeline.load(path).first_stage.spec.alias == "static-64"


# --------------------------------------------------------------------------------------------
# display_name
# --------------------------------------------------------------------------------------------


def test_display_name(tiny_bi_encoder, tmp_path):
    assert display_name("bert-tiny") == "bert-tiny"
    run_model = tmp_path / "x" / "y" / "model"
    plain = tmp_path / "x" / "tiny"
    for target in (run_model, plain):
        shutil.copytree(tiny_bi_encoder, target)
    assert display_name(str(run_model)) == "y"
    assert display_name(str(plain)) == "tiny" and display_name(f"{plain}/") == "tiny"


def test_a_reranker_not_evaluated_is_never_called_not_worth_it(tmp_path):
    from stagewise.selection.report.write import write_report

    why = ("not evaluated: needs about 38.2 min even shortened, and 2.9 min of the time budget were left for it; "
           "give --time-budget 90 to allow it")
    skipped = {**reranker("cross bert-tiny", [], status="skipped"), "note": why}
    v = verdict(SelectConfig(), first_stage(), [skipped])
    assert v["reranker_worth_it"] is None and v["reranker_status"] == "not evaluated"
    assert v["not_evaluated"] == [f"cross bert-tiny: {why}"]
    assert "not known" in text(v) and "--time-budget 90" in text(v) and "not worth it" not in text(v)
    measured = verdict(SelectConfig(), first_stage(), [reranker("cross a", [depth(5, 0.49)]), skipped])
    assert measured["reranker_worth_it"] is False and measured["reranker_status"] == "not worth it"
    assert f"cross bert-tiny was {why}." in measured["summary"]  # what the budget could not afford, and its cost
    sel = {"verdict": v, "first_stage": {"chosen": FIRST, "candidates": [first_stage()]}, "rerankers": [skipped],
           "systems": [], "skipped": [], "budget": {}, "config": {}, "dataset": {}, "machine": {}}
    paths = write_report(sel, tmp_path)
    for kind in ("markdown", "html"):
        page = paths[kind].read_text()
        assert "reranking was not evaluated" in page and "--time-budget 90" in page
        assert "not worth it" not in page
