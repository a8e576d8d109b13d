"""Tests for stagewise.data.loaders: BEIR loading, training examples, describe, and error reporting.

Every error test checks the exact ``path:line:`` prefix, the field name where one applies, and that
the files on disk are byte-for-byte unchanged after the failed load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagewise.data.loaders import (
    Document,
    RetrievalDataset,
    TrainingExamples,
    describe,
    load_beir,
    load_corpus,
    load_dataset,
    load_qrels,
    load_queries,
    load_training_examples,
)
from stagewise.errors import DataError, StagewiseError

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

GOOD_CORPUS = [
    {"_id": "d1", "title": "Python lists", "text": "Lists are mutable sequences."},
    {"_id": "d2", "title": "", "text": "Tuples are immutable sequences of values."},
    {"_id": "d3", "text": "Dictionaries map keys to values."},
    {"_id": "d4", "title": "Sets", "text": "A set holds unique items."},
]
GOOD_QUERIES = [
    {"_id": "q1", "text": "mutable sequence"},
    {"_id": "q2", "text": "immutable sequence"},
    {"_id": "q3", "text": "key value mapping"},
    {"_id": "q4", "text": "unique items"},
]
GOOD_TEST_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\td1\t0\n"
GOOD_TRAIN_QRELS = "q3\td3\t2\n"


def _encode(lines) -> bytes:
    """Lines may be dicts (JSON-encoded), str or bytes; each gets a trailing newline."""
    out = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        if isinstance(line, str):
            line = line.encode("utf-8")
        out += line + b"\n"
    return out


def write_beir(
    root: Path,
    corpus=GOOD_CORPUS,
    queries=GOOD_QUERIES,
    qrels: dict[str, str | bytes] | None = None,
) -> Path:
    """Write a BEIR folder. ``corpus``/``queries`` are lists of lines (dict/str/bytes) or raw bytes;
    ``None`` leaves the file out. ``qrels`` maps split -> file content; ``None`` means the default
    test/train splits, ``{}`` an empty qrels folder."""
    root.mkdir(parents=True, exist_ok=True)
    if corpus is not None:
        (root / "corpus.jsonl").write_bytes(corpus if isinstance(corpus, bytes) else _encode(corpus))
    if queries is not None:
        (root / "queries.jsonl").write_bytes(queries if isinstance(queries, bytes) else _encode(queries))
    if qrels is None:
        qrels = {"test": GOOD_TEST_QRELS, "train": GOOD_TRAIN_QRELS}
    if qrels != "absent":
        (root / "qrels").mkdir(exist_ok=True)
        for split, content in qrels.items():
            data = content if isinstance(content, bytes) else content.encode("utf-8")
            (root / "qrels" / f"{split}.tsv").write_bytes(data)
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (folders as None) with its bytes."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def expect_error(
    call,
    root: Path,
    path: Path | str,
    line: int | None = None,
    field: str | None = None,
    contains: tuple[str, ...] = (),
) -> DataError:
    """Run ``call``; it must raise a DataError for ``path`` (and ``line``/``field``) and leave ``root``
    byte-for-byte unchanged."""
    before = snapshot(root)
    with pytest.raises(DataError) as info:
        call()
    err = info.value
    message = str(err)
    prefix = f"{path}:" if line is None else f"{path}:{line}:"
    # exactly "path: ..." or "path:line: ..." -- no line number where none applies
    assert message.startswith(prefix + " "), f"{message!r} does not start with {prefix + ' '!r}"
    assert err.path == str(path)
    assert err.line == line
    assert err.field == field
    if field is not None:
        assert message.startswith(f"{prefix} field '{field}': "), message
    else:
        assert not message.startswith(f"{prefix} field '"), message
    for part in contains:
        assert part in message, f"{part!r} not in {message!r}"
    assert isinstance(err, StagewiseError)
    assert snapshot(root) == before, "loading changed files on disk"
    return err


def jsonl(path: Path, lines) -> Path:
    path.write_bytes(_encode(lines))
    return path


# --------------------------------------------------------------------------------------------
# DataError formatting
# --------------------------------------------------------------------------------------------


def test_data_error_format_with_line_and_field():
    err = DataError("a/b.jsonl", "missing", line=3, field="_id")
    assert str(err) == "a/b.jsonl:3: field '_id': missing"
    assert (err.path, err.line, err.field, err.message) == ("a/b.jsonl", 3, "_id", "missing")


def test_data_error_format_without_line_or_field():
    assert str(DataError(Path("x.tsv"), "file not found")) == "x.tsv: file not found"
    assert str(DataError("x.tsv", "bad", line=7)) == "x.tsv:7: bad"


# --------------------------------------------------------------------------------------------
# BEIR: good datasets
# --------------------------------------------------------------------------------------------


def test_load_beir_good_dataset(tmp_path):
    root = write_beir(tmp_path / "mini")
    before = snapshot(root)
    ds = load_beir(root)
    assert isinstance(ds, RetrievalDataset)
    assert ds.name == "mini"
    assert ds.source == str(root)
    assert list(ds.corpus) == ["d1", "d2", "d3", "d4"]
    assert ds.corpus["d1"] == Document("d1", "Python lists", "Lists are mutable sequences.")
    assert ds.corpus["d3"] == Document("d3", "", "Dictionaries map keys to values.")
    assert ds.queries == {
        "q1": "mutable sequence",
        "q2": "immutable sequence",
        "q3": "key value mapping",
        "q4": "unique items",
    }
    assert ds.splits == ["test", "train"]
    assert ds.qrels["test"] == {"q1": {"d1": 1}, "q2": {"d2": 1, "d1": 0}}
    assert ds.qrels["train"] == {"q3": {"d3": 2}}
    assert snapshot(root) == before


def test_load_beir_accepts_str_path_and_load_dataset_delegates(tmp_path):
    root = write_beir(tmp_path / "mini")
    assert load_beir(str(root)).corpus == load_beir(root).corpus
    ds = load_dataset(str(root))
    assert ds.name == "mini" and ds.splits == ["test", "train"]


def test_document_full_text():
    assert Document("d", "Title", "body").full_text() == "Title body"
    assert Document("d", "", "body").full_text() == "body"
    assert Document("d", "Only title", "").full_text() == "Only title"


def test_qrels_header_is_optional(tmp_path):
    with_header = load_beir(write_beir(tmp_path / "a", qrels={"test": "query-id\tcorpus-id\tscore\nq1\td1\t1\n"}))
    without = load_beir(write_beir(tmp_path / "b", qrels={"test": "q1\td1\t1\n"}))
    assert with_header.qrels == without.qrels == {"test": {"q1": {"d1": 1}}}


@pytest.mark.parametrize("header", ["query_id\tcorpus_id\tscore", "qid\tdocid\trel", "Query-ID\tcorpus-id\tscore"])
def test_qrels_header_variants(tmp_path, header):
    ds = load_beir(write_beir(tmp_path / "ds", qrels={"test": f"{header}\nq1\td1\t1\n"}))
    assert ds.qrels["test"] == {"q1": {"d1": 1}}


@pytest.mark.parametrize(
    "content",
    [
        "q1 0 d1 1\nq2 0 d2 2\nq2 0 d3 0\n",  # TREC, space separated
        "q1\tQ0\td1\t1\nq2\tQ0\td2\t2\nq2\tQ0\td3\t0\n",  # TREC, tab separated
    ],
)
def test_trec_four_column_qrels(tmp_path, content):
    ds = load_beir(write_beir(tmp_path / "ds", qrels={"dev": content}))
    assert ds.qrels == {"dev": {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}}


def test_space_separated_three_column_qrels(tmp_path):
    ds = load_beir(write_beir(tmp_path / "ds", qrels={"test": "q1 d1 1\n"}))
    assert ds.qrels["test"] == {"q1": {"d1": 1}}


def test_float_integral_score_accepted(tmp_path):
    ds = load_beir(write_beir(tmp_path / "ds", qrels={"test": "q1\td1\t1.0\nq1\td2\t0\n"}))
    assert ds.qrels["test"] == {"q1": {"d1": 1, "d2": 0}}
    assert isinstance(ds.qrels["test"]["q1"]["d1"], int)


def test_utf8_bom_accepted_everywhere(tmp_path):
    bom = b"\xef\xbb\xbf"
    root = write_beir(
        tmp_path / "ds",
        corpus=bom + _encode(GOOD_CORPUS),
        queries=bom + _encode(GOOD_QUERIES),
        qrels={"test": bom + GOOD_TEST_QRELS.encode()},
    )
    ds = load_beir(root)
    plain = load_beir(write_beir(tmp_path / "plain", qrels={"test": GOOD_TEST_QRELS}))
    assert ds.corpus == plain.corpus
    assert ds.queries == plain.queries
    assert ds.qrels == plain.qrels
    assert ds.fingerprint() == plain.fingerprint()


def test_bom_on_headerless_qrels(tmp_path):
    ds = load_beir(write_beir(tmp_path / "ds", qrels={"test": b"\xef\xbb\xbfq1\td1\t1\n"}))
    assert ds.qrels["test"] == {"q1": {"d1": 1}}


def test_blank_lines_and_crlf_are_ignored(tmp_path):
    corpus = b'{"_id": "d1", "text": "one"}\r\n\r\n   \n{"_id": "d2", "text": "two"}\r\n'
    queries = b'\n{"_id": "q1", "text": "first"}\r\n'
    root = write_beir(tmp_path / "ds", corpus=corpus, queries=queries, qrels={"test": "q1\td1\t1\r\n\r\n"})
    ds = load_beir(root)
    assert ds.corpus == {"d1": Document("d1", "", "one"), "d2": Document("d2", "", "two")}
    assert ds.queries == {"q1": "first"}
    assert ds.qrels == {"test": {"q1": {"d1": 1}}}


def test_non_ascii_text_round_trips(tmp_path):
    corpus = [{"_id": "d1", "title": "Über", "text": "naïve café — 東京"}]
    queries = [{"_id": "q1", "text": "café 東京"}]
    ds = load_beir(write_beir(tmp_path / "ds", corpus=corpus, queries=queries, qrels={"t": "q1\td1\t1\n"}))
    assert ds.corpus["d1"].text == "naïve café — 東京"
    assert ds.queries["q1"] == "café 東京"


def test_numeric_ids_become_strings(tmp_path):
    corpus = [{"_id": 1, "text": "one"}, {"_id": 2, "text": "two"}]
    queries = [{"_id": 10, "text": "q"}]
    ds = load_beir(write_beir(tmp_path / "ds", corpus=corpus, queries=queries, qrels={"test": "10\t1\t1\n"}))
    assert list(ds.corpus) == ["1", "2"]
    assert ds.queries == {"10": "q"}
    assert ds.qrels["test"] == {"10": {"1": 1}}


def test_null_title_and_title_only_document(tmp_path):
    corpus = [{"_id": "d1", "title": None, "text": "text"}, {"_id": "d2", "title": "Just a title", "text": ""}]
    ds = load_beir(write_beir(tmp_path / "ds", corpus=corpus, qrels={"test": "q1\td1\t1\n"}))
    assert ds.corpus["d1"] == Document("d1", "", "text")
    assert ds.corpus["d2"] == Document("d2", "Just a title", "")
    assert ds.corpus["d2"].full_text() == "Just a title"


def test_only_tsv_files_are_splits(tmp_path):
    root = write_beir(tmp_path / "ds", qrels={"test": "q1\td1\t1\n"})
    (root / "qrels" / "README.txt").write_text("not a split")
    assert load_beir(root).splits == ["test"]


# --------------------------------------------------------------------------------------------
# RetrievalDataset.split and fingerprint
# --------------------------------------------------------------------------------------------


def test_split_returns_judged_queries_only(tmp_path):
    ds = load_beir(write_beir(tmp_path / "ds"))
    queries, qrels = ds.split("test")
    assert queries == {"q1": "mutable sequence", "q2": "immutable sequence"}
    assert qrels == {"q1": {"d1": 1}, "q2": {"d2": 1, "d1": 0}}
    queries, qrels = ds.split("train")
    assert queries == {"q3": "key value mapping"}
    assert qrels == {"q3": {"d3": 2}}
    assert "q4" not in ds.split("test")[0] and "q4" not in ds.split("train")[0]


def test_split_that_does_not_exist_lists_available(tmp_path):
    root = write_beir(tmp_path / "ds")
    ds = load_beir(root)
    err = expect_error(lambda: ds.split("dev"), root, root, field="split", contains=("'dev'", "available: test, train"))
    assert err.field == "split"


def test_split_on_dataset_without_splits():
    ds = RetrievalDataset("mem", {"d": Document("d", "", "x")}, {"q": "y"}, {})
    with pytest.raises(DataError) as info:
        ds.split("test")
    assert str(info.value) == "mem: field 'split': no split 'test' (available: none)"


def test_split_with_no_queries():
    ds = RetrievalDataset("mem", {"d": Document("d", "", "x")}, {"q": "y"}, {"test": {}}, source="src")
    with pytest.raises(DataError) as info:
        ds.split("test")
    assert str(info.value) == "src: field 'split': split 'test' has no queries"


def test_fingerprint_equal_for_equal_content(tmp_path):
    a = load_beir(write_beir(tmp_path / "a"))
    b = load_beir(write_beir(tmp_path / "elsewhere" / "b"))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() == a.fingerprint()
    assert len(a.fingerprint()) == 16
    int(a.fingerprint(), 16)  # hex


def test_fingerprint_changes_when_one_doc_text_changes(tmp_path):
    changed = [dict(d) for d in GOOD_CORPUS]
    changed[2]["text"] = "Dictionaries map keys to values!"
    a = load_beir(write_beir(tmp_path / "a"))
    b = load_beir(write_beir(tmp_path / "b", corpus=changed))
    assert a.queries == b.queries and a.qrels == b.qrels
    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_changes_with_title_query_and_qrels(tmp_path):
    base = load_beir(write_beir(tmp_path / "base")).fingerprint()
    titled = [dict(d) for d in GOOD_CORPUS]
    titled[0]["title"] = "Python list"
    q = [dict(x) for x in GOOD_QUERIES]
    q[0]["text"] = "mutable sequences"
    variants = [
        write_beir(tmp_path / "title", corpus=titled),
        write_beir(tmp_path / "query", queries=q),
        write_beir(tmp_path / "rel", qrels={"test": GOOD_TEST_QRELS.replace("q1\td1\t1", "q1\td1\t2"), "train": GOOD_TRAIN_QRELS}),
        write_beir(tmp_path / "split", qrels={"test": GOOD_TEST_QRELS, "dev": GOOD_TRAIN_QRELS}),
    ]
    prints = [load_beir(v).fingerprint() for v in variants]
    assert base not in prints
    assert len(set(prints)) == len(prints)


# --------------------------------------------------------------------------------------------
# BEIR: corpus errors
# --------------------------------------------------------------------------------------------


def _corpus_error(tmp_path, corpus_lines, line, field=None, contains=()):
    root = write_beir(tmp_path / "ds", corpus=corpus_lines)
    return expect_error(lambda: load_beir(root), root, root / "corpus.jsonl", line, field, contains)


def test_corpus_invalid_json(tmp_path):
    _corpus_error(
        tmp_path,
        [GOOD_CORPUS[0], '{"_id": "d2", "text": "oops"', GOOD_CORPUS[2]],
        line=2,
        contains=("invalid JSON", "column"),
    )


@pytest.mark.parametrize(
    "line, got",
    [('["d2", "text"]', "list"), ('"just a string"', "str"), ("42", "int"), ("null", "NoneType")],
)
def test_corpus_line_not_an_object(tmp_path, line, got):
    _corpus_error(tmp_path, [GOOD_CORPUS[0], line], line=2, contains=(f"expected a JSON object, got {got}",))


def test_corpus_missing_id(tmp_path):
    _corpus_error(tmp_path, [GOOD_CORPUS[0], GOOD_CORPUS[1], {"text": "no id"}], line=3, field="_id", contains=("missing",))


def test_corpus_missing_text(tmp_path):
    _corpus_error(tmp_path, [GOOD_CORPUS[0], {"_id": "d2", "title": "t"}], line=2, field="text", contains=("missing",))


@pytest.mark.parametrize(
    "record, field, got",
    [
        ({"_id": "d2", "text": 5}, "text", "int"),
        ({"_id": "d2", "text": ["a"]}, "text", "list"),
        ({"_id": "d2", "text": None, "title": "t"}, "text", "NoneType"),
        ({"_id": "d2", "text": "x", "title": 7}, "title", "int"),
        ({"_id": "d2", "text": "x", "title": ["t"]}, "title", "list"),
        ({"_id": True, "text": "x"}, "_id", "bool"),
        ({"_id": ["d2"], "text": "x"}, "_id", "list"),
        ({"_id": None, "text": "x"}, "_id", "NoneType"),
    ],
)
def test_corpus_non_string_field(tmp_path, record, field, got):
    _corpus_error(tmp_path, [GOOD_CORPUS[0], record], line=2, field=field, contains=(f"expected a string, got {got}",))


def test_corpus_duplicate_id_names_first_line(tmp_path):
    lines = [GOOD_CORPUS[0], "", GOOD_CORPUS[1], {"_id": "d1", "text": "again"}]
    err = _corpus_error(tmp_path, lines, line=4, field="_id", contains=("duplicate id 'd1'", "first on line 1"))
    assert err.message == "duplicate id 'd1' (first on line 1)"


def test_corpus_duplicate_numeric_and_string_id(tmp_path):
    _corpus_error(tmp_path, [{"_id": 7, "text": "a"}, {"_id": "7", "text": "b"}], line=2, field="_id", contains=("first on line 1",))


@pytest.mark.parametrize(
    "record",
    [
        {"_id": "d2", "text": ""},
        {"_id": "d2", "text": "", "title": ""},
        {"_id": "d2", "text": "   ", "title": " \t "},
        {"_id": "d2", "text": "\n", "title": None},
    ],
)
def test_corpus_empty_document(tmp_path, record):
    _corpus_error(tmp_path, [GOOD_CORPUS[0], record], line=2, field="text", contains=("empty",))


@pytest.mark.parametrize("doc_id", ["", "   "])
def test_corpus_empty_id(tmp_path, doc_id):
    _corpus_error(tmp_path, [{"_id": doc_id, "text": "x"}], line=1, field="_id", contains=("empty",))


def test_corpus_invalid_utf8(tmp_path):
    lines = [GOOD_CORPUS[0], b'{"_id": "d2", "text": "bad \xff byte"}', GOOD_CORPUS[2]]
    _corpus_error(tmp_path, lines, line=2, contains=("not valid UTF-8", "\\xff"))


def test_corpus_invalid_utf8_on_first_line_after_bom(tmp_path):
    _corpus_error(tmp_path, b"\xef\xbb\xbf\xff\n", line=1, contains=("not valid UTF-8",))


def test_corpus_error_line_counts_blank_lines(tmp_path):
    _corpus_error(tmp_path, [GOOD_CORPUS[0], "", "", {"_id": "d9"}], line=4, field="text")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_corpus_empty_file(tmp_path, content):
    _corpus_error(tmp_path, content, line=None, contains=("corpus is empty",))


def test_missing_corpus_file(tmp_path):
    root = write_beir(tmp_path / "ds", corpus=None)
    expect_error(lambda: load_beir(root), root, root / "corpus.jsonl", contains=("file not found",))


def test_corpus_path_is_a_directory(tmp_path):
    root = write_beir(tmp_path / "ds", corpus=None)
    (root / "corpus.jsonl").mkdir()
    expect_error(lambda: load_beir(root), root, root / "corpus.jsonl", contains=("file not found",))


def test_load_corpus_directly(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", GOOD_CORPUS)
    assert list(load_corpus(path)) == ["d1", "d2", "d3", "d4"]
    assert list(load_corpus(str(path))) == ["d1", "d2", "d3", "d4"]


# --------------------------------------------------------------------------------------------
# BEIR: query errors
# --------------------------------------------------------------------------------------------


def _queries_error(tmp_path, query_lines, line, field=None, contains=()):
    root = write_beir(tmp_path / "ds", queries=query_lines)
    return expect_error(lambda: load_beir(root), root, root / "queries.jsonl", line, field, contains)


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_query_empty_text(tmp_path, text):
    _queries_error(tmp_path, [GOOD_QUERIES[0], {"_id": "q2", "text": text}], line=2, field="text", contains=("empty",))


def test_query_missing_text(tmp_path):
    _queries_error(tmp_path, [GOOD_QUERIES[0], GOOD_QUERIES[1], {"_id": "q3"}], line=3, field="text", contains=("missing",))


def test_query_missing_id(tmp_path):
    _queries_error(tmp_path, [{"text": "no id"}], line=1, field="_id", contains=("missing",))


def test_query_non_string_text(tmp_path):
    _queries_error(tmp_path, [{"_id": "q1", "text": {"a": 1}}], line=1, field="text", contains=("expected a string, got dict",))


def test_query_duplicate_id(tmp_path):
    lines = [GOOD_QUERIES[0], GOOD_QUERIES[1], GOOD_QUERIES[2], {"_id": "q2", "text": "again"}]
    err = _queries_error(tmp_path, lines, line=4, field="_id", contains=("duplicate id 'q2'",))
    assert "first on line 2" in err.message


def test_query_invalid_json(tmp_path):
    _queries_error(tmp_path, [GOOD_QUERIES[0], "{_id: q2}"], line=2, contains=("invalid JSON",))


def test_query_not_an_object(tmp_path):
    _queries_error(tmp_path, ["[1, 2]"], line=1, contains=("expected a JSON object, got list",))


def test_query_invalid_utf8(tmp_path):
    _queries_error(tmp_path, [GOOD_QUERIES[0], GOOD_QUERIES[1], b'{"_id": "q3", "text": "\xff"}'], line=3, contains=("not valid UTF-8",))


def test_queries_empty_file(tmp_path):
    _queries_error(tmp_path, b"", line=None, contains=("no queries",))


def test_missing_queries_file(tmp_path):
    root = write_beir(tmp_path / "ds", queries=None)
    expect_error(lambda: load_beir(root), root, root / "queries.jsonl", contains=("file not found",))


def test_load_queries_directly(tmp_path):
    assert load_queries(jsonl(tmp_path / "q.jsonl", GOOD_QUERIES))["q3"] == "key value mapping"


# --------------------------------------------------------------------------------------------
# BEIR: qrels errors
# --------------------------------------------------------------------------------------------


def _qrels_error(tmp_path, content, line, field=None, contains=(), split="test"):
    root = write_beir(tmp_path / "ds", qrels={"a_ok": "q1\td1\t1\n", split: content})
    return expect_error(lambda: load_beir(root), root, root / "qrels" / f"{split}.tsv", line, field, contains)


def test_qrels_unknown_query_id(tmp_path):
    _qrels_error(
        tmp_path,
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq99\td1\t1\n",
        line=3,
        field="query-id",
        contains=("unknown query id 'q99'", "queries.jsonl"),
    )


def test_qrels_unknown_doc_id(tmp_path):
    _qrels_error(tmp_path, "q1\td1\t1\nq2\td99\t1\n", line=2, field="corpus-id", contains=("unknown document id 'd99'", "corpus.jsonl"))


def test_qrels_unknown_doc_id_trec(tmp_path):
    _qrels_error(tmp_path, "q1 0 d1 1\nq1 0 nope 1\n", line=2, field="corpus-id", contains=("'nope'",))


@pytest.mark.parametrize("score", ["abc", "", "1.5", "0.5", "-0.25", "nan", "inf", "-inf", "1e400"])
def test_qrels_non_integer_score(tmp_path, score):
    _qrels_error(tmp_path, f"q1\td1\t1\nq2\td2\t{score}\n", line=2, field="score", contains=("expected an integer relevance",))


@pytest.mark.parametrize(
    "row, got",
    [
        ("q1\td1", 2),
        ("q1", 1),
        ("q1\td1\t1\textra\tmore", 5),
        ("q1 d1", 2),
    ],
)
def test_qrels_wrong_column_count(tmp_path, row, got):
    _qrels_error(tmp_path, f"q1\td1\t1\n\n{row}\n", line=3, contains=("expected 3 tab-separated columns", f"got {got}"))


def test_qrels_split_with_no_relevant_judgements(tmp_path):
    _qrels_error(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t0\nq2\td2\t0\n", line=None, contains=("no queries with a relevant document",))


@pytest.mark.parametrize("content", ["", "query-id\tcorpus-id\tscore\n", "\n\n", "q1\td1\t-1\n"])
def test_qrels_empty_or_only_non_relevant(tmp_path, content):
    _qrels_error(tmp_path, content, line=None, contains=("no queries with a relevant document",))


def test_qrels_invalid_utf8(tmp_path):
    _qrels_error(tmp_path, b"q1\td1\t1\nq2\td\xff2\t1\n", line=2, contains=("not valid UTF-8",))


def test_qrels_header_only_recognised_on_first_line(tmp_path):
    _qrels_error(tmp_path, "q1\td1\t1\nquery-id\tcorpus-id\tscore\n", line=2, field="query-id", contains=("'query-id'",))


def test_qrels_error_in_second_split_after_a_good_one(tmp_path):
    _qrels_error(tmp_path, "q1\td1\t1\nq1\td1\tx\n", line=2, field="score", split="zz_bad")


def test_missing_qrels_folder(tmp_path):
    root = write_beir(tmp_path / "ds", qrels="absent")
    expect_error(lambda: load_beir(root), root, root / "qrels", contains=("no qrels/<split>.tsv files",))


def test_empty_qrels_folder(tmp_path):
    root = write_beir(tmp_path / "ds", qrels={})
    (root / "qrels" / "test.txt").write_text("q1\td1\t1\n")
    expect_error(lambda: load_beir(root), root, root / "qrels", contains=("no qrels/<split>.tsv files",))


def test_folder_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    expect_error(lambda: load_beir(missing), tmp_path, missing, contains=("dataset folder not found", "corpus.jsonl"))
    assert not missing.exists()


def test_folder_is_a_file(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_bytes(_encode(GOOD_CORPUS))
    expect_error(lambda: load_beir(f), tmp_path, f, contains=("dataset folder not found",))


def test_load_qrels_directly(tmp_path):
    corpus = {"d1": Document("d1", "", "x")}
    path = tmp_path / "q.tsv"
    path.write_text("q1\td1\t3\n")
    assert load_qrels(path, corpus, {"q1": "y"}) == {"q1": {"d1": 3}}
    expect_error(lambda: load_qrels(path, corpus, {}), tmp_path, path, 1, "query-id")
    expect_error(lambda: load_qrels(tmp_path / "none.tsv", corpus, {}), tmp_path, tmp_path / "none.tsv", contains=("file not found",))


# --------------------------------------------------------------------------------------------
# Training examples: good files
# --------------------------------------------------------------------------------------------


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_jsonl_pairs(tmp_path):
    path = jsonl(tmp_path / "pairs.jsonl", [{"query": "q1", "positive": "p1"}, {"query": "q2", "positive": "p2"}])
    ex = load_training_examples(path)
    assert isinstance(ex, TrainingExamples)
    assert ex.kind == "pairs"
    assert list(ex.columns) == ["anchor", "positive"]
    assert ex.columns == {"anchor": ["q1", "q2"], "positive": ["p1", "p2"]}
    assert len(ex) == 2
    assert ex.source == str(path)


@pytest.mark.parametrize(
    "anchor, positive",
    [("anchor", "positive"), ("question", "passage"), ("Query", "Document"), ("QUESTION", "pos")],
)
def test_pair_column_name_variants(tmp_path, anchor, positive):
    path = _write(tmp_path / "p.csv", f"{anchor},{positive}\nhello,world\n")
    ex = load_training_examples(path)
    assert ex.kind == "pairs"
    assert ex.columns == {"anchor": ["hello"], "positive": ["world"]}


def test_csv_pairs_with_quoting_and_extra_columns(tmp_path):
    path = _write(tmp_path / "p.csv", 'id,positive,query\n1,"a, b","say ""hi"""\n\n2,c,d\n')
    ex = load_training_examples(path)
    assert ex.kind == "pairs"
    assert list(ex.columns) == ["anchor", "positive"]
    assert ex.columns == {"anchor": ['say "hi"', "d"], "positive": ["a, b", "c"]}


