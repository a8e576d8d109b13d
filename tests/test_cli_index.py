"""``index build|add|delete|info``, ``search`` and ``serve`` from the command line: results, and every user
mistake as one line with exit code 2 that leaves the index as it was."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stagewise.cli import app
from stagewise.serving.index import Index

runner = CliRunner()


@pytest.fixture
def built(beir_dir, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"first_stage: {{type: dense, model: {tiny_bi_encoder}}}\n"
                        f"reranker: {{type: cross-encoder, model: {tiny_cross_encoder}}}\ndepth: 3\n")
    out = tmp_path / "idx"
    result = runner.invoke(app, ["index", "build", "--pipeline", str(pipeline), "--corpus", str(beir_dir),
                                 "--out", str(out), "--kind", "hnsw", "-q", "int8"])
    assert result.exit_code == 0, result.output
    return out


def user_error(args: list[str], *words: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output
    return result.output


def test_build_search_info_and_updates(built, tmp_path):
    """The stored pipeline answers with both stages' scores; add and delete make new versions."""
    result = runner.invoke(app, ["search", str(built), "animals that bark", "--k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 3 and all(h["rerank_score"] is not None for h in hits)
    plain = json.loads(runner.invoke(app, ["search", str(built), "animals that bark", "--no-rerank", "--json"]).stdout)
    assert all(h["rerank_score"] is None for h in plain) and [h["first_stage_rank"] for h in plain] == \
        list(range(1, len(plain) + 1))
    info = json.loads(runner.invoke(app, ["index", "info", str(built), "--json"]).stdout)
    assert (info["documents"], info["vectors"], info["version"]) == (6, "hnsw-int8", "v000001")

    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"_id": "d9", "title": "Wolves", "text": "Wolves howl at night."}) + "\n")
    assert runner.invoke(app, ["index", "add", str(built), str(extra)]).exit_code == 0
    ids = tmp_path / "ids.txt"
    ids.write_text("d1\n\nd2\n")
    assert runner.invoke(app, ["index", "delete", str(built), "d3", "--ids-file", str(ids)]).exit_code == 0
    index = Index.load(built)
    assert index.version == "v000003" and sorted(index.corpus) == ["d4", "d5", "d6", "d9"]


def test_build_refuses_bad_options_and_inputs(beir_dir, tiny_bi_encoder, tmp_path):
    out = str(tmp_path / "idx")
    base = ["index", "build", "--pipeline", str(tiny_bi_encoder), "--corpus", str(beir_dir), "--out", out]
    user_error(base + ["--kind", "ivf"], "unknown index kind 'ivf'")
    user_error(base + ["-q", "int4"], "unknown quantization 'int4'")
    user_error(base + ["--rescore", "0"], "rescore must be at least 1")
    user_error(["index", "build", "--pipeline", str(tmp_path / "missing.yaml"), "--corpus", str(beir_dir),
                "--out", out], "missing.yaml", "not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b"}\n')
    user_error(["index", "build", "--pipeline", str(tiny_bi_encoder), "--corpus", str(bad), "--out", out],
               f"{bad}:2", "'text'")
    assert not (tmp_path / "idx").exists() or not any((tmp_path / "idx").iterdir())


def test_updates_refuse_bad_input_and_leave_the_index_as_it_was(built, tmp_path):
    before = Index.load(built).version
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "d9", "text": "fine"}\nnot json\n')
    user_error(["index", "add", str(built), str(bad)], f"{bad}:2", "invalid JSON")
    duplicate = tmp_path / "dup.jsonl"
    duplicate.write_text(json.dumps({"_id": "d1", "text": "again"}) + "\n")
    user_error(["index", "add", str(built), str(duplicate)], "'d1'", "--upsert")
    user_error(["index", "delete", str(built)], "no ids given")
    user_error(["index", "delete", str(built), "--ids-file", str(tmp_path / "nope.txt")], "nope.txt", "cannot read")
    user_error(["index", "delete", str(built), "d404"], "not in the index", "'d404'")
    assert Index.load(built).version == before and len(Index.load(built)) == 6


def test_search_and_serve_refuse_what_is_not_an_index(built, tmp_path):
    user_error(["search", str(tmp_path / "nowhere"), "q"], "no such index")
    (tmp_path / "empty").mkdir()
    user_error(["serve", str(tmp_path / "empty")], "not an index")
    user_error(["index", "info", str(built / "v000001")], "not an index")
    user_error(["search", str(built), "q", "--pipeline", str(tmp_path / "missing.yaml")], "missing.yaml")


# ---- fusion ------------------------------------------------------------------------------------


def write_pipeline(path, bi, cross, extra: str = ""):
    path.write_text(f"first_stage: {{type: dense, model: {bi}}}\n"
                    f"reranker: {{type: cross-encoder, model: {cross}}}\ndepth: 3\n{extra}")
    return path


