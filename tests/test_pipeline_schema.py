"""``pipeline.yaml`` against its one schema: every command that reads it refuses a bad file in one line naming the
file, line and field, before any work (nothing written, an existing index byte for byte as it was); what the
schema accepts builds an index that loads and searches. A seeded fuzz test holds both over random edits."""

from __future__ import annotations

import copy
import hashlib
import random
import socket
import time
import warnings
from pathlib import Path

import pytest
import yaml
from test_inputs import one_line_error

from conftest import CORPUS
from stagewise.data.loaders import Document
from stagewise.errors import DataError, StagewiseError
from stagewise.models.backends import Backend
from stagewise.search import pipeline_schema
from stagewise.search.fusion import Fusion
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import BM25Retriever, DenseRetriever, HybridRetriever
from stagewise.serving.index import Index


def corpus() -> dict[str, Document]:
    return {d["_id"]: Document(d["_id"], d.get("title", ""), d["text"]) for d in CORPUS}


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def saved(tiny_bi_encoder, tiny_cross_encoder, tmp_path_factory) -> str:
    """``pipeline.yaml`` as saved for a hybrid of BM25 and the tiny bi-encoder, reranked and fused."""
    stage = HybridRetriever([BM25Retriever(), DenseRetriever(str(tiny_bi_encoder), show_progress=False)])
    pipeline = Pipeline(stage, CrossEncoderReranker(str(tiny_cross_encoder)), depth=3, fusion=Fusion(0.5))
    return pipeline.save(tmp_path_factory.mktemp("saved") / "pipeline.yaml").read_text()


