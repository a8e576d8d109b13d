"""Tests for stagewise.serving.index: a persistent, versioned, updatable index built from a pipeline's first stage.

Built with the tiny random models from conftest: the scores mean nothing, but they are deterministic, so a
stored index must answer exactly like the same pipeline in memory, before and after updates, crashes and moves.
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
import yaml

import stagewise.serving.index as index_module
from conftest import CORPUS, QUERIES
from stagewise.data.loaders import Document
from stagewise.errors import StagewiseError
from stagewise.search.fusion import Fusion
from stagewise.search.pipeline import Pipeline, Query
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import DenseRetriever, build_first_stage
from stagewise.search.vector_index import VectorIndex, VectorIndexConfig
from stagewise.serving.index import Index, InvalidIndexError, _writer_lock

TEXTS = [q["text"] for q in QUERIES] + ["hot drink made from leaves"]
NEW_DOCS = [
    Document("d7", "Volcanoes", "Volcanoes erupt molten lava and volcanic ash."),
    Document("d8", "Glaciers", "Glaciers are slow rivers of ice carving valleys."),
]


def docs() -> dict[str, Document]:
    return {d["_id"]: Document(d["_id"], d.get("title", ""), d["text"]) for d in CORPUS}


def answers(searcher, k: int = 5, texts=TEXTS) -> list[list[tuple[str, float, bool]]]:
    """Each query's (doc id, score, reranked?) list, from an Index or an indexed Pipeline (one batch: fast)."""
    results, _ = searcher.search_many([Query(t, k) for t in texts])
    return [[(h.doc_id, h.score, h.rerank_score is not None) for h in hits] for hits in results]


def assert_same_answers(actual, expected) -> None:
    assert [[(d, r) for d, _, r in hits] for hits in actual] == [[(d, r) for d, _, r in hits] for hits in expected]
    for got, want in zip(actual, expected):
        assert [s for _, s, _ in got] == pytest.approx([s for _, s, _ in want], abs=1e-5)


def versions(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("v"))


@pytest.fixture
def make(tiny_bi_encoder, tiny_cross_encoder):
    """``make(first_stage, rerank, depth, model, fusion)``: a fresh pipeline (Index.build mutates the one given)."""

    def make(first: str = "dense", rerank: bool = True, depth: int = 3, model: Path | None = None,
             fusion: Fusion | None = None) -> Pipeline:
        model = str(model or tiny_bi_encoder)
        spec = {"dense": model, "bm25": "bm25", "hybrid": f"bm25+{model}"}[first]
        reranker = CrossEncoderReranker(str(tiny_cross_encoder), device="cpu") if rerank else None
        return Pipeline(build_first_stage(spec, show_progress=False), reranker, depth=depth, fusion=fusion)

    return make


@pytest.fixture
def built(make, tmp_path) -> Path:
    """A dense + reranker index over the six toy documents; returns its folder."""
    Index.build(make(), docs(), tmp_path / "idx")
    return tmp_path / "idx"