def test_a_fused_pipeline_is_built_searched_and_shown(beir_dir, tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    """search --json and the table show the fused score the index answers with; index info names the fusion."""
    pipeline = write_pipeline(tmp_path / "fused.yaml", tiny_bi_encoder, tiny_cross_encoder,
                              "fusion: {weight: 0.4, normalization: minmax}\n")
    out = tmp_path / "idx"
    build = runner.invoke(app, ["index", "build", "--pipeline", str(pipeline), "--corpus", str(beir_dir),
                                "--out", str(out)])
    assert build.exit_code == 0, build.output
    assert "reranker weight 0.40" in build.output
    result = runner.invoke(app, ["search", str(out), "animals that bark", "--k", "4", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    want = Index.load(out).search("animals that bark", k=4)
    assert [h["doc_id"] for h in hits] == [w.doc_id for w in want]
    assert [h["fused_score"] is not None for h in hits] == [True, True, True, False]
    assert [h["fused_score"] for h in hits[:3]] == pytest.approx([w.fused_score for w in want[:3]], abs=1e-6)
    assert [h["score"] for h in hits] == pytest.approx([w.score for w in want], abs=1e-6)
    assert [h["rerank_score"] for h in hits[:3]] == pytest.approx([w.rerank_score for w in want[:3]], abs=1e-6)
    table = runner.invoke(app, ["search", str(out), "animals that bark", "--k", "4"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "fused 0.40" in table.output and "fused" in table.output.split("title / text")[0].split("\n")[-1]
    for h in hits[:3]:
        assert f"{h['fused_score']:.4f}" in table.output
    plain = runner.invoke(app, ["search", str(out), "animals that bark", "--no-rerank"], env={"COLUMNS": "200"})
    assert plain.exit_code == 0 and "fused" not in plain.output  # no fusion column without reranking


@pytest.mark.parametrize("extra, words", [
    ("fusion: {weight: 2}\n", ["field 'fusion'", "weight"]),
    ("fusion: {weight: 0.5, blend: sum}\n", ["field 'fusion'", "unknown key 'blend'"]),
    ("fusion: [0.5]\n", ["field 'fusion'", "mapping"]),
    ("depth: zero\n", ["field 'depth'", "'zero'"]),
], ids=["weight-2", "unknown-key", "not-a-mapping", "depth-zero"])
def test_a_bad_pipeline_file_is_one_line_naming_the_field(built, beir_dir, tiny_bi_encoder, tiny_cross_encoder,
                                                          tmp_path, extra, words):
    bad = write_pipeline(tmp_path / "bad.yaml", tiny_bi_encoder, tiny_cross_encoder, extra)
    if extra.startswith("depth"):
        bad.write_text(bad.read_text().replace("depth: 3\n", ""))
    for args in (["search", str(built), "cats", "--pipeline", str(bad)],
                 ["index", "build", "--pipeline", str(bad), "--corpus", str(beir_dir), "--out", str(tmp_path / "new")]):
        output = user_error(args, "bad.yaml", *words)
        assert len([line for line in output.splitlines() if line.strip()]) == 1, output
    assert not (tmp_path / "new").exists()


def test_search_prints_its_results_on_stdout(tmp_path):
    """Issue 20.11: the table went to stderr with the progress, so `stagewise search … > hits.txt` kept nothing."""
    from conftest import write_beir
    from stagewise.serving.index import load_pipeline_spec

    Index.build(load_pipeline_spec("bm25"), write_beir(tmp_path / "ds") / "corpus.jsonl", tmp_path / "idx")
    result = runner.invoke(app, ["search", str(tmp_path / "idx"), "animals that bark", "--k", "2"])
    assert result.exit_code == 0, result.output
    assert "d2" in result.stdout and "Dogs" in result.stdout and "rank" in result.stdout
    assert "d2" not in result.stderr
    failed = runner.invoke(app, ["search", str(tmp_path / "nowhere"), "q"])  # errors stay on stderr
    assert failed.exit_code == 2 and failed.stdout == "" and "no such index" in failed.stderr


def test_every_command_that_reports_results_prints_them_on_stdout(tmp_path):
    """Results of eval, compare, data describe, models and index info can be piped like search's; progress stays
    on stderr (the results went there with it)."""
    from conftest import write_beir
    from stagewise.serving.index import load_pipeline_spec

    data = write_beir(tmp_path / "ds")
    Index.build(load_pipeline_spec("bm25"), data / "corpus.jsonl", tmp_path / "idx")
    run = tmp_path / "run"
    cases = {("eval", "--data", data, "-f", "bm25", "--out", run): "nDCG@10",
             ("data", "describe", data): "documents", ("models",): "minilm-l6",
             ("index", "info", tmp_path / "idx"): "documents; first stage bm25"}
    for args, word in cases.items():
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert word in result.stdout and word not in result.stderr, (args, result.stdout, result.stderr)
    per_query = run / "per_query" / "bm25.json"
    result = runner.invoke(app, ["compare", str(per_query), str(per_query)])
    assert result.exit_code == 0 and "ndcg@10" in result.stdout and result.stderr == "", result.output
