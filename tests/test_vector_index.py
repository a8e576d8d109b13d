"""Tests for stagewise.search.vector_index: exact / HNSW search, int8 / binary codes with full-precision rescoring,
persistence and in-place updates. Pure numpy on seeded random unit vectors: no models involved."""

from __future__ import annotations

import numpy as np
import pytest

from stagewise.errors import StagewiseError
from stagewise.search.vector_index import EMBEDDED_KINDS, QUANTIZATIONS, VectorIndex, VectorIndexConfig

DIM = 32
COMBOS = [(kind, q) for kind in EMBEDDED_KINDS for q in QUANTIZATIONS]  # milvus: tests/test_milvus_index.py
COMBO_IDS = [f"{k}-{q}" for k, q in COMBOS]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return unit(rng.normal(size=(n, dim)))


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """~2000 unit vectors in 20 gaussian clusters (a realistic shape for ANN), and 50 queries near data points."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, DIM))
    vectors = unit(centers[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, DIM)))
    queries = unit(vectors[rng.choice(2000, 50, replace=False)] + 0.1 * rng.normal(size=(50, DIM)))
    return vectors, queries


def brute_force(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def build(vectors: np.ndarray, kind: str, quantization: str, **options) -> VectorIndex:
    return VectorIndex.build(vectors, VectorIndexConfig(kind=kind, quantization=quantization, **options))


# ---- searching ---------------------------------------------------------------------------------


def test_exact_full_precision_is_brute_force(clustered):
    """The default index is a plain matrix product: same rows, same scores, best first."""
    vectors, queries = clustered
    rows, scores = VectorIndex.build(vectors).search(queries, 10)
    expected_rows, expected_scores = brute_force(queries, vectors, 10)
    assert rows.shape == scores.shape == (50, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize(("kind", "quantization"), COMBOS, ids=COMBO_IDS)
def test_scores_are_full_precision_inner_products_of_the_returned_rows(clustered, kind, quantization):
    """Quantised / approximate candidates are rescored: a score is always the float32 query · row."""
    vectors, queries = clustered
    rows, scores = build(vectors, kind, quantization).search(queries, 10)
    assert rows.shape == (50, 10)
    assert all(len(set(r)) == 10 for r in rows)  # no row twice
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[rows]), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)  # best first


@pytest.mark.parametrize(("kind", "quantization", "minimum"),
                         [("exact", "int8", 0.9), ("hnsw", "none", 0.9), ("hnsw", "int8", 0.85),
                          ("exact", "binary", 0.5), ("hnsw", "binary", 0.5)])
def test_recall_at_10_against_exact(clustered, kind, quantization, minimum):
    """The fast paths find (nearly) the same top 10 as exact search; binary codes of 32 dims lose more."""
    vectors, queries = clustered
    truth, _ = VectorIndex.build(vectors).search(queries, 10)
    found, _ = build(vectors, kind, quantization).search(queries, 10)
    assert recall(found, truth) >= minimum


def test_more_rescoring_candidates_raise_binary_recall(clustered):
    """``rescore`` is honoured: fetching 16×k binary candidates beats fetching exactly k."""
    vectors, queries = clustered
    truth, _ = VectorIndex.build(vectors).search(queries, 10)
    low = recall(build(vectors, "exact", "binary", rescore=1).search(queries, 10)[0], truth)
    high = recall(build(vectors, "exact", "binary", rescore=16).search(queries, 10)[0], truth)
    assert high > low + 0.1 and high >= 0.9


@pytest.mark.parametrize(("kind", "quantization"), COMBOS, ids=COMBO_IDS)
def test_k_larger_than_the_index_returns_every_row_once(kind, quantization):
    """Asking for more rows than exist returns all of them, once each, in exact order after rescoring."""
    rng = np.random.default_rng(1)
    vectors = random_unit(rng, 30)
    queries = random_unit(rng, 3)
    index = build(vectors, kind, quantization)
    rows, scores = index.search(queries, 100)
    assert rows.shape == scores.shape == (3, 30)
    for r in rows:
        assert sorted(r.tolist()) == list(range(30))
    np.testing.assert_array_equal(rows, brute_force(queries, vectors, 30)[0])  # all rows: exact order after rescoring


@pytest.mark.parametrize(("kind", "quantization"), COMBOS, ids=COMBO_IDS)
def test_k_zero_and_single_query_shapes(kind, quantization):
    """Shapes stay (queries, k) at the edges: k=0 and a 1-D query."""
    rng = np.random.default_rng(2)
    index = build(random_unit(rng, 20), kind, quantization)
    rows, scores = index.search(random_unit(rng, 4), 0)
    assert rows.shape == scores.shape == (4, 0)
    rows, scores = index.search(random_unit(rng, 1)[0], 3)  # a 1-D query is one query
    assert rows.shape == scores.shape == (1, 3)


# ---- persistence -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "quantization"), COMBOS, ids=COMBO_IDS)
def test_save_then_load_gives_identical_results(clustered, kind, quantization, tmp_path):
    """Every kind/quantization writes exactly the files it needs and reloads to the same answers."""
    vectors, queries = clustered
    index = build(vectors, kind, quantization)
    written = index.save(tmp_path / "vectors")
    names = {p.name for p in written}
    assert {"embeddings.npy", "keys.npy", "vectors.json"} <= names
    assert ("codes.npy" in names) == (quantization != "none")
    assert ("graph.usearch" in names) == (kind == "hnsw")
    assert all(p.is_file() for p in written)

    loaded = VectorIndex.load(tmp_path / "vectors")
    assert loaded.config == index.config and len(loaded) == len(index) and loaded.dim == DIM
    np.testing.assert_array_equal(loaded.keys, index.keys)
    rows, scores = index.search(queries, 10)
    loaded_rows, loaded_scores = loaded.search(queries, 10)
    np.testing.assert_array_equal(loaded_rows, rows)
    np.testing.assert_array_equal(loaded_scores, scores)


def test_int8_calibration_ranges_survive_save_and_load(tmp_path):
    """Later additions are quantised with the corpus' ranges, so a reloaded index must keep the same ranges."""
    rng = np.random.default_rng(3)
    index = build(random_unit(rng, 50), "exact", "int8")
    index.save(tmp_path / "v")
    loaded = VectorIndex.load(tmp_path / "v")
    np.testing.assert_array_equal(loaded.ranges, index.ranges)
    added = random_unit(rng, 5)
    np.testing.assert_array_equal(loaded.updated([], added).codes, index.updated([], added).codes)


