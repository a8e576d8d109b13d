"""The time budget's plan: shares, ladders of recipes, what is left out."""

from __future__ import annotations

import pytest

from stagewise.selection.budget import Level, Rates, Sizes, Step, bi_levels, cross_levels, share_out
from stagewise.training.config import BiTrainConfig, CrossTrainConfig

SIZES = Sizes(corpus=5000, train_queries=600, train_pairs=690, dev_queries=200, latency_queries=20,
              depths=[5, 10, 20, 50, 100], query_seconds=0.02)


def step(name, full, minimum, tier=0, priority=0, stage=1):
    return Step(name, [Level(full, cuts=[]), Level(minimum, cuts=["cut"])], tier, priority, stage)


def test_the_second_stage_gets_its_share_before_the_first_spends_it():
    bi = step("bi", 1000, 250, tier=0, priority=10)
    cross = step("cross", 500, 150, tier=0, priority=8, stage=2)
    shared = step("shared", 5000, 300, tier=1, priority=2, stage=2)
    plan = share_out([bi, cross, shared], 1200)
    assert all(a.runs for a in plan.values())
    # the core steps share what is left after every minimum, in proportion to what each could still use
    assert plan["bi"].share == pytest.approx(250 + 500 * 750 / 1100)
    assert plan["cross"].share == pytest.approx(150 + 500 * 350 / 1100)
    assert plan["shared"].share == pytest.approx(300)  # extra steps get more only once the core have their full
    assert plan["bi"].level.cuts == ["cut"] and plan["cross"].level.cuts == ["cut"]
    assert sum(a.share for a in plan.values()) == pytest.approx(1200)


def test_extra_steps_get_what_the_core_steps_cannot_use():
    plan = share_out([step("bi", 1000, 250), step("shared", 5000, 300, tier=1)], 3000)
    assert plan["bi"].share == pytest.approx(1000) and plan["bi"].level.cuts == []
    assert plan["shared"].share == pytest.approx(2000)


def test_time_beyond_every_full_recipe_is_slack_for_all():
    plan = share_out([step("bi", 1000, 250), step("cross", 500, 150)], 3000)
    assert plan["bi"].share == pytest.approx(2000) and plan["cross"].share == pytest.approx(1000)
    assert all(a.level.cuts == [] for a in plan.values())


def test_when_even_the_shortest_recipes_do_not_fit_the_least_important_is_left_out():
    plan = share_out([step("bi", 1000, 250, priority=10), step("cross", 500, 150, priority=8),
                      step("shared", 5000, 300, tier=1, priority=2)], 500)
    assert not plan["shared"].runs and plan["bi"].runs and plan["cross"].runs
    assert "5.0 min" in plan["shared"].reason  # its shortest recipe
    plan = share_out([step("bi", 1000, 250, priority=10), step("cross", 500, 150, priority=8)], 300)
    assert plan["bi"].runs and not plan["cross"].runs


def test_no_time_budget_runs_every_full_recipe():
    plan = share_out([step("bi", 1000, 250)], float("inf"))
    assert plan["bi"].share is None and plan["bi"].level.cuts == []


RATES = Rates(encode=40.0, train=100.0, score=800.0, score_query=400.0)


def test_a_cross_encoder_ladder_cuts_in_order_and_each_cut_costs_less():
    config = CrossTrainConfig(epochs=3, hard_negatives=7, random_negatives=2, pretrain_queries=2000)
    levels = cross_levels(config, [5, 10, 20, 50, 100], RATES, SIZES)
    costs = [lv.seconds for lv in levels]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    assert levels[0].cuts == [] and levels[0].settings == {}
    assert levels[1].cuts == ["pre-training on 1000 pseudo-queries (of 2000)"]
    shortest = levels[-1]
    assert shortest.settings == {"pretrain_queries": 250, "epochs": 1, "depths": [5, 10, 20]}
    assert shortest.cuts == ["pre-training on 250 pseudo-queries (of 2000)", "1 epoch (of 3)", "depths 50, 100 not "
                             "evaluated"]
    assert sum(shortest.parts.values()) == pytest.approx(shortest.seconds)


