"""Vectors kept in Milvus (``pymilvus``'s ``MilvusClient``), behind the same interface as :class:`VectorIndex`.

A local file path as ``uri`` is Milvus Lite (embedded: tests, one machine); ``http://host:19530`` is a Milvus
server or cluster; the code is the same. Milvus holds the vectors and does the search; the index version on
disk holds only the sorted keys it owns, the collection's name and a key watermark.

Versions share one collection, so an update never disturbs the version that is still current:
new rows get keys above the current watermark (readers filter ``key < watermark``), rows a version deletes
stay in Milvus until the next update (readers of the previous version still need them; readers of the new
one skip them), and rows inserted by a writer that died before its commit are above every committed
watermark and are removed by the next update.

A Milvus Lite path is never left relative: MilvusClient (milvus-lite) opens a relative ``.db`` path in the
current directory, so a relative ``--milvus-uri`` is made absolute when the index is built, and a path stored
relative to its index is resolved against that index folder only (never against the current directory).
Tested against Milvus Lite and against the standalone server that the ``milvus`` package runs
(tests/test_milvus_server.py).

A search never waits on an outage: each call has a deadline (``CALL_TIMEOUT_S``, reconnecting included), and a
server that is down, restarting or still loading the collection raises :class:`~stagewise.errors.Unavailable`
with a message for clients (no internal address), which the service answers with 503. pymilvus reconnects on
the next call, so answers resume as soon as the server does, not after a request timeout.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from pathlib import Path

import numpy as np

from stagewise.errors import StagewiseError, Unavailable

MAX_LIMIT = 16384  # Milvus' largest top-k
# seconds a search (with its reconnect, or its wait for a reloading collection) may take before it is an outage:
# well under the service's request timeout, so a client hears 503 rather than waiting for its 504
CALL_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 2.0  # the /health probe's search
_clients: dict[str, object] = {}


def client(uri: str):
    """One ``MilvusClient`` per URI per process (Milvus Lite serves a file to one process)."""
    if uri not in _clients:
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise StagewiseError("the milvus index needs pymilvus: pip install 'stagewise[scale]' "
                                 "(pymilvus, and milvus-lite for a local file)") from None
        try:  # a server's (re)connections wait at most CALL_TIMEOUT_S; Milvus Lite starts a local process: its default
            _clients[uri] = MilvusClient(uri, timeout=CALL_TIMEOUT_S) if _is_server(uri) else MilvusClient(uri)
        except Exception as e:  # pymilvus raises its own MilvusException family, and OSError for Lite files
            raise StagewiseError(f"cannot open Milvus at {uri}: {e}") from None
    return _clients[uri]


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


def resolve_uri(uri: str, index_root: Path | None) -> str:
    """A Milvus Lite file stored relative to its index folder, made absolute; servers and absolute paths as given.

    Without the index folder a relative file is refused: opening it would make a Milvus Lite folder in the current
    directory (the ``milvus.db/LOCK`` once committed at the repository root)."""
    if _is_server(uri) or Path(uri).is_absolute():
        return uri
    if index_root is None:
        raise StagewiseError(f"the Milvus Lite file '{uri}' is stored relative to its index folder: load it from "
                             "the index (a vNNNNNN folder inside it), not from a copy outside it")
    return str(index_root.resolve() / uri)


def _hit_key(hit) -> int:
    """A search hit's primary key: Milvus Lite and servers from 2.4 name it by its field, 2.3 servers ``id``."""
    return hit["key"] if "key" in hit else hit["id"]


def _not_loaded(error: Exception) -> bool:
    """A server that restarted loads its collections again in the background; until then searches fail so."""
    return getattr(error, "code", None) == 101 or "not loaded" in str(error)