def test_int8_additions_beyond_the_calibrated_range_saturate():
    """A later document outside the corpus' ranges gets the extreme code, never a wrapped-around one."""
    index = build(random_unit(np.random.default_rng(8), 100), "exact", "int8")
    spike = np.zeros((1, DIM), dtype=np.float32)
    spike[0, 0], spike[0, 1] = 1.0, -1.0
    assert index.ranges[1, 0] < 1.0 and index.ranges[0, 1] > -1.0  # both beyond what was calibrated
    updated = index.updated(np.array([], dtype=np.int64), spike)
    assert updated.codes.dtype == np.int8
    assert (updated.codes[-1, 0], updated.codes[-1, 1]) == (127, -128)
    assert updated.search(spike, 1)[0][0, 0] == 100


# ---- updates -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reload", [False, True], ids=["in-memory", "loaded"])
@pytest.mark.parametrize(("kind", "quantization"), COMBOS, ids=COMBO_IDS)
def test_updated_removes_and_adds_rows(kind, quantization, reload, tmp_path):
    """Removed rows never come back, added vectors are found, keys stay sorted and unique."""
    rng = np.random.default_rng(4)
    vectors = random_unit(rng, 300)
    index = build(vectors, kind, quantization)
    if reload:  # the loaded index has memory-mapped embeddings and a restored graph
        index.save(tmp_path / "v")
        index = VectorIndex.load(tmp_path / "v")
    removed = rng.choice(300, 100, replace=False)
    added = random_unit(rng, 20)

    updated = index.updated(removed, added)

    kept = np.setdiff1d(np.arange(300), removed)
    assert len(updated) == 220
    np.testing.assert_array_equal(np.asarray(updated.embeddings), np.concatenate([vectors[kept], added]))
    keys = updated.keys.astype(np.int64)
    assert np.all(np.diff(keys) > 0)  # sorted and unique
    np.testing.assert_array_equal(keys[:200], kept)  # surviving rows keep their keys
    assert keys[200] > 299  # new keys are fresh, never a removed row's

    # querying with the removed vectors themselves: none of them comes back
    rows, scores = updated.search(vectors[removed], 10)
    assert not set(updated.keys[rows].ravel().tolist()) & set(removed.tolist())
    assert rows.max() < len(updated)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", vectors[removed], np.asarray(updated.embeddings)[rows]),
                               rtol=1e-5, atol=1e-6)
    # every row exactly once when asking for all of them
    every, _ = updated.search(added[:2], 1000)
    assert every.shape == (2, 220) and all(sorted(r.tolist()) == list(range(220)) for r in every)
    # each added vector is its own best match
    top, _ = updated.search(added, 1)
    np.testing.assert_array_equal(top[:, 0], np.arange(200, 220))


