"""select's stage 3: backend candidates for the chosen stages, measured, recommended and deployed."""

from __future__ import annotations

import json

import pytest
import yaml

from stagewise.backend_selection import BackendSelection, parse_backend
from stagewise.errors import StagewiseError
from stagewise.pipeline import Pipeline
from stagewise.selection import Selection, SelectConfig, _slug, load_select_config, select
from stagewise.rundir import RunDir
from stagewise.data import load_dataset

from test_selection import select_data, tiny_config  # noqa: F401  (the module's data fixture)

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
    assert rows[0]["status"] == "ok" and rows[0]["speedup"] == 1.0 and rows[0]["relative_change"] == 0.0
    chosen = next(c for c in result["first_stage"]["candidates"] if c["name"] == result["first_stage"]["chosen"])
    assert rows[0]["ndcg@10"] == chosen["metrics"]["ndcg@10"]  # PyTorch float32: stage 1's numbers, not remeasured
    for r in rows:
        assert r["status"] in ("ok", "slower", "refused"), r
        assert r["status"] == "refused" and "tolerance" in r["note"] or r["rate"] > 0 and r["unit"] == "docs/s"
        if r["status"] == "ok":
            assert 0 <= r["ndcg@10"] <= 1 and r["latency_ms"] > 0
        if r["backend"].startswith("onnx") and r["status"] != "refused":
            assert r["equivalence"]["min_cosine"] > 0.9 and (out / "exports").is_dir()
    onnx = next(r for r in rows if r["backend"] == "onnx")
    if onnx["status"] == "ok":  # a float32 export ranks exactly as PyTorch does
        assert onnx["relative_change"] == pytest.approx(0.0, abs=1e-3)
    assert sum(r.get("recommended", False) for r in rows) == 1
    assert result["verdict"]["backends"]["first_stage"] in CANDIDATES
    assert any(line.startswith("First stage: run it on") for line in result["verdict"]["summary"])


def test_the_recommended_backend_is_deployed_and_reported(backend_run):
    _, out, result = backend_run
    chosen = result["verdict"]["backends"]["first_stage"]
    saved = yaml.safe_load((out / "pipeline.yaml").read_text())["first_stage"]
    assert saved.get("backend", "torch") == parse_backend(chosen).name
    assert Pipeline.load(out / "pipeline.yaml").first_stage.backend == parse_backend(chosen)
    markdown = (out / "report.md").read_text()
    assert "Stage 3: backends" in markdown and "onnx-int8" in markdown


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
        assert r["status"] == "refused" and "tolerance" in r["note"] or r["unit"] == "pairs/s" and r["rate"] > 0
        if r["status"] == "ok":
            assert r["latency"]["total"]["p50_ms"] > 0 and "@" in r["name"] or r["backend"] == "torch"
    assert backends["recommended"]["reranker"] in CANDIDATES


def _row(backend, latency, change=0.0, status="ok"):
    return {"backend": backend, "status": status, "latency_ms": latency, "rate": 1000 / latency,
            "relative_change": change}


@pytest.mark.parametrize("rows, expected", [
    ([_row("torch", 100), _row("onnx", 50)], "onnx"),  # faster, no loss
    ([_row("torch", 100), _row("onnx-int8", 40, change=-0.02)], "torch"),  # faster, but loses 2% > 1%
    ([_row("torch", 100), _row("onnx", 97)], "torch"),  # within the noise: no export for 3%
    ([_row("torch", 100), _row("onnx", 60, status="refused"), _row("openvino", 70, change=-0.005)], "openvino"),
    # a tie within 5% goes to the smaller loss (float32 before int8), not to noise in the latency
    ([_row("torch", 100), _row("onnx", 51), _row("onnx-int8", 50, change=-0.004)], "onnx"),
    ([_row("torch", 100), _row("onnx", 70), _row("onnx-int8", 50, change=-0.004)], "onnx-int8"),
])
def test_the_fastest_within_the_loss_is_recommended(rows, expected):
    chooser = BackendSelection.__new__(BackendSelection)
    chooser.config = SelectConfig()
    assert chooser._recommend(rows)["backend"] == expected


@pytest.mark.parametrize("label", ["tensorrt", "onnx-fp16", "torch-int8", "onnx-bf16", "int8-onnx"])
def test_bad_backend_labels_fail_with_the_field_named(label, tmp_path):
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump({"backends": ["torch", label]}))
    with pytest.raises(StagewiseError, match=rf"select.yaml: field 'backends': '{label}'"):
        load_select_config(path)