@pytest.fixture(scope="session")
def other_bi_encoder(tiny_bi_encoder, tmp_path_factory) -> Path:
    """The tiny bi-encoder with one weight perturbed: same architecture, a different model."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("other-bi") / "model"
    shutil.copytree(tiny_bi_encoder, out)
    weights = next(out.rglob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("embeddings.word_embeddings.weight"))
    tensors[name] = tensors[name] + np.random.default_rng(1).normal(0, 0.5, tensors[name].shape).astype(np.float32)
    save_file(tensors, weights)
    return out


# ---- building and loading ----------------------------------------------------------------------


@pytest.mark.parametrize("rerank", [False, True], ids=["first-stage", "reranked"])
@pytest.mark.parametrize("first", ["dense", "bm25", "hybrid"])
def test_a_loaded_index_answers_like_the_pipeline_in_memory(make, first, rerank, tmp_path):
    """Storing must change nothing: same ids, scores and reranking as the pipeline that built it, in memory."""
    expected = answers(make(first, rerank).index(docs()))
    built = Index.build(make(first, rerank), docs(), tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")

    assert_same_answers(answers(built), expected)
    assert_same_answers(answers(loaded), expected)
    assert any(r for hits in expected for _, _, r in hits) == rerank
    assert len(loaded) == 6 and list(loaded.corpus) == list(docs())
    assert loaded.version == "v000001" and (tmp_path / "idx" / "CURRENT").read_text().startswith("v000001 ")
    assert loaded.manifest["documents"] == 6 and loaded.manifest["change"] == {"built": 6}
    assert loaded.manifest["parent"] is None
    assert loaded.pipeline.depth == 3 and (loaded.pipeline.reranker is not None) == rerank


@pytest.mark.parametrize("config", [
    VectorIndexConfig(kind="hnsw"),
    VectorIndexConfig(quantization="int8"),
    VectorIndexConfig(kind="hnsw", quantization="int8"),
    VectorIndexConfig(quantization="binary"),
], ids=lambda c: c.label)
def test_approximate_and_quantised_indexes_load_and_answer(make, config, tmp_path):
    """Six documents are fewer than rescore × k candidates, so every variant rescored ends up exact."""
    expected = answers(make("dense", rerank=False).index(docs()))
    Index.build(make("dense", rerank=False), docs(), tmp_path / "idx", vectors=config)
    loaded = Index.load(tmp_path / "idx")
    assert_same_answers(answers(loaded), expected)
    assert loaded.manifest["vectors"] == config.label and loaded.describe()["vectors"] == config.label
    assert loaded.pipeline.first_stage.vectors.config == config
    stored = {p.name for p in (tmp_path / "idx" / loaded.version / "first_stage").iterdir()}
    assert ("graph.usearch" in stored) == (config.kind == "hnsw")
    assert ("codes.npy" in stored) == (config.quantization != "none")


def test_build_and_add_accept_files(make, beir_dir, tmp_path):
    """The CLI's way in: a saved pipeline.yaml and BEIR corpus files instead of objects."""
    pipeline_yaml = make("bm25", rerank=False).save(tmp_path / "pipe" / "pipeline.yaml")
    index = Index.build(pipeline_yaml, beir_dir / "corpus.jsonl", tmp_path / "idx")
    assert list(index.corpus) == list(docs())
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in NEW_DOCS))
    index.add(extra)
    assert index.search("volcanic lava", k=1)[0].doc_id == "d7" and len(Index.load(tmp_path / "idx")) == 8
    with_depth = Index.load(tmp_path / "idx", pipeline=pipeline_yaml)  # a pipeline file works at load too
    assert with_depth.pipeline.reranker is None and len(with_depth) == 8


def test_describe_reports_what_the_index_holds(built):
    """``describe`` feeds ``/stats`` and ``index info``: its numbers must be the index's own."""
    index = Index.load(built)
    info = index.describe()
    assert info["path"] == str(built) and info["version"] == "v000001" and info["documents"] == 6
    assert info["vectors"] == "exact" and info["depth"] == 3 and info["reranker"] == index.pipeline.reranker.name
    assert info["memory_bytes"] == 6 * 32 * 4  # six 32-dim float32 rows
    version = built / "v000001"
    data = [f for f in version.rglob("*") if f.is_file() and f.relative_to(version).parts[0] != "models"]
    assert info["disk_bytes"] == sum(f.stat().st_size for f in data if f.name != "manifest.json")
    assert info["model_disk_bytes"] == sum(f.stat().st_size for f in (version / "models").rglob("*") if f.is_file())
    stages = [index.pipeline.first_stage, index.pipeline.reranker]
    assert [m["fingerprint"] for m in info["models"]] == [s.spec.fingerprint for s in stages]


