"""Malformed input to every command: one ``error:`` line naming the file, line and field (or the option), exit
code 2, nothing written lost and no half-written run directory or index folder left; and document or user text
never reaches the terminal with its control characters (escape sequences) intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CORPUS, write_beir
from stagewise.cli import app

runner = CliRunner()


def one_line_error(args: list[str], *words: str) -> str:
    """The command fails as a user mistake: exit 2, exactly one line, starting with ``error:``, naming ``words``."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---- 8. data files ------------------------------------------------------------------------------


def _with_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


SURROGATE = json.dumps({"_id": "d1", "title": "Cats", "text": "\ud800 cats purr"})  # the escape "\ud800"


def test_a_lone_surrogate_in_the_corpus_is_refused_when_read_and_leaves_no_index_folder(beir_dir, tmp_path):
    assert "\\ud800" in SURROGATE
    _with_line(beir_dir / "corpus.jsonl", 1, SURROGATE)
    before = snapshot(beir_dir)
    out = tmp_path / "new" / "idx"
    one_line_error(["index", "build", "--pipeline", "bm25", "--corpus", beir_dir, "--out", out],
                   "corpus.jsonl:1:", "field 'text'", "surrogate")
    assert not (tmp_path / "new").exists()  # no folder, no INDEX/.lock
    one_line_error(["eval", "--data", beir_dir, "-f", "bm25", "--out", tmp_path / "run"], "corpus.jsonl:1:", "'text'")
    one_line_error(["data", "describe", beir_dir], "corpus.jsonl:1:")
    assert not (tmp_path / "run").exists() and snapshot(beir_dir) == before


@pytest.mark.parametrize("file,line,record,field", [
    ("corpus.jsonl", 2, {"_id": "d2", "title": "\udfff", "text": "x"}, "title"),
    ("corpus.jsonl", 3, {"_id": "d\ud800", "text": "x"}, "_id"),
    ("queries.jsonl", 2, {"_id": "q2", "text": "animals \ud83d that bark"}, "text"),
])
def test_a_lone_surrogate_anywhere_names_the_file_line_and_field(beir_dir, tmp_path, file, line, record, field):
    _with_line(beir_dir / file, line, json.dumps(record))
    one_line_error(["eval", "--data", beir_dir, "-f", "bm25", "--out", tmp_path / "run"],
                   f"{file}:{line}:", f"field '{field}'", "surrogate")
    assert not (tmp_path / "run").exists()


def test_a_failed_build_removes_the_folder_it_created_and_only_that(beir_dir, tmp_path, monkeypatch):
    import stagewise.serving.index as index_module
    from stagewise.data.loaders import load_corpus
    from stagewise.serving.index import Index, load_pipeline_spec

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_write_docs", broken)
    corpus = load_corpus(beir_dir / "corpus.jsonl")
    with pytest.raises(OSError, match="disk full"):
        Index.build(load_pipeline_spec("bm25"), corpus, tmp_path / "a" / "b" / "idx")
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(OSError, match="disk full"):
        Index.build(load_pipeline_spec("bm25"), corpus, existing)
    assert existing.is_dir()  # the user's own folder stays (a retry may use it)


