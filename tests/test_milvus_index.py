"""Tests for stagewise.scale.milvus: an index whose vectors live in Milvus (Milvus Lite on a temporary file).

Mirrors test_index.py: a stored index answers exactly like the same pipeline in memory (exact search), before
and after updates, crashes and rebuilds. Milvus-specific: versions share one collection, readers filter
``key < watermark``, deleted rows are retired (kept for the previous version, removed at the next update),
and a dead writer's rows above the watermark are never returned and are removed by the next update.

Milvus Lite serves a file to one process: the subprocess test hands the file over (``release``) first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from milvus_lite.server_manager import server_manager_instance  # noqa: E402
from test_index import NEW_DOCS, TEXTS, answers, assert_same_answers, docs, versions  # noqa: E402

import stagewise.serving.index as index_module  # noqa: E402
from stagewise.data.loaders import Document  # noqa: E402
from stagewise.errors import StagewiseError  # noqa: E402
from stagewise.scale import milvus as milvus_index  # noqa: E402
from stagewise.scale.milvus import MilvusVectors  # noqa: E402
from stagewise.search.pipeline import Pipeline  # noqa: E402
from stagewise.search.rerankers import CrossEncoderReranker  # noqa: E402
from stagewise.search.retrievers import build_first_stage  # noqa: E402
from stagewise.search.vector_index import VectorIndex, VectorIndexConfig  # noqa: E402
from stagewise.serving.index import Index, InvalidIndexError  # noqa: E402

MILVUS = VectorIndexConfig(kind="milvus")


def vectors_of(index: Index) -> MilvusVectors:
    stage = index.pipeline.first_stage
    stage = next(s for s in [stage, *getattr(stage, "stages", [])] if hasattr(s, "vectors"))
    assert isinstance(stage.vectors, MilvusVectors)
    return stage.vectors


def stored_keys(v: MilvusVectors) -> list[int]:
    """Every key the collection holds, whatever version owns it."""
    return sorted(r["key"] for r in v.client.query(v.collection, filter="key >= 0", output_fields=["key"]))


def release(uri: str) -> None:
    """Close this process's Milvus Lite server for ``uri`` so another process can open the file."""
    client = milvus_index._clients.pop(uri, None)
    if client is not None:
        client.close()
    server_manager_instance.release_server(uri)


@pytest.fixture(autouse=True)
def _release_milvus():
    """Each test's Milvus Lite files are closed after it: no server threads pile up over the session."""
    yield
    for uri in list(milvus_index._clients):
        release(uri)


@pytest.fixture
def make(tiny_bi_encoder, tiny_cross_encoder):
    """``make(first_stage, rerank, depth)``: a fresh pipeline (Index.build mutates the one it is given)."""

    def make(first: str = "dense", rerank: bool = False, depth: int = 3) -> Pipeline:
        spec = {"dense": str(tiny_bi_encoder), "hybrid": f"bm25+{tiny_bi_encoder}"}[first]
        reranker = CrossEncoderReranker(str(tiny_cross_encoder), device="cpu") if rerank else None
        return Pipeline(build_first_stage(spec, show_progress=False), reranker, depth=depth)

    return make


@pytest.fixture
def built(make, tmp_path) -> Path:
    """A dense Milvus Lite index (default file INDEX/milvus.db) over the six toy documents."""
    Index.build(make(), docs(), tmp_path / "idx", vectors=MILVUS)
    return tmp_path / "idx"


# ---- building and loading ----------------------------------------------------------------------