def test_the_index_folder_is_self_contained_and_can_move(tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    """Local models are copied into the version and named relative to it: the folder works without the originals."""
    bi = shutil.copytree(tiny_bi_encoder, tmp_path / "originals" / "bi")
    cross = shutil.copytree(tiny_cross_encoder, tmp_path / "originals" / "cross")
    pipeline = Pipeline(build_first_stage(str(bi), show_progress=False), CrossEncoderReranker(str(cross)), depth=3)
    index = Index.build(pipeline, docs(), tmp_path / "idx")
    before = answers(index)

    version = tmp_path / "idx" / index.version
    config = yaml.safe_load((version / "pipeline.yaml").read_text())
    named = [config["first_stage"]["model"], config["reranker"]["model"]]
    assert all(m.startswith("models/") for m in named), named
    assert all((version / m / "config.json").is_file() for m in named)

    shutil.rmtree(tmp_path / "originals")
    shutil.move(tmp_path / "idx", tmp_path / "elsewhere" / "idx")
    moved = Index.load(tmp_path / "elsewhere" / "idx")
    assert_same_answers(answers(moved), before)
    assert moved.describe()["path"] == str(tmp_path / "elsewhere" / "idx")


def test_rewriting_the_original_model_in_place_does_not_touch_the_index(tiny_bi_encoder, make, tmp_path):
    """Retraining into the same folder rewrites its files in place; the index must hold its own copy, not links."""
    model = shutil.copytree(tiny_bi_encoder, tmp_path / "model")
    index = Index.build(make("dense", rerank=False, model=model), docs(), tmp_path / "idx")
    before = answers(index)
    weights = next(model.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    with open(weights, "r+b") as f:  # same inode: a hard link would see this
        f.write(data)
    assert_same_answers(answers(Index.load(tmp_path / "idx")), before)


# ---- updates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "vectors"), [
    ("dense", None), ("bm25", None), ("hybrid", None), ("dense", VectorIndexConfig(kind="hnsw", quantization="int8")),
], ids=["dense", "bm25", "hybrid", "dense-hnsw-int8"])
def test_updates_answer_like_a_rebuild_and_survive_a_reload(make, first, vectors, tmp_path):
    """add, delete and upsert give the same results as indexing the new corpus from scratch, in memory and on disk."""
    path = tmp_path / "idx"
    index = Index.build(make(first, rerank=False), docs(), path, vectors=vectors)
    quasar = Document("d1", "Quasars", "Quasars are luminous galactic nuclei powered by black holes.")
    index.add(NEW_DOCS)
    index.delete(["d2", "d5"])
    index.add([quasar], upsert=True)

    expected_corpus = {d: doc for d, doc in docs().items() if d not in ("d1", "d2", "d5")}
    expected_corpus |= {d.id: d for d in NEW_DOCS} | {"d1": quasar}
    assert list(index.corpus) == list(expected_corpus) and len(index) == 6
    texts = TEXTS + ["volcanic lava", "ice valleys", "black holes", "dogs that bark"]
    expected = answers(make(first, rerank=False).index(expected_corpus), k=6, texts=texts)
    assert_same_answers(answers(index, k=6, texts=texts), expected)

    reloaded = Index.load(path)
    assert reloaded.version == index.version == "v000004"
    assert list(reloaded.corpus) == list(expected_corpus) and reloaded.corpus["d1"].text == quasar.text
    assert_same_answers(answers(reloaded, k=6, texts=texts), expected)


def test_added_documents_become_searchable(make, tmp_path):
    """New documents are found at once and after a reload; the manifest records the change."""
    index = Index.build(make("bm25", rerank=False), docs(), tmp_path / "idx")
    assert "d7" not in [h.doc_id for h in index.search("volcanic lava", k=6)]
    index.add(NEW_DOCS)
    assert len(index) == 8 and index.manifest["documents"] == 8
    assert index.search("volcanic lava", k=1)[0].doc_id == "d7"
    assert index.search("glaciers ice", k=1)[0].doc_id == "d8"
    assert index.manifest["change"] == {"added": 2, "replaced": 0, "deleted": 0}
    assert index.manifest["parent"] == "v000001" and index.version == "v000002"
    assert Index.load(tmp_path / "idx").search("volcanic lava", k=1)[0].doc_id == "d7"


def test_dense_add_finds_the_new_document_by_its_own_text(make, tmp_path):
    """Added vectors are appended to the rows the new ids point at (a misaligned row would give another doc)."""
    index = Index.build(make("dense", rerank=False), docs(), tmp_path / "idx")
    index.add(NEW_DOCS)
    for doc in NEW_DOCS:  # the query is the document itself: cosine 1
        top = index.search(doc.full_text(), k=1)[0]
        assert top.doc_id == doc.id and top.score == pytest.approx(1.0, abs=1e-4) and top.text == doc.text


def test_a_duplicate_id_is_refused_unless_upsert(make, tmp_path):
    """Adding an id twice is a mistake unless asked for: upsert replaces the text everywhere."""
    path = tmp_path / "idx"
    index = Index.build(make("bm25", rerank=False), docs(), path)
    current = (path / "CURRENT").read_text()
    replacement = Document("d1", "Quasars", "Quasars are luminous galactic nuclei.")

    with pytest.raises(InvalidIndexError, match="already in the index, e.g. 'd1'"):
        index.add([replacement, NEW_DOCS[0]])
    assert (path / "CURRENT").read_text() == current and versions(path) == ["v000001"]
    assert len(index) == 6 and "d7" not in index.corpus  # nothing half-added

    index.add([replacement], upsert=True)
    assert len(index) == 6 and index.corpus["d1"].text == replacement.text
    assert index.manifest["change"] == {"added": 0, "replaced": 1, "deleted": 0}
    top = index.search("quasars galactic", k=1)[0]
    assert (top.doc_id, top.title) == ("d1", "Quasars")
    assert all(h.first_stage_score == 0 for h in index.search("purr", k=6))  # the old text is gone
    assert Index.load(path).corpus["d1"].text == replacement.text


