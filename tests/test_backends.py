"""Tests for stagewise.models.backends and stagewise.models.export: ONNX Runtime / OpenVINO exports (float32 and int8) and
PyTorch bfloat16, on the tiny random models.

Every exported variant is made once per module (``exports``) and compared with float32 PyTorch on held-out texts
(the built-in sample, not the calibration data). The loaded model is checked to really run on the runtime
(``transformer_module(model).model`` is the runtime session), so "same outputs" cannot come from torch itself.

conftest's tiny cross-encoder scores every pair almost the same (a spread of ~2e-5: its random head sees a
near-constant [CLS]), so rank correlations on it measure rounding noise. The cross-encoder variants therefore use
``spread_cross_encoder``: the same tiny architecture with a wider random initialisation, whose scores vary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

import stagewise.models.export as export_module
from conftest import CORPUS, QUERIES, _tiny_bert_config, _tokenizer_dir, running_server, write_beir
from stagewise.cache import cache_dir
from stagewise.data.loaders import Document
from stagewise.errors import DataError, ModelError, StagewiseError
from stagewise.models.backends import Backend, backend_of, read_manifest, require, set_threads
from stagewise.models.export import (
    FILES,
    Calibration,
    Tolerance,
    builtin_calibration,
    equivalence,
    equivalence_sample,
    export_model,
    failures,
    load_calibration,
    prepare,
)
from stagewise.models.runtimes import OnnxRuntimeModel, OpenVINOModel, transformer_module
from stagewise.models.specs import load_bi_encoder, load_cross_encoder, resolve_model
from stagewise.search.pipeline import Pipeline, Query
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import DenseRetriever
from stagewise.serving.index import Index

BI, CROSS = "bi-encoder", "cross-encoder"
VARIANTS = {
    "onnx": Backend("onnx"),
    "onnx-int8": Backend("onnx", "int8"),
    "openvino": Backend("openvino"),
    "openvino-int8": Backend("openvino", "int8"),
}
RUNTIME = {"onnx": OnnxRuntimeModel, "openvino": OpenVINOModel}
# int8 on a random 2-layer cross-encoder keeps the pairs' order only roughly (Spearman ~0.85 for both runtimes):
# its export is checked against a looser tolerance than the default 0.98, which real trained models meet
INT8_CROSS = Tolerance(min_correlation=0.7)
SAMPLE = builtin_calibration()  # held out: none of it is calibration data
TEXTS = SAMPLE.texts(64)
PAIRS = SAMPLE.pairs(64)
SEARCHES = [q["text"] for q in QUERIES] + ["hot drink made from leaves", "a pet that barks"]


def docs() -> dict[str, Document]:
    return {d["_id"]: Document(d["_id"], d.get("title", ""), d["text"]) for d in CORPUS}


def nothing_written(out: Path) -> None:
    """``out`` does not exist, and no half-written temporary sibling (``.out-…``) was left beside it."""
    assert not out.exists()
    if out.parent.is_dir():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}-")] == []


def encode(model, texts=TEXTS) -> np.ndarray:
    return model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)


def predict(model, pairs=PAIRS) -> np.ndarray:
    return np.asarray(model.predict(pairs, show_progress_bar=False, convert_to_numpy=True), dtype=np.float64)


def load(kind: str, folder, backend: Backend | None = None):
    if kind == BI:
        return load_bi_encoder(str(folder), device="cpu", backend=backend)
    return load_cross_encoder(str(folder), device="cpu", backend=backend)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Loading with ``threads`` sets PyTorch's global thread count: put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---- module fixtures: models, calibration data and every export, each made once ------------------------------


@pytest.fixture(scope="module")
def spread_cross_encoder(tmp_path_factory) -> Path:
    """conftest's tiny cross-encoder architecture, initialised wide enough that its scores differ across pairs."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("spread-cross")
    BertForSequenceClassification(_tiny_bert_config(num_labels=1, initializer_range=0.2)).save_pretrained(out)
    AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sources(tiny_bi_encoder, spread_cross_encoder) -> dict[str, Path]:
    return {BI: tiny_bi_encoder, CROSS: spread_cross_encoder}


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("calibration") / "beir")


@pytest.fixture(scope="module")
def calibration(calibration_dir) -> Calibration:
    return load_calibration(str(calibration_dir))


@pytest.fixture(scope="module")
def reference(sources) -> dict:
    """Float32 PyTorch: the models and their outputs on the held-out sample."""
    bi = load_bi_encoder(str(sources[BI]), device="cpu")
    cross = load_cross_encoder(str(sources[CROSS]), device="cpu")
    return {BI: bi, CROSS: cross, "embeddings": encode(bi), "scores": predict(cross)}