@pytest.mark.parametrize(("kind", "quantization"), COMBOS, ids=COMBO_IDS)
def test_chained_updates_save_and_load_like_the_updated_object(kind, quantization, tmp_path):
    """Several edits in a row, saved and reloaded, answer like the edited object."""
    rng = np.random.default_rng(5)
    index = build(random_unit(rng, 200), kind, quantization)
    index = index.updated(np.arange(0, 200, 3), random_unit(rng, 10))
    index = index.updated(np.array([0, 1, len(index) - 1]), random_unit(rng, 7))
    assert len(index) == 200 - 67 + 10 - 3 + 7
    assert np.all(np.diff(index.keys.astype(np.int64)) > 0)
    index.save(tmp_path / "v")
    loaded = VectorIndex.load(tmp_path / "v")
    queries = random_unit(rng, 10)
    rows, scores = index.search(queries, 10)
    loaded_rows, loaded_scores = loaded.search(queries, 10)
    np.testing.assert_array_equal(loaded_rows, rows)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)
    truth = brute_force(queries, np.asarray(index.embeddings), 10)[0]
    if (kind, quantization) == ("exact", "none"):
        np.testing.assert_array_equal(rows, truth)
    elif quantization == "none":  # HNSW is approximate (on unstructured vectors too), but an edited graph still works
        assert recall(rows, truth) >= 0.9


@pytest.mark.parametrize(("kind", "quantization"), COMBOS, ids=COMBO_IDS)
def test_removing_every_row_then_adding_again(kind, quantization):
    """An index can pass through empty (every document deleted, then new ones added)."""
    rng = np.random.default_rng(6)
    index = build(random_unit(rng, 40), kind, quantization)
    empty = index.updated(np.arange(40), np.zeros((0, DIM), dtype=np.float32))
    assert len(empty) == 0
    assert empty.search(random_unit(rng, 2), 5)[0].shape == (2, 0)
    added = random_unit(rng, 5)
    refilled = empty.updated(np.array([], dtype=np.int64), added)
    assert len(refilled) == 5
    top, _ = refilled.search(added, 1)
    np.testing.assert_array_equal(top[:, 0], np.arange(5))


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"kind": "ivf"}, "unknown index kind 'ivf'"),
    ({"quantization": "int4"}, "unknown quantization 'int4'"),
    ({"rescore": 0}, "rescore must be at least 1"),
    ({"connectivity": 1}, "connectivity must be at least 2"),  # usearch refuses 1 (it was a traceback)
    ({"connectivity": 10**9}, "at most 256"),  # usearch ran out of memory
    ({"expansion_search": -1}, "expansion_search must be at least 1"),
])
def test_config_validation(options, message):
    """Bad options are refused up front with a message naming them."""
    with pytest.raises(StagewiseError, match=message):
        VectorIndexConfig(**options)


def test_config_labels():
    """The label is what the manifest and ``describe`` show."""
    assert VectorIndexConfig().label == "exact"
    assert VectorIndexConfig(kind="hnsw").label == "hnsw"
    assert VectorIndexConfig(kind="hnsw", quantization="int8").label == "hnsw-int8"
    assert VectorIndexConfig(quantization="binary").label == "exact-binary"


def test_memory_bytes_reflect_what_the_fast_path_holds():
    """Exact search holds the float32 rows; int8 codes take a quarter of that, binary a thirty-second."""
    vectors = random_unit(np.random.default_rng(7), 256)
    assert VectorIndex.build(vectors).memory_bytes() == vectors.nbytes
    assert build(vectors, "exact", "int8").memory_bytes() == vectors.nbytes // 4
    assert build(vectors, "exact", "binary").memory_bytes() == vectors.nbytes // 32
    assert build(vectors, "hnsw", "none").memory_bytes() > vectors.nbytes  # vectors plus the graph