def test_delete_removes_documents_and_refuses_what_it_cannot_do(make, tmp_path):
    """Deleted ids never come back; unknown ids and emptying the index are refused without writing."""
    path = tmp_path / "idx"
    index = Index.build(make("dense", rerank=False), docs(), path)
    index.delete(["d3", "d4", "d3"])  # a repeated id counts once
    assert len(index) == 4 and set(index.corpus) == {"d1", "d2", "d5", "d6"}
    assert index.manifest["change"] == {"added": 0, "replaced": 0, "deleted": 2}
    every = {h.doc_id for t in TEXTS for h in index.search(t, k=10)}
    assert every == {"d1", "d2", "d5", "d6"}
    assert len(Index.load(path)) == 4

    with pytest.raises(InvalidIndexError, match="not in the index, e.g. 'nope'"):
        index.delete(["d1", "nope"])
    assert len(index) == 4 and index.version == "v000002"

    index.delete(["d1", "nope"], missing_ok=True)
    assert set(index.corpus) == {"d2", "d5", "d6"} and index.manifest["change"]["deleted"] == 1

    current = (path / "CURRENT").read_text()
    with pytest.raises(InvalidIndexError, match="empty index"):
        index.delete(["d2", "d5", "d6"])
    assert (path / "CURRENT").read_text() == current and len(Index.load(path)) == 3


def test_updates_encode_only_the_new_documents(make, tmp_path, monkeypatch):
    """An update must not re-encode the stored corpus: that is what makes add cheap on a large index."""
    Index.build(make("hybrid", rerank=False), docs(), tmp_path / "idx")
    encoded: list[str] = []
    real = DenseRetriever.encode_documents

    def recording(self, texts, show_progress=None):
        encoded.extend(texts)
        return real(self, texts, show_progress)

    monkeypatch.setattr(DenseRetriever, "encode_documents", recording)
    index = Index.load(tmp_path / "idx")
    assert encoded == []  # loading reads the stored vectors
    index.add(NEW_DOCS)
    assert encoded == [d.full_text() for d in NEW_DOCS]
    encoded.clear()
    index.delete(["d1"])
    assert encoded == []
    index.add([Document("d2", "Wolves", "Wolves howl.")], upsert=True)
    assert encoded == ["Wolves Wolves howl."]


def test_only_the_current_and_previous_versions_are_kept(make, tmp_path):
    """Every write makes a version; only two stay on disk."""
    path = tmp_path / "idx"
    index = Index.build(make("bm25", rerank=False), docs(), path)
    index.add(NEW_DOCS[:1])
    assert versions(path) == ["v000001", "v000002"]
    index.add(NEW_DOCS[1:])
    index.delete(["d7"])
    assert versions(path) == ["v000003", "v000004"]
    assert (path / "CURRENT").read_text().split()[0] == "v000004" == index.version
    assert index.manifest["parent"] == "v000003"
    assert Index.load(path).manifest["change"] == {"added": 0, "replaced": 0, "deleted": 1}


def test_a_stale_loaded_index_refuses_to_update(make, tmp_path):
    """Two writers that loaded the same version: the second must reload instead of overwriting the first's change."""
    path = tmp_path / "idx"
    Index.build(make("bm25", rerank=False), docs(), path)
    first, second = Index.load(path), Index.load(path)
    first.add(NEW_DOCS[:1])
    with pytest.raises(InvalidIndexError, match="changed since it was loaded"):
        second.add(NEW_DOCS[1:])
    assert set(Index.load(path).corpus) == set(docs()) | {"d7"}


def test_a_concurrent_writer_is_refused(built):
    """One writer at a time (the lock), while readers carry on."""
    index = Index.load(built)
    with _writer_lock(built):
        with pytest.raises(InvalidIndexError, match="another build or update"):
            index.add(NEW_DOCS)
        with pytest.raises(InvalidIndexError, match="another build or update"):
            index.delete(["d1"])
        assert len(Index.load(built)) == 6  # readers are never blocked
    index.add(NEW_DOCS)  # released
    assert len(Index.load(built)) == 8