def test_the_shared_starts_trial_goes_on_down_to_no_pre_training_and_a_sample():
    config = CrossTrainConfig(epochs=3, hard_negatives=7, random_negatives=2, pretrain_queries=2000)
    trial = cross_levels(config, [5, 10, 20, 50, 100], RATES, SIZES, trial=True)
    primary = cross_levels(config, [5, 10, 20, 50, 100], RATES, SIZES)
    assert trial[:len(primary)] == primary and trial[-1].seconds < primary[-1].seconds
    assert trial[-1].settings == {"pretrain_queries": 0, "epochs": 1, "depths": [5, 10, 20], "dev_sample": 100,
                                  "max_train_queries": 150, "hard_negatives": 3, "random_negatives": 1}
    assert "no pre-training" in trial[-1].cuts and "150 of 600 training queries" in trial[-1].cuts


def test_a_recipe_already_short_has_fewer_cuts():
    config = CrossTrainConfig(epochs=1, hard_negatives=3, random_negatives=1, pretrain_queries=0)
    levels = cross_levels(config, [5, 10], RATES, SIZES)
    assert len(levels) == 1  # nothing to cut: no pre-training, one epoch, no depth above 20


def test_a_bi_encoder_ladder_shortens_its_training_only():
    levels = bi_levels(BiTrainConfig(epochs=1), RATES, SIZES)
    assert [lv.cuts for lv in levels][1:] == [[f"about {f}% of its training steps"] for f in (75, 50, 25)]
    assert levels[0].parts["train_s"] == pytest.approx(4 * levels[-1].parts["train_s"])


def test_stage3_reserve_is_its_work_at_the_measured_rates():
    """Stage 3's reserve follows what it does: nothing without candidates; more with every candidate, a bigger
    corpus or slower models; an exported candidate costs more than a torch one (its export). The first stage's
    part and the reranker's are apart (the reranker's is measured only if one is chosen)."""
    from types import SimpleNamespace

    from stagewise.selection.backend_stage import stage3_reserve

    def reserve(backends, sizes=SIZES, docs=50.0, corpus=150.0, pairs=800.0):
        return sum(stage3_reserve(SimpleNamespace(backends=backends), sizes, docs, corpus, pairs))

    assert reserve(["torch"]) == 0.0
    one, two = reserve(["torch", "torch-bf16"]), reserve(["torch", "torch-bf16", "onnx-int8"])
    assert 0 < one < two
    assert reserve(["torch", "onnx"]) > reserve(["torch", "torch-bf16"])
    bigger = Sizes(**{**SIZES.__dict__, "corpus": SIZES.corpus * 4})
    assert reserve(["torch", "torch-bf16"], bigger) > one
    assert reserve(["torch", "torch-bf16"], docs=25.0, corpus=75.0) > one
    first, reranker = stage3_reserve(SimpleNamespace(backends=["torch", "torch-bf16"]), SIZES, 50.0, 150.0, 800.0)
    assert first > 0 and reranker > 0 and first + reranker == pytest.approx(one)
    assert reserve(["torch", "torch-bf16"], pairs=None) == pytest.approx(first)
    assert reserve(["torch", "torch-bf16"], docs=None, corpus=None) == pytest.approx(reranker)


def test_stage3_reserves_the_rerankers_part_at_the_protected_starts_rate():
    """The reranker's part of stage 3 is planned at the first base start's scoring rate (the start trained in
    full), not the slowest start's: a slower start that wins measures its backends with the time left."""
    from types import SimpleNamespace

    from stagewise.selection.plan import SelectionPlan

    config = SimpleNamespace(cross_training={"max_length": 64, "pretrain_queries": 0}, depths=[5, 10])
    plan = SelectionPlan(SimpleNamespace(config=config))
    plan.rates = {"cross-bert-tiny-64": {"score_query": 900.0}, "cross-minilm-l6-64": {"score_query": 60.0},
                  "bi-minilm-l6": {"encode": 100.0}}
    tiny = {"name": "cross bert-tiny", "model": "bert-tiny", "init": "base"}
    same = {"name": "cross minilm-l6", "model": "minilm-l6", "init": "same-as-bi"}
    assert plan._protected_score_rate([tiny, same]) == 900.0
    assert plan._protected_score_rate([same, tiny]) == 900.0  # the first *base* start
    assert plan._protected_score_rate([{**tiny, "skip": "too long"}, same]) == 60.0  # none: the slowest
    assert plan._protected_score_rate([same]) == 60.0
