"""Model selection end to end with tiny models: the staged flow, the run directory, resume, budgets, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_beir
from stagewise.cli import app
from stagewise.errors import StagewiseError
from stagewise.search.fusion import Fusion
from stagewise.search.pipeline import Pipeline
from stagewise.selection import outcome
from stagewise.selection import strategy as selection
from stagewise.selection import verdict as verdicts
from stagewise.selection.config import SelectConfig, load_select_config
from stagewise.selection.strategy import select

TOPICS = ["cats purr", "dogs bark", "rust memory", "python typing", "tea leaves", "coffee beans", "rain clouds",
          "sun heat", "moon tides", "trees roots", "fish gills", "birds wings", "cars engines", "ships sails",
          "books pages", "songs notes", "bread yeast", "cheese milk", "glass sand", "steel iron", "paper wood",
          "wind mills", "snow cold", "fire smoke"]


@pytest.fixture(scope="module")
def select_data(tmp_path_factory):
    """24 documents; 16 training queries, 8 dev queries and 6 test queries, one relevant document each."""
    corpus = [{"_id": f"d{i}", "title": t.split()[0], "text": f"{t}, and more words about {t} here"}
              for i, t in enumerate(TOPICS)]
    queries = [{"_id": f"q{i:02d}", "text": f"what about {t.split()[1]}"} for i, t in enumerate(TOPICS)]
    queries += [{"_id": f"t{i}", "text": f"{t.split()[0]} and {t.split()[1]}"} for i, t in enumerate(TOPICS[10:16])]
    qrels = {"train": [(f"q{i:02d}", f"d{i}", 1) for i in range(16)],
             "dev": [(f"q{i:02d}", f"d{i}", 1) for i in range(16, 24)],
             "test": [(f"t{i}", f"d{10 + i}", 1) for i in range(6)]}
    return write_beir(tmp_path_factory.mktemp("select") / "data", corpus, queries, qrels)


def tiny_config(data, bi, cross, **extra) -> SelectConfig:
    settings = dict(data=str(data), bi_encoders=[str(bi)], cross_encoders=[str(cross)], finetune_top=1,
                    depths=[2, 5], latency_queries=3,
                    bi_training={"epochs": 1, "batch_size": 8, "dev_corpus_size": 24, "hard_negatives": "bm25",
                                 "range_min": 1, "range_max": 5},
                    cross_training={"epochs": 1, "batch_size": 8, "hard_negatives": 2, "random_negatives": 1,
                                    "max_length": 32},
                    backends=["torch"])  # stage 3's candidates are tested in test_backend_selection.py
    return load_select_config(**{**settings, **extra})


@pytest.fixture(scope="module")
def dense_run(select_data, tiny_bi_encoder, tiny_cross_encoder, tmp_path_factory):
    """A whole selection without BM25, so the chosen first stage is a bi-encoder and every start applies.
    Shared by the tests below, which read it or resume it (leaving it as they found it)."""
    config = tiny_config(select_data, tiny_bi_encoder, tiny_cross_encoder, bm25=False)
    out = tmp_path_factory.mktemp("dense") / "run"
    return config, out, select(config, out)


def test_stage_one_measures_zero_shot_and_fine_tuned(dense_run, tiny_bi_encoder):
    _, out, result = dense_run
    cands = {c["name"]: c for c in result["first_stage"]["candidates"]}
    base = tiny_bi_encoder.name
    assert set(cands) == {base, f"{base} fine-tuned"}  # no bm25, so no hybrid either
    tuned = cands[f"{base} fine-tuned"]
    assert tuned["fine_tuned"] and tuned["train_seconds"] > 0 and (out / "train" / f"bi-{base}" / "model").is_dir()
    for c in cands.values():
        assert {"ndcg@10", "mrr@10", "recall@2", "recall@5", "recall@100"} <= set(c["metrics"])
        assert c["latency"]["first_stage"]["p95_ms"] > 0 and c["index_bytes"] == 24 * 32 * 4
    assert result["first_stage"]["chosen"] in cands


def test_stage_two_tries_every_start_on_the_chosen_first_stage(dense_run, tiny_cross_encoder):
    _, out, result = dense_run
    chosen = result["first_stage"]["chosen"]
    by_init = {r["init"]: r for r in result["rerankers"]}
    assert set(by_init) == {"base", "same-as-bi", "from-finetuned-bi"}
    first_ndcg = result_first(result)["metrics"]["ndcg@10"]
    for r in by_init.values():
        assert r["status"] == "ok", r["note"]
        assert [(d["depth"], d["mode"]) for d in r["depths"]] == [(2, "rerank"), (2, "fusion"), (5, "rerank"),
                                                                   (5, "fusion")]
        for d in r["depths"]:
            suffix = f" fused {d['fusion']['weight']:.2f}" if d["mode"] == "fusion" else ""
            assert d["name"] == f"{chosen} >> {r['name']}@{d['depth']}" + suffix
            if d["mode"] == "fusion":  # chosen on these dev queries, with weight 0 among the options
                assert d["metrics"]["ndcg@10"] >= first_ndcg - 1e-12 and d["comparison"]["mean_diff"] >= -1e-12
            assert d["latency"]["queries"] == 3 and d["latency"]["rerank"]["p50_ms"] > 0
            assert d["comparison"]["a"] == chosen and -1 <= d["comparison"]["mean_diff"] <= 1
            assert d["recall_ceiling"] == result_first(result)["metrics"][f"recall@{d['depth']}"]
        assert r["health"] is not None and (out / "train").is_dir()
        # select pre-trains by default; the toy corpus's one-line texts give no pseudo-query, so it says so and
        # fine-tunes on the labels alone instead of failing
        assert "pseudo-queries" in r["pretrain"]["skipped"] and "pretrain_note" not in r
        assert json.loads((Path(r["run"]) / "config.json").read_text())["pretrain_queries"] == 0
    assert by_init["from-finetuned-bi"]["model"].endswith("model")
    # a bi-encoder start is warned about, a real base is not
    assert by_init["same-as-bi"]["init_warning"] and not by_init["base"]["init_warning"]


def result_first(result):
    return next(c for c in result["first_stage"]["candidates"] if c["name"] == result["first_stage"]["chosen"])


def test_run_directory_holds_report_steps_and_a_loadable_pipeline(dense_run, select_data):
    from stagewise.data.loaders import load_dataset

    _, out, result = dense_run
    for name in ("config.json", "result.json", "log.txt", "report.html", "report.md", "selection.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "steps").glob("[!_]*.json"))) == 2 + 3
    verdict = result["verdict"]
    html = (out / "report.html").read_text()
    assert f"{verdict['first_stage_ndcg@10']:.3f}" in html and verdict["summary"][0].split(" (")[0] in html
    markdown = (out / "report.md").read_text()
    for cost in verdict["init_costs"]:  # the report shows what the verdict measured, not dashes
        assert cost["vs_best_other"] is not None and f"{cost['vs_best_other']:+.3f}" in markdown
    saved = json.loads((out / "selection.json").read_text())
    assert saved["verdict"]["summary"] == verdict["summary"]
    pipeline = Pipeline.load(out / result["pipeline_yaml"]).index(load_dataset(str(select_data)).corpus)
    assert pipeline.first_stage.name == verdict["first_stage"]
    assert (pipeline.reranker is not None) == verdict["reranker_worth_it"]
    assert len(pipeline.search("what about purr", k=3)) == 3


def test_resume_reuses_finished_steps(dense_run, monkeypatch):
    config, out, result = dense_run

    def fail(*args, **kwargs):
        raise AssertionError("a finished step was redone")

    for name in ("train_bi", "train_cross", "evaluate", "evaluate_depths"):
        monkeypatch.setattr(selection, name, fail)
    again = select(config, out, resume=True)
    assert again["verdict"] == result["verdict"]
    assert again["wall_seconds"] >= result["wall_seconds"] > 0  # the time of every session counts


def test_resume_redoes_only_the_interrupted_step(dense_run, monkeypatch):
    config, out, result = dense_run
    step = out / "steps" / "rerank-cross-from-tiny-bi0-fine-tuned.json"
    assert step.is_file(), sorted(p.name for p in (out / "steps").iterdir())
    step.unlink()  # as if interrupted after training, before its evaluation was stored
    calls = []
    real = selection.evaluate_depths
    monkeypatch.setattr(selection, "train_bi", lambda *a, **k: (_ for _ in ()).throw(AssertionError("bi redone")))
    monkeypatch.setattr(selection, "evaluate_depths", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = select(config, out, resume=True)
    assert calls == [1] and step.is_file()
    assert [r["name"] for r in again["rerankers"]] == [r["name"] for r in result["rerankers"]]


def test_an_existing_run_needs_resume(dense_run):
    config, out, _ = dense_run
    with pytest.raises(StagewiseError, match="--resume"):
        select(config, out)


def test_a_tiny_time_budget_skips_training_and_says_so(select_data, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    config = tiny_config(select_data, tiny_bi_encoder, tiny_cross_encoder, time_budget_min=0.0001)
    result = select(config, tmp_path / "run")
    names = [c["name"] for c in result["first_stage"]["candidates"]]
    assert not any(n.endswith("fine-tuned") for n in names)
    skipped = {s["what"]: s["why"] for s in result["skipped"]}
    assert f"{tiny_bi_encoder.name} fine-tuned" in skipped and "time budget" in skipped[f"{tiny_bi_encoder.name} fine-tuned"]
    assert all(r["status"] == "skipped" for r in result["rerankers"])
    assert not result["verdict"]["reranker_worth_it"]
    assert "no reranker was evaluated" in result["verdict"]["summary"][0]
    assert "time budget" in (tmp_path / "run" / "report.md").read_text()


def test_a_missing_model_or_split_fails_before_any_work(select_data, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(StagewiseError):
        select(tiny_config(select_data, tmp_path / "nope", tiny_cross_encoder), out)
    with pytest.raises(StagewiseError, match="split"):
        select(tiny_config(select_data, tiny_bi_encoder, tiny_cross_encoder, dev_split="validation"), out)
    with pytest.raises(StagewiseError, match="cross-encoder"):
        select(tiny_config(select_data, tiny_cross_encoder, tiny_cross_encoder), out)
    with pytest.raises(StagewiseError, match="no split 'heldout'"):
        select(tiny_config(select_data, tiny_bi_encoder, tiny_cross_encoder, test_split="heldout"), out)
    assert not out.exists()


def test_cli_select_prints_verdict_report_and_an_example(select_data, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    config = tmp_path / "select.yaml"
    config.write_text(json.dumps({
        "bi_encoders": [str(tiny_bi_encoder)], "cross_encoders": [str(tiny_cross_encoder)], "finetune_top": 0,
        "init_strategies": ["base"], "depths": [3], "latency_queries": 2,
        "cross_training": {"epochs": 1, "batch_size": 8, "max_length": 32}}))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["select", "--data", str(select_data), "--config", str(config), "--out", str(out),
                                   "--query", "what about purr", "--test-split", "test"])
    assert res.exit_code == 0, res.output
    assert "On the held-out test split (6 queries, never used to choose)" in " ".join(res.output.split())
    assert "Verdict" in res.output and "report.html" in res.output and "what about purr" in res.output
    assert "1. d" in res.output  # the example query's first hit
    bad = tmp_path / "bad.yaml"
    bad.write_text("depth: [5]\n")
    res = CliRunner().invoke(app, ["select", "--data", str(select_data), "--config", str(bad), "--out", str(out)])
    assert res.exit_code == 2 and "bad.yaml" in res.output and "'depth'" in res.output


def test_a_recommended_reranker_goes_into_pipeline_yaml(dense_run, select_data, tmp_path):
    """The tiny rerankers never earn a recommendation, so hand the pipeline writer a verdict that does."""
    from types import SimpleNamespace

    from stagewise.data.loaders import load_dataset

    _, out, result = dense_run
    chosen = json.loads((out / "steps" / f"first-{selection._slug(result['verdict']['first_stage'])}.json").read_text())
    reranker = result["rerankers"][0]
    verdict = {"reranker_worth_it": True, "reranker": reranker["name"], "depth": 5,
               "fusion": {"weight": 0.3, "normalization": "zscore", "first_stage": "score"}}
    pipeline = outcome.chosen_pipeline(SimpleNamespace(cache=None), chosen, result["rerankers"], verdict)
    path = pipeline.save(out / "recommended.yaml")
    loaded = Pipeline.load(path).index(load_dataset(str(select_data)).corpus)
    assert loaded.reranker.name == reranker["name"] and loaded.depth == 5 and loaded.fusion == Fusion(0.3, "zscore")
    hits = loaded.search("what about purr", k=6)
    assert [h.rerank_score is not None for h in hits] == [True] * 5 + [False]
    assert [h.fused_score is not None for h in hits] == [True] * 5 + [False]
    path.unlink()


@pytest.fixture(scope="module")
def confirmed_run(select_data, tiny_bi_encoder, tiny_cross_encoder, tmp_path_factory):
    """One first stage and one reranker, with the gain rules relaxed so that a second stage is recommended, and a
    held-out test split to confirm it on."""
    config = tiny_config(select_data, tiny_bi_encoder, tiny_cross_encoder, bm25=False, finetune_top=0,
                         init_strategies=["base"], min_gain=-1.0, alpha=1.0, test_split="test",
                         cross_training={"epochs": 1, "batch_size": 8, "hard_negatives": 2, "random_negatives": 1,
                                         "max_length": 32, "learning_rate": 1e-3})
    out = tmp_path_factory.mktemp("confirmed") / "run"
    return config, out, select(config, out)


def test_the_chosen_pipeline_and_its_fusion_go_into_pipeline_yaml(confirmed_run):
    import yaml

    _, out, result = confirmed_run
    v = result["verdict"]
    # a tiny reranker's scores collapse, so it is never recommended alone: only fused, here at a weight above 0
    assert v["reranker_worth_it"] and v["mode"] == "fusion" and 0 < v["fusion"]["weight"] < 1
    (r,) = result["rerankers"]
    row = next(d for d in r["depths"] if d["name"] == v["name"])
    assert (row["depth"], row["mode"], row.get("fusion")) == (v["depth"], v["mode"], v["fusion"])
    saved = yaml.safe_load((out / result["pipeline_yaml"]).read_text())
    assert saved["depth"] == v["depth"] and saved["fusion"] == (v["fusion"] or Fusion().config())
    systems = {s["name"]: s for s in result["systems"]}
    assert {systems[d["name"]]["mode"] for d in r["depths"]} == {"rerank", "fusion"}
    markdown = (out / "report.md").read_text()
    assert "| Mode |" in markdown and "fused, weight" in markdown
    assert f"fused with the first stage at weight {v['fusion']['weight']:.2f}" in v["summary"][0]
    assert "its scores collapsed" in " ".join(v["summary"])


def test_the_confirmation_split_is_evaluate_pipeline_and_eval_pipeline(confirmed_run, select_data, tmp_path):
    from dataclasses import asdict

    from stagewise.data.loaders import load_dataset
    from stagewise.evaluation.runs import evaluate_pipeline

    _, out, result = confirmed_run
    conf = result["confirmation"]
    first, final, comparison = evaluate_pipeline(load_dataset(str(select_data)), "test",
                                                 Pipeline.load(out / "pipeline.yaml"))
    assert (conf["split"], conf["queries"], conf["first_stage"]) == ("test", 6, first.name)
    assert (conf["pipeline"], conf["first_stage_ndcg@10"], conf["pipeline_ndcg@10"]) == (
        final.name, first.metrics["ndcg@10"], final.metrics["ndcg@10"])
    assert conf["comparison"] == asdict(comparison)
    res = CliRunner().invoke(app, ["eval", "--pipeline", str(out), "--data", str(select_data), "--split", "test",
                                   "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [s["metrics"]["ndcg@10"] for s in evaluated["systems"]] == [conf["first_stage_ndcg@10"],
                                                                       conf["pipeline_ndcg@10"]]
    assert evaluated["comparisons"] == [json.loads(json.dumps(conf["comparison"]))]
    # reported, never used to choose: the verdict is what the dev records alone give, plus one line
    assert conf["summary"] == result["verdict"]["summary"][-1] and "never used to choose" in conf["summary"]
    again = verdicts.verdict(load_select_config(**{**asdict(confirmed_run[0]), "test_split": None}),
                              result_first(result), json.loads(json.dumps(result["rerankers"])))
    assert again["summary"] == result["verdict"]["summary"][:-1]
    assert {k: v for k, v in again.items() if k != "summary"} == {  # stage 3 adds the backends
        k: v for k, v in json.loads(json.dumps(result["verdict"])).items() if k not in ("summary", "backends")}
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert "Confirmation on test (held out)" in text and "never used to choose" in text
    assert json.loads((out / "selection.json").read_text())["confirmation"]["comparison"]["wins"] == comparison.wins


def test_the_plan_reserves_the_second_stage_and_the_shared_starts_share_one_shortened_recipe(
        select_data, tiny_bi_encoder, tiny_cross_encoder, tmp_path, monkeypatch):
    """Rates as slow as a 2-core CPU's with MiniLM for the bi-encoder's base as a cross-encoder, so that a 3-minute
    budget cannot run the shared starts' full recipe."""
    from stagewise.selection import probes
    from stagewise.selection.budget import Rates

    def cross_rates(model, *args, **kwargs):
        slow = model == str(tiny_bi_encoder)
        return Rates(train=0.5 if slow else 3.0, score=50.0, score_query=30.0)

    monkeypatch.setattr(probes, "bi_training_rates", lambda *a, **k: Rates(train=2.0))
    monkeypatch.setattr(probes, "cross_rates", cross_rates)
    config = tiny_config(select_data, tiny_bi_encoder, tiny_cross_encoder, bm25=False, time_budget_min=3,
                         cross_training={"epochs": 3, "batch_size": 8, "hard_negatives": 2, "random_negatives": 1,
                                         "max_length": 32})
    result = select(config, tmp_path / "run")
    plan = {row["step"]: row for row in result["budget"]["plan"]["steps"]}
    cross = plan[f"cross {tiny_cross_encoder.name}"]
    assert cross["runs"] and cross["cuts"] == [] and cross["share_s"] >= cross["full_s"]  # reserved, whole
    shared = plan["shared starts"]
    assert shared["runs"] and shared["cuts"] and shared["share_s"] < shared["full_s"]  # shortened, not skipped
    assert plan[f"{tiny_bi_encoder.name} fine-tuned"]["share_s"] < result["budget"]["plan"]["remaining_s"]
    by_init = {r["init"]: r for r in result["rerankers"]}
    # one recipe for both shared starts (the plan is made again before them, with the time really left)
    assert by_init["same-as-bi"]["cuts"] == by_init["from-finetuned-bi"]["cuts"] != []
    # … and one start's estimate for each: the second is not charged for both (which would cut its training short)
    assert by_init["same-as-bi"]["estimated_seconds"] == by_init["from-finetuned-bi"]["estimated_seconds"]
    for r in (by_init["same-as-bi"], by_init["from-finetuned-bi"]):
        assert r["status"] == "shortened" and all(cut in r["note"] for cut in r["cuts"]) and r["depths"]
        trained = json.loads((Path(r["run"]) / "config.json").read_text())
        assert trained["epochs"] < 3  # the cut recipe is the one that ran
    assert by_init["base"]["status"] == "ok" and not by_init["base"]["cuts"]
    assert {e["step"] for e in result["time"]["estimates"]} >= {f"cross {tiny_cross_encoder.name}"}
    assert {"train", "score", "latency"} <= set(result["time"]["by_kind"])
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "Where the time went" in markdown and "shared starts" in markdown