@pytest.fixture(scope="module")
def existing(tmp_path_factory) -> Path:
    """An index that every refused command must leave as it was."""
    return Index.build(Pipeline(BM25Retriever()), corpus(), tmp_path_factory.mktemp("existing") / "idx").path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edit_line(text: str, start: str, new: str) -> tuple[str, int]:
    """``text`` with its first line that starts with ``start`` (indentation aside) replaced by ``new``, and its
    line number."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(start))
    lines[i] = lines[i][:len(lines[i]) - len(lines[i].lstrip())] + new
    return "\n".join(lines) + "\n", i + 1


BOMB = "lol: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 7))  # 10**7 when expanded

# the issue's items: the line changed, what it becomes, and what the one line must say besides the file and line
ITEMS = {
    "misspelt-reranker": ("reranker:", "rerankr:", ["unknown key 'rerankr'", "did you mean 'reranker'?"]),
    "misspelt-depth": ("depth:", "dept: 3", ["unknown key 'dept'", "did you mean 'depth'?"]),
    "rrf_k-negative": ("rrf_k:", "rrf_k: -1", ["field 'first_stage'", "'rrf_k'", "got -1"]),
    "rrf_k-text": ("rrf_k:", "rrf_k: x", ["field 'first_stage'", "'rrf_k'", "got 'x'"]),
    "max_length-text": ("max_length:", "max_length: abc", ["field 'reranker'", "'max_length'", "got 'abc'"]),
    "k1-infinite": ("k1:", "k1: .inf", ["field 'first_stage'", "'stages[0].k1'", "got inf"]),
    "stopwords-klingon": ("stopwords:", "stopwords: klingon", ["'stages[0].stopwords'", "got 'klingon'"]),
    "stopwords-5": ("stopwords:", "stopwords: 5", ["'stages[0].stopwords'", "got 5"]),
    "name-list": ("name:", "name: [1, 2]", ["field 'first_stage'", "'name'", "got [1, 2]"]),
    "static-reranker": (None, "model: static-64", ["field 'reranker'", "static embedding model"]),
    "alias-bomb": ("depth:", BOMB + "depth: 3", ["YAML aliases"]),
    "version-99": ("version:", "version: 99", ["field 'version'", "got 99"]),
}


def bad_file(saved: str, item: str, folder: Path) -> tuple[Path, int, list[str]]:
    start, new, words = ITEMS[item]
    if item == "static-reranker":
        from stagewise.models.specs import installed_aliases

        if "static-64" not in installed_aliases():
            pytest.skip("static-64 is not installed")
        start = "model: " + yaml.safe_load(saved)["reranker"]["model"]
    text, line = edit_line(saved, start, new)
    if item == "alias-bomb":
        line = text[:text.index("*l0")].count("\n") + 1
    path = folder / "pipeline.yaml"
    path.write_text(text)
    return path, line, words


@pytest.mark.parametrize("item", list(ITEMS))
def test_each_item_of_the_issue_is_refused_by_every_reader(item, saved, existing, beir_dir, tmp_path, monkeypatch):
    """One line naming the file, line and field, exit 2 from eval, index build (over an index, and new), search and
    serve; no run folder and no index written, the existing index byte for byte as it was."""
    bad, line, words = bad_file(saved, item, tmp_path)
    monkeypatch.setattr("stagewise.serving.service.serve", lambda *a, **k: pytest.fail("served a refused pipeline"))
    before = tree_hash(existing)
    for args in (["index", "build", "--pipeline", bad, "--corpus", beir_dir, "--out", existing, "--replace"],
                 ["index", "build", "--pipeline", bad, "--corpus", beir_dir, "--out", tmp_path / "new"],
                 ["eval", "--data", beir_dir, "--pipeline", bad, "--out", tmp_path / "run"],
                 ["search", existing, "cats", "--pipeline", bad],
                 ["serve", existing, "--pipeline", bad, "--port", free_port()]):
        one_line_error(args, f"{bad}:{line}: ", *words)
    assert tree_hash(existing) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "run").exists()
    with pytest.raises(DataError) as e:
        Pipeline.load(bad)
    assert (e.value.path, e.value.line) == (str(bad), line)


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    path = tmp_path / "pipeline.yaml"
    levels = [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**9 when expanded
    path.write_text("\n".join(["first_stage: bm25", "l0: &l0 [lol, lol]", *levels]) + "\n")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"pipeline.yaml:3: YAML aliases \(\*name\) are not allowed"):
        pipeline_schema.read(path)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("text, words", [
    ("first_stage: bm25\ndepth: 3\ndepth: 4\n", ["pipeline.yaml:3:", "'depth' is given twice (first on line 2)"]),
    ("first_stage: bm25\n? [a, b]\n: 1\n", ["pipeline.yaml:2:", "a key must be a name"]),
    ("first_stage: !!python/object/apply:os.getcwd []\n", ["pipeline.yaml:1:", "python/object/apply:os.getcwd"]),
    ("first_stage: !!python/name:os.getcwd\n", ["pipeline.yaml:1:", "invalid YAML"]),
    ("first_stage: {type: bm25}\nfusion: {weight: 0.5}\n", ["pipeline.yaml:2:", "field 'fusion'", "needs a reranker"]),
    ("first_stage: {type: hybrid, stages: [bm25]}\n", ["pipeline.yaml:1:", "'stages' must be a list of at least two"]),
    ("first_stage: {type: bm25, k1: 1.2, b: 1.5}\n", ["pipeline.yaml:1:", "'b' must be a number of at least 0"]),
    ("first_stage: {type: dense, model: x, quantize: int8}\n", ["field 'first_stage'", "'quantize' does not go"]),
    ("first_stage: {type: bm25, k2: 1}\n", ["pipeline.yaml:1:", "field 'first_stage': unknown key 'k2'", "known:"]),
    ("first_stage: bm25\nreranker: {model: x, per_query: {model: x, dtyp: bfloat16}}\n",
     ["pipeline.yaml:2:", "field 'reranker'", "'per_query' has unknown key 'dtyp' (did you mean 'dtype'?)"]),
    ("", ["pipeline.yaml:", "must be a pipeline"]),
], ids=["duplicate-key", "list-key", "python-tag", "python-scalar-tag", "fusion-alone", "one-stage-hybrid",
        "b-above-1", "int8-on-torch", "unknown-nested", "per-query-typo", "empty"])
def test_other_mistakes_are_one_line_naming_the_line(text, words, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(StagewiseError) as e:
        Pipeline.load(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value), str(e.value)


def test_stopword_names_are_the_ones_bm25s_knows():
    from bm25s.tokenization import Tokenizer

    for name in [*pipeline_schema.STOPWORDS, *pipeline_schema.STOPWORDS.values()]:
        assert Tokenizer(stopwords=name).stopwords, name
    with pytest.raises(ValueError):  # what the schema keeps from failing at index time
        Tokenizer(stopwords="klingon")


def test_what_save_writes_reads_back_and_what_load_refuses_is_never_saved(tiny_bi_encoder, tiny_cross_encoder,
                                                                          tmp_path):
    """Every kind of key round-trips: hybrid, stop word list, per-query backends, fusion; a pipeline built in code
    with a value the file would refuse is not saved, so an index never commits a version it cannot load."""
    bf16 = Backend(dtype="bfloat16")
    stage = HybridRetriever([BM25Retriever(k1=1.2, b=0.5, stopwords=["the", "a"]),
                             DenseRetriever(str(tiny_bi_encoder), show_progress=False, per_query_setting={
                                 "model": str(tiny_bi_encoder), **bf16.config()})], rrf_k=30, fusion_depth=50)
    reranker = CrossEncoderReranker(str(tiny_cross_encoder), max_length=64, per_query_setting={
        "model": str(tiny_cross_encoder), **bf16.config()})
    pipeline = Pipeline(stage, reranker, depth=4, fusion=Fusion(0.3, "zscore", "rank"))
    path = pipeline.save(tmp_path / "pipeline.yaml")
    assert pipeline_schema.read(path).config == yaml.safe_load(path.read_text()) == pipeline.config()
    assert Pipeline.load(path).config() == pipeline.config()

    bad = Pipeline(BM25Retriever(k1=float("inf")))
    with pytest.raises(StagewiseError, match=r"not saved: field 'first_stage': 'k1' must be a number"):
        bad.save(tmp_path / "bad" / "pipeline.yaml")
    assert not (tmp_path / "bad" / "pipeline.yaml").exists()
    with pytest.raises(StagewiseError, match="not saved"):
        Index.build(bad, corpus(), tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


# ---- fuzz: random deletions, renamings and type changes of a valid file's keys ------------------------------------

ODD_VALUES = [None, True, False, 0, 1, 2, -1, 2.5, -0.5, 10**12, float("inf"), float("-inf"), float("nan"), "", " ",
              "x", "abc", "bm25", "en", "cross-encoder", [], [1, 2], ["a"], {}, {"a": 1}, {"model": "x"}]


def _paths(value, at=()) -> list[tuple]:
    """Every key and list item's path in a config."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    return [p for k, v in children for p in [at + (k,), *_paths(v, at + (k,))]]


