"""Issue 20, items 1, 4, 5 (long numbers) and 11: inputs that were accepted and then broke evaluation or indexing,
and run folders that blocked their own command. Each refusal is one ``error:`` line naming the file, line and
field (or the option), exit code 2, nothing written, and an existing index left byte for byte as it was."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_inputs import one_line_error, snapshot
from typer.testing import CliRunner

from conftest import QRELS, write_beir
from stagewise.cli import app
from stagewise.data.loaders import RELEVANCE_MAX, RELEVANCE_MIN, load_beir
from stagewise.errors import DataError
from stagewise.rundir import UNFINISHED, RunDir

runner = CliRunner()
ZERO_WIDTH = "\u200b\u200c\u2060\ufeff"  # zero-width space, non-joiner, word joiner, BOM: nothing to see or search


def _with_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _eval(data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--data", str(data), "-f", "bm25", "--out", str(out), *extra]


@pytest.fixture
def bm25_idx(beir_dir, tmp_path) -> Path:
    from stagewise.serving.index import Index, load_pipeline_spec

    return Index.build(load_pipeline_spec("bm25"), beir_dir / "corpus.jsonl", tmp_path / "idx").path


# ---- 1. relevance values trec_eval cannot evaluate in bounded memory ------------------------------------------


@pytest.mark.parametrize("score", ["100000000", "2147483647", "-2147483647", str(RELEVANCE_MAX + 1),
                                   str(RELEVANCE_MIN - 1), "9" * 5000])
def test_relevance_outside_the_graded_range_is_one_line_naming_file_line_field(beir_dir, tmp_path, score):
    """10**8 made pytrec_eval allocate 0.8 GB, 2**31 - 1 over 16 GB; -2147483647 crashed eval (exit 139)."""
    (beir_dir / "qrels" / "dev.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t{score}\n")
    before = snapshot(beir_dir)
    # describe only loads: on a loader that accepts the value, this fails without evaluating it
    line = one_line_error(["data", "describe", beir_dir], "dev.tsv:3:", "field 'score'", "out of range",
                          f"{RELEVANCE_MIN} to {RELEVANCE_MAX}")
    assert len(line) < 400  # a 5,000-digit value is not echoed whole
    one_line_error(_eval(beir_dir, tmp_path / "run"), "dev.tsv:3:", "field 'score'", "out of range")
    assert not (tmp_path / "run").exists() and snapshot(beir_dir) == before


@pytest.mark.parametrize("score", ["1_0", "1e1", "0x1", "\u0661", "1.5", "- 1", "++1"])
def test_relevance_is_plain_digits_not_everything_int_or_float_accepts(tmp_path, score):
    """``1_0`` was read as 10 (int() and float() accept underscores), ``1e1`` as 10, an Arabic-Indic one as 1."""
    root = write_beir(tmp_path / "ds", qrels={"dev": [("q1", "d1", 1), ("q2", "d2", score)]})
    with pytest.raises(DataError) as info:
        load_beir(root)
    assert info.value.line == 3 and info.value.field == "score" and "expected an integer relevance" in str(info.value)


@pytest.mark.parametrize("score,rel", [("0", 0), ("1", 1), ("2", 2), ("+2", 2), ("02", 2), ("1.0", 1), ("3.", 3),
                                       ("-1", -1), ("-2", -2), (str(RELEVANCE_MAX), RELEVANCE_MAX),
                                       (str(RELEVANCE_MIN), RELEVANCE_MIN)])
def test_graded_relevance_and_trec_negative_grades_are_read_as_before(tmp_path, score, rel):
    root = write_beir(tmp_path / "ds", qrels={"dev": [("q1", "d1", 1), ("q2", "d2", score)]})
    assert load_beir(root).qrels["dev"]["q2"]["d2"] == rel


_METRICS = """
import json, sys
from stagewise.evaluation.metrics import compute_metrics, run_from_rankings
run = run_from_rankings({"q1": ["d1", "d2", "d3"], "q2": ["d2", "d1"]})
print(json.dumps([compute_metrics({"q1": {"d1": 1}, "q2": {"d2": rel}}, run)[1] for rel in json.loads(sys.argv[1])]))
"""


def test_a_query_judged_only_below_minus_one_is_evaluated_as_not_relevant_without_crashing():
    """pytrec_eval segfaulted (exit 139) on a retrieved document judged -2 or lower when that query had nothing higher:
    trec_eval reads every negative grade as "not relevant", and so do the metrics now. In a subprocess: a crash
    must fail this test, not end the test session."""
    grades = [-2, -5, RELEVANCE_MIN, -2147483647, -1, 0]
    done = subprocess.run([sys.executable, "-c", _METRICS, json.dumps(grades)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    per_query = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(p == per_query[-1] for p in per_query)  # every negative grade scores as 0 does
    assert per_query[-1]["q2"]["ndcg@10"] == 0.0 and per_query[-1]["q1"]["ndcg@10"] == 1.0


def test_eval_of_a_query_judged_only_as_trec_junk_runs_and_finishes(tmp_path):
    """TREC's -2 (junk) as a query's only judgement crashed eval (exit 139). In a subprocess, as above."""
    qrels = {"dev": [("q1", "d1", 1), ("q2", "d2", -2), ("q3", "d4", 1)], "test": QRELS["test"]}
    root = write_beir(tmp_path / "ds", qrels=qrels)
    done = subprocess.run([sys.executable, "-c", "import sys; from stagewise.cli import app; app(sys.argv[1:])",
                           *_eval(root, tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert (tmp_path / "run" / "result.json").is_file() and not (tmp_path / "run" / UNFINISHED).exists()


# ---- 4. blank judged queries, zero-width documents, run folders that block their own command ------------------


def test_a_judged_query_of_zero_width_characters_is_refused_when_loading(beir_dir, tmp_path):
    """It broke eval mid-run with a message naming no file, and left a run folder."""
    _with_line(beir_dir / "queries.jsonl", 2, json.dumps({"_id": "q2", "text": ZERO_WIDTH}))
    before = snapshot(beir_dir)
    one_line_error(_eval(beir_dir, tmp_path / "run"), "queries.jsonl:2:", "field 'text'", "empty", "invisible")
    one_line_error(["data", "describe", beir_dir], "queries.jsonl:2:", "field 'text'")
    assert not (tmp_path / "run").exists() and snapshot(beir_dir) == before


@pytest.mark.parametrize("record", [{"_id": "d9", "text": ZERO_WIDTH},
                                    {"_id": "d9", "title": "\u200b", "text": " \u2060 "}])
def test_a_document_of_zero_width_characters_is_refused_like_an_empty_one(beir_dir, bm25_idx, tmp_path, record):
    """It was indexed; an empty document is refused. An existing index stays byte for byte as it was."""
    docs = tmp_path / "more.jsonl"
    docs.write_text(json.dumps({"_id": "d8", "text": "Owls hunt at night."}) + "\n" + json.dumps(record) + "\n")
    before = snapshot(bm25_idx)
    one_line_error(["index", "add", bm25_idx, docs], "more.jsonl:2:", "field 'text'", "empty (and no title)")
    assert snapshot(bm25_idx) == before
    one_line_error(["index", "build", "--pipeline", "bm25", "--corpus", docs, "--out", tmp_path / "new"],
                   "more.jsonl:2:", "field 'text'")
    assert not (tmp_path / "new").exists()


def test_the_python_api_refuses_a_blank_document_and_an_index_holding_one_still_loads(tmp_path, monkeypatch):
    """Index.build and add refuse a blank document as the file loader does (an empty one used to be written and
    then fail the build's own read-back); an index that earlier builds wrote with a zero-width document loads."""
    from stagewise.data.loaders import Document
    from stagewise.errors import StagewiseError
    from stagewise.serving import index as index_module
    from stagewise.serving.index import Index, load_pipeline_spec

    owls = Document("d1", "", "Owls hunt at night.")
    for blank in (Document("d9", "", ""), Document("d9", "\u200b", ZERO_WIDTH)):
        with pytest.raises(StagewiseError, match="document 'd9': empty"):
            Index.build(load_pipeline_spec("bm25"), {"d1": owls, "d9": blank}, tmp_path / "new")
        assert not (tmp_path / "new").exists()
    built = Index.build(load_pipeline_spec("bm25"), {"d1": owls}, tmp_path / "idx")
    before = snapshot(tmp_path / "idx")
    with pytest.raises(StagewiseError, match="document 'd9': empty"):
        built.add([Document("d9", "", ZERO_WIDTH)])
    assert snapshot(tmp_path / "idx") == before
    monkeypatch.setattr(index_module, "is_blank", lambda text: not text)  # as earlier builds checked
    Index.build(load_pipeline_spec("bm25"), {"d1": owls, "d9": Document("d9", "", ZERO_WIDTH)}, tmp_path / "old")
    monkeypatch.undo()
    assert sorted(Index.load(tmp_path / "old").corpus) == ["d1", "d9"]


def test_an_unknown_engine_leaves_no_run_folder(beir_dir, tmp_path):
    out = tmp_path / "run"
    one_line_error(_eval(beir_dir, out, "--engine", "spark"), "spark")
    assert not out.exists()
    result = runner.invoke(app, _eval(beir_dir, out))
    assert result.exit_code == 0, result.output


def test_an_eval_that_failed_mid_run_is_replaced_by_its_rerun(beir_dir, tmp_path, monkeypatch):
    import stagewise.evaluation.runs

    real = stagewise.evaluation.runs.evaluate

    def failing(*args, **kwargs):
        raise RuntimeError("died mid-run")

    out = tmp_path / "run"
    monkeypatch.setattr(stagewise.evaluation.runs, "evaluate", failing)
    assert isinstance(runner.invoke(app, _eval(beir_dir, out)).exception, RuntimeError)
    assert (out / "config.json").is_file() and (out / UNFINISHED).is_file()
    (out / "stale.txt").write_text("from the failed run")
    monkeypatch.setattr(stagewise.evaluation.runs, "evaluate", real)
    result = runner.invoke(app, _eval(beir_dir, out))
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file() and (out / "result.json").is_file()
    assert not (out / UNFINISHED).exists() and not (out / "stale.txt").exists()  # the folder it created: all replaced


_HANG = """
import pathlib, sys, time
import stagewise.evaluation.runs

def hang(*args, **kwargs):
    pathlib.Path(sys.argv[1]).write_text("running")
    time.sleep(600)

stagewise.evaluation.runs.evaluate = hang
from stagewise.cli import app
app(sys.argv[2:])
"""


def test_a_killed_eval_is_replaced_by_its_rerun_but_a_running_one_is_left_alone(beir_dir, tmp_path):
    out, flag = tmp_path / "run", tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", _HANG, str(flag), *_eval(beir_dir, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the eval subprocess never started"
            time.sleep(0.2)
        before = snapshot(out)
        one_line_error(_eval(beir_dir, out), str(out), "being written", f"pid {proc.pid}")
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()
    result = runner.invoke(app, _eval(beir_dir, out))
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file() and not (out / UNFINISHED).exists()


def test_a_finished_eval_is_kept_and_its_rerun_does_not_ask_for_a_resume_eval_lacks(beir_dir, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, _eval(beir_dir, out)).exit_code == 0
    before = snapshot(out)
    line = one_line_error(_eval(beir_dir, out), str(out), "already holds a run", "another --out")
    assert "--resume" not in line and snapshot(out) == before


def test_an_unfinished_run_in_a_users_folder_loses_only_the_run_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    RunDir(out, {"command": "eval"}, resumable=False).close()  # never finished
    run = RunDir(out, {"command": "eval", "seed": 1}, resumable=False)
    run.finish({})
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "config.json").read_text())["seed"] == 1
    assert not (out / UNFINISHED).exists()