def test_a_tiny_time_budget_says_what_the_reranker_would_need(select_data, tiny_bi_encoder, tiny_cross_encoder,
                                                               tmp_path):
    config = tiny_config(select_data, tiny_bi_encoder, tiny_cross_encoder, time_budget_min=0.0001)
    result = select(config, tmp_path / "run")
    verdict = result["verdict"]
    assert verdict["reranker_worth_it"] is None and verdict["reranker_status"] == "not evaluated"
    assert any("--time-budget" in why for why in verdict["not_evaluated"])
    assert "not worth it" not in " ".join(verdict["summary"])


# ---- issue 20.3: what `train bi` / `train cross` refuse, `select --config` refuses before any work --------------

REFUSED_AT_ONCE = [
    ("cross_training: {loss: hinge}\n", ["field 'cross_training'", "unknown cross-encoder loss 'hinge'"]),
    ("cross_training: {pretrain_kind: klingon}\n", ["field 'cross_training'", "--pretrain-kind", "'klingon'"]),
    ("cross_training: {init: random}\n", ["field 'cross_training'", "--init", "'random'"]),
    ("cross_training: {epochs: .inf}\n", ["field 'cross_training'", "setting 'epochs'"]),
    ("cross_training: {max_length: 1000000000}\n", ["field 'cross_training'", "setting 'max_length'"]),
    ("bi_training: {loss: hinge}\n", ["field 'bi_training'", "unknown bi-encoder loss 'hinge'"]),
    ("bi_training: {hard_negatives: psychic}\n", ["field 'bi_training'", "--hard-negatives", "'psychic'"]),
    ("cross_encoders: [static-64]\n", ["cross_encoders", "'static-64'", "static embedding model"]),
    ("alpha: 5\n", ["field 'alpha'", "at most 1"]),
    ("backends: []\n", ["field 'backends'"]),
    ("time_budget_min: .inf\n", ["field 'time_budget_min'"]),
    ("depths: [5, 100000]\n", ["field 'depths'"]),
]