@pytest.mark.parametrize("score", ["9223372036854775807", "-2147483649", "2147483648"])
def test_relevance_out_of_range_is_refused_with_file_line_field(beir_dir, tmp_path, score):
    """The graded range and its edges: tests/test_data_hardening.py."""
    (beir_dir / "qrels" / "dev.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t{score}\n")
    one_line_error(["eval", "--data", beir_dir, "-f", "bm25", "--out", tmp_path / "run"],
                   "dev.tsv:3:", "field 'score'", "out of range")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("file,record,field,got", [
    ("corpus.jsonl", {"_id": "d1", "title": 0, "text": "Cats purr."}, "title", "int"),
    ("corpus.jsonl", {"_id": "d1", "title": [], "text": "Cats purr."}, "title", "list"),
    ("corpus.jsonl", {"_id": "d1", "title": False, "text": "Cats purr."}, "title", "bool"),
    ("corpus.jsonl", {"_id": "d1", "title": "Cats", "text": 0}, "text", "int"),
    ("corpus.jsonl", {"_id": 1.5, "title": "Cats", "text": "Cats purr."}, "_id", "float"),
    ("corpus.jsonl", {"_id": [], "title": "Cats", "text": "Cats purr."}, "_id", "list"),
    ("queries.jsonl", {"_id": "q1", "text": ["which", "animal"]}, "text", "list"),
    ("queries.jsonl", {"_id": None, "text": "which animal"}, "_id", "NoneType"),
])
def test_non_string_fields_are_refused_not_indexed_as_empty(beir_dir, tmp_path, file, record, field, got):
    _with_line(beir_dir / file, 1, json.dumps(record))
    one_line_error(["data", "describe", beir_dir], f"{file}:1:", f"field '{field}'", f"got {got}")
    if file == "corpus.jsonl":  # index build reads the corpus only
        one_line_error(["index", "build", "--pipeline", "bm25", "--corpus", beir_dir, "--out", tmp_path / "idx"],
                       f"{file}:1:", f"field '{field}'", f"got {got}")
        assert not (tmp_path / "idx").exists()