# ---- crash safety ------------------------------------------------------------------------------


def _fail_at(step: str, m: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    if step == "docs":
        m.setattr(index_module, "_write_docs", boom)
    elif step == "vectors":
        m.setattr(VectorIndex, "save", boom)
    else:  # the very last step: switching CURRENT
        real = index_module._atomic_write
        m.setattr(index_module, "_atomic_write", lambda p, text: boom() if p.name == "CURRENT" else real(p, text))


@pytest.mark.parametrize("step", ["docs", "vectors", "current"])
def test_a_failed_update_leaves_the_old_index_answering(built, step, monkeypatch):
    """A write failing at any step leaves CURRENT, the disk and the object as they were."""
    index = Index.load(built)
    current, before = (built / "CURRENT").read_text(), answers(index)
    (built / ".tmp-v000009-killed").mkdir()  # what a killed writer leaves behind
    (built / ".tmp-v000009-killed" / "docs.jsonl").write_text("garbage\n")

    with monkeypatch.context() as m:
        _fail_at(step, m)
        with pytest.raises(OSError, match="disk full"):
            index.add(NEW_DOCS)

    assert (built / "CURRENT").read_text() == current
    assert index.version == "v000001" and len(index) == 6  # the object is back in line with the disk
    assert_same_answers(answers(index), before)
    reloaded = Index.load(built, verify=True)
    assert reloaded.version == "v000001"
    assert_same_answers(answers(reloaded), before)

    index.add(NEW_DOCS)  # the next update works and sweeps the stale temporary folder
    assert not list(built.glob(".tmp-*"))
    assert len(Index.load(built)) == 8 and Index.load(built).version == index.version


def test_a_failed_update_keeps_the_pipeline_the_index_was_loaded_with(make, built, monkeypatch):
    """Recovering from a failed write must not silently swap the caller's reranker/depth back."""
    index = Index.load(built, pipeline=make("dense", rerank=False))
    assert index.pipeline.reranker is None
    with monkeypatch.context() as m:
        _fail_at("docs", m)
        with pytest.raises(OSError):
            index.add(NEW_DOCS)
    assert index.pipeline.reranker is None and all(h.rerank_score is None for h in index.search("cats"))


def test_a_failed_update_keeps_the_fusion_the_index_was_loaded_with(make, built, monkeypatch):
    index = Index.load(built, pipeline=make(fusion=FUSION))
    with monkeypatch.context() as m:
        _fail_at("docs", m)
        with pytest.raises(OSError):
            index.add(NEW_DOCS)
    assert index.pipeline.fusion == FUSION and all(h.fused_score is not None for h in index.search("cats", k=3))


def test_a_failed_first_build_can_be_retried(make, tmp_path, monkeypatch):
    """Nothing was ever committed, so the folder should still take a new build."""
    with monkeypatch.context() as m:
        _fail_at("vectors", m)
        with pytest.raises(OSError):
            Index.build(make("dense", rerank=False), docs(), tmp_path / "idx")
    assert len(Index.build(make("dense", rerank=False), docs(), tmp_path / "idx")) == 6


def test_after_a_failed_switch_the_version_kept_is_the_current_ones_parent(make, tmp_path, monkeypatch):
    """Kept versions are the current one and the one before it, not a version that never went live."""
    path = tmp_path / "idx"
    index = Index.build(make("bm25", rerank=False), docs(), path)
    with monkeypatch.context() as m:
        _fail_at("current", m)
        with pytest.raises(OSError):
            index.add(NEW_DOCS[:1])
    index.add(NEW_DOCS[1:])
    assert versions(path) == [index.manifest["parent"], index.version]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # bm25s averaging zero document lengths
@pytest.mark.parametrize("first", ["bm25", "dense"])
def test_building_an_empty_index_is_refused_clearly(make, first, tmp_path):
    """An empty corpus must get a one-line StagewiseError, not a traceback from deep inside a stage."""
    with pytest.raises(StagewiseError, match="empty"):
        Index.build(make(first, rerank=False), {}, tmp_path / "idx")


def _run(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # carries this test's STAGEWISE_CACHE
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


KILL_BEFORE_CURRENT = """
    import os, signal, sys
    from pathlib import Path
    import stagewise.serving.index as index
    from stagewise.data.loaders import Document

    real = index._atomic_write
    def write(path, text):
        if Path(path).name == "CURRENT":  # the new version is complete and in place: die before switching to it
            Path(sys.argv[2]).write_text("reached CURRENT")
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, text)
    index._atomic_write = write
    index.Index.load(sys.argv[1]).add([Document("d9", "Volcanoes", "Volcanoes erupt molten lava.")])
"""


def test_an_update_killed_before_switching_current_leaves_the_old_index(make, tmp_path):
    """A real SIGKILL at the last moment (new version complete, CURRENT not yet switched)."""
    path = tmp_path / "idx"
    Index.build(make("bm25", rerank=False), docs(), path)
    current, before = (path / "CURRENT").read_text(), answers(Index.load(path))

    proc = _run(KILL_BEFORE_CURRENT, path, tmp_path / "marker")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "marker").read_text() == "reached CURRENT"

    assert (path / "CURRENT").read_text() == current
    old = Index.load(path, verify=True)
    assert old.version == "v000001" and "d9" not in old.corpus
    assert_same_answers(answers(old), before)
    old.add(NEW_DOCS)  # the dead writer's lock went with it
    assert set(Index.load(path).corpus) == set(docs()) | {"d7", "d8"}


KILL_INSIDE_BUILD = """
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from stagewise.data.loaders import Document
    from stagewise.serving.index import Index
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.retrievers import build_first_stage
    from stagewise.search.vector_index import VectorIndex

    def save(self, folder):  # die half-way through writing the new version's vectors
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "embeddings.npy", np.asarray(self.embeddings))
        Path(sys.argv[3]).write_text(str(folder))
        os.kill(os.getpid(), signal.SIGKILL)
    VectorIndex.save = save
    corpus = {f"n{i}": Document(f"n{i}", "", f"replacement document number {i}") for i in range(4)}
    Index.build(Pipeline(build_first_stage(sys.argv[2], show_progress=False)), corpus, sys.argv[1], replace=True)
"""


def test_a_rebuild_killed_half_way_leaves_the_old_index(make, tiny_bi_encoder, tmp_path):
    """A real SIGKILL while ``build(replace=True)`` writes the new vectors."""
    path = tmp_path / "idx"
    Index.build(make("dense", rerank=False), docs(), path)
    current, before = (path / "CURRENT").read_text(), answers(Index.load(path))

    proc = _run(KILL_INSIDE_BUILD, path, tiny_bi_encoder, tmp_path / "marker")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    half_written = Path((tmp_path / "marker").read_text())
    assert half_written.parent.name.startswith(".tmp-v000002")  # it died inside the temporary version
    assert (half_written / "embeddings.npy").is_file()

    assert (path / "CURRENT").read_text() == current
    old = Index.load(path, verify=True)
    assert old.version == "v000001" and set(old.corpus) == set(docs())
    assert_same_answers(answers(old), before)
    old.add(NEW_DOCS)  # the next writer sweeps the dead one's temporary folder
    assert not list(path.glob(".tmp-*"))


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["first_stage/embeddings.npy", "docs.jsonl"])
def test_a_corrupted_file_is_refused(built, rel):
    """One flipped bit in a stored file is caught by its checksum, and the message names the file."""
    target = built / "v000001" / rel
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01  # one bit, same size
    target.write_bytes(data)
    with pytest.raises(InvalidIndexError, match="checksum mismatch") as e:
        Index.load(built)
    assert str(target) in str(e.value)
    if rel.endswith(".npy"):  # the checksums are what refuses it: unverified, it loads
        assert len(Index.load(built, verify=False)) == 6


