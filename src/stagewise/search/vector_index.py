"""Vector search over corpus embeddings: exact or approximate (HNSW), full precision or quantised.

A :class:`VectorIndex` keeps the float32 embeddings (memory-mapped once saved) and, for the fast path, either
nothing more (exact search by matrix product), quantised codes (int8 or binary, via sentence-transformers'
``quantize_embeddings``), an HNSW graph (usearch), or both. Quantised and approximate searches fetch
``rescore × k`` candidates and rescore them against the full-precision embeddings, so scores are always
the model's own similarity. Rows carry stable integer keys, so documents can be added and removed
without rebuilding the graph or re-encoding anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stagewise.errors import StagewiseError

EMBEDDED_KINDS = ("exact", "hnsw")  # searched in this process
KINDS = (*EMBEDDED_KINDS, "milvus")  # milvus: vectors in a Milvus collection (milvus_index.py)
QUANTIZATIONS = ("none", "int8", "binary")
#: Each HNSW / rescoring number's range, with the command-line option that sets it. usearch refuses fewer than 2
#: edges per node and allocates per edge (a billion ran out of memory); beams past a few thousand only cost time.
RANGES = {"rescore": (1, 1000, "--rescore"), "connectivity": (2, 256, "--connectivity"),
          "expansion_add": (1, 4096, "--ef-construction"), "expansion_search": (1, 4096, "--ef-search")}


@dataclass
class VectorIndexConfig:
    """How corpus vectors are searched: exact or HNSW (or Milvus), full precision or quantised, and its settings."""

    kind: str = "exact"  # exact | hnsw | milvus
    quantization: str = "none"  # none | int8 | binary
    rescore: int = 4  # quantised / approximate: fetch rescore × k candidates, rescore in full precision
    connectivity: int = 16  # HNSW: edges per node (M)
    expansion_add: int = 128  # HNSW: ef_construction
    expansion_search: int = 64  # HNSW: ef at query time (raised to the number of candidates wanted)
    uri: str | None = None  # milvus: a local file (Milvus Lite) or http://host:19530
    collection: str | None = None  # milvus: collection name prefix

    def __post_init__(self):
        if self.kind not in KINDS:
            raise StagewiseError(f"unknown index kind {self.kind!r} (expected one of: {', '.join(KINDS)})")
        if self.quantization not in QUANTIZATIONS:
            raise StagewiseError(
                f"unknown quantization {self.quantization!r} (expected one of: {', '.join(QUANTIZATIONS)})")
        if self.kind == "milvus" and self.quantization != "none":
            raise StagewiseError("a milvus index stores float32 vectors: quantization must be 'none'")
        for name, (low, high, option) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise StagewiseError(f"option '{option}': index option {name} must be at least {low} and at most "
                                     f"{high}, got {value!r}")

    @property
    def label(self) -> str:
        return self.kind if self.quantization == "none" else f"{self.kind}-{self.quantization}"


class VectorIndex:
    """Search ``embeddings`` (rows of unit vectors for cosine models, raw for dot-product ones) by inner product."""

    def __init__(self, embeddings: np.ndarray, keys: np.ndarray, config: VectorIndexConfig,
                 ranges: np.ndarray | None = None, graph=None, codes: np.ndarray | None = None):
        self.embeddings, self.keys, self.config = embeddings, keys, config
        self.ranges, self.graph = ranges, graph
        self.codes = codes if codes is not None else self._quantize(embeddings)
        if self.graph is None and config.kind == "hnsw":
            self.graph = self._new_graph()
            if len(keys):
                self.graph.add(keys, self.codes if self.codes is not None else embeddings, threads=0)

    # ---- building ----------------------------------------------------------------------------

    @classmethod
    def build(cls, embeddings: np.ndarray, config: VectorIndexConfig | None = None) -> "VectorIndex":
        if config is not None and config.kind == "milvus":
            from stagewise.scale.milvus import MilvusVectors

            return MilvusVectors.build(embeddings, config)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        return cls(embeddings, np.arange(len(embeddings), dtype=np.uint64), config or VectorIndexConfig())

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def _quantize(self, embeddings: np.ndarray) -> np.ndarray | None:
        from sentence_transformers.quantization import quantize_embeddings

        q = self.config.quantization
        if q == "none":
            return None
        if q == "binary":
            return quantize_embeddings(embeddings, precision="ubinary")
        if self.ranges is None:  # int8 ranges are calibrated on the first documents, then kept for later additions
            if not len(embeddings):
                return np.zeros((0, embeddings.shape[1]), dtype=np.int8)
            self.ranges = np.vstack([embeddings.min(axis=0), embeddings.max(axis=0)]).astype(np.float32)
        clipped = np.clip(embeddings, self.ranges[0], self.ranges[1])  # quantize_embeddings wraps out-of-range values
        return quantize_embeddings(clipped, precision="int8", ranges=self.ranges)

    def _new_graph(self):
        from usearch.index import Index

        c = self.config
        metric, dtype = {"none": ("ip", "f32"), "int8": ("ip", "i8"), "binary": ("hamming", "b1")}[c.quantization]
        return Index(ndim=self.dim, metric=metric, dtype=dtype, connectivity=c.connectivity,
                     expansion_add=c.expansion_add, expansion_search=c.expansion_search)

    def updated(self, remove_rows: np.ndarray, add_embeddings: np.ndarray) -> "VectorIndex":
        """A new index without ``remove_rows`` and with ``add_embeddings`` appended; the graph is edited, not rebuilt.

        The graph object is shared with (and edited under) ``self``: use the result, not ``self``, afterwards.
        """
        keep = np.ones(len(self.keys), dtype=bool)
        keep[np.asarray(remove_rows, dtype=np.int64)] = False
        add_embeddings = np.ascontiguousarray(add_embeddings, dtype=np.float32).reshape(-1, self.dim)
        next_key = int(self.keys.max()) + 1 if len(self.keys) else 0
        new_keys = np.arange(next_key, next_key + len(add_embeddings), dtype=np.uint64)
        add_codes = self._quantize(add_embeddings) if len(add_embeddings) else None
        graph = self.graph
        if graph is not None:
            removed = self.keys[~keep]
            if len(removed):
                graph.remove(removed)
            if len(new_keys):
                graph.add(new_keys, add_codes if add_codes is not None else add_embeddings, threads=0)
        codes = None
        if self.codes is not None:
            codes = self.codes[keep] if add_codes is None else np.concatenate([self.codes[keep], add_codes])
        embeddings = np.concatenate([np.asarray(self.embeddings[keep]), add_embeddings])
        return VectorIndex(embeddings, np.concatenate([self.keys[keep], new_keys]), self.config, self.ranges,
                           graph, codes)

    # ---- searching ---------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows and their inner products for each query, best first: ``(rows, scores)``, each ``(n, k)``."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), dtype=np.int64), np.zeros((len(queries), 0), dtype=np.float32)
        if self.config.kind == "exact" and self.codes is None:
            return top_k(inner_products(queries, self.embeddings), k)
        candidates = self._candidates(queries, min(len(self), k * self.config.rescore))
        scores = np.einsum("qd,qcd->qc", queries, np.asarray(self.embeddings)[candidates])  # full-precision rescore
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(candidates, order, 1), np.take_along_axis(scores, order, 1)

    def _candidates(self, queries: np.ndarray, n: int) -> np.ndarray:
        """``n`` candidate rows per query from the fast structure (quantised codes and/or the graph)."""
        if self.config.kind == "hnsw":
            matches = self.graph.search(self._quantize_queries(queries), n, threads=0)
            keys = np.asarray(matches.keys).reshape(len(queries), -1)[:, :n]
            rows = np.searchsorted(self.keys, keys)
            counts = matches.counts if hasattr(matches, "counts") else [len(matches.keys)]  # one query: Matches
            for i, found in enumerate(np.asarray(counts).reshape(-1)):
                if found < n:  # the graph found fewer than asked (tiny or heavily edited): search this query exactly
                    rows[i] = top_k(inner_products(queries[i:i + 1], self.embeddings), n)[0][0]
            return rows
        from usearch.index import MetricKind, search  # exact SIMD scan over the codes

        metric = MetricKind.Hamming if self.config.quantization == "binary" else MetricKind.IP
        found = search(self.codes, self._quantize_queries(queries), n, metric, exact=True, threads=0)
        return np.asarray(found.keys, dtype=np.int64).reshape(len(queries), -1)

    def _quantize_queries(self, queries: np.ndarray) -> np.ndarray:
        return self._quantize(queries) if self.codes is not None else queries

    # ---- persistence -------------------------------------------------------------------------

    def save(self, folder: Path) -> list[Path]:
        """Write the embeddings, keys, codes and graph into ``folder``; returns the files written."""
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / "embeddings.npy", folder / "keys.npy", folder / "vectors.json"]
        np.save(files[0], np.asarray(self.embeddings, dtype=np.float32))
        np.save(files[1], self.keys)
        meta = {"config": asdict(self.config), "dim": self.dim, "count": len(self),
                "ranges": self.ranges.tolist() if self.ranges is not None else None}
        files[2].write_text(json.dumps(meta))
        if self.codes is not None:
            files.append(folder / "codes.npy")
            np.save(files[-1], self.codes)
        if self.graph is not None:
            files.append(folder / "graph.usearch")
            self.graph.save(str(files[-1]))
        return files

    @classmethod
    def load(cls, folder: Path) -> "VectorIndex":
        meta = json.loads((folder / "vectors.json").read_text())
        config = VectorIndexConfig(**meta["config"])
        if config.kind == "milvus":
            from stagewise.scale.milvus import MilvusVectors

            return MilvusVectors.load(folder, config, meta)
        embeddings = np.load(folder / "embeddings.npy", mmap_mode="r")  # read from disk only for rescoring
        keys = np.load(folder / "keys.npy")
        codes = np.load(folder / "codes.npy") if (folder / "codes.npy").is_file() else None
        ranges = np.asarray(meta["ranges"], dtype=np.float32) if meta.get("ranges") is not None else None
        graph = None
        if config.kind == "hnsw":
            from usearch.index import Index

            graph = Index.restore(str(folder / "graph.usearch"))
        if config.kind == "exact" and codes is None:
            embeddings = np.asarray(embeddings)  # exact full-precision search reads every row: keep them in memory
        return cls(embeddings, keys, config, ranges, graph, codes)

    def memory_bytes(self) -> int:
        """Bytes the fast path holds in memory: all embeddings for exact search, else the codes and graph."""
        if self.config.kind == "exact" and self.codes is None:
            return int(self.embeddings.nbytes)
        total = int(self.codes.nbytes) if self.codes is not None else 0
        if self.graph is not None:  # the graph with the vectors it stores (f32, i8 or b1)
            total += int(self.graph.serialized_length)
        return total


def inner_products(queries: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """``queries @ embeddings.T``, computed by PyTorch: its thread pool is the one the models already use. numpy's
    BLAS keeps a pool of its own whose threads spin for a while after each product; between two query encodings
    they took the 2 cores from PyTorch's and made a 7 ms query take 100 ms (measured here, per query, MiniLM)."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a memory-mapped index is read-only: it is only read here
        return (torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
                @ torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).T).numpy()


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, top, 1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(top, order, 1), np.take_along_axis(part, order, 1)