def test_json_nested_too_deeply_is_a_line_error_not_a_recursion_error(beir_dir):
    with (beir_dir / "corpus.jsonl").open("a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    one_line_error(["data", "describe", beir_dir], "corpus.jsonl:7:", "nested too deeply")


def test_a_null_or_missing_title_is_no_title(tmp_path):
    from stagewise.data.loaders import load_corpus

    root = write_beir(tmp_path / "ds", corpus=[{"_id": "a", "title": None, "text": "x"}, {"_id": "b", "text": "y"}])
    assert [d.title for d in load_corpus(root / "corpus.jsonl").values()] == ["", ""]


@pytest.mark.parametrize("name,content,line,field,words", [
    ("t.csv", "text1,text2,score\na,b,1\nc,d,nan\n", 3, "score", ("finite",)),
    ("t.tsv", "text1\ttext2\tscore\na\tb\tinf\n", 2, "score", ("finite",)),
    ("t.jsonl", '{"text1": "a", "text2": "b", "score": true}\n', 1, "score", ("expected a number",)),
    ("t.jsonl", '{"query": "\\ud800", "positive": "p"}\n', 1, "query", ("surrogate",)),
    ("t.csv", "query,positive\na,b\nc\n", 3, None, ("expected 2 columns",)),
])
def test_bad_rows_in_training_files(beir_dir, tiny_bi_encoder, tmp_path, name, content, line, field, words):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "run"
    one_line_error(["train", "bi", "--model", tiny_bi_encoder, "--data", beir_dir, "--train-file", path,
                    "--dev-split", "", "--out", out], f"{name}:{line}:", *([f"field '{field}'"] if field else []),
                   *words)
    assert not out.exists()


# ---- 8. options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5"])
def test_eval_batch_size_must_be_positive(beir_dir, tmp_path, value):
    one_line_error(["eval", "--data", beir_dir, "-f", "bm25", "--batch-size", value, "--out", tmp_path / "run"],
                   "'--batch-size'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["-1", "0"])
def test_eval_max_queries_must_be_at_least_one(beir_dir, tmp_path, value):
    """-1 evaluated all queries but the last, 0 evaluated all of them."""
    one_line_error(["eval", "--data", beir_dir, "-f", "bm25", "--max-queries", value, "--out", tmp_path / "run"],
                   "'--max-queries'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("max_queries", [0, -1, 1.5, "2", True])
def test_the_python_api_never_slices_queries_with_a_bad_count(beir_dir, max_queries):
    from stagewise.data.loaders import load_beir
    from stagewise.errors import StagewiseError
    from stagewise.evaluation.runs import evaluate, split_queries
    from stagewise.search.retrievers import BM25Retriever

    dataset = load_beir(beir_dir)
    with pytest.raises(StagewiseError, match="max_queries"):
        split_queries(dataset, "dev", max_queries)
    with pytest.raises(StagewiseError, match="max_queries"):
        evaluate(dataset, "dev", [BM25Retriever()], max_queries=max_queries)
    assert len(split_queries(dataset, "dev", 2)[0]) == 2


# every numeric option with an obvious range, out of it: the command never starts (so nothing needs to exist)
BAD_OPTIONS = [
    ["eval", "--depth", "0"], ["eval", "--max-seq-length", "0"], ["eval", "--seed", "-1"], ["eval", "--threads", "0"],
    ["train", "bi", "--epochs", "0"], ["train", "bi", "--epochs", "nan"], ["train", "bi", "--batch-size", "0"],
    ["train", "bi", "--lr", "-1e-5"], ["train", "bi", "--num-negatives", "0"], ["train", "bi", "--range-min", "-1"],
    ["train", "bi", "--range-max", "0"], ["train", "bi", "--relative-margin", "1.5"],
    ["train", "bi", "--max-seq-length", "0"], ["train", "bi", "--eval-steps", "0"], ["train", "bi", "--patience", "-1"],
    ["train", "bi", "--dev-corpus-size", "0"], ["train", "bi", "--seed", "-3"],
    ["train", "cross", "--depth", "0"], ["train", "cross", "--hard-negatives", "-1"],
    ["train", "cross", "--random-negatives", "-1"], ["train", "cross", "--epochs", "-1"],
    ["train", "cross", "--batch-size", "0"], ["train", "cross", "--lr", "0"], ["train", "cross", "--max-length", "0"],
    ["train", "cross", "--pretrain-epochs", "0"], ["train", "cross", "--pretrain-skip", "-1"],
    ["train", "cross", "--pretrain-minutes", "0"], ["train", "cross", "--eval-steps", "0"],
    ["train", "cross", "--patience", "-1"], ["train", "cross", "--seed", "4294967296"],
    ["train", "cross", "--max-train-queries", "0"], ["train", "cross", "--dev-sample", "0"],
    ["select", "--depth", "0"], ["select", "--latency-budget-ms", "0"], ["select", "--time-budget", "-1"],
    ["select", "--max-dev-queries", "0"],
    ["export", "m", "--backend", "onnx", "--out", "o", "--min-cosine", "1.5"],
    ["export", "m", "--backend", "onnx", "--out", "o", "--min-correlation", "-2"],
    ["export", "m", "--backend", "onnx", "--out", "o", "--min-top10", "nan"],
    ["export", "m", "--backend", "onnx", "--out", "o", "--threads", "0"],
    ["search", "idx", "q", "--k", "0"], ["search", "idx", "q", "--depth", "0"],
    ["search", "idx", "q", "--threads", "-1"],
    ["index", "add", "idx", "docs.jsonl", "--threads", "0"],
]


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=lambda a: " ".join(a))
def test_every_numeric_option_out_of_range_is_one_line_naming_it(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    option = next(a for a in args if a.startswith("--") and a not in ("--backend", "--out"))
    one_line_error(args, f"'{option}'")
    assert list(tmp_path.iterdir()) == []  # no run directory, no index, no export


def test_usage_mistakes_are_one_line_too():
    one_line_error(["eval", "--no-such-option"], "--no-such-option")
    one_line_error(["no-such-command"], "no-such-command")
    one_line_error(["search", "idx", "q", "--k", "many"], "'--k'")


@pytest.mark.parametrize("command", ["eval", "index build", "search"])
def test_a_pipeline_yaml_with_a_bad_depth_names_the_file_and_field(command, beir_dir, tmp_path):
    from stagewise.serving.index import Index, load_pipeline_spec

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("first_stage: {type: bm25}\ndepth: zero\n")
    if command == "eval":
        args = ["eval", "--data", beir_dir, "--pipeline", pipeline, "--out", tmp_path / "run"]
    elif command == "index build":
        args = ["index", "build", "--pipeline", pipeline, "--corpus", beir_dir, "--out", tmp_path / "run"]
    else:
        Index.build(load_pipeline_spec("bm25"), beir_dir / "corpus.jsonl", tmp_path / "idx")
        args = ["search", tmp_path / "idx", "cats", "--pipeline", pipeline]
    one_line_error(args, "pipeline.yaml", "field 'depth'", "'zero'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content,words", [
    ("first_stage: [1, 2]\n", ("field 'first_stage'",)),
    ("first_stage: {type: dense}\n", ("field 'first_stage'", "'model'")),
    ("first_stage: {type: hybrid, stages: bm25}\n", ("field 'first_stage'", "'stages'")),
    ("first_stage: {type: bm25, k1: fast}\n", ("field 'first_stage'", "'k1'")),
    ("first_stage: 'bm25+'\n", ("'bm25+'",)),
])
def test_a_pipeline_yaml_with_a_malformed_first_stage(beir_dir, tmp_path, content, words):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(content)
    one_line_error(["eval", "--data", beir_dir, "--pipeline", pipeline, "--out", tmp_path / "run"], *words)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def bm25_idx(beir_dir, tmp_path) -> Path:
    from stagewise.serving.index import Index, load_pipeline_spec

    return Index.build(load_pipeline_spec("bm25"), beir_dir / "corpus.jsonl", tmp_path / "idx").path


def test_ids_file_that_is_not_utf8_names_the_file_and_line(bm25_idx, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"d1\nd2\n\xff\xfe\n")
    before = snapshot(bm25_idx)
    one_line_error(["index", "delete", bm25_idx, "--ids-file", ids], "ids.txt:3:", "UTF-8")
    assert snapshot(bm25_idx) == before


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_index_build_out_where_no_folder_can_be(beir_dir, tmp_path, where):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me")
    out = blocker / "idx" if where == "under a file" else blocker
    one_line_error(["index", "build", "--pipeline", "bm25", "--corpus", beir_dir, "--out", out], str(out))
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("command", ["eval", "export"])
def test_out_under_a_file_is_one_line(command, beir_dir, tiny_bi_encoder, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me")
    if command == "eval":
        args = ["eval", "--data", beir_dir, "-f", "bm25", "--out", blocker / "run"]
    else:
        args = ["export", tiny_bi_encoder, "--backend", "onnx", "--out", blocker / "onnx"]
    one_line_error(args, "somefile")
    assert blocker.read_text() == "keep me"


def test_a_run_directory_with_a_corrupted_config_is_one_line(beir_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes(b"\xff{not json")
    one_line_error(["eval", "--data", beir_dir, "-f", "bm25", "--out", run], "config.json")
    assert (run / "config.json").read_bytes() == b"\xff{not json"


@pytest.mark.parametrize("content,words", [
    ("finetune_top: two\n", ("field 'finetune_top'", "'two'")),
    ("bm25: 3\n", ("field 'bm25'",)),
    ("latency_queries: many\n", ("field 'latency_queries'",)),
    ("backend_max_loss: small\n", ("field 'backend_max_loss'",)),
    ("depths: [5, ten]\n", ("field 'depths'",)),
    ("bi_encoders: [3]\n", ("field 'bi_encoders'",)),
    ("time_budget_min: 0\n", ("field 'time_budget_min'",)),
    ("alpha: 0\n", ("field 'alpha'",)),
    ("min_gain: .inf\n", ("field 'min_gain'",)),
    ("bi_training: {epochs: one}\n", ("field 'bi_training'", "'epochs'")),
    ("cross_training: {batch_size: 0}\n", ("field 'cross_training'", "'batch_size'")),
    ("cross_training: {dev_sample: 0}\n", ("field 'cross_training'", "'dev_sample'")),
    ("batch_precision: fast\n", ("field 'batch_precision'", "'fast'")),
    ("train_precision: half\n", ("field 'train_precision'", "'half'")),
    ("- a list\n", ("expected a mapping",)),
])
def test_select_settings_of_the_wrong_type_or_range(content, words, tmp_path):
    config = tmp_path / "select.yaml"
    config.write_text(content)
    one_line_error(["select", "--config", config, "--out", tmp_path / "run"], "select.yaml", *words)
    assert not (tmp_path / "run").exists()


def test_a_binary_select_file_names_its_line(tmp_path):
    config = tmp_path / "select.yaml"
    config.write_bytes(b"data: default\n\xff\xfe\n")
    one_line_error(["select", "--config", config, "--out", tmp_path / "run"], "select.yaml:2:", "UTF-8")


def test_empty_data_name_and_folders_for_files(beir_dir, tmp_path):
    one_line_error(["data", "describe", ""], "no dataset named")
    (beir_dir / "corpus.jsonl").unlink()
    (beir_dir / "corpus.jsonl").mkdir()
    one_line_error(["data", "describe", beir_dir], "corpus.jsonl", "folder")


# ---- 9. terminal escape injection -------------------------------------------------------------------

ESCAPES = "\x1b[31mred\x1b]0;owned\x07\x9b2J\u202e"


def test_printable_makes_control_characters_visible():
    from stagewise.progress import printable

    assert printable(ESCAPES) == "\\x1b[31mred\\x1b]0;owned\\x07\\x9b2J\\u202e"
    assert printable("a\tb\nc\r") == "a b c " and printable("née 中文 ✓") == "née 中文 ✓"


def _raw_controls(text: str) -> list[str]:
    return [c for c in text if (ord(c) < 32 and c not in "\n") or 0x7f <= ord(c) < 0xa0 or c == "\u202e"]


def test_search_shows_escape_sequences_in_documents_as_text_but_json_keeps_them(tmp_path):
    from stagewise.serving.index import Index, load_pipeline_spec

    corpus = [{**CORPUS[0], "_id": "d\x1b[1m1", "title": f"Cats {ESCAPES}"}] + CORPUS[1:]
    root = write_beir(tmp_path / "ds", corpus=corpus, qrels={"dev": [("q1", "d2", 1)]})
    Index.build(load_pipeline_spec("bm25"), root / "corpus.jsonl", tmp_path / "idx")
    result = runner.invoke(app, ["search", str(tmp_path / "idx"), "small mammals that purr", "--k", "2"])
    assert result.exit_code == 0, result.output
    assert _raw_controls(result.output) == [] and "\\x1b]0;owned\\x07" in result.output.replace("\n", "")
    result = runner.invoke(app, ["search", str(tmp_path / "idx"), "small mammals that purr", "--k", "1", "--json"])
    hit = json.loads(result.stdout)[0]
    assert hit["title"] == f"Cats {ESCAPES}" and hit["doc_id"] == "d\x1b[1m1"


def test_describe_info_and_errors_never_print_raw_control_characters(tmp_path):
    from stagewise.serving.index import Index, load_pipeline_spec

    root = write_beir(tmp_path / "data\x1b[2J")
    result = runner.invoke(app, ["data", "describe", str(root)])
    assert result.exit_code == 0 and _raw_controls(result.output) == [] and "\\x1b[2J" in result.output
    Index.build(load_pipeline_spec("bm25"), root / "corpus.jsonl", tmp_path / "idx\x1b]0;t\x07")
    result = runner.invoke(app, ["index", "info", str(tmp_path / "idx\x1b]0;t\x07")])
    assert result.exit_code == 0 and _raw_controls(result.output) == [] and "\\x1b]0;t\\x07" in result.output
    line = one_line_error(["index", "delete", str(tmp_path / "idx\x1b]0;t\x07"), "no\x1b[31mpe"], "not in the index")
    assert _raw_controls(line) == [] and "no\\x1b[31mpe" in line
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"_id": "q\\u001b[5m1", "text": "x"}\n{"_id": "q\\u001b[5m1", "text": "y"}\n')
    one_line_error(["index", "add", str(tmp_path / "idx\x1b]0;t\x07"), str(bad)], "q.jsonl:2:", "q\\x1b[5m1")


def test_select_example_hits_go_through_the_same_helper():
    """select's table, verdict and example hits print through ``printable`` (select itself runs for minutes)."""
    import inspect

    from stagewise.cli import selection as cli
    source = inspect.getsource(cli.select_command)
    assert source.count("printable(") >= 4


# ---- issue 20: every option bounded by what the code can serve; no empty paths ----------------------------------


def _commands(typer_app=None, prefix=()):
    """Every command: its words on the command line and its function (from the app itself, so none is missed)."""
    from stagewise.cli import main as cli
    typer_app = typer_app or cli.app
    for info in typer_app.registered_commands:
        yield [*prefix, info.name], info.callback
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance, [*prefix, group.name])


def _params(callback):
    """``(name, annotation without Optional/List, OptionInfo or ArgumentInfo)`` for each of a command's parameters."""
    import inspect
    import typing

    hints = typing.get_type_hints(callback)
    for name, info in ((n, p.default) for n, p in inspect.signature(callback).parameters.items()):
        hint = hints[name]
        while typing.get_args(hint):  # Optional[X], List[X] -> X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        yield name, hint, info


# what each command needs besides the option under test; nothing in them has to exist, since every check under
# test runs before anything is read
REQUIRED = {"compare": ["a.json", "b.json"], "export": ["model", "--backend", "onnx", "--out", "exported"],
            "search": ["idx", "query"], "serve": ["idx"], "data describe": ["default"],
            "index build": ["-p", "bm25", "-c", "default", "-o", "idx"], "index add": ["idx", "docs.jsonl"],
            "index delete": ["idx", "d1"], "index info": ["idx"]}
def _numeric_options():
    for words, callback in _commands():
        for name, hint, info in _params(callback):
            if hint in (int, float) and getattr(info, "param_decls", None):
                yield pytest.param(words, info.param_decls[0], hint, id=f"{' '.join(words)} {info.param_decls[0]}")


@pytest.mark.parametrize("words, option, kind", list(_numeric_options()))
def test_every_numeric_option_has_a_bound_the_code_can_serve(words, option, kind, tmp_path, monkeypatch):
    """Issue 20.5: `--threads 100000000000`, `--connectivity 1000000000`, `--epochs inf`, `--max-length 1000000000`
    were tracebacks (some after the run folder existed). Far past any bound, every numeric option of every command
    is one line naming it, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    args = [*words, *REQUIRED.get(" ".join(words), [])]
    for value in (["1" + "0" * 30] if kind is int else ["inf", "1e300"]):
        one_line_error([*args, option, value], f"'{option}'")
    assert list(tmp_path.iterdir()) == []


def _path_parameters():
    """Every parameter that names a file or folder: a ``Path``, or a text parsed as a path (cli.TEXT_PATH)."""
    from pathlib import Path as P

    from stagewise.cli import options as cli
    for words, callback in _commands():
        for name, hint, info in _params(callback):
            if hint is P or getattr(info, "parser", None) is getattr(cli, "TEXT_PATH", P):
                yield pytest.param(words, name, info, id=f"{' '.join(words)} {name}")


@pytest.mark.parametrize("words, name, info", list(_path_parameters()))
@pytest.mark.parametrize("empty", ["", "  "])
def test_every_path_refuses_an_empty_value(words, name, info, empty, tmp_path, monkeypatch):
    """Issue 20.6: `eval --out ""` wrote config.json, results.json, log.txt, per_query/ and runs/ into the working
    directory (Path("") is "."). Every option or argument that names a file or folder refuses it, naming it."""
    import typer

    monkeypatch.chdir(tmp_path)
    base = REQUIRED.get(" ".join(words), [])
    if isinstance(info, typer.models.ArgumentInfo):  # a positional one: the empty value in its place
        callback = next(c for w, c in _commands() if w == words)
        positions = [n for n, _, i in _params(callback) if isinstance(i, typer.models.ArgumentInfo)]
        args = list(base)
        args[positions.index(name)] = empty
        label = f"'{info.metavar or name}'"
    else:
        args, label = [*base, info.param_decls[0], empty], f"'{info.param_decls[0]}'"
    one_line_error([*words, *args], label, "empty path")
    assert list(tmp_path.iterdir()) == []


def test_eval_out_empty_writes_nothing_into_the_working_directory(beir_dir, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    one_line_error(["eval", "--data", beir_dir, "-f", "bm25", "--out", ""], "'--out'", "empty path")
    assert list((tmp_path / "cwd").iterdir()) == []


def test_bounds_refuse_before_the_previous_index_is_touched(bm25_idx, beir_dir, tmp_path):
    """The previous index answers as it was: its files hash the same after each refusal."""
    import hashlib

    def digest() -> str:
        return hashlib.sha256(b"".join(p.as_posix().encode() + p.read_bytes() for p in sorted(bm25_idx.rglob("*"))
                                       if p.is_file())).hexdigest()

    before = digest()
    build = ["index", "build", "-p", "bm25", "-c", beir_dir, "-o", bm25_idx, "--replace"]
    one_line_error([*build, "--kind", "hnsw", "--connectivity", "1000000000"], "'--connectivity'", "at most 256")
    one_line_error([*build, "--kind", "hnsw", "--connectivity", "1"], "'--connectivity'", "at least 2")
    one_line_error([*build, "--threads", "100000000000"], "'--threads'")
    one_line_error(["index", "add", bm25_idx, beir_dir / "corpus.jsonl", "--threads", "100000000000"], "'--threads'")
    one_line_error(["index", "add", bm25_idx, ""], "'documents'", "empty path")
    one_line_error(["search", bm25_idx, "cats", "-k", "100000000000"], "'--k'")
    assert digest() == before


def test_training_options_past_their_bound_leave_no_run_folder(tmp_path):
    """`train cross --epochs inf` and `--max-length 1000000000` failed after the run folder was made."""
    for option, value in (("--epochs", "inf"), ("--max-length", "1000000000"), ("--pretrain-epochs", "inf"),
                          ("--lr", "inf")):
        one_line_error(["train", "cross", option, value, "--out", tmp_path / "run"], f"'{option}'")
    one_line_error(["train", "bi", "--max-seq-length", "1000000000", "--out", tmp_path / "run"], "'--max-seq-length'")
    assert not (tmp_path / "run").exists()


def test_a_static_embedding_model_is_no_reranker(beir_dir, tmp_path):
    """Issue 20.5: `eval -r static-64` was a traceback from transformers (no model_type to load)."""
    from stagewise.models.specs import installed_aliases

    if "static-64" not in installed_aliases():
        pytest.skip("static-64 is not installed")
    one_line_error(["eval", "--data", beir_dir, "-f", "bm25", "-r", "static-64", "--out", tmp_path / "run"],
                   "'static-64'", "static embedding model")
    # nor a cross-encoder to train: refused before the run folder (and before the warning about bi-encoder starts)
    one_line_error(["train", "cross", "--model", "static-64", "--out", tmp_path / "run"], "'static-64'",
                   "static embedding model")
    assert not (tmp_path / "run").exists()


def test_a_length_past_what_the_model_takes_is_held_to_its_limit(tiny_bi_encoder, tiny_cross_encoder):
    """Within the options' bound, a length the model cannot take (the tiny models have 128 positions) is held to
    what it takes: a long text is truncated there instead of failing inside the model."""
    from stagewise.models.specs import load_bi_encoder, load_cross_encoder

    bi = load_bi_encoder(str(tiny_bi_encoder), max_seq_length=20_000)
    cross = load_cross_encoder(str(tiny_cross_encoder), max_length=20_000)
    long_text = " ".join(["cats purr"] * 400)
    assert bi.encode([long_text]).shape == (1, 32)  # was an IndexError in the position embeddings
    assert len(cross.predict([("cats", long_text)])) == 1
    assert bi.max_seq_length == 128 and cross.max_length == 128
