"""Tests for stagewise.scale.engine: batch work on Ray Data gives exactly what the same work gives in this process.

One local Ray (two CPUs) serves the whole module. The tiny random models from conftest are deterministic, so
Ray-encoded embeddings and Ray-computed cross-encoder scores must equal the local ones to float precision,
row for row, and a worker that dies mid-job must cost nothing: every row back exactly once.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from typer.testing import CliRunner  # noqa: E402

from conftest import CORPUS, QUERIES, SERVICE_CORPUS, write_beir  # noqa: E402
from stagewise.cli import app  # noqa: E402
from stagewise.data.loaders import Document, load_dataset  # noqa: E402
from stagewise.errors import StagewiseError  # noqa: E402
from stagewise.evaluation.runs import evaluate, evaluate_depths  # noqa: E402
from stagewise.scale import engine  # noqa: E402
from stagewise.search.pipeline import Pipeline, Query  # noqa: E402
from stagewise.search.rerankers import CrossEncoderReranker  # noqa: E402
from stagewise.search.retrievers import DenseRetriever, build_first_stage  # noqa: E402
from stagewise.serving.index import Index  # noqa: E402

WORDS = ("river mountain violin train garden glacier owl bridge tea coffee cat dog python rust memory safety "
         "lava ice valley beans leaves water").split()


def texts(n: int = 40, seed: int = 0) -> list[str]:
    """``n`` texts of shuffled lengths (1 to 60 words): batches mix short and long, padding differs per batch."""
    rng = random.Random(seed)
    lengths = list(range(1, n + 1))
    rng.shuffle(lengths)
    return [f"text {i}: " + " ".join(rng.choice(WORDS) for _ in range(1 + (length * 59) // n))
            for i, length in enumerate(lengths)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module: two CPUs, no dashboard; shut down at the end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the workers inherit the environment Ray starts with
        mp.setenv("RAY_DEDUP_LOGS", "0")
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield
        finally:
            if started:
                ray.shutdown()


@pytest.fixture
def calls(monkeypatch):
    """Record the engine's two Ray jobs (they still run): texts in ``encode``, pairs in ``score`` (its results in
    ``score_results``)."""
    seen: dict[str, list] = {"encode": [], "score": [], "score_results": []}
    real_encode, real_score = engine.encode_documents, engine.score_pairs

    def encode(model_path, texts, *args, **kwargs):
        seen["encode"].append(list(texts))
        return real_encode(model_path, texts, *args, **kwargs)

    def score(model_path, pairs, *args, **kwargs):
        seen["score"].append(list(pairs))
        seen["score_results"].append(real_score(model_path, pairs, *args, **kwargs))
        return seen["score_results"][-1]

    monkeypatch.setattr(engine, "encode_documents", encode)
    monkeypatch.setattr(engine, "score_pairs", score)
    return seen


def docs(rows=CORPUS) -> dict[str, Document]:
    return {d["_id"]: Document(d["_id"], d.get("title", ""), d["text"]) for d in rows}


# ---- the same numbers as in this process -----------------------------------------------------------------


def test_a_corpus_encoded_on_ray_equals_the_local_encoding_row_for_row(tiny_bi_encoder, calls):
    """Batches of 4 over two actors come back in any order; ``_run`` puts every row back where it was."""
    retriever = DenseRetriever(str(tiny_bi_encoder), show_progress=False)
    corpus = texts()
    local = retriever.encode_documents(corpus)
    assert engine.current().name == "local" and calls["encode"] == []

    with engine.use("ray", min_items=1, batch_size=4) as config:
        assert config.name == "ray" and engine.distributed(len(corpus))
        remote = retriever.encode_documents(corpus)
    assert engine.current().name == "local"  # the block's engine does not outlive it

    assert calls["encode"] == [corpus]  # it really went to Ray, once, with every text
    assert remote.shape == local.shape == (40, 32) and remote.dtype == np.float32
    np.testing.assert_allclose(remote, local, atol=1e-5, rtol=0)
    assert np.array_equal(np.argmax(remote @ local.T, axis=1), np.arange(40))  # each row is its own text's
    np.testing.assert_allclose(np.linalg.norm(remote, axis=1), 1.0, atol=1e-5)  # the cosine model's normalisation


def test_an_index_built_on_ray_equals_one_built_locally(tiny_bi_encoder, tmp_path, monkeypatch, calls):
    """Same stored embeddings, same answers, in memory and after a load."""
    corpus = docs(SERVICE_CORPUS)
    local = Index.build(Pipeline(build_first_stage(str(tiny_bi_encoder), show_progress=False)), corpus,
                        tmp_path / "local")
    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path / "other-cache"))  # no embedding cache hit: really encode
    with engine.use("ray", min_items=2, batch_size=8, actors=1):
        on_ray = Index.build(Pipeline(build_first_stage(str(tiny_bi_encoder), show_progress=False)), corpus,
                             tmp_path / "ray")
    assert calls["encode"] == [[d.full_text() for d in corpus.values()]]

    for a, b in ((local, on_ray), (Index.load(tmp_path / "local"), Index.load(tmp_path / "ray"))):
        stored = [np.load(i.path / i.version / "first_stage" / "embeddings.npy") for i in (a, b)]
        assert stored[0].shape == (30, 32)
        np.testing.assert_allclose(stored[1], stored[0], atol=1e-5, rtol=0)
        queries = [Query(q["text"], k=10) for q in QUERIES] + [Query("history of rivers", k=10)]
        for hits_a, hits_b in zip(a.search_many(queries)[0], b.search_many(queries)[0]):
            assert [h.doc_id for h in hits_b] == [h.doc_id for h in hits_a]
            assert [h.score for h in hits_b] == pytest.approx([h.score for h in hits_a], abs=1e-5)


def test_cross_encoder_scoring_on_ray_equals_local_and_so_does_evaluate_depths(tiny_bi_encoder, tiny_cross_encoder,
                                                                              tmp_path, calls):
    """All (query, candidate) pairs of a depth sweep are scored in one Ray job: the same scores as in this process
    (the tiny cross-encoder's head is saved, so they are deterministic), hence the same rankings and metrics."""
    dataset = load_dataset(write_beir(tmp_path / "data", corpus=SERVICE_CORPUS))
    stage = DenseRetriever(str(tiny_bi_encoder), show_progress=False)
    first = evaluate(dataset, "dev", [stage], k=30)[0]
    reranker = CrossEncoderReranker(str(tiny_cross_encoder), device="cpu")
    pipeline = Pipeline(stage, reranker, depth=10).index(dataset.corpus)

    local = evaluate_depths(dataset, "dev", first, pipeline, depths=[3, 10], latency_queries=1)
    assert calls["score"] == []
    # 3 dev queries × 10 candidates = 30 pairs: the batch job goes to Ray, one query's reranking (10) does not
    with engine.use("ray", min_items=30, batch_size=4, actors=1):
        remote = evaluate_depths(dataset, "dev", first, pipeline, depths=[3, 10], latency_queries=1)
    assert [len(pairs) for pairs in calls["score"]] == [30]

    pairs = calls["score"][0]
    assert pairs == [(q, dataset.corpus[d].full_text()) for q, d in
                     ((text, d) for qid, text in dataset.split("dev")[0].items() for d in first.rankings[qid][:10])]
    on_ray, here = calls["score_results"][0], reranker.score_pairs(pairs)
    assert on_ray.shape == here.shape == (30,) and on_ray.dtype == np.float32
    # a random head's sigmoid scores all sit near 0.5 and span ~1e-5: compare far tighter than that spread
    assert np.ptp(here) > 5e-6
    np.testing.assert_allclose(on_ray, here, atol=5e-7, rtol=0)

    assert [r.name for r in remote] == [r.name for r in local]
    for r, l in zip(remote, local):
        assert r.rankings == l.rankings
        assert r.metrics == pytest.approx(l.metrics, abs=1e-12)
        assert r.per_query == l.per_query
    assert local[0].rankings != first.rankings  # the reranker really reordered something


# ---- when work stays local ---------------------------------------------------------------------------------


def test_below_min_items_the_work_stays_local(tiny_bi_encoder, tiny_cross_encoder, monkeypatch):
    """A handful of texts or pairs is not worth a round trip: the engine's Ray jobs are never called."""

    def refuse(*args, **kwargs):
        raise AssertionError("sent to Ray")

    monkeypatch.setattr(engine, "encode_documents", refuse)
    monkeypatch.setattr(engine, "score_pairs", refuse)
    retriever = DenseRetriever(str(tiny_bi_encoder), show_progress=False)
    reranker = CrossEncoderReranker(str(tiny_cross_encoder), device="cpu")
    corpus, pairs = texts(10), [("which animal purrs", t) for t in texts(10)]
    expected = retriever.encode_documents(corpus), reranker.score_pairs(pairs, batch_job=True)

    with engine.use("ray", min_items=11):
        assert not engine.distributed(10) and engine.distributed(11)
        np.testing.assert_array_equal(retriever.encode_documents(corpus), expected[0])
        np.testing.assert_array_equal(reranker.score_pairs(pairs, batch_job=True), expected[1])
        assert len(reranker.score_pairs([], batch_job=True)) == 0
    with engine.use("local", min_items=1):  # the local engine never ships anything, whatever the size
        assert not engine.distributed(10_000)
        np.testing.assert_array_equal(retriever.encode_documents(corpus), expected[0])
    assert engine.current() == engine.EngineConfig()


def test_reranking_one_query_stays_local_even_at_a_depth_above_min_items(tiny_bi_encoder, tiny_cross_encoder,
                                                                         monkeypatch):
    sent = []
    monkeypatch.setattr(engine, "score_pairs", lambda model, pairs, *a, **k: sent.append(len(pairs)) or
                        np.zeros(len(pairs), dtype=np.float32))
    pipeline = Pipeline(build_first_stage(str(tiny_bi_encoder), show_progress=False),
                        CrossEncoderReranker(str(tiny_cross_encoder), device="cpu"), depth=6).index(docs())
    with engine.use("ray", min_items=4):
        pipeline.search("which animal purrs", k=6)  # one query, six candidates: query-time work
    assert sent == []


# ---- exactly once, even when a worker dies -------------------------------------------------------------------


def test_a_worker_that_dies_mid_job_is_replaced_and_nothing_is_lost_or_duplicated(tmp_path):
    """The actor holding the marker row's batch kills its own process, once; Ray restarts it and retries."""
    flag = tmp_path / "crashed"

    class CrashOnce:  # defined here: cloudpickle ships it to the workers by value
        def __init__(self, flag: str, marker: int, threads: int):
            self.flag, self.marker = flag, marker

        def __call__(self, batch: dict) -> dict:
            if self.marker in batch["value"].tolist():
                try:
                    os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass  # already died once: work normally
                else:
                    os._exit(1)  # the whole worker process, mid-batch, no cleanup
            return {"row": batch["row"], "vector": (batch["value"] * 10.0).astype(np.float32).reshape(-1, 1)}

    items = [{"value": v} for v in range(100, 140)]
    with engine.use("ray", min_items=1, batch_size=4, actors=2):
        result = engine._run(items, CrashOnce, {"flag": str(flag), "marker": 117})

    assert flag.exists()  # the crash really happened
    assert result.shape == (40, 1)
    np.testing.assert_array_equal(result[:, 0], np.arange(100, 140) * 10.0)  # every row, once, in place


@pytest.mark.parametrize("fault", ["drop", "duplicate"])
def test_a_partial_or_duplicated_result_is_refused(fault):
    """``_run`` checks every position comes back exactly once: it never pads, drops or averages."""

    class Faulty:
        def __init__(self, fault: str, threads: int):
            self.fault = fault

        def __call__(self, batch: dict) -> dict:
            rows, values = batch["row"], batch["value"].astype(np.float32).reshape(-1, 1)
            if 0 in rows.tolist():
                keep = np.arange(len(rows)) != 0 if self.fault == "drop" else np.r_[np.arange(len(rows)), 0]
                rows, values = rows[keep], values[keep]
            return {"row": rows, "vector": values}

    with engine.use("ray", min_items=1, batch_size=4, actors=1):
        with pytest.raises(StagewiseError, match="refusing a partial result") as e:
            engine._run([{"value": v} for v in range(12)], Faulty, {"fault": fault})
    if fault == "drop":
        assert "11 rows for 12 inputs (1 missing, 0 duplicated)" in str(e.value)
    else:
        assert "13 rows for 12 inputs (0 missing, 1 duplicated)" in str(e.value)


# ---- choosing the engine ---------------------------------------------------------------------------------------


def test_an_unknown_engine_is_refused():
    with pytest.raises(StagewiseError, match="unknown engine 'spark'"):
        with engine.use("spark"):
            pass
    assert engine.current().name == "local"


def test_the_cli_builds_an_index_with_the_ray_engine(tiny_bi_encoder, tmp_path):
    """``index build --engine ray`` joins the running Ray; below min_items the six documents encode locally."""
    corpus = write_beir(tmp_path / "data") / "corpus.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["index", "build", "--engine", "ray", "--pipeline", str(tiny_bi_encoder),
                                 "--corpus", str(corpus), "--out", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.output
    index = Index.load(tmp_path / "idx")
    assert len(index) == 6 and index.search("which animal purrs", k=1)[0].doc_id in index.corpus
    assert engine.current().name == "local"

    bad = runner.invoke(app, ["index", "build", "--engine", "spark", "--pipeline", str(tiny_bi_encoder),
                              "--corpus", str(corpus), "--out", str(tmp_path / "idx2")])
    assert bad.exit_code == 2 and "unknown engine 'spark'" in bad.output
    assert not (tmp_path / "idx2").exists()


def test_a_batch_that_keeps_killing_its_worker_fails_the_job_after_a_few_retries(tmp_path):
    """The marker batch kills its worker up to six times, then gives in (so that today's code cannot hang here):
    the job must have failed before that, after at most a handful of restarts (Ray backs off 1 s, 2 s, 4 s, …)."""

    class CrashSixTimes:
        def __init__(self, folder: str, threads: int):
            self.folder = folder

        def __call__(self, batch: dict) -> dict:
            if 5 in batch["value"].tolist():
                for n in range(6):
                    try:
                        os.close(os.open(os.path.join(self.folder, f"crash-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    except FileExistsError:
                        continue
                    os._exit(1)
            return {"row": batch["row"], "vector": batch["value"].astype(np.float32).reshape(-1, 1)}

    with engine.use("ray", min_items=1, batch_size=4, actors=1):
        with pytest.raises(Exception):  # noqa: B017 - Ray's ActorDiedError, or a StagewiseError naming it
            engine._run([{"value": v} for v in range(12)], CrashSixTimes, {"folder": str(tmp_path)})
    assert 1 <= len(list(tmp_path.glob("crash-*"))) < 6