def test_an_edited_manifest_is_refused(built):
    """The manifest itself is pinned by the checksum in CURRENT."""
    manifest_path = built / "v000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["documents"] = 5
    manifest_path.write_text(json.dumps(manifest, indent=1))
    with pytest.raises(InvalidIndexError, match="checksum does not match CURRENT") as e:
        Index.load(built)
    assert str(manifest_path) in str(e.value)


def test_a_missing_file_is_refused(built):
    """A file listed in the manifest but gone is named, not a numpy error."""
    (built / "v000001" / "first_stage" / "keys.npy").unlink()
    with pytest.raises(InvalidIndexError, match="keys.npy: missing"):
        Index.load(built)


def test_a_folder_without_current_is_not_an_index(built, tmp_path):
    """CURRENT is what makes a folder an index."""
    (built / "CURRENT").unlink()
    with pytest.raises(InvalidIndexError, match="not an index"):
        Index.load(built)
    with pytest.raises(StagewiseError, match="no such index"):  # the CLI's one-line, exit-2 kind of error
        Index.load(tmp_path / "nowhere")


@pytest.mark.filterwarnings("ignore:model .* has changed since this config was saved")
def test_a_model_changed_after_the_build_is_refused(built):
    """The copied models are not in the manifest's checksums: their fingerprints are what protects them."""
    copies = sorted((built / "v000001" / "models").iterdir())
    assert len(copies) == 2  # the bi-encoder and the cross-encoder
    bi = next(c for c in copies if (c / "modules.json").is_file())
    weights = next(bi.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.unlink()  # a new file: never write through a link to someone else's copy
    weights.write_bytes(data)
    with pytest.raises(InvalidIndexError, match="fingerprint") as e:
        Index.load(built)
    assert "rebuild the index" in str(e.value)


def test_loading_with_another_first_stage_is_refused(built, make, other_bi_encoder):
    """Stored vectors only make sense for the model (and stage type) that made them."""
    with pytest.raises(InvalidIndexError, match="not the one this index was built with"):
        Index.load(built, pipeline=make("dense", model=other_bi_encoder))
    with pytest.raises(InvalidIndexError, match="not the one this index was built with"):
        Index.load(built, pipeline=make("bm25"))
    with pytest.raises(InvalidIndexError, match="not the one this index was built with"):
        Index.load(built, pipeline=make("hybrid"))


def test_loading_with_another_reranker_or_depth_uses_them(built, make):
    """The reranker and depth are free to change at load time; the stored first stage is kept."""
    stored = Index.load(built)
    first_stage_only = Index.load(built, pipeline=make("dense", rerank=False))
    assert first_stage_only.pipeline.reranker is None
    hits = first_stage_only.search("which animal purrs", k=5)
    assert all(h.rerank_score is None and h.rank == h.first_stage_rank for h in hits)
    assert [h.doc_id for h in hits] == [h.doc_id for h in stored.search("which animal purrs", k=5, rerank=False)]

    deeper = Index.load(built, pipeline=make("dense", rerank=True, depth=5))
    assert deeper.pipeline.depth == 5 and deeper.describe()["depth"] == 5
    hits = deeper.search("which animal purrs", k=6)
    assert [h.rerank_score is not None for h in hits] == [True] * 5 + [False]
    assert [h.rerank_score is not None for h in stored.search("which animal purrs", k=6)] == [True] * 3 + [False] * 3


def test_building_over_an_existing_index_needs_replace(built, make):
    """An index is never overwritten by accident; ``replace=True`` commits a new version over it."""
    with pytest.raises(InvalidIndexError, match="already an index"):
        Index.build(make(), docs(), built)
    assert versions(built) == ["v000001"]

    smaller = {d: doc for d, doc in docs().items() if d in ("d1", "d2")}
    rebuilt = Index.build(make(), smaller, built, replace=True)
    assert rebuilt.version == "v000002" and len(rebuilt) == 2
    assert rebuilt.manifest["parent"] == "v000001" and rebuilt.manifest["change"] == {"built": 2}
    assert set(Index.load(built).corpus) == {"d1", "d2"}


def test_building_into_a_folder_that_is_not_an_index_is_refused(make, tmp_path):
    """A build never writes into (or next to) someone else's files."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("mine")
    with pytest.raises(InvalidIndexError, match="exists and is not an index"):
        Index.build(make("bm25", rerank=False), docs(), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["readme.txt"]
    with pytest.raises(InvalidIndexError, match="exists and is not an index"):
        Index.build(make("bm25", rerank=False), docs(), folder / "readme.txt")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(Index.build(make("bm25", rerank=False), docs(), empty)) == 6  # an empty folder is fine


def test_a_build_while_another_writer_holds_the_lock_is_refused(built, make):
    """A rebuild takes the same writer lock as updates."""
    with _writer_lock(built):
        with pytest.raises(InvalidIndexError, match="another build or update"):
            Index.build(make(), docs(), built, replace=True)
    assert versions(built) == ["v000001"]


# ---- batched search ----------------------------------------------------------------------------


def test_search_many_answers_each_query_with_its_own_options(built):
    """The service batches queries that differ in k, depth and rerank: each must get its own answer."""
    index = Index.load(built)  # depth 3
    queries = [Query("which animal purrs", k=2), Query("which animal purrs", k=5, rerank=False),
               Query("language with memory safety", k=6, depth=5), Query("hot drink", k=1, depth=1)]
    results, timings = index.search_many(queries)

    assert [len(r) for r in results] == [2, 5, 6, 1]
    assert timings.first_stage_s >= 0 and timings.rerank_s >= 0
    default, plain, deep, shallow = results
    assert all(h.rerank_score is not None for h in default)
    assert all(h.rerank_score is None and h.rank == h.first_stage_rank for h in plain)
    assert [h.score for h in plain] == sorted((h.score for h in plain), reverse=True)
    assert [h.rerank_score is not None for h in deep] == [True] * 5 + [False]
    assert shallow[0].rerank_score is not None and shallow[0].first_stage_rank == 1

    # batching changes nothing: each query alone gives the same hits
    for query, hits in zip(queries, results):
        alone = index.search(query.text, k=query.k, depth=query.depth, rerank=query.rerank)
        assert [(h.doc_id, h.rerank_score is None) for h in hits] == [(h.doc_id, h.rerank_score is None) for h in alone]
        assert [h.score for h in hits] == pytest.approx([h.score for h in alone], abs=1e-5)
    nothing, timings = index.search_many([])
    assert nothing == [] and timings.total_s == 0


# ---- fusion ------------------------------------------------------------------------------------

FUSION = Fusion(0.3, "zscore")


def fused_answers(searcher, k: int = 5, texts=TEXTS) -> list[list[tuple[str, float | None, float | None]]]:
    results, _ = searcher.search_many([Query(t, k) for t in texts])
    return [[(h.doc_id, h.fused_score, h.rerank_score) for h in hits] for hits in results]


def assert_same_fused(actual, expected) -> None:
    assert [[(d, f is None, r is None) for d, f, r in hits] for hits in actual] == \
        [[(d, f is None, r is None) for d, f, r in hits] for hits in expected]
    assert any(f is not None for hits in expected for _, f, _ in hits)
    for got, want in zip(actual, expected):  # 1e-5: pairs batched with other documents are padded differently
        assert [f for _, f, _ in got if f is not None] == pytest.approx([f for _, f, _ in want if f is not None],
                                                                        abs=1e-5)
        assert [r for _, _, r in got if r is not None] == pytest.approx([r for _, _, r in want if r is not None],
                                                                        abs=1e-5)


def test_a_fused_pipeline_is_stored_and_kept_by_every_update(make, tmp_path):
    """The stored pipeline.yaml carries the fusion; add and delete versions keep it and answer fused."""
    path = tmp_path / "idx"
    expected = fused_answers(make(fusion=FUSION).index(docs()))
    index = Index.build(make(fusion=FUSION), docs(), path)
    assert yaml.safe_load((path / "v000001" / "pipeline.yaml").read_text())["fusion"] == FUSION.config()
    assert index.describe()["fusion"] == FUSION.config()
    assert_same_fused(fused_answers(index), expected)
    loaded = Index.load(path)
    assert loaded.pipeline.fusion == FUSION and loaded.pipeline.name == make(fusion=FUSION).name
    assert_same_fused(fused_answers(loaded), expected)

    loaded.add(NEW_DOCS)
    loaded.delete(["d2"])
    corpus = {d: doc for d, doc in docs().items() if d != "d2"} | {d.id: d for d in NEW_DOCS}
    expected = fused_answers(make(fusion=FUSION).index(corpus))
    for version in ("v000002", "v000003"):
        assert yaml.safe_load((path / version / "pipeline.yaml").read_text())["fusion"] == FUSION.config()
    reloaded = Index.load(path)
    assert reloaded.version == "v000003" and reloaded.pipeline.fusion == FUSION
    assert_same_fused(fused_answers(reloaded), expected)


def test_loading_with_a_fused_pipeline_keeps_its_fusion(built, make, tmp_path):
    """A pipeline swapped in at load (object or file) brings its fusion; the stored one stays pure reranking."""
    assert Index.load(built).pipeline.fusion == Fusion()
    assert all(h.fused_score is None for h in Index.load(built).search("which animal purrs"))
    expected = fused_answers(make(fusion=FUSION).index(docs()))
    as_object = Index.load(built, pipeline=make(fusion=FUSION))
    as_file = Index.load(built, pipeline=make(fusion=FUSION).save(tmp_path / "fused" / "pipeline.yaml"))
    for index in (as_object, as_file):
        assert index.pipeline.fusion == FUSION
        assert_same_fused(fused_answers(index), expected)