@pytest.mark.parametrize("rerank", [False, True], ids=["first-stage", "reranked"])
@pytest.mark.parametrize("first", ["dense", "hybrid"])
def test_a_milvus_index_answers_like_exact_search_in_memory(make, first, rerank, tmp_path):
    """Milvus does the search; ids, scores and reranking must be those of exact search over the same vectors."""
    expected = answers(make(first, rerank).index(docs()), k=6)
    path = tmp_path / "idx"
    built = Index.build(make(first, rerank), docs(), path, vectors=MILVUS)
    loaded = Index.load(path)

    assert_same_answers(answers(built, k=6), expected)
    assert_same_answers(answers(loaded, k=6), expected)
    assert any(r for hits in expected for _, _, r in hits) == rerank

    assert (path / "milvus.db").exists()  # Milvus Lite beside the versions by default
    v = vectors_of(loaded)
    assert v.uri == str(path.resolve() / "milvus.db") and v.collection.startswith("stagewise_")
    assert v.keys.tolist() == list(range(6)) and v.watermark == 6 and len(v.retired) == 0
    assert stored_keys(v) == list(range(6))
    assert loaded.manifest["vectors"] == "milvus" and loaded.describe()["vectors"] == "milvus"
    assert loaded.describe()["memory_bytes"] >= 6 * 8  # the keys: the vectors live in Milvus
    folder = next((path / loaded.version / "first_stage").rglob("vectors.json")).parent
    assert {p.name for p in folder.iterdir()} == {"keys.npy", "retired.npy", "vectors.json"}  # no embeddings.npy


def test_an_explicit_uri_and_collection_prefix_are_used(make, tmp_path):
    uri = str(tmp_path / "elsewhere" / "vectors.db")
    (tmp_path / "elsewhere").mkdir()
    config = VectorIndexConfig(kind="milvus", uri=uri, collection="docs")
    expected = answers(make().index(docs()))
    index = Index.build(make(), docs(), tmp_path / "idx", vectors=config)

    assert not (tmp_path / "idx" / "milvus.db").exists() and Path(uri).exists()
    v = vectors_of(Index.load(tmp_path / "idx"))
    assert v.uri == uri and v.collection.startswith("docs_")
    assert milvus_index.client(uri).list_collections() == [v.collection]
    assert_same_answers(answers(index), expected)
    assert_same_answers(answers(Index.load(tmp_path / "idx")), expected)


# ---- updates -----------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["dense", "hybrid"])
def test_updates_answer_like_a_rebuild_and_survive_a_reload(make, first, tmp_path):
    """add, delete and upsert give exact search's results over the new corpus, in memory and on disk."""
    path = tmp_path / "idx"
    index = Index.build(make(first), docs(), path, vectors=MILVUS)
    quasar = Document("d1", "Quasars", "Quasars are luminous galactic nuclei powered by black holes.")
    index.add(NEW_DOCS)
    index.delete(["d2", "d5"])
    index.add([quasar], upsert=True)

    expected_corpus = {d: doc for d, doc in docs().items() if d not in ("d1", "d2", "d5")}
    expected_corpus |= {d.id: d for d in NEW_DOCS} | {"d1": quasar}
    assert list(index.corpus) == list(expected_corpus) and len(index) == 6
    texts = TEXTS + ["volcanic lava", "ice valleys", "black holes", "dogs that bark"]
    expected = answers(make(first).index(expected_corpus), k=6, texts=texts)
    assert_same_answers(answers(index, k=6, texts=texts), expected)

    reloaded = Index.load(path)
    assert reloaded.version == index.version == "v000004"
    assert_same_answers(answers(reloaded, k=6, texts=texts), expected)
    v = vectors_of(reloaded)
    # keys 0..5 built, 6-7 added, 8 the upserted d1; d2, d5 (keys 1, 4) went at the upsert, d1's old key 0 is retired
    assert v.keys.tolist() == [2, 3, 5, 6, 7, 8] and v.watermark == 9 and v.retired.tolist() == [0]
    assert stored_keys(v) == [0, 2, 3, 5, 6, 7, 8]


def test_a_dense_add_finds_the_new_document_by_its_own_text(built):
    """Added rows get keys above the watermark and map back to the right documents."""
    index = Index.load(built)
    index.add(NEW_DOCS)
    for doc in NEW_DOCS:
        top = index.search(doc.full_text(), k=1)[0]
        assert top.doc_id == doc.id and top.score == pytest.approx(1.0, abs=1e-4) and top.text == doc.text