def test_a_resumable_command_still_resumes_its_unfinished_run_and_nothing_else_replaces_it(tmp_path):
    out = tmp_path / "run"
    RunDir(out, {"command": "train-bi"}).close()  # interrupted
    with pytest.raises(Exception, match="pass --resume"):
        RunDir(out, {"command": "train-bi"})
    with pytest.raises(Exception, match="already holds a run"):  # another command never replaces it
        RunDir(out, {"command": "eval"}, resumable=False)
    run = RunDir(out, {"command": "train-bi"}, resume=True)
    assert (out / UNFINISHED).is_file()
    run.finish({"ok": True})
    assert not (out / UNFINISHED).exists() and (out / "result.json").is_file()


# ---- 5. a number of 5,000 digits in a JSONL field ----------------------------------------------------------------


@pytest.mark.parametrize("file,line,fields,field", [
    ("corpus.jsonl", 2, '"_id": 9{digits}, "text": "x"', "_id"),
    ("corpus.jsonl", 3, '"_id": "d3", "text": 9{digits}', "text"),
    ("corpus.jsonl", 1, '"_id": "d1", "title": -9{digits}, "text": "x"', "title"),
    ("corpus.jsonl", 4, '"_id": "d4", "text": "x", "metadata": {{"n": [1, 9{digits}]}}', "metadata"),
    ("queries.jsonl", 2, '"_id": "q2", "text": 9{digits}', "text"),
])
def test_a_number_of_5000_digits_is_one_line_naming_file_line_field(beir_dir, tmp_path, file, line, fields, field):
    """json.loads raised int()'s ValueError (over 4,300 digits): a traceback."""
    _with_line(beir_dir / file, line, "{" + fields.format(digits="9" * 4999) + "}")
    before = snapshot(beir_dir)
    one_line_error(["data", "describe", beir_dir], f"{file}:{line}:", f"field '{field}'", "digits")
    one_line_error(_eval(beir_dir, tmp_path / "run"), f"{file}:{line}:", f"field '{field}'")
    assert not (tmp_path / "run").exists() and snapshot(beir_dir) == before


def test_a_number_of_5000_digits_in_added_documents_leaves_the_index_untouched(bm25_idx, tmp_path):
    docs = tmp_path / "more.jsonl"
    docs.write_text('{"_id": "d8", "text": "Owls hunt at night."}\n{"_id": "d9", "text": ' + "7" * 5000 + "}\n")
    before = snapshot(bm25_idx)
    one_line_error(["index", "add", bm25_idx, docs], "more.jsonl:2:", "field 'text'", "digits")
    assert snapshot(bm25_idx) == before


# ---- 11. JSON error wording ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,words", [
    ('{"_id": "d1", "text": "unterminated', "Unterminated string starting at column 23"),
    ('{"_id": "d1", "text": "a\tb"}', "Invalid control character at column 25"),
    ('{"_id": "d1", "text" "x"}', "Expecting ':' delimiter at column 22"),
])
def test_json_errors_say_at_column_once(beir_dir, text, words):
    _with_line(beir_dir / "corpus.jsonl", 1, text)
    line = one_line_error(["data", "describe", beir_dir], "corpus.jsonl:1:", words)
    assert "at at" not in line

