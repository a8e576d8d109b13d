"""The CLI end to end on the toy dataset and tiny models: outputs written, user errors as one line and exit 2."""

from __future__ import annotations

import json

import pytest
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


def test_compare_two_systems_query_by_query(beir_dir, tiny_bi_encoder, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--data", str(beir_dir), "-f", "bm25", "-f", str(tiny_bi_encoder),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    files = sorted((out / "per_query").glob("*.json"))
    bm25 = out / "per_query" / "bm25.json"
    other = next(f for f in files if f != bm25)
    result = runner.invoke(app, ["compare", str(bm25), str(other), "--metric", "recall@10"])
    assert result.exit_code == 0, result.output
    assert "recall@10" in result.output and "wins" in result.output
    result = runner.invoke(app, ["compare", str(bm25), str(other), "--metric", "nope"])
    assert result.exit_code == 2 and "available" in result.output
    (tmp_path / "bad.json").write_text("[1, 2]")
    result = runner.invoke(app, ["compare", str(bm25), str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "not a per-query results file" in result.output


@pytest.mark.parametrize("file,content,expected", [
    ("corpus.jsonl", b'{"_id": "d1", "title": "t", "text": "x"}\n{"_id": "d1", "text": "y"}\n', "corpus.jsonl:2: field '_id'"),
    ("corpus.jsonl", b'{"_id": "d1", "text": "\xff\xfe"}\n', "corpus.jsonl:1:"),
    ("corpus.jsonl", b'{"title": "t", "text": "x"}\n', "corpus.jsonl:1: field '_id': missing"),
    ("queries.jsonl", b'{"_id": "q1", "text": "  "}\n', "queries.jsonl:1: field 'text': empty"),
    ("qrels/dev.tsv", b"query-id\tcorpus-id\tscore\nq1\tnope\t1\n", "dev.tsv:2: field 'corpus-id'"),
])
def test_every_malformed_file_is_one_line_exit_2_and_untouched(beir_dir, file, content, expected):
    (beir_dir / file).write_bytes(content)
    snapshot = {p: p.read_bytes() for p in beir_dir.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["data", "describe", str(beir_dir)])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in beir_dir.rglob("*") if p.is_file()} == snapshot


def test_error_text_with_brackets_is_printed_verbatim(tmp_path):
    folder = tmp_path / "odd[data]"
    result = runner.invoke(app, ["data", "describe", str(folder)])
    assert result.exit_code == 2 and "odd[data]" in result.output


def test_eval_pipeline_gives_exactly_the_numbers_of_evaluate_pipeline(beir_dir, tiny_bi_encoder, tiny_cross_encoder,
                                                                      tmp_path):
    from dataclasses import asdict

    from stagewise.data.loaders import load_dataset
    from stagewise.evaluation.runs import _slug, evaluate_pipeline
    from stagewise.search.fusion import Fusion
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker
    from stagewise.search.retrievers import build_first_stage

    folder = tmp_path / "chosen"
    Pipeline(build_first_stage(str(tiny_bi_encoder)), CrossEncoderReranker(str(tiny_cross_encoder)), depth=4,
             fusion=Fusion(0.3, "zscore")).save(folder / "pipeline.yaml")
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--pipeline", str(folder), "--data", str(beir_dir), "--split", "test",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    first, fused, comparison = evaluate_pipeline(load_dataset(str(beir_dir)), "test",
                                                 Pipeline.load(folder / "pipeline.yaml"))
    summary = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in summary["systems"]] == [first.name, fused.name]
    assert fused.name.endswith("@4 fused 0.30 zscore") and summary["systems"][1]["fusion"]["weight"] == 0.3
    assert [s["metrics"] for s in summary["systems"]] == [first.metrics, fused.metrics]
    assert summary["comparisons"] == [json.loads(json.dumps(asdict(comparison)))]
    assert summary["config"]["pipeline_config"]["fusion"] == Fusion(0.3, "zscore").config()
    assert set(json.loads((out / "per_query" / f"{_slug(first.name)}.json").read_text())) == {"q4", "q5"}
    assert f"{comparison.mean_diff:+.4f} vs first stage" in result.output


def test_eval_pipeline_refuses_stage_options_and_a_missing_file(beir_dir, tmp_path):
    (tmp_path / "pipeline.yaml").write_text("first_stage: {type: bm25}\n")
    for extra in (["-f", "bm25"], ["--reranker", "bert-tiny"], ["--depth", "5"]):
        result = runner.invoke(app, ["eval", "--pipeline", str(tmp_path), "--data", str(beir_dir), *extra])
        assert result.exit_code == 2 and "cannot be combined" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["eval", "--pipeline", str(tmp_path / "nope"), "--data", str(beir_dir),
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "cannot read pipeline" in result.output and not (tmp_path / "r").exists()
    result = runner.invoke(app, ["eval", "--pipeline", str(tmp_path), "--data", str(beir_dir), "--out",
                                 str(tmp_path / "bm25")])  # a first stage alone: itself, no comparison
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "bm25" / "results.json").read_text())
    assert [s["name"] for s in summary["systems"]] == ["bm25"] and summary["comparisons"] == []


def test_long_work_shows_our_progress_bars_only(beir_dir, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    """Encoding and scoring run on our rich bars: no sentence-transformers tqdm "Batches" bar among them."""
    result = runner.invoke(app, ["eval", "--data", str(beir_dir), "-f", str(tiny_bi_encoder), "-r",
                                 str(tiny_cross_encoder), "-d", "3", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "encode documents" in result.output  # ours: count, rate, ETA
    assert "Batches" not in result.output and "it/s]" not in result.output, result.output


def test_a_batch_of_pairs_is_scored_on_our_bar(tiny_cross_encoder, capfd):
    from stagewise.search.rerankers import CrossEncoderReranker

    reranker = CrossEncoderReranker(str(tiny_cross_encoder), batch_size=2)
    scores = reranker.score_pairs([("q", f"text {i}") for i in range(7)], batch_job=True)
    assert scores.shape == (7,)
    assert (scores == reranker.score_pairs([("q", f"text {i}") for i in range(7)])).all()  # chunks change nothing
    err = capfd.readouterr().err
    assert "score pairs" in err and "Batches" not in err and "it/s]" not in err, err