@pytest.fixture(scope="module")
def exports(sources, calibration, tmp_path_factory):
    """``exports(kind, label) -> (folder, manifest)``: each variant exported once, the first time it is asked for."""
    made: dict = {}
    root = tmp_path_factory.mktemp("exports")

    def get(kind: str, label: str):
        if (kind, label) not in made:
            backend = VARIANTS[label]
            int8 = backend.quantize == "int8"
            out = root / f"{kind}-{label}"
            manifest = export_model(str(sources[kind]), backend, out, calibration=calibration if int8 else None,
                                    tolerance=INT8_CROSS if int8 and kind == CROSS else Tolerance())
            made[kind, label] = out, manifest
        return made[kind, label]

    return get


@pytest.fixture(scope="module")
def loaded(exports):
    """``loaded(kind, label)``: the exported variant loaded as it runs by default (its own backend), once."""
    models: dict = {}

    def get(kind: str, label: str):
        if (kind, label) not in models:
            models[kind, label] = load(kind, exports(kind, label)[0])
        return models[kind, label]

    return get


def test_the_reference_models_are_fit_to_compare_with(reference):
    """The thresholds below only mean something if another text's embedding is clearly further away than 0.99,
    and if the cross-encoder's scores spread much wider than the float32 tolerance."""
    e = reference["embeddings"]
    similarity = e @ e.T
    np.fill_diagonal(similarity, -1)
    assert similarity.max() < 0.98
    assert np.ptp(reference["scores"]) > 0.05


# ---- 1. every variant runs on its runtime and agrees with float32 PyTorch -------------------------------------


@pytest.mark.parametrize("label", list(VARIANTS))
@pytest.mark.parametrize("kind", [BI, CROSS])
def test_an_export_runs_on_its_runtime_and_agrees_with_float32_torch(kind, label, loaded, reference):
    backend = VARIANTS[label]
    model = loaded(kind, label)  # no backend asked: an exported folder runs on its own
    assert isinstance(transformer_module(model).model, RUNTIME[backend.name])
    assert not list(transformer_module(model).model.parameters())  # no torch weights left doing the work

    int8 = backend.quantize == "int8"
    if kind == BI:
        got, want = encode(model), reference["embeddings"]
        cosines = np.sum(got * want, axis=1)
        assert cosines.min() > (0.99 if int8 else 0.9999), cosines.min()
        if not int8:
            assert np.abs(got - want).max() < 1e-4
        # each text's nearest torch embedding is its own
        assert (np.argmax(got @ want.T, axis=1) == np.arange(len(TEXTS))).all()
    else:
        got, want = predict(model), reference["scores"]
        if int8:
            assert spearman(got, want) > 0.7 and np.corrcoef(got, want)[0, 1] > 0.8  # order kept, not the offset
        else:
            assert np.abs(got - want).max() < 1e-4
            assert spearman(got, want) > 0.999


@pytest.mark.parametrize("label", list(VARIANTS))
@pytest.mark.parametrize("kind", [BI, CROSS])
def test_the_manifest_records_source_backend_calibration_and_equivalence(kind, label, exports, loaded, sources,
                                                                         calibration, calibration_dir, reference):
    folder, manifest = exports(kind, label)
    backend = VARIANTS[label]
    int8 = backend.quantize == "int8"
    source = resolve_model(str(sources[kind]))

    assert json.loads((folder / "export.json").read_text()) == manifest == read_manifest(folder)
    assert manifest["kind"] == kind
    assert manifest["source"] == {"spec": str(sources[kind]), "fingerprint": source.fingerprint}
    assert resolve_model(str(folder)).fingerprint != source.fingerprint
    assert manifest["backend"] == backend.config() and backend_of(folder) == backend
    assert manifest["file"] == FILES[backend.name, backend.quantize] and (folder / manifest["file"]).is_file()
    assert manifest["accepted"] is True
    # the source's own files come along (tokenizer, config), the torch weights are not what runs
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()

    if int8:
        record = manifest["calibration"]
        assert record == load_calibration(str(calibration_dir)).record()  # the same data hashes the same
        held = calibration.held_out  # the rest of the data: what the equivalence is measured on
        assert (record["queries"] + len(held.queries), record["documents"] + len(held.documents)) == (len(QUERIES),
                                                                                                      len(CORPUS))
        assert record["source"] == str(calibration_dir) and len(record["hash"]) == 24
        assert record["hash"] != Calibration(calibration.queries[1:], calibration.documents, "x").record()["hash"]
        assert manifest["equivalence"]["sample"] == f"{calibration_dir} (held out)"
    else:
        assert manifest["calibration"] is None
        assert manifest["equivalence"]["sample"] == builtin_calibration().source

    numbers = manifest["equivalence"]
    if kind == BI:
        assert numbers["texts"] > 1 and numbers["min_cosine"] > (0.99 if int8 else 0.9999)
        assert numbers["min_cosine"] <= numbers["mean_cosine"] <= 1.0 + 1e-6
    else:
        assert numbers["pairs"] > 1 and numbers["spearman"] > (0.7 if int8 else 0.999)
        assert numbers["max_abs_diff"] < (0.3 if int8 else 1e-4)
    assert 0.8 <= numbers["top10_agreement"] <= 1.0
    # the numbers are the saved folder's own: measuring it again gives them back
    again = equivalence(kind, reference[kind], loaded(kind, label), equivalence_sample(calibration if int8 else None))
    assert again == pytest.approx({k: v for k, v in numbers.items() if k != "sample"}, abs=1e-6)