def test_tsv_pairs(tmp_path):
    path = _write(tmp_path / "p.tsv", "query\tpositive\nwhat is a list\tLists, tuples and sets\nsecond\tdoc two\n")
    ex = load_training_examples(path)
    assert ex.kind == "pairs"
    assert ex.columns == {"anchor": ["what is a list", "second"], "positive": ["Lists, tuples and sets", "doc two"]}


def test_csv_with_bom_and_crlf(tmp_path):
    path = _write(tmp_path / "p.csv", b"\xef\xbb\xbfquery,positive\r\nq,p\r\n")
    ex = load_training_examples(path)
    assert ex.columns == {"anchor": ["q"], "positive": ["p"]}


def test_csv_tuples_with_negative_columns(tmp_path):
    path = _write(tmp_path / "t.csv", "negative_a,query,positive,neg_b\nn1,q1,p1,n2\nn3,q2,p2,n4\n")
    ex = load_training_examples(path)
    assert ex.kind == "tuples"
    assert list(ex.columns) == ["anchor", "positive", "negative_1", "negative_2"]
    assert ex.columns == {
        "anchor": ["q1", "q2"],
        "positive": ["p1", "p2"],
        "negative_1": ["n1", "n3"],
        "negative_2": ["n2", "n4"],
    }