def test_deleted_rows_are_retired_then_removed_at_the_next_update(built, make):
    """A delete keeps the row in Milvus for the previous version's readers; the new version never returns it."""
    index = Index.load(built)
    before = answers(index, k=6)
    assert any(d == "d3" for hits in before for d, _, _ in hits)
    index.delete(["d3"])  # key 2
    v = vectors_of(index)
    assert v.retired.tolist() == [2] and v.watermark == 6 and 2 not in v.keys.tolist()
    assert [r["key"] for r in v.client.get(v.collection, ids=[2])] == [2]  # still in the collection

    expected = answers(make().index({d: doc for d, doc in docs().items() if d != "d3"}), k=6)
    for searcher in (index, Index.load(built)):
        got = answers(searcher, k=6)
        assert all(d != "d3" for hits in got for d, _, _ in hits)
        assert_same_answers(got, expected)

    # the previous version (kept on disk) still answers with d3: the row it needs is still there
    old_folder = built / "v000001" / "first_stage"
    meta = json.loads((old_folder / "vectors.json").read_text())
    old = MilvusVectors.load(old_folder, MILVUS, meta)
    rows, _ = old.search(index.pipeline.first_stage.encode_queries(TEXTS), 6)
    assert (rows == 2).any(axis=1).all()  # six of six documents: every query sees d3's row

    index.add(NEW_DOCS)  # the next update deletes the retired row (v000001 is pruned by this commit)
    v = vectors_of(index)
    assert len(v.client.get(v.collection, ids=[2])) == 0 and len(v.retired) == 0
    assert stored_keys(v) == [0, 1, 3, 4, 5, 6, 7]
    assert versions(built) == ["v000002", "v000003"]
    assert all(d != "d3" for hits in answers(Index.load(built), k=8) for d, _, _ in hits)


def test_retired_rows_taking_the_top_places_do_not_shorten_the_answer(built):
    """Milvus is asked for k + len(retired) rows, so k hits come back even when retired rows rank first."""
    index = Index.load(built)
    index.delete(["d1", "d2", "d3"])
    for hits in answers(index, k=3):
        assert len(hits) == 3 and {d for d, _, _ in hits} == {"d4", "d5", "d6"}


# ---- crash safety ------------------------------------------------------------------------------


def test_rows_of_a_failed_update_are_never_returned_and_the_next_update_removes_them(built, make, monkeypatch):
    """The update inserted its rows above the watermark, then failed before switching CURRENT."""
    index = Index.load(built)
    current, before = (built / "CURRENT").read_text(), answers(index, k=6)
    real = index_module._atomic_write

    def fail_at_current(path, text):
        if Path(path).name == "CURRENT":
            raise OSError("disk full")
        real(path, text)

    with monkeypatch.context() as m:
        m.setattr(index_module, "_atomic_write", fail_at_current)
        with pytest.raises(OSError, match="disk full"):
            index.add(NEW_DOCS)

    assert (built / "CURRENT").read_text() == current and index.version == "v000001"
    v = vectors_of(index)
    assert v.watermark == 6 and stored_keys(v) == list(range(8))  # the uncommitted rows 6, 7 are in Milvus...
    texts = TEXTS + [d.full_text() for d in NEW_DOCS]  # ...and would be the best match for these
    expected = answers(make().index(docs()), k=6, texts=texts)
    assert_same_answers(answers(index, k=6, texts=texts), expected)  # ...but are never returned
    assert_same_answers(answers(Index.load(built, verify=True), k=6, texts=texts), expected)
    assert_same_answers(answers(index, k=6), before)

    owls = Document("d9", "Owls", "Owls hunt at night.")
    index.add([owls])  # deletes the dead rows, then inserts its own
    v = vectors_of(index)
    assert stored_keys(v) == list(range(7)) and v.keys.tolist() == list(range(7)) and v.watermark == 7
    expected = answers(make().index(docs() | {"d9": owls}), k=7, texts=texts)
    assert_same_answers(answers(index, k=7, texts=texts), expected)
    assert index.search(owls.full_text(), k=1)[0].doc_id == "d9"


