"""The CLI end to end on the toy dataset and tiny models: outputs written, user errors as one line and exit 2."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stagewise.cli import app

runner = CliRunner()


def test_eval_writes_metrics_per_query_and_runs(beir_dir, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "eval", "--data", str(beir_dir), "--split", "dev", "-f", "bm25", "-f", str(tiny_bi_encoder),
        "-f", f"bm25+{tiny_bi_encoder}", "--reranker", str(tiny_cross_encoder), "--depth", "3", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    systems = {s["name"]: s for s in summary["systems"]}
    assert len(systems) == 6  # three first stages, each alone and reranked
    reranked = [s for s in systems.values() if s["stage"] == "pipeline"]
    for s in reranked:
        first = systems[s["first_stage"]]
        # reranking reorders the top 3 only: its recall at the depth is the first stage's, the ceiling
        assert s["metrics"]["recall@3"] == first["metrics"]["recall@3"]
        assert set(s["latency"]) == {"first_stage", "rerank", "total"}
    assert all(0.0 <= s["metrics"]["ndcg@10"] <= 1.0 for s in systems.values())
    assert len(list((out / "per_query").glob("*.json"))) == 6
    assert (out / "config.json").is_file() and len(summary["comparisons"]) == 3
    per_query = json.loads(next((out / "per_query").glob("bm25.json")).read_text())
    assert set(per_query) == {"q1", "q2", "q3"}


def test_bm25_alone_finds_exact_term_matches(beir_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--data", str(beir_dir), "-f", "bm25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "results.json").read_text())["systems"][0]["metrics"]
    per_query = json.loads((out / "per_query" / "bm25.json").read_text())
    assert metrics["recall@10"] == 1.0
    # 'bark' and 'memory safety' occur only in the relevant documents; 'purrs' is not stemmed to 'purr'
    assert per_query["q2"]["ndcg@10"] == 1.0 and per_query["q3"]["ndcg@10"] == 1.0
    assert per_query["q1"]["ndcg@10"] < 1.0


def test_bad_data_is_one_line_and_exit_2(beir_dir, tmp_path):
    corpus = beir_dir / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + '{"_id": "d9", "title": "x"\n')
    before = corpus.read_bytes()
    result = runner.invoke(app, ["eval", "--data", str(beir_dir), "-f", "bm25", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "corpus.jsonl:7:" in result.output and "invalid JSON" in result.output
    assert corpus.read_bytes() == before


def test_missing_split_and_unknown_model_are_user_errors(beir_dir, tmp_path):
    result = runner.invoke(app, ["eval", "--data", str(beir_dir), "--split", "train", "-f", "bm25"])
    assert result.exit_code == 2 and "no split 'train'" in result.output and "dev, test" in result.output
    result = runner.invoke(app, ["eval", "--data", str(beir_dir), "-f", "nobody/no-such-model",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "minilm-l6" in result.output  # lists what is available offline
    result = runner.invoke(app, ["eval", "--data", str(beir_dir), "-f", "bm25", "--depth", "0"])
    assert result.exit_code == 2


def test_models_lists_every_alias():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["alias"]: r for r in json.loads(result.output)}
    assert {"minilm-l6", "static-64", "bert-tiny", "mpnet-base"} <= set(rows)
    assert rows["minilm-l6"]["installed"] is True
    for r in rows.values():
        assert r["installed"] or r["install"].startswith("pip install")


def test_data_describe(beir_dir):
    result = runner.invoke(app, ["data", "describe", str(beir_dir), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["documents"] == 6 and info["splits"]["dev"]["queries"] == 3
    result = runner.invoke(app, ["data", "describe", str(beir_dir / "missing")])
    assert result.exit_code == 2 and "not found" in result.output