@pytest.mark.parametrize("kind", [BI, CROSS])
def test_int8_files_are_really_quantised(kind, exports):
    import onnx

    folder, manifest = exports(kind, "onnx-int8")
    ops = {n.op_type for n in onnx.load(str(folder / manifest["file"])).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    folder, manifest = exports(kind, "openvino-int8")
    assert "FakeQuantize" in (folder / manifest["file"]).read_text()
    folder, manifest = exports(kind, "openvino")
    assert "FakeQuantize" not in (folder / manifest["file"]).read_text()


@pytest.mark.parametrize("kind", [BI, CROSS])
def test_torch_bfloat16_runs_in_bfloat16_and_agrees_with_float32(kind, sources, reference):
    backend = Backend("torch", dtype="bfloat16")
    model = load(kind, sources[kind], backend)
    assert {p.dtype for p in transformer_module(model).model.parameters()} == {torch.bfloat16}
    if kind == BI:
        got, want = encode(model), reference["embeddings"]
        assert np.sum(got * want, axis=1).min() > 0.99
        assert not np.allclose(got, want, atol=1e-6)  # it really ran in bfloat16
        assert (np.argmax(got @ want.T, axis=1) == np.arange(len(TEXTS))).all()
    else:
        got, want = predict(model), reference["scores"]
        assert spearman(got, want) > 0.9 and np.abs(got - want).max() < 0.05
        assert not np.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("kind", [BI, CROSS])
def test_openvino_bfloat16_is_a_load_option_of_the_float32_export(kind, exports, reference):
    folder, _ = exports(kind, "openvino")
    model = load(kind, folder, Backend("openvino", dtype="bfloat16"))
    assert isinstance(transformer_module(model).model, OpenVINOModel)
    if kind == BI:
        assert np.sum(encode(model) * reference["embeddings"], axis=1).min() > 0.99
    else:
        assert spearman(predict(model), reference["scores"]) > 0.9


def test_an_openvino_model_says_which_precision_it_runs_in(exports, loaded):
    """``precision`` is OpenVINO's short name of the inference precision: bf16 where the CPU has it, else f32."""
    import openvino as ov

    folder, _ = exports(BI, "openvino")
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    asked = transformer_module(load_bi_encoder(str(folder), backend=Backend("openvino", dtype="bfloat16"))).model
    assert asked.precision == ("bf16" if has_bf16 else "f32")
    assert transformer_module(loaded(BI, "openvino")).model.precision == "f32"


def test_calibration_from_a_text_file_is_recorded_in_the_manifest(tiny_bi_encoder, tmp_path):
    lines = [f"calibration text number {i} about {topic}" for i, topic in enumerate(
        ["cats", "dogs", "tea", "coffee", "rust", "python", "rivers", "owls", "trains", "violins"])]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(lines[:5]) + "\n\n   \n" + "\n".join(lines[5:]) + "\n")  # blank lines are skipped
    calibration = load_calibration(texts)
    held = calibration.held_out.queries + calibration.held_out.documents
    assert sorted(calibration.queries + calibration.documents + held) == sorted(lines)
    assert calibration.source == str(texts) and len(held) == len(lines) // 2

    manifest = export_model(str(tiny_bi_encoder), Backend("onnx", "int8"), tmp_path / "out", calibration)
    record = manifest["calibration"]
    assert record["source"] == str(texts) and record["queries"] + record["documents"] == len(lines) - len(held)
    assert record["hash"] == calibration.record()["hash"]
    texts.write_text("\n".join(lines[:-1]) + "\n")
    assert load_calibration(texts).record()["hash"] != record["hash"]  # other texts, another hash
    assert manifest["equivalence"]["sample"] == f"{texts} (held out)" and manifest["equivalence"]["texts"] == len(held)


