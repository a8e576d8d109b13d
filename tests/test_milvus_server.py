"""Tests for stagewise.scale.milvus against a Milvus server in its own process, not Milvus Lite in ours.

The server is the standalone Milvus that the PyPI package ``milvus`` embeds (``pip install
'stagewise[milvus-server]'``, part of the ``test`` extra on Linux x86-64): started once for this module on a free
loopback port, its base dir (binaries, etcd, data, logs) under pytest's temporary folder, and stopped at the end.
The module is skipped, with the reason, where the package is absent or its server does not start.

What only a server shows: ``serve`` and ``index add`` in two processes on one collection (Milvus Lite serves a
file to one process), a reader on the previous version while another commits, and a restart with nothing lost.
Answers are compared with exact search in memory over the same documents, as in test_milvus_index.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pymilvus")
if importlib.util.find_spec("milvus") is None:
    pytest.skip("the Milvus server package is not installed: pip install 'stagewise[milvus-server]' "
                "(Linux x86-64 only)", allow_module_level=True)

from test_index import NEW_DOCS, TEXTS, answers, assert_same_answers, docs, versions  # noqa: E402

from conftest import write_beir  # noqa: E402
from stagewise.data.loaders import Document  # noqa: E402
from stagewise.scale import milvus as milvus_index  # noqa: E402
from stagewise.scale.milvus import MilvusVectors  # noqa: E402
from stagewise.search.pipeline import Pipeline  # noqa: E402
from stagewise.search.retrievers import build_first_stage  # noqa: E402
from stagewise.search.vector_index import VectorIndexConfig  # noqa: E402
from stagewise.serving.index import Index  # noqa: E402

# Run in a process of its own: ``default_server.start()`` changes the working directory while it starts the
# binary, and the server must outlive nothing of ours (it stops when its stdin closes, also if pytest dies).
LAUNCHER = r"""
import socket, subprocess, sys
from milvus import default_server as server

base, port = sys.argv[1], int(sys.argv[2])


def bind(self, port):  # SO_REUSEADDR: the same port again after a restart, its old connections in TIME_WAIT
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def free():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


server.set_base_dir(base)
server.config.try_bind_port = bind.__get__(server.config)
for key in list(server.config_keys):
    if key.endswith("_port"):  # internal ports: searched from a random free one, away from other servers'
        server.config.set(key, free())
server.config.update(proxy_port=port)  # the client's port: exactly this one, or fail
server.webservice_port = free()
server.config.set("common.gracefulStopTimeout", 5)  # seconds; the default waits up to 30 minutes
server.config.set("common.session.ttl", 5)  # a restart after a kill waits this long for the old sessions
server.start()
print("ready", server.server_proc.pid, flush=True)
sys.stdin.read()
server.server_proc.terminate()
try:
    server.server_proc.wait(timeout=15)
except subprocess.TimeoutExpired:
    pass
