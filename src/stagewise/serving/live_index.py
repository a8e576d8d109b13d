"""The index a service answers from, following the folder's ``CURRENT`` as writers commit new versions.

A new version (from ``index add``, ``index delete`` or ``index build --replace``) is loaded and verified beside
the one being served, on a thread of its own; then one reference assignment swaps it in. A batch already
running finishes on the version it started with, so no request is lost or answered from a half-loaded index;
each answer names the version that gave it. A version that fails to load (corrupted, a model changed, an
untrained reranker) is not served: the previous one keeps answering and ``/health`` says why. ``/health`` also
probes a vector store the index searches through (a Milvus server), so an outage shows there, not only as 503s.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from stagewise.errors import StagewiseError
from stagewise.models.backends import Backend
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import require_trained
from stagewise.serving.index import Index, current_version


class LiveIndex:
    def __init__(self, index: Index, override: Pipeline | None = None, backend: Backend | None = None,
                 threads: int | None = None, allow_untrained_reranker: bool = False):
        """``override``: the pipeline given at start (``serve --pipeline``), kept over every new version."""
        require_trained(index.pipeline.reranker, allow_untrained_reranker, f"serve {index.path}")
        index.pipeline.warm_up()  # first-call costs paid here, not by the first requests
        self.index = index
        self._override = (override.reranker, override.depth, override.fusion) if override else None
        self._backend, self._threads, self._allow_untrained = backend, threads, allow_untrained_reranker
        self._lock = threading.Lock()  # one reload at a time
        self.loaded_at = time.time()
        self.reloads = 0
        self.failed: dict | None = None  # the last version that could not be loaded, and why

    @property
    def path(self) -> Path:
        return self.index.path

    def on_disk(self) -> str | None:
        """The version ``CURRENT`` names now (None while it cannot be read)."""
        try:
            return current_version(self.path)
        except StagewiseError:
            return None

    def stale(self) -> bool:
        version = self.on_disk()
        return version is not None and version != self.index.version and \
            (self.failed is None or self.failed["version"] != version)

    def reload(self) -> bool:
        """Load the version ``CURRENT`` names and swap it in; False (and ``failed`` set) when it cannot be served."""
        with self._lock:
            version = self.on_disk()
            if version is None or version == self.index.version:
                return False
            try:
                new = self._load()
                require_trained(new.pipeline.reranker, self._allow_untrained, f"serve {self.path} {new.version}")
                new.pipeline.warm_up()
            except (StagewiseError, OSError) as e:
                self.failed = {"version": version, "error": str(e)}
                return False
            self.index, self.failed = new, None  # the swap: one reference assignment
            self.loaded_at, self.reloads = time.time(), self.reloads + 1
            return True

    def _load(self) -> Index:
        if self._override is None:
            return Index.load(self.path, backend=self._backend, threads=self._threads)
        reranker, depth, fusion = self._override  # a fresh pipeline object: the served one is never touched
        return Index.load(self.path, pipeline=Pipeline(self.index.pipeline.first_stage, reranker, depth, fusion),
                          backend=self._backend, threads=self._threads)

    def health(self) -> dict:
        """The version served, and the state of its vector store where it has one of its own (may take a probe's
        time: call it off the event loop)."""
        stores = _remote_stores(self.index)
        down = next((why for why in (store.ping() for store in stores) if why), None)
        return {"version": self.index.version, "documents": len(self.index), "reloads": self.reloads,
                "loaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                **({"reload_failed": self.failed} if self.failed else {}),
                **({"vector_store": {"status": "down", "error": down} if down else {"status": "up"}} if stores else {})}


def _remote_stores(index: Index) -> list:
    """The first stage's vector stores that can fail apart from this process (they have ``ping``): Milvus."""
    first = index.pipeline.first_stage
    vectors = [getattr(stage, "vectors", None) for stage in getattr(first, "stages", [first])]
    return [v for v in vectors if hasattr(v, "ping")]