def _run(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


KILL_BEFORE_CURRENT = """
    import os, signal, sys
    from pathlib import Path
    import stagewise.serving.index as index
    from stagewise.data.loaders import Document

    real = index._atomic_write
    def write(path, text):
        if Path(path).name == "CURRENT":  # the new rows are in Milvus, the new version in place: die now
            Path(sys.argv[2]).write_text("reached CURRENT")
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, text)
    index._atomic_write = write
    index.Index.load(sys.argv[1]).add([Document("d9", "Volcanoes", "Volcanoes erupt molten lava.")])
"""


def test_an_update_killed_before_switching_current_leaves_the_old_index(built, make, tmp_path):
    """A real SIGKILL in another process (this one hands the Milvus Lite file over first)."""
    index = Index.load(built)
    current, before = (built / "CURRENT").read_text(), answers(index, k=6)
    release(vectors_of(index).uri)
    del index

    proc = _run(KILL_BEFORE_CURRENT, built, tmp_path / "marker")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "marker").read_text() == "reached CURRENT"

    assert (built / "CURRENT").read_text() == current
    old = Index.load(built, verify=True)
    assert old.version == "v000001" and "d9" not in old.corpus
    v = vectors_of(old)
    assert stored_keys(v) == list(range(7)) and v.watermark == 6  # the dead writer's row 6 survived the kill
    assert_same_answers(answers(old, k=6), before)
    texts = TEXTS + ["Volcanoes Volcanoes erupt molten lava."]  # the dead row is this query's best match
    assert_same_answers(answers(old, k=6, texts=texts), answers(make().index(docs()), k=6, texts=texts))

    old.add(NEW_DOCS)  # its lock went with it; its row 6 is deleted before d7 takes key 6
    assert stored_keys(vectors_of(old)) == list(range(8))
    expected = answers(make().index(docs() | {d.id: d for d in NEW_DOCS}), k=8)
    assert_same_answers(answers(Index.load(built), k=8), expected)


def test_a_reader_left_on_a_pruned_version_never_invents_hits(built):
    stale = Index.load(built)  # stays on v000001, like a long-running service
    writer = Index.load(built)
    writer.delete(["d3"])  # d3's row is retired: still there for v000001
    writer.add(NEW_DOCS)  # ...and now deleted: v000001 is pruned
    for hits in answers(stale, k=6):
        ids = [d for d, _, _ in hits]
        assert len(ids) == len(set(ids)), ids


LOCKED = """
    import sys
    from stagewise.errors import StagewiseError
    from stagewise.scale.milvus import client
    try:
        client(sys.argv[1])
    except StagewiseError as e:
        print(e)
        sys.exit(3)
"""


