"""Retrieval datasets (BEIR layout) and training examples, loaded with validation.

Every problem in a user's file is raised as a :class:`DataError` naming the file, the line and
the field, before any expensive work starts.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from stagewise.data.dataset import Document, RetrievalDataset, is_blank
from stagewise.data.stdlib import build_stdlib_dataset
from stagewise.errors import DataError

DEFAULT_DATASET_NAMES = ("default", "stdlib")
#: The relevance a qrels file may give: a small graded range. trec_eval (pytrec_eval) keeps a counter per level from
#: 0 to a query's highest relevance, so memory grows with the value (10**7 took 76 MB, 10**8 0.8 GB); every negative
#: value means "not relevant" to it (TREC's -1 unjudged, -2 junk), and the metrics read them all as -1.
RELEVANCE_MIN, RELEVANCE_MAX = -1000, 1000
#: An integer relevance as written in qrels: ASCII digits with an optional sign; a zero fraction ("1.0") is kept
#: for files written from float columns. Not int()'s wider syntax ("1_0", " 1", Unicode digits, "1e0").
_RELEVANCE = re.compile(r"([+-]?[0-9]+)(?:\.0*)?")
_INVISIBLE = ": only spaces or invisible characters"


# --------------------------------------------------------------------------------------------
# Reading files line by line, with positions
# --------------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, decoded line) and turn encoding problems into DataErrors with a line."""
    if not path.is_file():
        raise DataError(path, "file not found (a folder is there)" if path.is_dir() else "file not found")
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(path, f"cannot read ({e.strerror or e})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(path, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})", line=number) from None


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; a missing file or a line that is not UTF-8 is a DataError."""
    return _lines(Path(path))


def _field_with_long_integer(line: str) -> str | None:
    """The top-level field of a JSON record holding an integer too long for Python's int() (it refuses more than
    ``sys.get_int_max_str_digits()`` digits, and json.loads with it), found by parsing again without converting."""
    limit = sys.get_int_max_str_digits()
    too_long = object()

    def holds(value) -> bool:
        if value is too_long:
            return True
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        return any(holds(v) for v in items)

    try:
        record = json.loads(line, parse_int=lambda digits: too_long if len(digits.lstrip("-")) > limit else 0)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    return next((key for key, value in record.items() if holds(value)), None)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:  # some messages end with "at" already ("Unterminated string starting at")
            at = "" if e.msg.endswith(" at") else " at"
            raise DataError(path, f"invalid JSON ({e.msg}{at} column {e.colno})", line=number) from None
        except RecursionError:  # thousands of nested brackets: no record is that deep
            raise DataError(path, "invalid JSON (nested too deeply)", line=number) from None
        except ValueError:  # an integer of more digits than int() converts: the only other error json.loads raises
            raise DataError(path, f"a number of more than {sys.get_int_max_str_digits()} digits", line=number,
                            field=_field_with_long_integer(line)) from None
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, got {type(record).__name__}", line=number)
        yield number, record


def _valid_text(value: str, path: Path, line: int, key: str) -> str:
    """A JSON escape such as ``"\\ud800"`` decodes to a lone surrogate: not text any file or model can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(path, f"holds a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start + 1}): "
                              "not valid Unicode text", line=line, field=key) from None
    return value


