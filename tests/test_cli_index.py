"""``index build|add|delete|info``, ``search`` and ``serve`` from the command line: results, and every user
mistake as one line with exit code 2 that leaves the index as it was."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stagewise.cli import app
from stagewise.index import Index

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