def mutate(config: dict, rng: random.Random) -> dict:
    """One to three random deletions, renamings (misspelt, another known key, a stranger) or type changes."""
    config = copy.deepcopy(config)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(config)
        if not paths:
            break
        path = rng.choice(paths)
        parent = config
        for k in path[:-1]:
            parent = parent[k]
        key, action = path[-1], rng.choice(["delete", "rename", "retype", "retype"])
        if action == "delete":
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            name = str(key)
            options = [name[:-1], name + name[-1], name[1:], *(k for k in parent if k != key), "extra", "Type"]
            parent[rng.choice([o for o in options if o])] = parent.pop(key)
        else:
            parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return config


def accepted_or_one_line(config: dict, folder: Path, docs: dict) -> bool:
    """Either refused in one line naming the file (and no index written), or built into an index that loads and
    searches; never a traceback, never a committed index that cannot be loaded."""
    folder.mkdir()
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = folder / "idx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a changed fingerprint, an untrained head: said, not refused
            index = Index.build(path, docs, out)  # and loaded again from what it committed
    except StagewiseError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}:"), f"{config}\n{e}"
        assert not out.exists(), config
        return False
    hits = index.search("domesticated animals", k=3)
    assert hits and all(h.doc_id in docs for h in hits), config
    return True


def test_fuzz_a_bm25_pipeline_file(tmp_path):
    stage = HybridRetriever([BM25Retriever(), BM25Retriever(k1=1.2, b=0.5, stopwords=["the"])], rrf_k=10)
    valid = Pipeline(stage, depth=5).config()
    rng, docs = random.Random(20), corpus()
    accepted = sum(accepted_or_one_line(mutate(valid, rng), tmp_path / str(i), docs) for i in range(300))
    assert 20 <= accepted <= 280  # both outcomes are exercised


def test_fuzz_a_pipeline_file_with_models(tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    bf16 = {"model": str(tiny_cross_encoder), **Backend(dtype="bfloat16").config()}
    stage = HybridRetriever([BM25Retriever(), DenseRetriever(str(tiny_bi_encoder), show_progress=False)])
    valid = Pipeline(stage, CrossEncoderReranker(str(tiny_cross_encoder), per_query_setting=bf16), depth=3,
                     fusion=Fusion(0.5)).config()
    rng, docs = random.Random(21), corpus()
    accepted = sum(accepted_or_one_line(mutate(valid, rng), tmp_path / str(i), docs) for i in range(80))
    assert 4 <= accepted <= 76


def test_fuzz_through_the_command_line(beir_dir, tmp_path):
    """A sample through ``index build --replace`` over an index: exit 0, or exit 2 in one line and the index as
    it was."""
    from typer.testing import CliRunner

    from stagewise.cli import app

    valid = Pipeline(HybridRetriever([BM25Retriever(), BM25Retriever(stopwords=None)]), depth=5).config()
    rng, outcomes = random.Random(22), set()
    target = tmp_path / "idx"
    Index.build(Pipeline(BM25Retriever()), corpus(), target)
    for i in range(30):
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump(mutate(valid, rng), sort_keys=False))
        before = tree_hash(target)
        result = CliRunner().invoke(app, ["index", "build", "--pipeline", str(path), "--corpus", str(beir_dir),
                                          "--out", str(target), "--replace"])
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
        if result.exit_code == 2:
            assert result.output.count("\n") == 1 and result.output.startswith(f"error: {path}:"), result.output
            assert tree_hash(target) == before
        assert Index.load(target).search("cats")
        outcomes.add(result.exit_code)
    assert outcomes == {0, 2}
