"""select's stage 3: backend candidates for the chosen stages, measured, recommended and deployed."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from test_selection import select_data, tiny_config  # noqa: F401  (the module's data fixture)

from stagewise.data.loaders import load_dataset
from stagewise.errors import StagewiseError
from stagewise.rundir import RunDir
from stagewise.search.pipeline import Pipeline
from stagewise.selection.backend_stage import BackendSelection, parse_backend
from stagewise.selection.backend_timing import ROUNDS, USES, RoundResult, RoundWork, interleaved
from stagewise.selection.config import SelectConfig, load_select_config
from stagewise.selection.strategy import Selection, _slug, select

CANDIDATES = ["torch", "torch-bf16", "onnx", "onnx-int8"]


@pytest.fixture(scope="module")
def backend_run(select_data, tiny_bi_encoder, tiny_cross_encoder, tmp_path_factory):  # noqa: F811
    config = tiny_config(select_data, tiny_bi_encoder, tiny_cross_encoder, bm25=False, init_strategies=["base"],
                         backends=CANDIDATES, depths=[5])
    out = tmp_path_factory.mktemp("backends") / "run"
    return config, out, select(config, out)


def test_every_candidate_is_measured_against_torch_float32(backend_run):
    _, out, result = backend_run
    rows = result["backends"]["stages"]["first_stage"]
    assert [r["backend"] for r in rows] == CANDIDATES  # PyTorch float32 first: every ratio is against it
    assert rows[0]["status"] == "ok" and rows[0]["relative_change"] == 0.0
    for use in USES:  # measured in the same interleaved rounds: its ratio to itself is exactly 1 in every round
        assert rows[0][use]["speedup"] == 1.0 and rows[0][use]["speedup_range"] == [1.0, 1.0]
        timing = result["backends"]["timing"]["first_stage"][use]
        assert timing["rounds"] >= 3 and 1 <= timing["attempts"] <= 3 and isinstance(timing["disturbed"], bool)
    for r in rows:
        assert r["status"] in ("ok", "refused"), r
        if r["status"] == "refused":
            assert "tolerance" in r["note"]
            continue
        assert r["batch"]["median"] > 0 and len(r["batch"]["rounds"]) == timing["rounds"]
        assert r["batch"]["min"] <= r["batch"]["median"] <= r["batch"]["max"]
        assert 0 < r["query"]["p50_ms"] <= r["query"]["p95_ms"] and r["query"]["queries"] >= timing["rounds"]
        if "ndcg@10" in r:
            assert 0 <= r["ndcg@10"] <= 1
        if r["backend"].startswith("onnx"):
            assert r["equivalence"]["min_cosine"] > 0.9 and (out / "exports").is_dir()
            assert r["equivalence"]["sample"].endswith("(held out)")
    onnx = next(r for r in rows if r["backend"] == "onnx")
    if "relative_change" in onnx:  # a float32 export ranks exactly as PyTorch does
        assert onnx["relative_change"] == pytest.approx(0.0, abs=1e-3)
    for use in USES:
        assert sum(use in r["recommended"] for r in rows) == 1
        assert result["verdict"]["backends"]["first_stage"][use] in CANDIDATES
    assert result["backends"]["samples"]["first_stage"]["queries"] > 0
    assert any(line.startswith("First stage: batch work") for line in result["verdict"]["summary"])


def test_the_recommended_backends_are_deployed_and_reported(backend_run):
    _, out, result = backend_run
    chosen = result["verdict"]["backends"]["first_stage"]
    saved = yaml.safe_load((out / "pipeline.yaml").read_text())["first_stage"]
    assert saved.get("backend", "torch") == parse_backend(chosen["batch"]).name
    loaded = Pipeline.load(out / "pipeline.yaml").first_stage
    assert loaded.backend == parse_backend(chosen["batch"])
    if chosen["query"] == chosen["batch"]:  # one backend wins both: one simple setting
        assert "per_query" not in saved and loaded.per_query is None
    else:
        assert loaded.per_query.backend == parse_backend(chosen["query"])
    markdown = (out / "report.md").read_text()
    assert "Stage 3: backends" in markdown and "onnx-int8" in markdown and "per query" in markdown


def test_a_chosen_reranker_gets_its_backends_measured_too(backend_run, tmp_path):
    config, out, result = backend_run
    reranker = result["rerankers"][0]
    alone = next(d for d in reranker["depths"] if d["mode"] == "rerank")
    verdict = {"reranker": reranker["name"], "depth": 5, "fusion": None, "name": alone["name"]}  # as if worth it
    with RunDir(tmp_path / "stage3", {"command": "test"}) as run:
        s = Selection(config, run, load_dataset(config.data))
        chosen = json.loads((out / "steps" / f"{_slug('first-' + result['first_stage']['chosen'])}.json").read_text())
        backends = BackendSelection(s, chosen, verdict, result["rerankers"]).run()
    rows = backends["stages"]["reranker"]
    assert [r["backend"] for r in rows] == CANDIDATES
    for r in rows:  # a random head's near-constant scores may well fail the int8 correlation check: refused
        assert r["status"] == "refused" and "tolerance" in r["note"] or r["batch"]["median"] > 0
        if r["status"] == "ok":
            assert r["query"]["p95_ms"] > 0
    for use in USES:
        assert backends["recommended"]["reranker"][use] in CANDIDATES
    confirmation = backends["confirmation"].get("reranker")
    if confirmation:  # a recommendation other than float32 is checked on the whole dev split
        assert confirmation["latency"]["total"]["p50_ms"] > 0 and "@" in confirmation["name"]


def _row(backend, batch, query=None, change=0.0, status="ok"):
    return {"backend": backend, "status": status, "relative_change": change,
            "batch": {"speedup": batch}, "query": {"speedup": batch if query is None else query}}


@pytest.mark.parametrize("rows, expected", [
    ([_row("torch", 1), _row("onnx", 2)], "onnx"),  # faster, no loss
    ([_row("torch", 1), _row("onnx-int8", 2.5, change=-0.02)], "torch"),  # faster, but loses 2% > 1%
    ([_row("torch", 1), _row("onnx", 1.03)], "torch"),  # within the noise: no export for 3%
    ([_row("torch", 1), _row("onnx", 1.6, status="refused"), _row("openvino", 1.4, change=-0.005)], "openvino"),
    # a tie within 5% goes to the smaller loss (float32 before int8), not to noise in the timing
    ([_row("torch", 1), _row("onnx", 1.96), _row("onnx-int8", 2.0, change=-0.004)], "onnx"),
    ([_row("torch", 1), _row("onnx", 1.4), _row("onnx-int8", 2.0, change=-0.004)], "onnx-int8"),
])
def test_the_fastest_within_the_loss_is_recommended(rows, expected):
    assert _chooser()._recommend(rows, "batch", disturbed=False)["backend"] == expected


def test_each_use_gets_its_own_fastest_and_a_disturbed_timing_moves_nothing():
    rows = [_row("torch", 1), _row("openvino-int8", 3.0, query=0.9), _row("torch-bf16", 2.0, query=1.5)]
    chooser = _chooser()
    assert chooser._recommend(rows, "batch", disturbed=False)["backend"] == "openvino-int8"
    assert chooser._recommend(rows, "query", disturbed=False)["backend"] == "torch-bf16"
    assert chooser._recommend(rows, "batch", disturbed=True)["backend"] == "torch"


def _chooser() -> BackendSelection:
    chooser = BackendSelection.__new__(BackendSelection)
    chooser.config = SelectConfig()
    return chooser


def _sleeping(seconds_by_round: list[float]):
    """Round work that sleeps the given seconds in each round (a slowed round is a longer sleep)."""
    calls = iter(seconds_by_round)

    def run():
        start = time.perf_counter()
        time.sleep(next(calls))
        return RoundResult(1.0 / (time.perf_counter() - start))

    return RoundWork(run)


@pytest.mark.parametrize("slowed", ["torch", "onnx", "torch-bf16"])
def test_one_slowed_timing_round_does_not_flip_the_recommendation(slowed):
    """onnx is 2× float32 and torch-bf16 1.5×; a burst of load that slows one round of any one of them 10× leaves
    the medians of the per-round ratios, and so the recommendation, where they were."""
    base = {"torch": 0.02, "onnx": 0.01, "torch-bf16": 0.0133}
    work = {label: _sleeping([seconds * (10 if label == slowed and r == 2 else 1) for r in range(ROUNDS)])
            for label, seconds in base.items()}
    measured = interleaved(work, "torch", "batch", sleep=lambda s: None)
    assert not measured["disturbed"] and measured["attempts"] == 1  # one slow round is what medians are for
    speedups = {label: measured["candidates"][label]["speedup"] for label in base}
    assert speedups["onnx"] == pytest.approx(2.0, rel=0.2) and speedups["torch-bf16"] == pytest.approx(1.5, rel=0.2)
    assert measured["candidates"][slowed]["min"] < measured["candidates"][slowed]["max"] / 5  # the spread shows it
    rows = [{**_row(label, speedups[label]), "batch": measured["candidates"][label]} for label in base]
    assert _chooser()._recommend(rows, "batch", measured["disturbed"])["backend"] == "onnx"


def test_a_reference_whose_rounds_disagree_is_measured_again_then_flagged():
    # float32's own rounds swing 3× in every attempt: the machine is busy, nothing measured then is acted on
    swings = [0.01, 0.03, 0.01, 0.03, 0.01] * 3
    work = {"torch": _sleeping(swings), "onnx": _sleeping([0.005] * len(swings))}
    measured = interleaved(work, "torch", "batch", sleep=lambda s: None)
    assert measured["disturbed"] and measured["attempts"] == 3 and measured["reference_disturbed_rounds"] >= 2
    rows = [{**_row(label, 1), "batch": measured["candidates"][label]} for label in work]
    assert _chooser()._recommend(rows, "batch", measured["disturbed"])["backend"] == "torch"


@pytest.mark.parametrize("label", ["tensorrt", "onnx-fp16", "torch-int8", "onnx-bf16", "int8-onnx"])
def test_bad_backend_labels_fail_with_the_field_named(label, tmp_path):
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump({"backends": ["torch", label]}))
    with pytest.raises(StagewiseError, match=rf"select.yaml: field 'backends': '{label}'"):
        load_select_config(path)