def test_tsv_tuples(tmp_path):
    path = _write(tmp_path / "t.tsv", "anchor\tpositive\tnegative\na\tp\tn\n")
    ex = load_training_examples(path)
    assert ex.kind == "tuples"
    assert ex.columns == {"anchor": ["a"], "positive": ["p"], "negative_1": ["n"]}


def test_jsonl_negatives_list(tmp_path):
    path = jsonl(
        tmp_path / "t.jsonl",
        [
            {"query": "q1", "positive": "p1", "negatives": ["n11", "n12", "n13"]},
            {"query": "q2", "positive": "p2", "negatives": ["n21", "n22", "n23"]},
        ],
    )
    ex = load_training_examples(path)
    assert ex.kind == "tuples"
    assert list(ex.columns) == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert ex.columns["negative_1"] == ["n11", "n21"]
    assert ex.columns["negative_3"] == ["n13", "n23"]
    assert len(ex) == 2


def test_jsonl_negatives_list_capitalised_key(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", [{"Query": "q1", "Positive": "p1", "Negatives": ["n1", "n2"]}])
    ex = load_training_examples(path)
    assert ex.kind == "tuples"
    assert ex.columns == {"anchor": ["q1"], "positive": ["p1"], "negative_1": ["n1"], "negative_2": ["n2"]}


def test_jsonl_empty_negatives_list_is_pairs(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", [{"query": "q1", "positive": "p1", "negatives": []}])
    ex = load_training_examples(path)
    assert ex.kind == "pairs"
    assert ex.columns == {"anchor": ["q1"], "positive": ["p1"]}


def test_csv_column_named_negatives_is_one_negative(tmp_path):
    path = _write(tmp_path / "t.csv", "query,positive,negatives\nq,p,n\n")
    ex = load_training_examples(path)
    assert ex.kind == "tuples"
    assert ex.columns == {"anchor": ["q"], "positive": ["p"], "negative_1": ["n"]}


def test_jsonl_negative_columns(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", [{"anchor": "a", "positive": "p", "negative": "n"}])
    ex = load_training_examples(path)
    assert ex.kind == "tuples"
    assert ex.columns == {"anchor": ["a"], "positive": ["p"], "negative_1": ["n"]}


def test_jsonl_scored_pairs(tmp_path):
    path = jsonl(
        tmp_path / "s.jsonl",
        [{"score": 0.5, "text2": "b", "text1": "a"}, {"text1": "c", "text2": "d", "score": 1}, {"text1": "e", "text2": "f", "score": "0.25"}],
    )
    ex = load_training_examples(path)
    assert ex.kind == "scored"
    assert list(ex.columns) == ["text1", "text2", "score"]
    assert ex.columns == {"text1": ["a", "c", "e"], "text2": ["b", "d", "f"], "score": [0.5, 1.0, 0.25]}
    assert all(isinstance(s, float) for s in ex.columns["score"])


def test_csv_scored_sentence_label_any_order(tmp_path):
    path = _write(tmp_path / "s.csv", "label,sentence2,sentence1\n0.9,second,first\n0,b,a\n")
    ex = load_training_examples(path)
    assert ex.kind == "scored"
    assert list(ex.columns) == ["text1", "text2", "score"]
    assert ex.columns == {"text1": ["first", "a"], "text2": ["second", "b"], "score": [0.9, 0.0]}


def test_tsv_scored(tmp_path):
    path = _write(tmp_path / "s.tsv", "sentence1\tsentence2\tscore\nA man\tA person\t4.5\n")
    ex = load_training_examples(path)
    assert ex.kind == "scored"
    assert ex.columns == {"text1": ["A man"], "text2": ["A person"], "score": [4.5]}


def test_csv_multiline_quoted_cell(tmp_path):
    path = _write(tmp_path / "p.csv", 'query,positive\n"line one\nline two",p1\nq2,p2\n')
    ex = load_training_examples(path)
    assert ex.columns == {"anchor": ["line one\nline two", "q2"], "positive": ["p1", "p2"]}


def test_training_loading_writes_nothing(tmp_path):
    path = _write(tmp_path / "p.csv", "query,positive\nq,p\n")
    before = snapshot(tmp_path)
    load_training_examples(path)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Training examples: errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content",
    [
        ("u.jsonl", '{"foo": "a", "bar": "b"}\n'),
        ("u.csv", "foo,bar\na,b\n"),
        ("u.tsv", "query\tnegative\na\tb\n"),  # anchor but no positive
        ("u2.csv", "text1,text2\na,b\n"),  # scored without a score
    ],
)
def test_training_unknown_layout(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    expect_error(lambda: load_training_examples(path), tmp_path, path, 1, contains=("cannot tell the layout", "(query, positive", "(text1, text2, score)"))


def test_training_unknown_layout_names_columns(tmp_path):
    path = _write(tmp_path / "u.csv", "foo,bar\na,b\n")
    err = expect_error(lambda: load_training_examples(path), tmp_path, path, 1)
    assert "['foo', 'bar']" in err.message


@pytest.mark.parametrize(
    "name, content, line, got",
    [
        ("w.csv", "query,positive\nq1,p1\nq2,p2,extra\n", 3, 3),
        ("w.csv", "query,positive\nq1\n", 2, 1),
        ("w.tsv", "query\tpositive\nq1\tp1\n\nq3\tp3\tx\ty\n", 4, 4),
        ("w.csv", 'query,positive\n"a\nb",p\nq,p,x\n', 4, 3),  # line counting after a multi-line cell
    ],
)
def test_training_row_with_wrong_column_count(tmp_path, name, content, line, got):
    path = _write(tmp_path / name, content)
    expect_error(lambda: load_training_examples(path), tmp_path, path, line, contains=("expected 2 columns like the header", f"got {got}"))


@pytest.mark.parametrize(
    "name, content, line, field",
    [
        ("e.csv", "query,positive\nq1,p1\nq2,\n", 3, "positive"),
        ("e.csv", "query,positive\n  ,p\n", 2, "query"),
        ("e.tsv", "anchor\tpositive\tneg\na\tp\tn\nb\tp\t \n", 3, "neg"),
        ("e.csv", "sentence1,sentence2,score\na,,1\n", 2, "sentence2"),
        ("e.jsonl", '{"query": "q", "positive": "p"}\n{"query": "", "positive": "p"}\n', 2, "query"),
        ("e.jsonl", '{"query": "q", "positive": "p", "negatives": ["n"]}\n{"query": "q", "positive": "p", "negatives": [" "]}\n', 2, "negative_1"),
    ],
)
def test_training_empty_text_cell(tmp_path, name, content, line, field):
    path = _write(tmp_path / name, content)
    expect_error(lambda: load_training_examples(path), tmp_path, path, line, field, contains=("empty",))


@pytest.mark.parametrize(
    "name, content, line, field",
    [
        ("s.csv", "text1,text2,score\na,b,0.5\nc,d,high\n", 3, "score"),
        ("s.csv", "sentence1,sentence2,label\na,b,\n", 2, "label"),
        ("s.tsv", "text1\ttext2\tscore\na\tb\tn/a\n", 2, "score"),
        ("s.jsonl", '{"text1": "a", "text2": "b", "score": null}\n', 1, "score"),
        ("s.jsonl", '{"text1": "a", "text2": "b", "score": 1}\n{"text1": "a", "text2": "b", "score": [1]}\n', 2, "score"),
    ],
)
def test_training_non_numeric_score(tmp_path, name, content, line, field):
    path = _write(tmp_path / name, content)
    expect_error(lambda: load_training_examples(path), tmp_path, path, line, field, contains=("expected a number",))


def test_training_missing_field_on_later_jsonl_line(tmp_path):
    path = jsonl(
        tmp_path / "m.jsonl",
        [{"query": "q1", "positive": "p1"}, {"query": "q2", "positive": "p2"}, {"query": "q3", "passage": "p3"}],
    )
    expect_error(lambda: load_training_examples(path), tmp_path, path, 3, "positive", contains=("missing",))


def test_training_missing_score_on_later_jsonl_line(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"text1": "a", "text2": "b", "score": 1}, {"text1": "a", "text2": "b"}])
    expect_error(lambda: load_training_examples(path), tmp_path, path, 2, "score", contains=("missing",))


def test_training_fewer_negatives_on_later_jsonl_line(tmp_path):
    path = jsonl(
        tmp_path / "n.jsonl",
        [{"query": "q", "positive": "p", "negatives": ["a", "b"]}, {"query": "q", "positive": "p", "negatives": ["a"]}],
    )
    expect_error(lambda: load_training_examples(path), tmp_path, path, 2, "negative_2", contains=("missing",))


def test_training_non_string_text_in_jsonl(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [{"query": "q", "positive": 3}])
    expect_error(lambda: load_training_examples(path), tmp_path, path, 1, "positive", contains=("expected a string, got int",))


@pytest.mark.parametrize("negatives, got", [(5, "int"), (None, "NoneType"), ({"a": 1}, "dict")])
def test_training_negatives_not_a_list(tmp_path, negatives, got):
    path = jsonl(tmp_path / "x.jsonl", [{"query": "q", "positive": "p", "negatives": negatives}])
    expect_error(lambda: load_training_examples(path), tmp_path, path, 1, "negatives", contains=(f"expected a string, got {got}",))


def test_training_negatives_list_with_non_string(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [{"query": "q", "positive": "p", "negatives": ["ok", 7]}])
    expect_error(lambda: load_training_examples(path), tmp_path, path, 1, "negative_2", contains=("expected a string, got int",))


def test_training_invalid_json(tmp_path):
    path = _write(tmp_path / "x.jsonl", '{"query": "q", "positive": "p"}\n{"query": "q",\n')
    expect_error(lambda: load_training_examples(path), tmp_path, path, 2, contains=("invalid JSON",))


def test_training_jsonl_line_not_object(tmp_path):
    path = _write(tmp_path / "x.jsonl", '["q", "p"]\n')
    expect_error(lambda: load_training_examples(path), tmp_path, path, 1, contains=("expected a JSON object, got list",))


@pytest.mark.parametrize("name", ["x.csv", "x.tsv", "x.jsonl"])
def test_training_invalid_utf8(tmp_path, name):
    sep = "\t" if name.endswith(".tsv") else ","
    if name.endswith(".jsonl"):
        content = b'{"query": "q", "positive": "p"}\n{"query": "\xff", "positive": "p"}\n'
    else:
        content = f"query{sep}positive\nq{sep}p\n".encode() + b"\xfe" + f"{sep}p\n".encode()
    path = _write(tmp_path / name, content)
    expect_error(lambda: load_training_examples(path), tmp_path, path, 2 if name.endswith(".jsonl") else 3, contains=("not valid UTF-8",))


@pytest.mark.parametrize("name", ["x.txt", "x.parquet", "x", "x.csv.gz"])
def test_training_unsupported_extension(tmp_path, name):
    path = _write(tmp_path / name, "query,positive\nq,p\n")
    expect_error(lambda: load_training_examples(path), tmp_path, path, contains=("unsupported file type", ".jsonl, .csv or .tsv"))


@pytest.mark.parametrize(
    "name, content",
    [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.csv", ""), ("e.csv", "query,positive\n"), ("e.tsv", "\n"), ("e.tsv", "query\tpositive\n\n")],
)
def test_training_empty_file(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    expect_error(lambda: load_training_examples(path), tmp_path, path, contains=("no training examples",))


@pytest.mark.parametrize("name", ["none.jsonl", "none.csv"])
def test_training_missing_file(tmp_path, name):
    expect_error(lambda: load_training_examples(tmp_path / name), tmp_path, tmp_path / name, contains=("file not found",))


# --------------------------------------------------------------------------------------------
# describe
# --------------------------------------------------------------------------------------------


def test_describe_counts_and_lengths(tmp_path):
    corpus = [
        {"_id": "d1", "title": "Two words", "text": "three more words"},  # full text: 5 words
        {"_id": "d2", "text": "one"},  # 1
        {"_id": "d3", "text": "a b c"},  # 3
    ]
    queries = [{"_id": "q1", "text": "x y"}, {"_id": "q2", "text": "z"}, {"_id": "q3", "text": "u v w x"}]
    root = write_beir(
        tmp_path / "desc",
        corpus=corpus,
        queries=queries,
        qrels={"test": "q1\td1\t1\nq1\td2\t1\nq1\td3\t0\nq2\td2\t2\n", "train": "q3\td3\t1\n"},
    )
    ds = load_beir(root)
    before = snapshot(root)
    info = describe(ds)
    assert snapshot(root) == before
    assert info["name"] == "desc"
    assert info["fingerprint"] == ds.fingerprint()
    assert info["documents"] == 3
    assert info["queries"] == 3
    assert info["document_length"] == {"mean_words": 3.0, "median_words": 3, "p95_words": 5, "max_words": 5}
    assert info["query_length"] == {"mean_words": 2.3, "median_words": 2, "p95_words": 4, "max_words": 4}
    assert info["splits"] == {
        "test": {"queries": 2, "judgements": 4, "relevant_per_query": 1.5},
        "train": {"queries": 1, "judgements": 1, "relevant_per_query": 1.0},
    }
    json.dumps(info)  # serialisable


def test_describe_p95_on_many_documents():
    corpus = {f"d{i}": Document(f"d{i}", "", " ".join(["w"] * i)) for i in range(1, 101)}
    ds = RetrievalDataset("many", corpus, {"q": "one"}, {"test": {"q": {"d1": 1}}})
    info = describe(ds)
    assert info["document_length"]["max_words"] == 100
    assert info["document_length"]["p95_words"] == 96
    assert info["document_length"]["median_words"] == 50.5
    assert info["document_length"]["mean_words"] == 50.5


def test_describe_without_splits():
    ds = RetrievalDataset("bare", {"d": Document("d", "", "a b")}, {"q": "c"}, {})
    info = describe(ds)
    assert info["splits"] == {}
    assert info["documents"] == 1 and info["queries"] == 1


@pytest.mark.parametrize("name, sep", [("cr.csv", ","), ("cr.tsv", "\t")])
def test_training_bare_carriage_return_in_cell(tmp_path, name, sep):
    path = _write(tmp_path / name, f"query{sep}positive\nq{sep}p\na\rb{sep}c\n")
    expect_error(lambda: load_training_examples(path), tmp_path, path, 3, contains=("malformed",))


def test_qrels_duplicate_judgement_names_both_lines(tmp_path):
    from conftest import write_beir

    folder = write_beir(tmp_path / "dup", qrels={"dev": [("q1", "d1", 1), ("q2", "d2", 1), ("q1", "d1", 0)]})
    with pytest.raises(DataError) as err:
        load_beir(folder)
    assert err.value.line == 4 and err.value.field == "corpus-id" and "first on line 2" in str(err.value)


def test_qrels_trailing_tab_is_still_three_columns(tmp_path):
    from conftest import write_beir

    folder = write_beir(tmp_path / "tab", qrels={"dev": [("q1", "d1", 1)]})
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\t\nq2\td2\t1\t\n")
    assert load_beir(folder).qrels["dev"] == {"q1": {"d1": 1}, "q2": {"d2": 1}}
