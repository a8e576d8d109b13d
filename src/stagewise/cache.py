"""On-disk cache of corpus embeddings, keyed by content: model fingerprint, encoding options and texts' hash.

Re-evaluating a model never re-encodes an unchanged corpus; a changed corpus or model gets a new key,
so a stale entry is never read. Entries are written atomically and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where Stagewise keeps derived files (unpacked models, embeddings, the default dataset):
    ``$STAGEWISE_CACHE`` or ``~/.cache/stagewise``."""
    return Path(os.environ.get("STAGEWISE_CACHE") or Path.home() / ".cache" / "stagewise")


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\x1e")
    return h.hexdigest()[:24]


@dataclass
class CachedEmbeddings:
    embeddings: np.ndarray
    docs_per_second: float  # measured when the entry was encoded
    from_cache: bool


class EmbeddingCache:
    """Corpus embeddings on disk, keyed by model fingerprint, encoding options and the texts' hash."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else cache_dir() / "embeddings"

    def key(self, model_fingerprint: str, texts: Sequence[str], options: dict) -> str:
        opts = json.dumps(options, sort_keys=True)
        return hashlib.sha256(f"{model_fingerprint}|{opts}|{texts_hash(texts)}".encode()).hexdigest()[:32]

    def get_or_encode(
        self,
        model_fingerprint: str,
        texts: Sequence[str],
        options: dict,
        encode: Callable[[Sequence[str]], np.ndarray],
    ) -> CachedEmbeddings:
        key = self.key(model_fingerprint, texts, options)
        vectors, meta = self.root / f"{key}.npy", self.root / f"{key}.json"
        if vectors.is_file() and meta.is_file():
            try:
                info = json.loads(meta.read_text())
                emb = np.load(vectors, mmap_mode="r")
                if emb.shape[0] == len(texts) and info.get("count") == len(texts):
                    logger.info("embeddings for %d texts read from cache %s", len(texts), vectors)
                    return CachedEmbeddings(np.asarray(emb), float(info.get("docs_per_second", 0.0)), True)
            except (ValueError, OSError, EOFError) as e:  # EOFError: a zero-byte .npy
                logger.warning("ignoring unreadable cache entry %s (%s); re-encoding", vectors, e)
        start = time.perf_counter()
        emb = np.asarray(encode(texts), dtype=np.float32)
        seconds = time.perf_counter() - start
        rate = len(texts) / seconds if seconds > 0 else float("inf")
        self._write(vectors, meta, emb, {"count": len(texts), "dim": int(emb.shape[1]), "seconds": seconds,
                                         "docs_per_second": rate, "options": options, "model": model_fingerprint})
        return CachedEmbeddings(emb, rate, False)

    def _write(self, vectors: Path, meta: Path, emb: np.ndarray, info: dict) -> None:
        """Vectors first, then the metadata that marks the entry complete; both by atomic rename."""
        self.root.mkdir(parents=True, exist_ok=True)
        for target, write in ((vectors, lambda f: np.save(f, emb)), (meta, lambda f: f.write(json.dumps(info).encode()))):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