@pytest.mark.parametrize("source", ["dataset", "text file", "one line", "built-in texts"])
def test_the_equivalence_sample_never_overlaps_the_calibration_texts(source, calibration_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    builtin = builtin_calibration()
    lines = {"text file": [f"text {i} about {w}" for i, w in enumerate("cats dogs tea owls rust trains".split())],
             "one line": ["just one text"],
             "built-in texts": builtin.queries[:3] + builtin.documents[:3] + ["something of my own"]}
    if source == "dataset":
        calibration = load_calibration(str(calibration_dir))
    else:
        texts.write_text("\n".join(lines[source]) + "\n")
        calibration = load_calibration(texts)
    sample = equivalence_sample(calibration)
    used = set(calibration.queries + calibration.documents)
    assert sample.queries + sample.documents and not used & set(sample.queries + sample.documents)
    assert sample.source.endswith("(held out)") or sample.source == builtin.source


def test_threads_reach_the_runtime_sessions(exports):
    onnx_folder, _ = exports(BI, "onnx")
    runtime = transformer_module(load_bi_encoder(str(onnx_folder), threads=1)).model
    assert runtime.session.get_session_options().intra_op_num_threads == 1
    assert torch.get_num_threads() == 1
    ov_folder, _ = exports(BI, "openvino")
    runtime = transformer_module(load_bi_encoder(str(ov_folder), threads=2)).model
    assert int(runtime.compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    with pytest.raises(StagewiseError, match="'--threads'"):
        set_threads(0)


# ---- Backend: options validated on construction ---------------------------------------------------------------


def test_backend_labels_and_config_round_trip():
    assert [Backend(*args).label for args in [(), ("torch", "none", "bfloat16"), ("onnx", "int8"),
                                              ("openvino", "none", "bfloat16"), ("openvino", "int8")]] == \
        ["torch", "torch-bf16", "onnx-int8", "openvino-bf16", "openvino-int8"]
    for backend in [Backend(), Backend("onnx", "int8"), Backend("openvino", "none", "bfloat16")]:
        assert Backend.from_config(backend.config()) == backend
    assert Backend.from_config(None) == Backend() and Backend().is_default and not Backend("onnx").is_default
    assert Backend("onnx").exported and not Backend("torch", dtype="bfloat16").exported


@pytest.mark.parametrize("args, option, words", [
    (("tensorrt",), "--backend", ["tensorrt", "torch, onnx, openvino"]),
    (("onnx", "int4"), "--quantize", ["int4"]),
    (("openvino", "none", "float16"), "--dtype", ["float16"]),
    (("torch", "int8"), "--quantize", ["stagewise export"]),
    (("onnx", "none", "bfloat16"), "--dtype", ["bfloat16"]),
])
def test_a_bad_backend_option_is_refused_naming_it(args, option, words):
    with pytest.raises(StagewiseError) as e:
        Backend(*args)
    assert str(e.value).startswith(f"option '{option}':") and all(w in str(e.value) for w in words)
    with pytest.raises(StagewiseError, match=r"^pipeline\.yaml: option"):
        Backend.from_config(dict(zip(("backend", "quantize", "dtype"), args)), "pipeline.yaml")


# ---- 2. the export refuses bad input and writes nothing -------------------------------------------------------


def test_an_unknown_backend_or_torch_is_not_something_to_export(tiny_bi_encoder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(StagewiseError, match="'--backend'.*tensorrt"):
        export_model(str(tiny_bi_encoder), Backend("tensorrt"), out)
    with pytest.raises(StagewiseError, match="'--backend': export needs onnx or openvino"):
        export_model(str(tiny_bi_encoder), Backend("torch"), out)
    nothing_written(out)


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    for spec in [folder, tmp_path / "missing"]:
        with pytest.raises(ModelError, match="not a model|no such directory"):
            export_model(str(spec), Backend("onnx"), tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_a_plain_base_encoder_is_refused(tiny_bi_encoder, tmp_path):
    import shutil

    base = shutil.copytree(tiny_bi_encoder, tmp_path / "base", ignore=shutil.ignore_patterns("modules.json"))
    with pytest.raises(ModelError, match="plain base encoder") as e:
        export_model(str(base), Backend("onnx"), tmp_path / "out")
    assert "stagewise train" in str(e.value)
    nothing_written(tmp_path / "out")


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "blank-lines"])
def test_empty_calibration_texts_are_a_data_error(content, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text(content)
    with pytest.raises(DataError) as e:
        load_calibration(texts)
    assert e.value.path == str(texts) and "no calibration texts" in str(e.value)


def test_a_calibration_dataset_without_documents_is_a_data_error(tmp_path):
    folder = write_beir(tmp_path / "empty", corpus=[], qrels={})
    with pytest.raises(DataError, match="empty"):
        load_calibration(str(folder))


def test_openvino_int8_without_calibration_is_refused(tiny_bi_encoder, tmp_path):
    with pytest.raises(StagewiseError, match="'--calibration'"):
        export_model(str(tiny_bi_encoder), Backend("openvino", "int8"), tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_a_non_empty_out_folder_is_refused_and_left_alone(tiny_bi_encoder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(StagewiseError, match="'--out'.*not empty"):
        export_model(str(tiny_bi_encoder), Backend("onnx"), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(StagewiseError, match="'--out'"):
        export_model(str(tiny_bi_encoder), Backend("onnx"), a_file)
    assert a_file.read_text() == "x"


def test_an_already_exported_folder_is_refused(exports, tmp_path):
    folder, _ = exports(BI, "onnx")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    for backend in [Backend("onnx"), Backend("openvino")]:
        with pytest.raises(ModelError, match="already an exported folder"):
            export_model(str(folder), backend, tmp_path / "out")
    nothing_written(tmp_path / "out")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


@pytest.mark.parametrize("kind, tolerance, words", [
    (BI, Tolerance(min_cosine=1.01), "min cosine"),
    (CROSS, Tolerance(min_correlation=1.01), "score correlation"),
], ids=["cosine", "correlation"])
def test_an_export_past_the_tolerance_is_refused_and_nothing_written(kind, tolerance, words, sources, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ModelError) as e:
        export_model(str(sources[kind]), Backend("onnx"), out, tolerance=tolerance)
    assert "tolerance" in str(e.value) and words in str(e.value) and "--force" in str(e.value)
    nothing_written(out)


def test_force_keeps_an_export_past_the_tolerance(tiny_bi_encoder, tmp_path):
    out = tmp_path / "out"
    manifest = export_model(str(tiny_bi_encoder), Backend("onnx"), out, tolerance=Tolerance(min_cosine=1.01),
                            force=True)
    assert manifest["accepted"] == "forced" and read_manifest(out)["accepted"] == "forced"
    assert read_manifest(out)["tolerance"]["min_cosine"] == 1.01
    assert isinstance(transformer_module(load_bi_encoder(str(out))).model, OnnxRuntimeModel)


def test_failures_name_each_number_past_the_tolerance():
    fine = {"min_cosine": 0.99, "top10_agreement": 0.9}
    assert failures(BI, fine, Tolerance()) == []
    problems = failures(BI, {"min_cosine": 0.5, "top10_agreement": 0.1}, Tolerance())
    assert len(problems) == 2 and "min cosine 0.5000 < 0.98" in problems[0] and "top-10" in problems[1]
    assert failures(CROSS, {"spearman": 0.97, "top10_agreement": 1.0}, Tolerance()) == \
        ["score correlation 0.9700 < 0.98"]
    assert failures(CROSS, {"spearman": 0.97, "top10_agreement": 1.0}, Tolerance(min_correlation=0.9)) == []


# ---- 3. an exported folder runs on its own backend, and refuses another ---------------------------------------


def test_an_exported_folder_runs_on_its_own_backend_and_refuses_another(exports, tiny_bi_encoder):
    folder, _ = exports(BI, "onnx")
    assert backend_of(folder) == Backend("onnx") and backend_of(folder, Backend()) == Backend("onnx")
    assert backend_of(folder, Backend("onnx")) == Backend("onnx")
    for other in [Backend("openvino"), Backend("onnx", "int8"), Backend("openvino", "int8"),
                  Backend("torch", dtype="bfloat16")]:
        with pytest.raises(ModelError) as e:
            backend_of(folder, other)
        message = str(e.value)
        assert f"exported for onnx, not {other.label}" in message and str(tiny_bi_encoder) in message
        with pytest.raises(ModelError, match=f"not {other.label}"):
            load_bi_encoder(str(folder), backend=other)
    ov, _ = exports(BI, "openvino")
    assert backend_of(ov, Backend("openvino", dtype="bfloat16")) == Backend("openvino", dtype="bfloat16")
    int8, _ = exports(BI, "onnx-int8")
    with pytest.raises(ModelError, match="onnx-int8, not onnx"):
        backend_of(int8, Backend("onnx"))


def test_a_plain_folder_runs_what_is_asked_and_refuses_a_runtime_without_export(tiny_bi_encoder):
    assert backend_of(tiny_bi_encoder) == Backend()
    assert backend_of(tiny_bi_encoder, Backend("onnx")) == Backend("onnx")
    for backend in [Backend("onnx"), Backend("openvino", "int8")]:
        with pytest.raises(ModelError, match="stagewise export") as e:
            load_bi_encoder(str(tiny_bi_encoder), backend=backend)
        assert "is not exported for " + backend.label in str(e.value)


@pytest.mark.parametrize("content, words", [
    ("{not json", "not an export manifest"),
    ('{"backend": {"backend": "onnx"}}', "not an export manifest"),  # no 'file'
    ('{"backend": {"backend": "tensorrt"}, "file": "x.onnx"}', "'--backend'"),
])
def test_a_broken_manifest_is_refused(content, words, tmp_path):
    (tmp_path / "export.json").write_text(content)
    with pytest.raises(StagewiseError, match=words):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path / "nowhere") is None


def test_a_manifest_naming_a_missing_file_is_refused(exports, tmp_path):
    import shutil

    folder = shutil.copytree(exports(BI, "onnx")[0], tmp_path / "copy")
    (folder / "onnx" / "model.onnx").unlink()
    with pytest.raises(ModelError, match="model.onnx, which is missing"):
        load_bi_encoder(str(folder))


# ---- 4. a missing runtime package: one line naming the extra --------------------------------------------------


@pytest.mark.parametrize("backend, export, missing, extra", [
    ("onnx", False, "onnxruntime", "onnx"),
    ("onnx", True, "onnx", "onnx"),
    ("onnx", True, "onnxruntime.quantization", "onnx"),
    ("openvino", False, "openvino", "openvino"),
    ("openvino", True, "nncf", "openvino"),
])
def test_a_missing_package_is_one_line_naming_the_extra(backend, export, missing, extra, monkeypatch):
    assert require(backend, export=export).__name__ == _module(backend)  # installed here: no error
    monkeypatch.setitem(sys.modules, missing, None)  # import now fails as if it were not installed
    with pytest.raises(ModelError) as e:
        require(backend, export=export)
    message = str(e.value)
    assert f'pip install -e ".[{extra}]"' in message and f"needs {missing.split('.')[0]}," in message
    assert "\n" not in message and e.value.__cause__ is None and e.value.__suppress_context__


def _module(backend: str) -> str:
    return {"onnx": "onnxruntime", "openvino": "openvino"}[backend]


def test_loading_or_exporting_without_the_runtime_fails_before_any_work(exports, tiny_bi_encoder, monkeypatch,
                                                                        tmp_path):
    folder, _ = exports(BI, "onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelError, match=r'pip install -e "\.\[onnx\]"'):
        load_bi_encoder(str(folder))
    with pytest.raises(ModelError, match=r'pip install -e "\.\[onnx\]"'):
        export_model(str(tiny_bi_encoder), Backend("onnx"), tmp_path / "out")
    nothing_written(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ModelError, match=r'needs nncf.*pip install -e "\.\[openvino\]"'):
        export_model(str(tiny_bi_encoder), Backend("openvino", "int8"), tmp_path / "out",
                     calibration=builtin_calibration())
    nothing_written(tmp_path / "out")


# ---- 5. prepare: a plain model is exported once into the cache ------------------------------------------------


def test_prepare_exports_a_plain_model_once_into_the_cache(tiny_bi_encoder, monkeypatch):
    calls = []
    real = export_module.export_model

    def counting(model, backend, out, *args, **kwargs):
        calls.append((backend, Path(out)))
        return real(model, backend, out, *args, **kwargs)

    monkeypatch.setattr(export_module, "export_model", counting)
    spec, backend = prepare(str(tiny_bi_encoder), Backend("onnx"))
    assert backend == Backend("onnx") and len(calls) == 1
    assert spec.path.parent == (cache_dir() / "exports").resolve()
    manifest = read_manifest(spec.path)
    assert manifest["source"]["fingerprint"] == resolve_model(str(tiny_bi_encoder)).fingerprint
    assert manifest["backend"] == Backend("onnx").config()
    stamp = (spec.path / "export.json").stat().st_mtime_ns

    again, backend_again = prepare(str(tiny_bi_encoder), Backend("onnx"))
    assert len(calls) == 1 and (again.path, again.fingerprint, backend_again) == (spec.path, spec.fingerprint, backend)
    assert (spec.path / "export.json").stat().st_mtime_ns == stamp
    retriever = DenseRetriever(str(tiny_bi_encoder), backend=Backend("onnx"), show_progress=False)
    assert len(calls) == 1 and retriever.spec.path == spec.path
    assert isinstance(transformer_module(retriever.model).model, OnnxRuntimeModel)


def test_prepare_exports_nothing_where_nothing_is_needed(exports, tiny_bi_encoder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("prepare exported where it had no need to")

    monkeypatch.setattr(export_module, "export_model", refuse)
    for backend in [None, Backend(), Backend("torch", dtype="bfloat16")]:
        spec, own = prepare(str(tiny_bi_encoder), backend)
        assert spec.path == Path(tiny_bi_encoder).resolve() and own == (backend or Backend())
    folder, _ = exports(BI, "openvino-int8")
    spec, own = prepare(str(folder), None)
    assert spec.path == folder.resolve() and own == Backend("openvino", "int8")
    with pytest.raises(StagewiseError, match="'--quantize'.*--calibration"):
        prepare(str(tiny_bi_encoder), Backend("openvino", "int8"))
    assert not (cache_dir() / "exports").exists()


# ---- 6. retrievers, rerankers, an index and the service on exported models ------------------------------------


@pytest.mark.parametrize("label", ["onnx", "openvino", "onnx-int8", "openvino-int8"])
def test_a_dense_retriever_on_an_export_ranks_like_torch(label, exports, tiny_bi_encoder):
    folder, _ = exports(BI, label)
    plain = DenseRetriever(str(tiny_bi_encoder), show_progress=False)
    exported = DenseRetriever(str(folder), show_progress=False)
    plain.index(docs())
    exported.index(docs())
    want, got = plain.retrieve(SEARCHES, k=6), exported.retrieve(SEARCHES, k=6)
    for w, g in zip(want, got):
        assert sorted(d for d, _ in g) == sorted(docs())
        scores = dict(w)
        if VARIANTS[label].quantize == "none":
            assert [d for d, _ in g] == [d for d, _ in w]  # the whole ranking, not only the top 1
            assert [s for _, s in g] == pytest.approx([s for _, s in w], abs=1e-4)
        else:
            assert all(abs(s - scores[d]) < 0.01 for d, s in g)
            assert scores[g[0][0]] > w[0][1] - 0.01  # int8's first is at worst a near-tie of torch's
    config = exported.config()
    assert Backend.from_config(config) == VARIANTS[label] and config["model"] == str(folder)
    assert config["fingerprint"] == resolve_model(str(folder)).fingerprint
    assert not {"backend", "quantize", "dtype"} & set(plain.config())


def test_a_retriever_asked_for_bfloat16_says_so_in_its_config(tiny_bi_encoder):
    retriever = DenseRetriever(str(tiny_bi_encoder), backend=Backend("torch", dtype="bfloat16"), show_progress=False)
    assert retriever.config()["dtype"] == "bfloat16" and retriever.config()["backend"] == "torch"
    assert next(transformer_module(retriever.model).model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("label", ["onnx", "openvino"])
def test_a_reranker_on_an_export_reranks_like_torch(label, exports, spread_cross_encoder):
    folder, _ = exports(CROSS, label)
    plain, exported = CrossEncoderReranker(str(spread_cross_encoder)), CrossEncoderReranker(str(folder))
    assert isinstance(transformer_module(exported.model).model, RUNTIME[label])
    candidates = [(d.id, d.full_text()) for d in docs().values()]
    for query in SEARCHES:
        want, got = plain.rerank(query, candidates, 6), exported.rerank(query, candidates, 6)
        assert [d for d, _ in got] == [d for d, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)
    assert Backend.from_config(exported.config()) == VARIANTS[label] and exported.config()["model"] == str(folder)
    assert "backend" not in plain.config()


def _answers(searcher, k: int = 5):
    results, _ = searcher.search_many([Query(t, k) for t in SEARCHES])
    return [[(h.doc_id, h.score, h.rerank_score is not None) for h in hits] for hits in results]


def _assert_same(got, want, tol: float):
    assert [[(d, r) for d, _, r in hits] for hits in got] == [[(d, r) for d, _, r in hits] for hits in want]
    for g, w in zip(got, want):
        assert [s for _, s, _ in g] == pytest.approx([s for _, s, _ in w], abs=tol)


def test_an_index_of_exported_models_round_trips_and_serves(exports, tmp_path):
    """An ONNX first stage and an OpenVINO reranker (each already compared with torch above): stored, loaded from
    the index's own copies and served, they answer exactly as the pipeline in memory."""
    bi, _ = exports(BI, "onnx")
    cross, _ = exports(CROSS, "openvino")
    pipeline = Pipeline(DenseRetriever(str(bi), show_progress=False), CrossEncoderReranker(str(cross)), depth=3)
    loaded = Index.build(pipeline, docs(), tmp_path / "idx")  # returns the index as loaded from disk
    expected = _answers(pipeline)
    assert any(r for hits in expected for _, _, r in hits)
    _assert_same(_answers(loaded), expected, 1e-5)

    first, reranker = loaded.pipeline.first_stage, loaded.pipeline.reranker
    assert first is not pipeline.first_stage and reranker is not pipeline.reranker
    assert (first.backend, reranker.backend) == (Backend("onnx"), Backend("openvino"))
    assert isinstance(transformer_module(first.model).model, OnnxRuntimeModel)
    assert isinstance(transformer_module(reranker.model).model, OpenVINOModel)
    version = (tmp_path / "idx" / loaded.version).resolve()
    for stage in (first, reranker):  # the index runs its own copies of the exported folders
        assert stage.spec.path.is_relative_to(version) and read_manifest(stage.spec.path) is not None
    saved = yaml.safe_load((version / "pipeline.yaml").read_text())
    assert Backend.from_config(saved["first_stage"]) == Backend("onnx")
    assert Backend.from_config(saved["reranker"]) == Backend("openvino")
    assert Backend.from_config(loaded.manifest["first_stage"]) == Backend("onnx")

    from stagewise.serving.service import create_app

    with running_server(create_app(tmp_path / "idx")) as base:  # the service loads the folder itself
        for query in SEARCHES[:4]:
            response = httpx.post(base + "/search", json={"query": query, "k": 5}, timeout=30)
            assert response.status_code == 200, response.text
            hits = response.json()["hits"]
            want = loaded.search(query, k=5)
            assert [h["doc_id"] for h in hits] == [w.doc_id for w in want]
            assert [h["score"] for h in hits] == pytest.approx([w.score for w in want], abs=1e-5)
            assert [h["rerank_score"] is not None for h in hits] == [True] * 3 + [False] * 2


def test_an_index_keeps_the_bfloat16_backend_of_both_stages(tiny_bi_encoder, spread_cross_encoder, tmp_path):
    """A torch-bf16 stage has no exported folder to say what it runs on: the saved config must."""
    bf16 = Backend("torch", dtype="bfloat16")
    pipeline = Pipeline(DenseRetriever(str(tiny_bi_encoder), backend=bf16, show_progress=False),
                        CrossEncoderReranker(str(spread_cross_encoder), backend=bf16), depth=3)
    built = Index.build(pipeline, docs(), tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.pipeline.first_stage.backend == bf16
    assert next(transformer_module(loaded.pipeline.first_stage.model).model.parameters()).dtype == torch.bfloat16
    assert loaded.pipeline.reranker.backend == bf16
    assert next(transformer_module(loaded.pipeline.reranker.model).model.parameters()).dtype == torch.bfloat16
    _assert_same(_answers(loaded), _answers(built), 1e-6)


# ---- a killed export: its temporary folder is refused by every loader and removed by the next export -----------

KILLED_EXPORT = """
import os, signal, sys
from stagewise.models import export
from stagewise.models.backends import Backend

export.equivalence = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-export
export.export_model(sys.argv[1], Backend("onnx"), sys.argv[2])
"""


def _killed_export(source: Path, out: Path) -> Path:
    """Export ``source`` in another process killed (SIGKILL: no cleanup runs) while it measures the equivalence;
    the hidden temporary folder it leaves beside ``out``."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(source), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr
    left = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}-")]
    assert len(left) == 1 and not out.exists()
    return left[0]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and file locks are POSIX")
def test_a_killed_export_is_refused_by_loaders_and_removed_by_the_next_export(tiny_bi_encoder, tmp_path):
    """Issue 20.7: the half export a killed `export` left (`.NAME-xxxx`) loaded as if its equivalence were known."""
    half = _killed_export(tiny_bi_encoder, tmp_path / "exported")
    assert (half / "onnx" / "model.onnx").is_file()  # far enough to run, never checked
    with pytest.raises(ModelError, match="unfinished export"):
        load_bi_encoder(str(half))
    export_model(str(tiny_bi_encoder), Backend("onnx"), tmp_path / "again")  # another export into the same parent
    assert not half.exists() and read_manifest(tmp_path / "again")["accepted"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_a_manifest_without_an_accepted_equivalence_is_refused(exports, tmp_path):
    """What an export killed before this fix left: the manifest written before the equivalence was measured."""
    import shutil

    folder, manifest = exports(CROSS, "onnx")
    half = shutil.copytree(folder, tmp_path / ".reranker-k1ll3d0")
    (half / "export.json").write_text(json.dumps({k: v for k, v in manifest.items()
                                                  if k not in ("equivalence", "accepted")}))
    for load_it in (lambda: load_cross_encoder(str(half)), lambda: read_manifest(half)):
        with pytest.raises(ModelError, match="field 'equivalence': no accepted equivalence"):
            load_it()
    (half / "export.json").write_text(json.dumps({**manifest, "accepted": False}))
    with pytest.raises(ModelError, match="no accepted equivalence"):
        read_manifest(half)
    (half / "export.json").write_text(json.dumps({**manifest, "accepted": "forced"}))  # kept past it, on purpose
    assert read_manifest(half)["accepted"] == "forced"


def test_eval_refuses_a_half_export_as_reranker_in_one_line(exports, beir_dir, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from stagewise.cli import app

    folder, manifest = exports(CROSS, "onnx")
    half = shutil.copytree(folder, tmp_path / ".reranker-k1ll3d0")
    (half / "export.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "equivalence"}))
    result = CliRunner().invoke(app, ["eval", "--data", str(beir_dir), "-f", "bm25", "-r", str(half),
                                      "--out", str(tmp_path / "run")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "export.json" in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_a_temporary_folder_in_use_is_left_alone(tmp_path):
    """Only folders whose run is dead go: the lock on the marker says which (a live run holds it)."""
    from stagewise.models.backends import UNFINISHED
    from stagewise.models.specs import _locked_marker, remove_stale_temporaries

    live, dead, other = tmp_path / ".live-abcd1234", tmp_path / ".dead-abcd1234", tmp_path / ".other-abcd1234"
    for folder in (live, dead, other):
        folder.mkdir()
    handle = _locked_marker(live)  # this process's run: alive
    (dead / UNFINISHED).write_text("")  # a marker nobody holds: its run was killed
    try:
        assert remove_stale_temporaries(tmp_path) == [dead]
        assert live.is_dir() and other.is_dir() and not dead.exists()  # `other` has no marker: not ours
    finally:
        handle.close()
    assert remove_stale_temporaries(tmp_path) == [live] and other.is_dir()


def test_thread_counts_past_what_torch_takes_are_refused(monkeypatch):
    """Issue 20.5: `--threads 100000000000` was a traceback (torch.set_num_threads overflows); the environment's
    OMP_NUM_THREADS is held to the same bound, named."""
    with pytest.raises(StagewiseError, match="'--threads': must be between 1 and"):
        set_threads(10**11)
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")  # spawns that many threads, if it does not crash first
    with pytest.raises(StagewiseError, match="OMP_NUM_THREADS"):
        set_threads(None)


def test_export_out_where_no_folder_can_be_made_is_one_line(tiny_bi_encoder, tmp_path):
    """Issue 20.5: `export --out /proc/x` was a traceback (FileNotFoundError from the temporary folder)."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    with pytest.raises(StagewiseError, match="option '--out': cannot create /proc/x"):
        export_model(str(tiny_bi_encoder), Backend("onnx"), "/proc/x")