def test_milvus_lite_serves_a_file_to_one_process_at_a_time(built):
    """Another process is refused with a one-line error while this one holds the file, and let in after."""
    uri = vectors_of(Index.load(built)).uri
    proc = _run(LOCKED, uri)
    assert proc.returncode == 3 and f"cannot open Milvus at {uri}" in proc.stdout, proc.stdout + proc.stderr
    release(uri)
    proc = _run(LOCKED, uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(Index.load(built)) == 6  # and this process can take it back


# ---- rebuilds and collections ------------------------------------------------------------------


def test_a_rebuild_makes_a_new_collection_and_the_old_one_is_dropped_once_pruned(built, make):
    first = vectors_of(Index.load(built))
    store = milvus_index.client(first.uri)
    smaller = {d: doc for d, doc in docs().items() if d in ("d1", "d2", "d3")}
    rebuilt = Index.build(make(), smaller, built, vectors=MILVUS, replace=True)
    second = vectors_of(rebuilt)

    assert second.collection != first.collection and second.uri == first.uri
    assert sorted(store.list_collections()) == sorted([first.collection, second.collection])  # v1 is still kept
    assert_same_answers(answers(Index.load(built), k=6), answers(make().index(smaller), k=6))

    rebuilt.add(NEW_DOCS)  # v000001 is pruned by this commit, and its collection with it
    assert versions(built) == ["v000002", "v000003"]
    assert store.list_collections() == [second.collection]
    assert len(Index.load(built)) == 5


def test_a_failed_rebuild_leaves_no_orphan_collection(built, make, monkeypatch):
    store = milvus_index.client(vectors_of(Index.load(built)).uri)
    kept = store.list_collections()
    with monkeypatch.context() as m:
        m.setattr(index_module, "_write_docs", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            Index.build(make(), docs(), built, vectors=MILVUS, replace=True)
    assert Index.load(built).version == "v000001"
    Index.load(built).add(NEW_DOCS)  # a later commit is the other chance to clean up
    assert store.list_collections() == kept


def test_an_index_with_its_default_milvus_file_can_move(built, tmp_path):
    before = answers(Index.load(built))
    release(str(built.resolve() / "milvus.db"))
    shutil.move(built, tmp_path / "elsewhere")
    assert_same_answers(answers(Index.load(tmp_path / "elsewhere")), before)


def test_the_cli_builds_updates_and_refuses_milvus_indexes(tiny_bi_encoder, tmp_path):
    """``index build --kind milvus`` (default file INDEX/milvus.db), ``index add``; quantization is refused."""
    from typer.testing import CliRunner

    from conftest import write_beir
    from stagewise.cli import app

    runner = CliRunner()
    corpus = write_beir(tmp_path / "data") / "corpus.jsonl"
    out = tmp_path / "idx"
    result = runner.invoke(app, ["index", "build", "--pipeline", str(tiny_bi_encoder), "--corpus", str(corpus),
                                 "--out", str(out), "--kind", "milvus"])
    assert result.exit_code == 0, result.output
    assert (out / "milvus.db").exists() and vectors_of(Index.load(out)).uri == str(out.resolve() / "milvus.db")
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in NEW_DOCS))
    result = runner.invoke(app, ["index", "add", str(out), str(extra)])
    assert result.exit_code == 0, result.output
    assert len(Index.load(out)) == 8 and Index.load(out).search("Volcanoes Volcanoes erupt molten lava and "
                                                                "volcanic ash.", k=1)[0].doc_id == "d7"

    bad = runner.invoke(app, ["index", "build", "--pipeline", str(tiny_bi_encoder), "--corpus", str(corpus),
                              "--out", str(tmp_path / "idx2"), "--kind", "milvus", "-q", "int8"])
    assert bad.exit_code == 2 and "quantization must be 'none'" in bad.output
    assert not (tmp_path / "idx2").exists()


# ---- the current directory ---------------------------------------------------------------------