server.stop()  # kills what is left
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MilvusServer:
    """The embedded Milvus server as a subprocess; ``restart`` keeps its base dir and port (so its URI)."""

    def __init__(self, base: Path):
        self.base, self.port = base, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.milvus_pid: int | None = None
        self.start_s: list[float] = []

    def start(self, timeout: float = 180) -> None:
        started = time.monotonic()
        log = open(self.base.parent / "launcher.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(self.base), str(self.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                     cwd=self.base.parent)
        log.close()
        line = ""
        while time.monotonic() - started < timeout and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 1)[0]:
                line = self.proc.stdout.readline()
                break
        if not line.startswith("ready"):
            self.stop()
            raise RuntimeError(f"the Milvus server did not start in {timeout:.0f} s: {self.log_tail()}")
        self.milvus_pid = int(line.split()[1])
        self.start_s.append(time.monotonic() - started)

    def stop(self, graceful: bool = True) -> None:
        """Graceful: SIGTERM, then SIGKILL after 15 s (the launcher's); else SIGKILL at once (the data is done)."""
        if self.proc is None:
            return
        if not graceful and self.milvus_pid is not None:
            try:
                os.kill(self.milvus_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.milvus_pid is not None:  # the launcher died before stopping it
            try:
                os.kill(self.milvus_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = self.milvus_pid = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def version(self) -> str:
        return milvus_index.client(self.uri).get_server_version()

    def log_tail(self) -> str:
        lines = []
        for name in (self.base.parent / "launcher.log", self.base / "logs" / "milvus-stderr.log"):
            if name.is_file():
                lines += [f"{name.name}: {line}" for line in name.read_text(errors="replace").splitlines()[-5:]]
        return " | ".join(lines) or "no log"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Milvus server for the module; skipped with the reason when it cannot run here."""
    folder = tmp_path_factory.mktemp("milvus-server")
    server = MilvusServer(folder / "base")
    try:
        server.start()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"the Milvus server cannot run here: {e}")
    try:
        yield server
    finally:
        client = milvus_index._clients.pop(server.uri, None)
        if client is not None:
            client.close()
        server.stop(graceful=False)
        shutil.rmtree(server.base / "bin", ignore_errors=True)  # the unpacked server, 250 MB; the logs stay


@pytest.fixture
def config(server) -> VectorIndexConfig:
    return VectorIndexConfig(kind="milvus", uri=server.uri)


@pytest.fixture
def make(tiny_bi_encoder):
    """A fresh first-stage pipeline over the tiny bi-encoder (Index.build mutates the one it is given)."""
    return lambda: Pipeline(build_first_stage(str(tiny_bi_encoder), show_progress=False))


def exact(make, corpus: dict[str, Document], **kwargs):
    """The answers of exact search in memory over ``corpus``."""
    return answers(make().index(corpus), **kwargs)


def vectors_of(index: Index) -> MilvusVectors:
    assert isinstance(index.pipeline.first_stage.vectors, MilvusVectors)
    return index.pipeline.first_stage.vectors


def wait_until_searchable(index: Index, timeout: float = 90) -> None:
    """A restarted Milvus answers strongly consistent searches only once it has caught up (0.3 to 11 s here; until
    then a search is Unavailable, as a service's client gets 503): wait for that, as such a client would."""
    deadline = time.monotonic() + timeout
    while (why := vectors_of(index).ping()) is not None:
        assert time.monotonic() < deadline, f"Milvus did not answer searches again: {why}"
        time.sleep(0.2)


def write_docs(path: Path, documents) -> Path:
    path.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in documents))
    return path


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


# ---- the CLI: build, add, delete, search -------------------------------------------------------


def test_the_cli_builds_adds_deletes_and_searches_on_the_server(server, make, tiny_bi_encoder, tmp_path):
    from typer.testing import CliRunner

    from stagewise.cli import app

    runner = CliRunner()
    corpus = write_beir(tmp_path / "data") / "corpus.jsonl"
    out = tmp_path / "idx"
    result = runner.invoke(app, ["index", "build", "--pipeline", str(tiny_bi_encoder), "--corpus", str(corpus),
                                 "--out", str(out), "--kind", "milvus", "--milvus-uri", server.uri])
    assert result.exit_code == 0, result.output
    v = vectors_of(Index.load(out))
    assert v.uri == server.uri and v.collection in milvus_index.client(server.uri).list_collections()
    assert not (out / "milvus.db").exists()  # the server holds the vectors, no Lite file beside the versions
    assert_same_answers(answers(Index.load(out), k=6), exact(make, docs(), k=6))

    extra = write_docs(tmp_path / "extra.jsonl", NEW_DOCS)
    result = runner.invoke(app, ["index", "add", str(out), str(extra)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["index", "delete", str(out), "d2", "d5"])
    assert result.exit_code == 0, result.output

    corpus_now = {d: doc for d, doc in docs().items() if d not in ("d2", "d5")} | {d.id: d for d in NEW_DOCS}
    texts = TEXTS + [d.full_text() for d in NEW_DOCS]
    loaded = Index.load(out)
    assert loaded.version == "v000003" and list(loaded.corpus) == list(corpus_now)
    assert_same_answers(answers(loaded, k=6, texts=texts), exact(make, corpus_now, k=6, texts=texts))
    v = vectors_of(loaded)
    assert v.keys.tolist() == [0, 2, 3, 5, 6, 7] and v.retired.tolist() == [1, 4] and v.watermark == 8

    result = runner.invoke(app, ["search", str(out), NEW_DOCS[0].full_text(), "--json", "-k", "2"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert [h["doc_id"] for h in hits][0] == "d7" and hits[0]["first_stage_score"] == pytest.approx(1.0, abs=1e-4)


# ---- readers and writers -----------------------------------------------------------------------


def test_a_reader_on_the_previous_version_answers_correctly_while_an_update_commits(server, config, make,
                                                                                       tmp_path):
    """A thread keeps searching version 1 while another Index object adds, deletes and commits twice."""
    path = tmp_path / "idx"
    Index.build(make(), docs(), path, vectors=config)
    reader = Index.load(path)
    before = exact(make, docs(), k=6)
    seen, errors, done = [], [], threading.Event()

    def read():
        while not done.is_set():
            try:
                seen.append(answers(reader, k=6))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    thread = threading.Thread(target=read)
    thread.start()
    try:
        writer = Index.load(path)
        writer.add(NEW_DOCS)  # rows 6, 7 above version 1's watermark
        writer.delete(["d3"])  # d3's row is retired: version 1's reader still needs it
    finally:
        done.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert len(seen) >= 2
    for got in seen:
        assert_same_answers(got, before)
    assert_same_answers(answers(reader, k=6), before)  # after both commits too (v000001 is pruned from disk)

    corpus_now = {d: doc for d, doc in docs().items() if d != "d3"} | {d.id: d for d in NEW_DOCS}
    assert versions(path) == ["v000002", "v000003"]
    assert_same_answers(answers(Index.load(path), k=7), exact(make, corpus_now, k=7))


def test_the_service_answers_while_index_add_commits_from_another_process(server, config, make, tmp_path):
    """``serve`` and ``index add`` side by side (Milvus Lite refuses the second process): every answer during the
    add is version 1's or version 2's exactly, and the service moves to version 2 once it is committed."""
    import httpx

    from conftest import running_server
    from stagewise.serving.service import ServiceSettings, create_app

    path = tmp_path / "idx"
    Index.build(make(), docs(), path, vectors=config)
    new_corpus = docs() | {d.id: d for d in NEW_DOCS}
    query = NEW_DOCS[0].full_text()
    expected = {"v000001": exact(make, docs(), k=6, texts=[query])[0],
                "v000002": exact(make, new_corpus, k=6, texts=[query])[0]}
    extra = write_docs(tmp_path / "extra.jsonl", NEW_DOCS)

    def search(base: str) -> tuple[str, list]:
        r = httpx.post(base + "/search", json={"query": query, "k": 6, "include_text": False}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        return body["index_version"], [(h["doc_id"], h["first_stage_score"], False) for h in body["hits"]]

    with running_server(create_app(path, ServiceSettings(reload_interval_s=0.2))) as base:
        assert search(base)[0] == "v000001"
        writer = subprocess.Popen([sys.executable, "-m", "stagewise.cli", "index", "add", str(path), str(extra)],
                                  env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        answered = []
        while writer.poll() is None:
            answered.append(search(base))
            time.sleep(0.05)
        assert writer.returncode == 0, writer.stdout.read()
        deadline = time.monotonic() + 30
        while httpx.get(base + "/health").json()["version"] != "v000002" and time.monotonic() < deadline:
            answered.append(search(base))
            time.sleep(0.1)
        answered.append(search(base))

    assert len(answered) >= 10 and answered[0][0] == "v000001" and answered[-1][0] == "v000002"
    for version, hits in answered:
        assert_same_answers([hits], [expected[version]])
    assert answered[-1][1][0][0] == "d7"


# ---- a restart ---------------------------------------------------------------------------------


def test_a_server_restart_loses_nothing(server, config, make, tmp_path):
    """Stop and start the server on the same base dir: the index loads and answers as before, and a reader
    loaded before the restart (its client cached) answers again, then an update works."""
    path = tmp_path / "idx"
    index = Index.build(make(), docs(), path, vectors=config)
    index.add(NEW_DOCS)
    index.delete(["d1", "d4"])  # retired rows, a watermark above the first build's
    corpus_now = dict(index.corpus)
    texts = TEXTS + [d.full_text() for d in NEW_DOCS]
    expected = exact(make, corpus_now, k=6, texts=texts)
    reader = Index.load(path)
    assert_same_answers(answers(reader, k=6, texts=texts), expected)
    stored = vectors_of(reader)
    keys_before = sorted(r["key"] for r in stored.client.query(stored.collection, filter="key >= 0",
                                                                output_fields=["key"]))

    server.restart()

    loaded = Index.load(path)
    wait_until_searchable(loaded)
    assert loaded.version == reader.version and list(loaded.corpus) == list(corpus_now)
    assert_same_answers(answers(loaded, k=6, texts=texts), expected)
    assert_same_answers(answers(reader, k=6, texts=texts), expected)
    v = vectors_of(loaded)
    assert sorted(r["key"] for r in v.client.query(v.collection, filter="key >= 0",
                                                   output_fields=["key"])) == keys_before

    owls = Document("d9", "Owls", "Owls hunt at night.")
    loaded.add([owls])
    assert Index.load(path).search(owls.full_text(), k=1)[0].doc_id == "d9"
    assert server.version().startswith("v2.3")


# ---- an outage while serving -------------------------------------------------------------------


def test_an_outage_is_a_503_and_health_says_so_then_answers_resume(server, config, make, tmp_path):
    """Stop the server while the service answers: each search is a 503 naming no address (within the Milvus call
    deadline, not the request timeout) and /health is degraded. Start it again: while Milvus recovers (its own time,
    0.5 to 11 s here), searches are 503s that each take at most that deadline, never a 504 or a 500; once /health
    sees Milvus answer a search, the service answers within seconds, and /health is ok again."""
    import httpx

    from conftest import running_server
    from stagewise.serving.service import ServiceSettings, create_app

    path = tmp_path / "idx"
    Index.build(make(), docs(), path, vectors=config)
    quick = 2 * milvus_index.CALL_TIMEOUT_S + 1  # a call, its reconnect, and the rest of the request
    settings = ServiceSettings(reload_interval_s=0, timeout_s=10.0)
    assert quick < settings.timeout_s

    with running_server(create_app(path, settings)) as base:
        def search() -> tuple[httpx.Response, float]:
            began = time.monotonic()
            r = httpx.post(base + "/search", json={"query": "cats", "k": 2, "include_text": False}, timeout=30)
            return r, time.monotonic() - began

        def health() -> dict:
            return httpx.get(base + "/health", timeout=30).json()

        assert search()[0].status_code == 200 and health()["vector_store"] == {"status": "up"}
        server.stop()
        for _ in range(3):
            r, seconds = search()
            assert r.status_code == 503 and seconds < quick, (r.text, seconds)
            error = r.json()["error"]
            assert error.startswith("the vector store is unavailable: ") and error.endswith("; retry shortly")
            assert str(server.port) not in error and "127.0.0.1" not in error and "Exception" not in error, error
            assert int(r.headers["retry-after"]) >= 1
        state = health()
        assert state["status"] == "degraded" and state["vector_store"]["status"] == "down", state
        assert str(server.port) not in json.dumps(state)

        server.start()
        restarted, statuses = time.monotonic(), []
        while (state := health())["vector_store"]["status"] != "up":  # Milvus recovering: its own time, not ours
            r, seconds = search()
            statuses.append((r.status_code, round(seconds, 1)))
            assert r.status_code in (200, 503) and seconds < quick, (r.text, seconds)
            assert time.monotonic() - restarted < 90, f"Milvus never answered again: {state}"
        recovered = time.monotonic()
        while (r := search()[0]).status_code != 200:  # as soon as Milvus answers, so does the service
            assert r.status_code == 503 and time.monotonic() - recovered < quick, (r.text, time.monotonic() - recovered)
        answered = time.monotonic()
        assert state["status"] == "ok"
        assert [search()[0].status_code for _ in range(3)] == [200] * 3
    print(f"Milvus answered {recovered - restarted:.1f} s after its restart, the service {answered - recovered:.1f} s "
          f"later; searches meanwhile: {statuses}")
