"""A running service follows its index folder: a version committed by ``index add`` is loaded beside the served
one and swapped in, under load, with no request lost and every answer the one its version gives; a version that
cannot be served leaves the previous one answering; and a reranker without a trained head is never deployed
unless asked for.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from conftest import SERVICE_CORPUS, running_server, write_beir
from stagewise.serving.index import Index
from stagewise.serving.live_index import LiveIndex
from stagewise.serving.service import ServiceSettings, create_app

QUERIES = ["which animal purrs", "language with memory safety", "history of trains", "drink from roasted beans"]
NEW = [{"_id": f"new{i}", "title": "New", "text": q} for i, q in enumerate(QUERIES)]  # each matches a query best


@pytest.fixture
def index_path(tmp_path, tiny_bi_encoder, tiny_cross_encoder):
    from stagewise.data.loaders import load_corpus
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker
    from stagewise.search.retrievers import build_first_stage

    corpus = load_corpus(write_beir(tmp_path / "data", corpus=SERVICE_CORPUS) / "corpus.jsonl")
    pipeline = Pipeline(build_first_stage(str(tiny_bi_encoder)), CrossEncoderReranker(str(tiny_cross_encoder)), depth=3)
    Index.build(pipeline, corpus, tmp_path / "idx")
    return tmp_path / "idx"


def _new_docs(tmp_path):
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in NEW))
    return path


def _same(got: dict, want) -> bool:
    """A service answer equals an in-process one (scores to 1e-5: other batches pad differently)."""
    return [h["doc_id"] for h in got["hits"]] == [w.doc_id for w in want] and all(
        abs(h["score"] - w.score) < 1e-5 and h["text"] == w.text for h, w in zip(got["hits"], want))


def test_a_new_version_is_served_under_load_with_nothing_lost(tmp_path, index_path):
    """Four clients search without pause while `index add` commits v2: every request is answered 200, each with the
    answer of the version it names (v1 before the swap, v2 after), and /health shows v2."""
    old = Index.load(index_path)
    base_cm = running_server(create_app(Index.load(index_path), ServiceSettings(reload_interval_s=0.05)))
    base = base_cm.__enter__()
    try:
        stop, answers = threading.Event(), []

        def client(n: int):
            with httpx.Client(base_url=base, timeout=30) as http:
                i = n
                while not stop.is_set():
                    query = QUERIES[i % len(QUERIES)]
                    r = http.post("/search", json={"query": query, "k": 5})
                    answers.append((query, r.status_code, r.json()))
                    i += 1

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, n) for n in range(4)]
            time.sleep(0.5)
            from typer.testing import CliRunner

            from stagewise.cli import app

            result = CliRunner().invoke(app, ["index", "add", str(index_path), str(_new_docs(tmp_path))])
            assert result.exit_code == 0, result.output
            deadline = time.monotonic() + 30
            while httpx.get(base + "/health").json()["version"] != "v000002":
                assert time.monotonic() < deadline, "the service never picked up v000002"
                time.sleep(0.05)
            time.sleep(0.5)
            stop.set()
            for c in clients:
                c.result()
        health = httpx.get(base + "/health").json()
        assert (health["version"], health["documents"], health["reloads"]) == ("v000002", 34, 1)
    finally:
        base_cm.__exit__(None, None, None)

    new = Index.load(index_path)
    expected = {"v000001": old, "v000002": new}
    assert [status for _, status, _ in answers] == [200] * len(answers)
    versions = [body["index_version"] for _, _, body in answers]
    assert set(versions) == {"v000001", "v000002"}
    assert versions.count("v000002") >= 4
    for query, _, body in answers:
        assert _same(body, expected[body["index_version"]].search(query, k=5)), (query, body)
    assert any(body["hits"][0]["doc_id"].startswith("new") for _, _, body in answers)  # v2 answers differently


def test_a_version_that_cannot_be_served_leaves_the_old_one_answering(tmp_path, index_path):
    live = LiveIndex(Index.load(index_path))
    Index.load(index_path).add(_new_docs(tmp_path))
    (index_path / "v000002" / "docs.jsonl").write_text("corrupted\n")
    assert live.stale() and live.reload() is False
    assert live.index.version == "v000001" and live.health()["reload_failed"]["version"] == "v000002"
    assert "checksum mismatch" in live.health()["reload_failed"]["error"]
    assert not live.stale()  # the failed version is not retried on every poll
    assert live.index.search("which animal purrs", k=3)


def test_a_pipeline_given_at_start_is_kept_over_new_versions(tmp_path, index_path, tiny_cross_encoder):
    from stagewise.search.fusion import Fusion
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker

    stored = Index.load(index_path)
    other = Pipeline(stored.pipeline.first_stage, CrossEncoderReranker(str(tiny_cross_encoder)), depth=5,
                     fusion=Fusion(0.5))
    other.save(tmp_path / "other.yaml")
    served = Index.load(index_path, pipeline=tmp_path / "other.yaml")
    live = LiveIndex(served, override=served.pipeline)
    Index.load(index_path).add(_new_docs(tmp_path))
    assert live.reload() is True
    assert live.index.version == "v000002" and len(live.index) == 34
    assert (live.index.pipeline.depth, live.index.pipeline.fusion) == (5, Fusion(0.5))
    assert served.version == "v000001" and len(served) == 30  # the old version, untouched while it answered


# ---- untrained rerankers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A plain BERT (no scoring head): what a user gets by naming a base encoder as the reranker."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from stagewise.models.specs import resolve_model

    out = tmp_path_factory.mktemp("base-bert")
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model("minilm-l6").path).save_pretrained(out)
    return out


def test_an_untrained_head_scores_the_same_on_every_load(base_model):
    import warnings

    from stagewise.search.rerankers import CrossEncoderReranker

    pairs = [("cats", "Cats purr."), ("cats", "Dogs bark."), ("tea", "Tea is a drink.")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = (CrossEncoderReranker(str(base_model)) for _ in range(2))
    assert not first.trained
    assert first.score_pairs(pairs).tolist() == second.score_pairs(pairs).tolist()


def test_index_build_and_serve_refuse_an_untrained_reranker_unless_allowed(tmp_path, tiny_bi_encoder, base_model,
                                                                           monkeypatch):
    from typer.testing import CliRunner

    from stagewise.cli import app
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker
    from stagewise.search.retrievers import build_first_stage

    data = write_beir(tmp_path / "data", corpus=SERVICE_CORPUS)
    with pytest.warns(UserWarning):
        pipeline = Pipeline(build_first_stage(str(tiny_bi_encoder)), CrossEncoderReranker(str(base_model)), depth=3)
    pipeline.save(tmp_path / "pipeline.yaml")
    runner = CliRunner()
    build = ["index", "build", "--pipeline", str(tmp_path / "pipeline.yaml"), "--corpus", str(data)]
    refused = runner.invoke(app, build + ["--out", str(tmp_path / "idx")])
    assert refused.exit_code == 2, refused.output
    assert "not a trained cross-encoder" in refused.output and "--allow-untrained-reranker" in refused.output
    assert not (tmp_path / "idx").exists()
    allowed = runner.invoke(app, build + ["--out", str(tmp_path / "idx"), "--allow-untrained-reranker"])
    assert allowed.exit_code == 0, allowed.output

    served = []
    monkeypatch.setattr("stagewise.serving.service.serve", lambda live, *args, **kwargs: served.append(live))
    refused = runner.invoke(app, ["serve", str(tmp_path / "idx"), "--port", "0"])
    assert refused.exit_code == 2 and "--port" in refused.output  # the port is checked before the models load
    refused = runner.invoke(app, ["serve", str(tmp_path / "idx"), "--port", "8765"])
    assert refused.exit_code == 2 and "not a trained cross-encoder" in refused.output and not served
    allowed = runner.invoke(app, ["serve", str(tmp_path / "idx"), "--port", "8765", "--allow-untrained-reranker"])
    assert allowed.exit_code == 0, allowed.output
    assert served and not served[0].index.pipeline.reranker.trained
