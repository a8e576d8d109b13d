"""Shared fixtures: tiny randomly initialised models (seconds on a CPU, no network) and a small BEIR dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache directory, so no test reads another's embeddings."""
    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tokenizer_dir() -> Path:
    from stagewise.models.specs import resolve_model

    return resolve_model("minilm-l6").path


def _tiny_bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **extra)


@pytest.fixture(scope="session")
def tiny_bi_encoder(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with mean pooling and normalisation, saved as a sentence-transformers model."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("tiny-base")
    BertModel(_tiny_bert_config()).save_pretrained(base)
    AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(base)
    transformer = models.Transformer(str(base), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    out = tmp_path_factory.mktemp("tiny-bi")
    model.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    """A random 2-layer BERT with a one-logit sequence-classification head: a cross-encoder's shape."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-cross")
    BertForSequenceClassification(_tiny_bert_config(num_labels=1)).save_pretrained(out)
    AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(out)
    return out


CORPUS = [
    {"_id": "d1", "title": "Cats", "text": "Cats are small domesticated carnivorous mammals that purr."},
    {"_id": "d2", "title": "Dogs", "text": "Dogs are loyal domesticated animals that bark at strangers."},
    {"_id": "d3", "title": "Python", "text": "Python is a programming language with dynamic typing."},
    {"_id": "d4", "title": "Rust", "text": "Rust is a systems programming language focused on memory safety."},
    {"_id": "d5", "title": "Tea", "text": "Tea is an aromatic beverage prepared by pouring hot water over leaves."},
    {"_id": "d6", "title": "Coffee", "text": "Coffee is a brewed drink made from roasted coffee beans."},
]
QUERIES = [
    {"_id": "q1", "text": "which animal purrs"},
    {"_id": "q2", "text": "animals that bark"},
    {"_id": "q3", "text": "language with memory safety"},
    {"_id": "q4", "text": "drink from roasted beans"},
    {"_id": "q5", "text": "dynamic typing programming language"},
]
QRELS = {"dev": [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d4", 1)], "test": [("q4", "d6", 1), ("q5", "d3", 2)]}


def write_beir(folder: Path, corpus=CORPUS, queries=QUERIES, qrels=QRELS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def beir_dir(tmp_path) -> Path:
    return write_beir(tmp_path / "toy")


@pytest.fixture
def scifact_dir() -> Path:
    path = SHARED / "scifact"
    if not (path / "corpus.jsonl").is_file():
        pytest.skip("../shared/datasets/scifact is absent")
    return path


# ---- the search service: indexes built once, and a real uvicorn server on loopback ---------------------------

import contextlib  # noqa: E402  (appended section)

SERVICE_CORPUS = CORPUS + [
    {"_id": f"n{i}{j}", "title": f"{aspect.capitalize()} {topic}",
     "text": f"A short note on the {aspect} {topic}, kept as document n{i}{j} for the service tests."}
    for i, topic in enumerate(["rivers", "mountains", "violins", "trains", "gardens", "glaciers", "owls", "bridges"])
    for j, aspect in enumerate(["history of", "care of", "myths about"])
]  # 30 documents: enough for k, depth and reranking to differ


def _build_service_index(tmp_path_factory, name: str, pipeline_factory):
    from stagewise.data.loaders import load_corpus
    from stagewise.serving.index import Index

    folder = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:  # session scope: no per-test cache yet, keep the build out of ~/.cache
        mp.setenv("STAGEWISE_CACHE", str(folder / "cache"))
        corpus = load_corpus(write_beir(folder / "data", corpus=SERVICE_CORPUS) / "corpus.jsonl")
        return Index.build(pipeline_factory(), corpus, folder / "idx")


@pytest.fixture(scope="session")
def reranked_index(tiny_bi_encoder, tiny_cross_encoder, tmp_path_factory):
    """The tiny bi-encoder reranked by the tiny cross-encoder at depth 3, over SERVICE_CORPUS."""
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker
    from stagewise.search.retrievers import build_first_stage

    return _build_service_index(tmp_path_factory, "reranked-index", lambda: Pipeline(
        build_first_stage(str(tiny_bi_encoder)), CrossEncoderReranker(str(tiny_cross_encoder)), depth=3))


@pytest.fixture(scope="session")
def bm25_index(tmp_path_factory):
    """BM25 alone over SERVICE_CORPUS: an index without a reranker."""
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.retrievers import build_first_stage

    return _build_service_index(tmp_path_factory, "bm25-index", lambda: Pipeline(build_first_stage("bm25")))


@contextlib.contextmanager
def running_server(app):
    """Serve ``app`` with uvicorn on a loopback socket in a background thread; yield its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound before the server starts: no free-port race
    host, port = sock.getsockname()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