def _required_text(record: dict, key: str, path: Path, line: int, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataError(path, "missing", line=line, field=key)
    value = record[key]
    if isinstance(value, int) and not isinstance(value, bool) and key == "_id":
        value = str(value)
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {type(value).__name__}", line=line, field=key)
    if not allow_empty and is_blank(value):
        raise DataError(path, "empty" + (_INVISIBLE if value else ""), line=line, field=key)
    return _valid_text(value, path, line, key)


# --------------------------------------------------------------------------------------------
# BEIR format
# --------------------------------------------------------------------------------------------


def load_corpus(path: str | Path, invisible_ok: bool = False) -> dict[str, Document]:
    """``invisible_ok``: a document of invisible characters alone is kept (an index's own ``docs.jsonl``, which
    earlier builds wrote with such documents in it); a new corpus refuses it like an empty one."""
    path = Path(path)
    corpus: dict[str, Document] = {}
    first_line: dict[str, int] = {}
    for number, record in _jsonl_records(path):
        doc_id = _required_text(record, "_id", path, number)
        title = record.get("title")
        if title is None:  # absent or null: no title (0, [] and other non-strings are refused, not dropped)
            title = ""
        if not isinstance(title, str):
            raise DataError(path, f"expected a string, got {type(title).__name__}", line=number, field="title")
        _valid_text(title, path, number, "title")
        text = _required_text(record, "text", path, number, allow_empty=True)
        if is_blank(text) and is_blank(title) and not (invisible_ok and (text or title)):  # nothing to index
            raise DataError(path, "empty (and no title)" + (_INVISIBLE if text or title else ""), line=number,
                            field="text")
        if doc_id in corpus:
            raise DataError(path, f"duplicate id '{doc_id}' (first on line {first_line[doc_id]})", line=number, field="_id")
        corpus[doc_id] = Document(doc_id, title, text)
        first_line[doc_id] = number
    if not corpus:
        raise DataError(path, "corpus is empty")
    return corpus


def load_queries(path: str | Path) -> dict[str, str]:
    path = Path(path)
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, record in _jsonl_records(path):
        qid = _required_text(record, "_id", path, number)
        text = _required_text(record, "text", path, number)
        if qid in queries:
            raise DataError(path, f"duplicate id '{qid}' (first on line {first_line[qid]})", line=number, field="_id")
        queries[qid] = text
        first_line[qid] = number
    if not queries:
        raise DataError(path, "no queries")
    return queries


def _relevance(score: str, path: Path, line: int) -> int:
    """A qrels score as an int from RELEVANCE_MIN to RELEVANCE_MAX; anything else is a DataError naming the line."""
    match, shown = _RELEVANCE.fullmatch(score), score if len(score) <= 40 else score[:40] + "…"
    if match is None:  # 0.5 / 1.5 were silently truncated, 1_0 read as 10
        raise DataError(path, f"expected an integer relevance, got '{shown}'", line=line, field="score")
    digits = match[1].lstrip("+-").lstrip("0")
    rel = int(match[1]) if len(digits) <= len(str(RELEVANCE_MAX)) else None  # int() never sees 5,000 digits
    if rel is None or not RELEVANCE_MIN <= rel <= RELEVANCE_MAX:
        raise DataError(path, f"relevance '{shown}' is out of range: an integer from {RELEVANCE_MIN} to "
                              f"{RELEVANCE_MAX} (0 or negative: not relevant; trec_eval's memory grows with the "
                              "highest grade)", line=line, field="score")
    return rel


def load_qrels(path: str | Path, corpus: dict[str, Document], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    """Read BEIR qrels (query-id, corpus-id, score; optional header) or TREC qrels (qid 0 docid rel).

    A score is an integer from ``RELEVANCE_MIN`` to ``RELEVANCE_MAX`` (graded relevance; 0 or negative is not
    relevant), written as plain digits with an optional sign: trec_eval's memory grows with the highest grade.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) == 4 and not cols[3].strip():  # a trailing tab, not TREC's four columns
            cols = cols[:3]
        if number == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(cols) == 4:
            cols = [cols[0], cols[2], cols[3]]
        if len(cols) != 3:
            raise DataError(path, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}", line=number)
        qid, did, score = (c.strip() for c in cols)
        if qid not in queries:
            raise DataError(path, f"unknown query id '{qid}' (not in queries.jsonl)", line=number, field="query-id")
        if did not in corpus:
            raise DataError(path, f"unknown document id '{did}' (not in corpus.jsonl)", line=number, field="corpus-id")
        rel = _relevance(score, path, number)
        if (qid, did) in first_line:
            raise DataError(path, f"duplicate judgement of '{did}' for '{qid}' (first on line "
                                  f"{first_line[qid, did]})", line=number, field="corpus-id")
        first_line[qid, did] = number
        qrels.setdefault(qid, {})[did] = rel
    if not any(rel > 0 for docs in qrels.values() for rel in docs.values()):
        raise DataError(path, "split has no queries with a relevant document")
    return qrels


def load_beir(folder: str | Path) -> RetrievalDataset:
    """Load ``corpus.jsonl``, ``queries.jsonl`` and every ``qrels/<split>.tsv`` of a BEIR folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "dataset folder not found (expected corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    corpus = load_corpus(folder / "corpus.jsonl")
    queries = load_queries(folder / "queries.jsonl")
    qrel_files = sorted((folder / "qrels").glob("*.tsv"))
    if not qrel_files:
        raise DataError(folder / "qrels", "no qrels/<split>.tsv files")
    qrels = {f.stem: load_qrels(f, corpus, queries) for f in qrel_files}
    return RetrievalDataset(folder.name, corpus, queries, qrels, source=str(folder))


def load_dataset(name_or_path: str | Path) -> RetrievalDataset:
    """``default`` (the embedded standard-library dataset) or a BEIR folder."""
    if not str(name_or_path).strip():  # Path("") is the current folder: not what an empty --data meant
        raise DataError("data", "no dataset named: 'default' or a BEIR folder")
    if str(name_or_path) in DEFAULT_DATASET_NAMES:
        return build_stdlib_dataset()
    return load_beir(name_or_path)


# --------------------------------------------------------------------------------------------
# Training examples: pairs, n-tuples, scored pairs
# --------------------------------------------------------------------------------------------

_ANCHOR = ("query", "anchor", "question")
_POSITIVE = ("positive", "pos", "document", "passage")
_TEXT1 = ("text1", "sentence1")
_TEXT2 = ("text2", "sentence2")
_SCORE = ("score", "label")


@dataclass
class TrainingExamples:
    """Columns in sentence-transformers order: ``anchor, positive[, negative_1 …]`` or ``text1, text2, score``.

    ``kind`` is ``pairs``, ``tuples`` (with negatives) or ``scored``; the training loss follows from it.
    """

    kind: str
    columns: dict[str, list] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((n for n in names if n.lower() in candidates), None)


def _layout(names: list[str], path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Map the file's column names to (kind, [(our column, their column)])."""
    anchor, positive = _pick(names, _ANCHOR), _pick(names, _POSITIVE)
    if anchor and positive:
        negatives = [n for n in names if n.lower().startswith("neg")]
        mapping = [("anchor", anchor), ("positive", positive)]
        mapping += [(f"negative_{i}", n) for i, n in enumerate(negatives, start=1)]
        return ("tuples" if negatives else "pairs"), mapping
    text1, text2, score = _pick(names, _TEXT1), _pick(names, _TEXT2), _pick(names, _SCORE)
    if text1 and text2 and score:
        return "scored", [("text1", text1), ("text2", text2), ("score", score)]
    raise DataError(
        path,
        f"cannot tell the layout from columns {names}: expected (query, positive[, negative…]) "
        "or (text1, text2, score)",
        line=1,
    )


def _table_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a JSONL, CSV or TSV file as dicts, with line numbers; CSV/TSV need a header row."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl_records(path)
        return
    if suffix not in (".csv", ".tsv"):
        raise DataError(path, "unsupported file type (expected .jsonl, .csv or .tsv)")
    delimiter = "\t" if suffix == ".tsv" else ","
    lines = list(_lines(path))
    reader = csv.reader((text + "\n" for _, text in lines), delimiter=delimiter)
    header: list[str] | None = None
    start = 0  # index in ``lines`` where the next record begins (a quoted cell may span lines)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a bare carriage return inside an unquoted cell
            raise DataError(path, f"malformed {suffix[1:].upper()} ({e})", line=reader.line_num) from None
        number, start = lines[start][0], reader.line_num
        if not row or not any(c.strip() for c in row):
            continue
        if header is None:
            header = [c.strip() for c in row]
            continue
        if len(row) != len(header):
            raise DataError(path, f"expected {len(header)} columns like the header, got {len(row)}", line=number)
        yield number, dict(zip(header, row))


def load_training_examples(path: str | Path) -> TrainingExamples:
    """Read (query, positive), (query, positive, negative…) or (text1, text2, score) examples."""
    path = Path(path)
    layout: list[tuple[str, str]] | None = None
    examples: TrainingExamples | None = None
    for number, row in _table_rows(path):
        key = next((k for k in row if k.lower() == "negatives" and isinstance(row[k], list)), None)
        if layout is None:
            flat = list(row)
            if key is not None:  # JSONL with a list of negatives
                flat = [k for k in flat if k != key] + [f"negative_{i}" for i in range(1, len(row[key]) + 1)]
            kind, layout = _layout(flat, path)
            examples = TrainingExamples(kind, {ours: [] for ours, _ in layout}, source=str(path))
        if key is not None:
            row = {**row, **{f"negative_{i}": v for i, v in enumerate(row[key], start=1)}}
        for ours, theirs in layout:
            if theirs not in row:
                raise DataError(path, "missing", line=number, field=theirs)
            value = row[theirs]
            if ours == "score":
                try:
                    if isinstance(value, bool):  # JSON true/false: a label, but not a number to train on
                        raise TypeError(value)
                    value = float(value)
                except (TypeError, ValueError, OverflowError):
                    raise DataError(path, f"expected a number, got {value!r}", line=number, field=theirs) from None
                if not math.isfinite(value):
                    raise DataError(path, f"expected a finite number, got {row[theirs]!r}", line=number, field=theirs)
            else:
                if not isinstance(value, str):
                    raise DataError(path, f"expected a string, got {type(value).__name__}", line=number, field=theirs)
                if is_blank(value):
                    raise DataError(path, "empty" + (_INVISIBLE if value else ""), line=number, field=theirs)
                _valid_text(value, path, number, theirs)
            examples.columns[ours].append(value)
    if examples is None or len(examples) == 0:
        raise DataError(path, "no training examples")
    return examples


# --------------------------------------------------------------------------------------------
# Describe
# --------------------------------------------------------------------------------------------


def _length_stats(texts: list[str]) -> dict[str, float]:
    words = sorted(len(t.split()) for t in texts)
    if not words:
        return {}
    return {
        "mean_words": round(statistics.fmean(words), 1),
        "median_words": statistics.median(words),
        "p95_words": words[min(len(words) - 1, int(0.95 * len(words)))],
        "max_words": words[-1],
    }


def describe(dataset: RetrievalDataset) -> dict:
    """Counts and length statistics: what a user checks first about a dataset."""
    splits = {}
    for name in dataset.splits:
        qrels = dataset.qrels[name]
        relevant = [sum(1 for r in docs.values() if r > 0) for docs in qrels.values()]
        splits[name] = {
            "queries": len(qrels),
            "judgements": sum(len(d) for d in qrels.values()),
            "relevant_per_query": round(statistics.fmean(relevant), 2) if relevant else 0,
        }
    return {
        "name": dataset.name,
        "fingerprint": dataset.fingerprint(),
        "documents": len(dataset.corpus),
        "queries": len(dataset.queries),
        "document_length": _length_stats([d.full_text() for d in dataset.corpus.values()]),
        "query_length": _length_stats(list(dataset.queries.values())),
        "splits": splits,
    }