def _outage(error: Exception, seconds: float = CALL_TIMEOUT_S) -> str | None:
    """Why a call failed, in words for clients, when Milvus is down, restarting, loading or too slow; None when it
    failed for another reason. pymilvus raises gRPC errors and its own ``MilvusException`` (code 2: cannot connect)."""
    import grpc  # pymilvus' transport

    code = error.code() if isinstance(error, grpc.RpcError) else getattr(error, "code", None)
    text = str(error)
    if _not_loaded(error) or "loading collection" in text:
        return "Milvus is loading the collection (after a restart)"
    if code in (grpc.StatusCode.UNAVAILABLE, 2) or "Fail connecting" in text:
        return "Milvus is not reachable"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "Retry timeout" in text:
        return f"Milvus did not answer within {seconds:g} s"
    return None


def _index_root(folder: Path) -> Path | None:
    """The index folder above a version's (or a version being written's) first-stage folder."""
    for p in [folder, *folder.parents]:
        if re.match(r"^(v\d{6}|\.tmp-v\d{6}-.*)$", p.name):
            return p.parent
    return None


class MilvusVectors:
    """Search by inner product in a Milvus collection; ``keys`` (sorted) are the rows this version owns."""

    def __init__(self, config, uri: str, collection: str, dim: int, keys: np.ndarray, watermark: int,
                 retired: np.ndarray):
        self.config, self.uri, self.collection, self._dim = config, uri, collection, dim
        self.keys, self.watermark, self.retired = keys, watermark, retired
        self.client = client(uri)

    @classmethod
    def build(cls, embeddings: np.ndarray, config) -> "MilvusVectors":
        if not config.uri:
            raise StagewiseError("a milvus index needs a URI: a local file (Milvus Lite) or http://host:19530")
        if not _is_server(config.uri):  # relative to where it was built, not to wherever it is loaded next
            config = dataclasses.replace(config, uri=str(Path(config.uri).resolve()))
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        collection = f"{config.collection or 'stagewise'}_{uuid.uuid4().hex[:10]}"  # a rebuild never clobbers
        store = client(config.uri)
        store.create_collection(collection, dimension=embeddings.shape[1], primary_field_name="key", id_type="int",
                                vector_field_name="vector", metric_type="IP", auto_id=False,
                                consistency_level="Strong")  # a search sees every committed insert and delete
        keys = np.arange(len(embeddings), dtype=np.int64)
        self = cls(config, config.uri, collection, embeddings.shape[1], keys, len(embeddings), keys[:0])
        self._insert(keys, embeddings)
        return self

    def _insert(self, keys: np.ndarray, embeddings: np.ndarray, chunk: int = 5000) -> None:
        for start in range(0, len(keys), chunk):
            rows = [{"key": int(k), "vector": v.tolist()} for k, v in
                    zip(keys[start:start + chunk], embeddings[start:start + chunk])]
            self.client.insert(self.collection, rows)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def embeddings(self):
        raise StagewiseError("a milvus index keeps its vectors in Milvus: only inner-product search is available")

    def __len__(self) -> int:
        return len(self.keys)

    def updated(self, remove_rows: np.ndarray, add_embeddings: np.ndarray) -> "MilvusVectors":
        """Insert the new rows above the watermark; the removed ones are retired (deleted at the next update)."""
        if len(self.retired):  # only the version before this one still needed them; it is about to be pruned
            self.client.delete(self.collection, ids=[int(k) for k in self.retired])
        self.client.delete(self.collection, filter=f"key >= {self.watermark}")  # a dead writer's uncommitted rows
        keep = np.ones(len(self.keys), dtype=bool)
        keep[np.asarray(remove_rows, dtype=np.int64)] = False
        add_embeddings = np.ascontiguousarray(add_embeddings, dtype=np.float32).reshape(-1, self.dim)
        new_keys = np.arange(self.watermark, self.watermark + len(add_embeddings), dtype=np.int64)
        self._insert(new_keys, add_embeddings)
        return MilvusVectors(self.config, self.uri, self.collection, self.dim,
                             np.concatenate([self.keys[keep], new_keys]), self.watermark + len(add_embeddings),
                             self.keys[~keep])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, len(self))
        limit = k + len(self.retired)  # retired rows may take places in Milvus' answer; they are dropped below
        if limit > MAX_LIMIT:
            raise StagewiseError(f"k={k} plus {len(self.retired)} rows awaiting deletion exceeds Milvus' top-k "
                                 f"limit of {MAX_LIMIT}")
        rows = np.full((len(queries), k), -1, dtype=np.int64)  # -1: fewer hits than k (a stale version's reader)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        if k == 0:
            return rows, scores
        deadline = time.monotonic() + CALL_TIMEOUT_S
        try:
            try:
                answers = self._search(queries, limit, CALL_TIMEOUT_S)
            except Exception as e:
                if not _not_loaded(e):
                    raise
                # a restarted server loads it again by itself; asking makes sure, and waits what is left of the call
                self.client.load_collection(self.collection, timeout=max(0.1, deadline - time.monotonic()))
                answers = self._search(queries, limit, max(0.1, deadline - time.monotonic()))
        except Exception as e:
            reason = _outage(e)
            if reason is None:
                raise
            raise Unavailable(f"the vector store is unavailable: {reason}; retry shortly") from None
        retired = set(self.retired.tolist())
        for i, hits in enumerate(answers):
            kept = [(key, h["distance"]) for h in hits if (key := _hit_key(h)) not in retired][:k]
            found = np.array([key for key, _ in kept], dtype=np.int64)
            rows[i, :len(kept)] = np.searchsorted(self.keys, found)
            scores[i, :len(kept)] = [score for _, score in kept]
        return rows, scores

    def _search(self, queries: np.ndarray, limit: int, timeout: float):
        return self.client.search(self.collection, data=queries.tolist(), limit=limit, timeout=timeout,
                                  filter=f"key < {self.watermark}", output_fields=[], consistency_level="Strong")

    def ping(self) -> str | None:
        """None when Milvus answers a search of this collection within ``PROBE_TIMEOUT_S``; else why not (for
        /health: a collection searchable as the service searches it is what matters, not only a server that
        answers: after a restart, strongly consistent searches wait seconds longer than the rest)."""
        try:
            self._search(np.zeros((1, self.dim), dtype=np.float32), 1, PROBE_TIMEOUT_S)
        except Exception as e:
            return _outage(e, PROBE_TIMEOUT_S) or f"Milvus search failed ({type(e).__name__})"
        return None

    def save(self, folder: Path) -> list[Path]:
        from dataclasses import asdict

        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "keys.npy", self.keys)
        np.save(folder / "retired.npy", self.retired)
        uri, root = self.uri, _index_root(folder)
        if root is not None and not _is_server(uri) and Path(uri).resolve().is_relative_to(root.resolve()):
            uri = Path(uri).resolve().relative_to(root.resolve()).as_posix()  # a Lite file inside the index moves with it
        (folder / "vectors.json").write_text(json.dumps({
            "config": {**asdict(self.config), "uri": uri}, "dim": self.dim, "count": len(self), "uri": uri,
            "collection": self.collection, "watermark": self.watermark}))
        return [folder / "keys.npy", folder / "retired.npy", folder / "vectors.json"]

    @classmethod
    def load(cls, folder: Path, config, meta: dict) -> "MilvusVectors":
        uri = resolve_uri(meta["uri"], _index_root(folder))
        store = client(uri)
        try:  # a server that is down or restarting: one StagewiseError, so a service keeps its loaded version
            found = store.has_collection(meta["collection"])
            if found:
                store.load_collection(meta["collection"])
        except Exception as e:  # pymilvus' MilvusException family
            raise StagewiseError(f"{folder}: Milvus at {uri} did not answer: {e}") from None
        if not found:
            raise StagewiseError(f"{folder}: Milvus collection '{meta['collection']}' not found at {uri}: "
                                 "the index's vectors are gone (rebuild the index)")
        config = dataclasses.replace(config, uri=uri)  # stored relative to the index: never reopened from the cwd
        return cls(config, uri, meta["collection"], meta["dim"], np.load(folder / "keys.npy"), meta["watermark"],
                   np.load(folder / "retired.npy"))

    def drop(self) -> None:
        """Remove the collection (when no kept version uses it any more)."""
        self.client.drop_collection(self.collection)

    def memory_bytes(self) -> int:
        """What this process holds: the keys; the vectors live in Milvus."""
        return int(self.keys.nbytes + self.retired.nbytes)