@pytest.mark.parametrize("content, words", REFUSED_AT_ONCE, ids=[c.strip() for c, _ in REFUSED_AT_ONCE])
def test_select_refuses_what_the_training_commands_refuse_before_any_work(content, words, select_data,
                                                                          tiny_bi_encoder, tmp_path):
    """Each was accepted and started work (zero-shot evaluation, training) until the step that used it failed."""
    if "static-64" in content:
        from stagewise.models.specs import installed_aliases

        if "static-64" not in installed_aliases():
            pytest.skip("static-64 is not installed")
    config = tmp_path / "select.yaml"
    config.write_text(f"bi_encoders: ['{tiny_bi_encoder}']\n{content}")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["select", "--data", str(select_data), "--config", str(config),
                                      "--out", str(out)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists()


def test_the_training_commands_and_select_share_one_check():
    """One check, not two kept in step: the settings `select` refuses are the ones `train_bi` / `train_cross` do."""
    from stagewise.training.config import BiTrainConfig, CrossTrainConfig, check_train_config

    for bad in (BiTrainConfig(loss="hinge"), BiTrainConfig(hard_negatives="psychic"),
                BiTrainConfig(epochs=float("inf")), CrossTrainConfig(loss="hinge"), CrossTrainConfig(pretrain_kind="klingon"),
                CrossTrainConfig(max_length=10**9), CrossTrainConfig(init="random")):
        with pytest.raises(StagewiseError):
            check_train_config(bad)
        kind = "bi_training" if isinstance(bad, BiTrainConfig) else "cross_training"
        default = BiTrainConfig() if kind == "bi_training" else CrossTrainConfig()
        changed = {k: v for k, v in vars(bad).items() if v != vars(default)[k]}
        with pytest.raises(StagewiseError, match=f"field '{kind}'"):
            load_select_config(**{kind: changed})