def test_the_milvus_path_writes_nothing_into_the_current_directory(make, tmp_path, monkeypatch):
    """MilvusClient opens a relative ``.db`` path in the current directory (a ``milvus.db/LOCK`` was once committed
    at the repository root): building, updating, loading and searching an index elsewhere leaves the cwd empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = tmp_path / "idx"
    index = Index.build(make(), docs(), path, vectors=MILVUS)
    index.add(NEW_DOCS)
    index.delete(["d2"])
    loaded = Index.load(path)
    expected = answers(make().index({d.id: d for d in index.corpus.values()}), k=6)
    assert_same_answers(answers(loaded, k=6), expected)

    # a loaded stage keeps the index's own file (vectors.json stores it relative to the index), so indexing
    # another corpus with it makes its collection there, not in a ./milvus.db
    stage = loaded.pipeline.first_stage
    assert stage.vector_config.uri == str(path.resolve() / "milvus.db")
    stage.index(docs())
    assert vectors_of(loaded).uri == str(path.resolve() / "milvus.db")

    # a version's vectors copied out of the index cannot say which file they mean: refused, nothing opened here
    copy = tmp_path / "copy"
    shutil.copytree(path / loaded.version / "first_stage", copy)
    with pytest.raises(StagewiseError, match="stored relative to its index folder"):
        VectorIndex.load(next(copy.rglob("vectors.json")).parent)
    assert list(cwd.iterdir()) == []


def test_a_relative_milvus_uri_is_the_one_given_wherever_the_index_is_loaded(make, tmp_path, monkeypatch):
    """``--milvus-uri vectors.db`` means ./vectors.db where the index is built: stored absolute, so a load from
    another directory opens that file (not INDEX/vectors.db, nor one in its own cwd)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    config = VectorIndexConfig(kind="milvus", uri="vectors.db")
    expected = answers(make().index(docs()))
    Index.build(make(), docs(), tmp_path / "idx", vectors=config)
    uri = str(tmp_path.resolve() / "a" / "vectors.db")
    release(uri)
    monkeypatch.chdir(tmp_path / "b")
    loaded = Index.load(tmp_path / "idx")
    assert vectors_of(loaded).uri == uri
    assert_same_answers(answers(loaded), expected)
    assert list((tmp_path / "b").iterdir()) == [] and not (tmp_path / "idx" / "vectors.db").exists()


