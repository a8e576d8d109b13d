"""Where batch work runs: in this process (the default) or on Ray, for corpus encoding and cross-encoder scoring.

``with engine.use("ray", address=None):`` routes the two expensive batch jobs (encoding a corpus, scoring a
large set of query-document pairs) to Ray Data: ``map_batches`` over model actors, one model load per actor,
so the same code runs on a laptop's local Ray and on a multi-node cluster (``address="ray://head:10001"`` or
``"auto"``). Ray retries a failed task or a dead actor; every row is tagged with its position, and the result
is checked to hold each position exactly once, so nothing is lost or duplicated. Query-time work (encoding
one query, reranking one query's candidates) always stays local: shipping it would cost more than it saves.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from stagewise.errors import StagewiseError

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass
class EngineConfig:
    name: str = "local"
    address: str | None = None  # None: start (or join) a local Ray; "auto" or "ray://host:10001": a cluster
    actors: int | None = None  # model actors; default: one per CPU Ray reports
    cpus_per_actor: float = 1.0
    batch_size: int = 64  # texts (or pairs) per Ray Data batch handed to one actor call
    min_items: int = 256  # fewer texts or pairs than this are not worth a round trip to the cluster
    retries: int = 3  # restarts of a dead actor, and retries of its batch


_current = EngineConfig()


def current() -> EngineConfig:
    return _current


@contextlib.contextmanager
def use(name: str = "local", address: str | None = None, **options):
    """Run the batch work inside this block on ``name`` (``local`` or ``ray``)."""
    global _current
    if name not in ENGINES:
        raise StagewiseError(f"unknown engine {name!r} (expected one of: {', '.join(ENGINES)})")
    previous, _current = _current, EngineConfig(name, address, **options)
    try:
        if name == "ray":
            _init_ray(address)
        yield _current
    finally:
        _current = previous


def distributed(items: int) -> bool:
    return _current.name == "ray" and items >= _current.min_items


def _init_ray(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise StagewiseError("the ray engine needs Ray: pip install 'stagewise[scale]' (or 'ray[data]')") from None
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StagewiseError(f"cannot start or reach Ray at {address or 'a new local instance'}: {e}") from None


class _EncodeActor:
    """One bi-encoder per actor process, loaded once; encodes each batch of documents."""

    def __init__(self, model_path: str, max_seq_length: int | None, normalize: bool, batch_size: int, backend: dict,
                 threads: int):
        from stagewise.models.backends import Backend
        from stagewise.models.specs import load_bi_encoder

        self.model = load_bi_encoder(model_path, device="cpu", max_seq_length=max_seq_length,
                                     backend=Backend.from_config(backend), threads=max(1, threads))
        self.normalize, self.batch_size = normalize, batch_size

    def __call__(self, batch: dict) -> dict:
        embeddings = self.model.encode_document(list(batch["text"]), batch_size=self.batch_size, convert_to_numpy=True,
                                                normalize_embeddings=self.normalize, show_progress_bar=False)
        return {"row": batch["row"], "vector": np.asarray(embeddings, dtype=np.float32)}


class _ScoreActor:
    """One cross-encoder per actor process, loaded once; scores each batch of (query, document) pairs."""

    def __init__(self, model_path: str, max_length: int | None, batch_size: int, backend: dict, threads: int):
        from stagewise.models.backends import Backend
        from stagewise.models.specs import load_cross_encoder

        self.model = load_cross_encoder(model_path, device="cpu", max_length=max_length, warn_untrained=False,
                                        backend=Backend.from_config(backend), threads=max(1, threads))
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        pairs = list(zip(batch["query"], batch["text"]))
        scores = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True)
        return {"row": batch["row"], "vector": np.asarray(scores, dtype=np.float32).reshape(len(pairs), -1)}


def _run(items: list[dict], actor, constructor_kwargs: dict) -> np.ndarray:
    """``map_batches`` over an actor pool; rows reassembled in input order and checked: each exactly once."""
    import ray.data
    import ray.exceptions

    c = _current
    actors = c.actors or max(1, int(ray.available_resources().get("CPU", 1) // c.cpus_per_actor))
    dataset = ray.data.from_items([{"row": i, **item} for i, item in enumerate(items)])
    try:  # a dead actor is restarted and its batch retried, a few times: a batch that always kills it fails the job
        out = dataset.map_batches(actor, fn_constructor_kwargs={**constructor_kwargs, "threads": int(c.cpus_per_actor)},
                                  batch_size=c.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                                  num_cpus=c.cpus_per_actor, batch_format="numpy", max_restarts=c.retries,
                                  max_task_retries=c.retries).take_all()
    except (ray.exceptions.RayError, ray.exceptions.RayTaskError) as e:
        raise StagewiseError(f"the Ray job failed after {c.retries} retries: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    rows = np.array([r["row"] for r in out], dtype=np.int64)
    if len(rows) != len(items) or not np.array_equal(np.sort(rows), np.arange(len(items))):
        missing = len(set(range(len(items))) - set(rows.tolist()))
        raise StagewiseError(f"Ray returned {len(rows)} rows for {len(items)} inputs ({missing} missing, "
                             f"{len(rows) - len(set(rows.tolist()))} duplicated): refusing a partial result")
    vectors = np.stack([np.asarray(r["vector"], dtype=np.float32) for r in out])
    result = np.empty_like(vectors)
    result[rows] = vectors
    return result


def encode_documents(model_path: str, texts: Sequence[str], max_seq_length: int | None, normalize: bool,
                     batch_size: int, backend=None) -> np.ndarray:
    """Corpus embeddings computed by Ray actors, in the order of ``texts``; each actor runs ``backend``."""
    logger.info("encoding %d documents on Ray", len(texts))
    return _run([{"text": t} for t in texts], _EncodeActor,
                {"model_path": model_path, "max_seq_length": max_seq_length, "normalize": normalize,
                 "batch_size": batch_size, "backend": backend.config() if backend else None})


def score_pairs(model_path: str, pairs: Sequence[tuple[str, str]], max_length: int | None,
                batch_size: int, backend=None) -> np.ndarray:
    """Cross-encoder scores computed by Ray actors, in the order of ``pairs``; each actor runs ``backend``."""
    logger.info("scoring %d pairs on Ray", len(pairs))
    scores = _run([{"query": q, "text": t} for q, t in pairs], _ScoreActor,
                  {"model_path": model_path, "max_length": max_length, "batch_size": batch_size,
                   "backend": backend.config() if backend else None})
    return scores.reshape(len(pairs))