def test_a_collection_not_loaded_yet_is_loaded_and_searched_again(built, monkeypatch):
    """A Milvus server that restarted loads its collections in the background; a search before that is retried
    once after ``load_collection`` (tests/test_milvus_server.py restarts a real one)."""
    from pymilvus.exceptions import MilvusException

    index = Index.load(built)
    before = answers(index)
    v = vectors_of(index)
    real, calls = v.client.search, []

    def search(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MilvusException(code=101, message="failed to search: collection not loaded")
        return real(*args, **kwargs)

    monkeypatch.setattr(v.client, "search", search)
    assert_same_answers(answers(index), before)
    assert len(calls) == 2


def _failing_search(v: MilvusVectors, monkeypatch, error: Exception) -> tuple[list[bool], list]:
    """Make the client's searches raise ``error`` while ``down[0]`` is true (it starts true); also returns the
    timeout each search was given."""
    real, down, timeouts = v.client.search, [True], []

    def search(*args, **kwargs):
        timeouts.append(kwargs.get("timeout"))
        if down[0]:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(v.client, "search", search)
    return down, timeouts


def test_a_milvus_outage_is_a_503_naming_no_address_and_health_says_so(built, monkeypatch):
    """What pymilvus raises while the server is down (a MilvusException naming its address) is a 503 with
    Retry-After and a message for clients, /health is 200 with status degraded; as soon as Milvus answers again
    so does the service (tests/test_milvus_server.py stops and restarts a real server)."""
    import httpx
    from pymilvus.exceptions import MilvusException

    from conftest import running_server
    from stagewise.serving.service import ServiceSettings, create_app

    index = Index.load(built)
    v = vectors_of(index)
    with running_server(create_app(index, ServiceSettings())) as base:
        down, timeouts = _failing_search(v, monkeypatch, MilvusException(code=2, message=(
            "Fail connecting to server on 127.0.0.1:29530, illegal connection params or server unavailable")))
        for body in ({"query": "cats"}, {"query": "cats", "rerank": False}):
            r = httpx.post(base + "/search", json=body, timeout=30)
            assert r.status_code == 503, r.text
            assert r.json() == {"error": "the vector store is unavailable: Milvus is not reachable; retry shortly"}
            assert int(r.headers["retry-after"]) >= 1
        health = httpx.get(base + "/health", timeout=30).json()
        assert (health["status"], health["vector_store"]) == ("degraded", {"status": "down",
                                                                           "error": "Milvus is not reachable"})
        down[0] = False
        r = httpx.post(base + "/search", json={"query": "cats", "k": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["hits"]) == 3
        health = httpx.get(base + "/health", timeout=30).json()
        assert (health["status"], health["vector_store"]) == ("ok", {"status": "up"})
    assert timeouts and all(t is not None and t <= milvus_index.CALL_TIMEOUT_S for t in timeouts), timeouts


@pytest.mark.parametrize("error, reason", [
    ("deadline", "Milvus did not answer within {seconds:g} s"),
    ("retry timeout", "Milvus did not answer within {seconds:g} s"),
    ("unavailable", "Milvus is not reachable"),
    ("loading", "Milvus is loading the collection (after a restart)"),
])
def test_each_kind_of_outage_is_unavailable_with_a_message_for_clients(built, monkeypatch, error, reason):
    """A search never waits out an outage and never passes pymilvus' text on: a gRPC deadline, pymilvus' retry
    timeout, a refused connection, or a collection that is still loading after ``CALL_TIMEOUT_S``; any other
    failure is raised as it is."""
    import grpc
    from pymilvus.exceptions import MilvusException

    from stagewise.errors import Unavailable

    class RpcError(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

    errors = {"deadline": RpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
              "retry timeout": MilvusException(code=65535, message="[search] Retry timeout: 3.0s, message=proxy "
                                                                   "TaskCondition context Done"),
              "unavailable": RpcError(grpc.StatusCode.UNAVAILABLE),
              "loading": MilvusException(code=101, message="failed to search: collection not loaded[collection=1]")}
    v = vectors_of(Index.load(built))
    _failing_search(v, monkeypatch, errors[error])
    if error == "loading":  # the load it asks for does not finish within the call's time
        monkeypatch.setattr(v.client, "load_collection", lambda name, timeout: (_ for _ in ()).throw(MilvusException(
            message=f"wait for loading collection timeout, collection: {name}")))
    with pytest.raises(Unavailable) as e:
        v.search(np.ones((1, v.dim), dtype=np.float32), 2)
    assert str(e.value) == f"the vector store is unavailable: {reason.format(seconds=milvus_index.CALL_TIMEOUT_S)}; " \
                           "retry shortly"
    assert v.ping() == reason.format(seconds=milvus_index.PROBE_TIMEOUT_S)  # what /health says

    _failing_search(v, monkeypatch, MilvusException(code=1100, message="invalid parameter"))
    with pytest.raises(MilvusException, match="invalid parameter"):
        v.search(np.ones((1, v.dim), dtype=np.float32), 2)


# ---- refusals ----------------------------------------------------------------------------------


def test_a_missing_collection_is_refused_by_name(built):
    v = vectors_of(Index.load(built))
    v.client.drop_collection(v.collection)
    with pytest.raises(StagewiseError, match=f"Milvus collection '{v.collection}' not found") as e:
        Index.load(built)
    assert "rebuild the index" in str(e.value)


def test_quantization_and_a_missing_uri_are_refused():
    with pytest.raises(StagewiseError, match="quantization must be 'none'"):
        VectorIndexConfig(kind="milvus", quantization="int8")
    with pytest.raises(StagewiseError, match="needs a URI"):
        VectorIndex.build(np.ones((2, 4), dtype=np.float32), VectorIndexConfig(kind="milvus"))


def test_a_corrupted_keys_file_is_refused(built):
    """The index's own checksums cover the Milvus version's files (keys, retired keys, metadata)."""
    target = built / "v000001" / "first_stage" / "keys.npy"
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01
    target.write_bytes(data)
    with pytest.raises(InvalidIndexError, match="checksum mismatch") as e:
        Index.load(built)
    assert str(target) in str(e.value)
    assert len(Index.load(built, verify=False)) == 6  # the checksum is what refuses it


def test_the_vectors_stay_in_milvus(built):
    """Only inner-product search is available: there is no in-process embedding matrix to hand out."""
    v = vectors_of(Index.load(built))
    with pytest.raises(StagewiseError, match="keeps its vectors in Milvus"):
        v.embeddings
    assert v.memory_bytes() == 6 * 8 and v.dim == 32 and len(v) == 6
