"""Export a bi-encoder or cross-encoder to ONNX Runtime or OpenVINO (int8 or not), and prove it still agrees.

The runtimes' own well-kept tools do the work: ``torch.onnx.export`` then onnxruntime's transformer optimiser
and ``quantize_dynamic``; ``openvino.convert_model`` then NNCF's ``nncf.quantize`` calibrated on the user's texts.
An exported folder is the source model's files plus the runtime's file and ``export.json`` (source fingerprint,
backend, quantisation, calibration hash and size, and the measured equivalence to PyTorch on a fixed sample).
A model whose equivalence falls past the tolerance is refused unless the user insists (``force``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from stagewise.cache import cache_dir, texts_hash
from stagewise.errors import DataError, ModelError, StagewiseError
from stagewise.models.backends import MANIFEST, Backend, backend_of, read_manifest, require_export, set_threads
from stagewise.models.runtimes import attach_runtime, load_runtime, output_name, transformer_module
from stagewise.models.specs import (
    ModelSpec,
    _atomic_dir,
    _quiet_transformers,
    load_bi_encoder,
    load_cross_encoder,
    model_kind,
    resolve_model,
)
from stagewise.progress import progress_bar
from stagewise.rundir import cpu, versions
from stagewise.timing import span

# where each variant's file goes: sentence-transformers' own layout, so its backends can load them one day
FILES = {
    ("onnx", "none"): "onnx/model.onnx",
    ("onnx", "int8"): "onnx/model_qint8.onnx",
    ("openvino", "none"): "openvino/openvino_model.xml",
    ("openvino", "int8"): "openvino/openvino_model_qint8_quantized.xml",
}
CALIBRATION_SIZE = 300  # texts (or pairs) for NNCF's statistics; its own default subset size
SAMPLE_PAIRS = 256  # (query, BM25 candidate) pairs a cross-encoder's equivalence check compares on


@dataclass(frozen=True)
class Tolerance:
    """How far an export may drift from float32 PyTorch on the sample before it is refused."""

    min_cosine: float = 0.98  # bi-encoder: the worst text's embedding cosine
    min_correlation: float = 0.98  # Spearman correlation of the scores (cross-encoder: all pairs; bi-encoder: mean
    # over queries of their scores against the sample's documents)
    min_top10: float = 0.8  # both: mean overlap of each query's top 10 on the sample


# ---------------------------------------------------------------------------------------------
# Texts to calibrate and check on
# ---------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Queries and documents from the user's data, and where they came from (its hash goes into the manifest).

    ``held_out`` holds other texts of the same data, never used to calibrate: the equivalence check runs on them,
    so that it measures what the export does to texts it was not fitted to."""

    queries: list[str]
    documents: list[str]
    source: str
    held_out: "Calibration | None" = None

    def texts(self, n: int) -> list[str]:
        """Up to ``n`` texts, queries and documents interleaved (both kinds go through a bi-encoder)."""
        mixed = [t for pair in zip(self.queries, self.documents) for t in pair]
        mixed += self.queries[len(self.documents):] + self.documents[len(self.queries):]
        return mixed[:n]

    def pairs(self, n: int) -> list[tuple[str, str]]:
        """Up to ``n`` (query, document) pairs: each query with its BM25 top 16 among the documents (fewer if there
        are fewer), the candidates a reranker really sees, so that a top 10 is a real choice and can disagree."""
        queries = self.queries or self.documents
        per_query = min(16, max(1, len(self.documents)))
        ranked = _bm25_top(queries[:max(1, -(-n // per_query))], self.documents, per_query)
        return [(q, self.documents[j]) for q, row in ranked for j in row][:n]

    def record(self) -> dict:
        return {"source": self.source, "queries": len(self.queries), "documents": len(self.documents),
                "hash": texts_hash(self.queries + ["\x1d"] + self.documents)}


def _bm25_top(queries: list[str], documents: list[str], k: int) -> list[tuple[str, list[int]]]:
    """Each query's top ``k`` documents by BM25 (bm25s), then the rest in order where BM25 finds fewer."""
    import bm25s

    model = bm25s.BM25()
    model.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    hits, scores = model.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                  k=min(k, len(documents)), show_progress=False, n_threads=1)
    out = []
    for q, row, row_scores in zip(queries, hits, scores):
        found = [int(j) for j, score in zip(row, row_scores) if score > 0]
        found += [j for j in range(len(documents)) if j not in found][:k - len(found)]
        out.append((q, found[:k]))
    return out


HELD_OUT_QUERIES, HELD_OUT_DOCUMENTS = 32, 256  # the equivalence sample: queries searched over an index of documents


def _split(texts: list[str], held: int, size: int) -> tuple[list[str], list[str]]:
    """(calibration, held out): disjoint, the held-out part at most half of the texts."""
    held = min(held, len(texts) // 2)
    return texts[held:held + size], texts[:held]


def load_calibration(source: str | Path, seed: int = 42, size: int = CALIBRATION_SIZE) -> Calibration:
    """A dataset (``default`` or a BEIR folder: its queries and documents) or a text file (one text per line);
    some of its texts are held out of calibration for the equivalence check."""
    path = Path(source)
    rng = random.Random(seed)
    if path.is_file():
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(path, f"cannot read calibration texts ({e})") from None
        texts = list(dict.fromkeys(t for t in lines if t))
        if not texts:
            raise DataError(path, "no calibration texts (the file is empty)", field="calibration")
        rng.shuffle(texts)
        texts, held = _split(texts, HELD_OUT_QUERIES * 2, size)
        return Calibration(texts[::2], texts[1::2] or texts, str(path),
                           Calibration(held[::2], held[1::2], f"{path} (held out)") if held else None)
    from stagewise.data.loaders import load_dataset

    dataset = load_dataset(source)
    docs = list(dict.fromkeys(d.full_text() for d in dataset.corpus.values()))
    queries = list(dict.fromkeys(dataset.queries.values()))
    if not docs:
        raise DataError(dataset.source or str(source), "no calibration texts (the corpus is empty)", field="calibration")
    rng.shuffle(docs)
    rng.shuffle(queries)
    queries, held_queries = _split(queries, HELD_OUT_QUERIES, size // 2)
    docs, held_docs = _split(docs, HELD_OUT_DOCUMENTS, size // 2)
    held = Calibration(held_queries, held_docs, f"{source} (held out)") if held_queries or held_docs else None
    return Calibration(queries, docs, str(source), held)


_BUILTIN_SAMPLE = [  # checks equivalence when the user gives no calibration data (quantisation needs theirs)
    ("what causes rain", "Rain forms when water vapour condenses into droplets heavy enough to fall."),
    ("how do vaccines work", "Vaccines train the immune system to recognise a pathogen without causing disease."),
    ("python list sort", "The sort method orders a list in place; sorted returns a new list."),
    ("capital of france", "Paris is the capital and largest city of France."),
    ("why is the sky blue", "Sunlight scatters off air molecules, and blue light scatters the most."),
    ("symptoms of flu", "Influenza brings fever, cough, sore throat, aches and tiredness."),
    ("how to boil an egg", "Place the egg in boiling water for seven to nine minutes, then cool it."),
    ("speed of light", "Light travels at about 299,792 kilometres per second in a vacuum."),
    ("what is photosynthesis", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("largest ocean", "The Pacific is the largest and deepest of Earth's oceans."),
    ("who wrote hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("benefits of exercise", "Regular exercise strengthens the heart and improves mood and sleep."),
]


def builtin_calibration() -> Calibration:
    return Calibration([q for q, _ in _BUILTIN_SAMPLE], [d for _, d in _BUILTIN_SAMPLE], "built-in sample")


def equivalence_sample(calibration: Calibration | None) -> Calibration:
    """What the equivalence check runs on: the calibration data's held-out texts, else the built-in sample; never
    a text the export was calibrated on."""
    sample = (calibration.held_out if calibration and calibration.held_out else None) or builtin_calibration()
    used = set(calibration.queries + calibration.documents) if calibration else set()
    return Calibration([t for t in sample.queries if t not in used], [t for t in sample.documents if t not in used],
                       sample.source)


# ---------------------------------------------------------------------------------------------
# Equivalence to float32 PyTorch
# ---------------------------------------------------------------------------------------------


def top10_overlap(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean overlap of each row's top 10 columns (rows: queries, columns: documents)."""
    k = min(10, reference.shape[1])
    ref = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    cand = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref, cand)]))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two models' scores for the same pairs (constant scores: 1 if equal, else 0)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else float(np.allclose(a, b))


def equivalence(kind: str, reference, candidate, sample: Calibration) -> dict:
    """Compare two loaded models of the same ``kind`` on the sample: the numbers the tolerance judges."""
    if kind == "bi-encoder":  # queries searched over an index of documents, as retrieval uses the model
        queries = sample.queries[:HELD_OUT_QUERIES] or sample.documents[:len(sample.documents) // 2]
        documents = [d for d in sample.documents if d not in queries][:HELD_OUT_DOCUMENTS] or queries
        texts = queries + documents

        def encode(model) -> np.ndarray:
            return model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)

        a, b = encode(reference), encode(candidate)
        cosines = np.sum(a * b, axis=1)
        n = len(queries)
        scores_a, scores_b = a[:n] @ a[n:].T, b[:n] @ b[n:].T
        return {"texts": len(texts), "queries": n, "documents": len(documents), "min_cosine": float(cosines.min()),
                "mean_cosine": float(cosines.mean()), "top10_agreement": top10_overlap(scores_a, scores_b),
                "score_correlation": float(np.mean([rank_correlation(x, y) for x, y in zip(scores_a, scores_b)]))}
    pairs = sample.pairs(SAMPLE_PAIRS)
    a = np.asarray(reference.predict(pairs, show_progress_bar=False, convert_to_numpy=True), dtype=np.float64)
    b = np.asarray(candidate.predict(pairs, show_progress_bar=False, convert_to_numpy=True), dtype=np.float64)
    queries = sorted({q for q, _ in pairs}, key=[q for q, _ in pairs].index)
    width = len(pairs) // len(queries)
    rows = len(queries) if width * len(queries) == len(pairs) else 0
    return {"pairs": len(pairs), "spearman": rank_correlation(a, b), "max_abs_diff": float(np.max(np.abs(a - b))),
            "top10_agreement": top10_overlap(a[:rows * width].reshape(rows, width), b[:rows * width].reshape(rows, width))
            if rows else 1.0}


def failures(kind: str, numbers: dict, tolerance: Tolerance) -> list[str]:
    """What falls past the tolerance, in words (empty: the export agrees)."""
    out = []
    if kind == "bi-encoder" and numbers["min_cosine"] < tolerance.min_cosine:
        out.append(f"min cosine {numbers['min_cosine']:.4f} < {tolerance.min_cosine}")
    if kind == "cross-encoder" and numbers["spearman"] < tolerance.min_correlation:
        out.append(f"score correlation {numbers['spearman']:.4f} < {tolerance.min_correlation}")
    if kind == "bi-encoder" and numbers.get("score_correlation", 1.0) < tolerance.min_correlation:
        out.append(f"per-query score correlation {numbers['score_correlation']:.4f} < {tolerance.min_correlation}")
    if numbers["top10_agreement"] < tolerance.min_top10:
        out.append(f"top-10 agreement {numbers['top10_agreement']:.3f} < {tolerance.min_top10}")
    return out


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _load(spec: ModelSpec | str, kind: str, backend: Backend | None = None, threads: int | None = None):
    if kind == "bi-encoder":
        return load_bi_encoder(spec, device="cpu", backend=backend, threads=threads)
    return load_cross_encoder(spec, device="cpu", warn_untrained=False, backend=backend, threads=threads)


class _Forward(torch.nn.Module):
    """The Hugging Face model as a function of the tokenizer's tensors (positional, as exporters pass them),
    returning the one output sentence-transformers reads: the graph the runtimes get."""

    def __init__(self, model, inputs: list[str], output: str):
        super().__init__()
        self.model, self.inputs, self.output = model, inputs, output

    def forward(self, *tensors):
        return getattr(self.model(**dict(zip(self.inputs, tensors)), return_dict=True), self.output)


def _features(model, texts: Sequence) -> dict:
    """Tokenised inputs as the model's own preprocessing makes them (pairs for a cross-encoder)."""
    return transformer_module(model).preprocess(list(texts))


def _input_names(model) -> list[str]:
    features = _features(model, ["an example", "another example text"])
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in features]


def _export_onnx(model, folder: Path, quantize: str, inputs: list[str], output: str):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    forward = _Forward(transformer_module(model).model, inputs, output).eval()
    example = _features(model, ["an example", "another example text"])
    raw = folder / "onnx" / "model_raw.onnx"
    raw.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes[output] = {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: it is still the one
        # whose graphs onnxruntime's transformer optimiser recognises (fused attention, layer norm, GELU)
        torch.onnx.export(forward, tuple(example[n] for n in inputs), str(raw), input_names=inputs,
                          output_names=[output], dynamic_axes=axes, opset_version=17, dynamo=False)
    config = transformer_module(model).model.config
    model_type = getattr(config, "model_type", "bert")
    optimised = folder / FILES["onnx", "none"]
    try:
        opt = optimizer.optimize_model(str(raw), model_type=model_type if model_type in optimizer.MODEL_TYPES else "bert",
                                       num_heads=getattr(config, "num_attention_heads", 0) or 0,
                                       hidden_size=getattr(config, "hidden_size", 0) or 0)
        opt.save_model_to_file(str(optimised))
    except Exception:  # an architecture the fusions do not know: the plain graph still runs (ORT optimises it)
        shutil.copyfile(raw, optimised)
    raw.unlink()
    if quantize == "none":
        return optimised
    import onnx

    target = folder / FILES["onnx", "int8"]
    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)  # its advice to pre-process is for image models
    try:  # per-channel scales: per-tensor int8 loses too much (a min cosine near 0.90 on MiniLM)
        quantize_dynamic(str(optimised), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops carry no type info
    finally:
        root.setLevel(level)
    optimised.unlink()
    return target


class _Advancing:
    """Calibration batches that advance our bar as NNCF reads them (once per statistics pass)."""

    def __init__(self, items: list, bar, task):
        self.items, self.bar, self.task = items, bar, task

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        for item in self.items:
            yield item
            self.bar.advance(self.task)


@contextlib.contextmanager
def _rich_default_console_quiet():
    """NNCF draws its progress on rich's default console; ours is another one, so only NNCF's goes quiet."""
    import rich

    shared = rich.get_console()
    quiet, shared.quiet = shared.quiet, True
    try:
        yield
    finally:
        shared.quiet = quiet


def _export_openvino(model, folder: Path, quantize: str, inputs: list[str], output: str, kind: str,
                     calibration: Calibration | None):
    import openvino as ov

    forward = _Forward(transformer_module(model).model, inputs, output).eval()
    example = _features(model, ["an example", "another example text"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        converted = ov.convert_model(forward, example_input=tuple(example[n] for n in inputs))
    for port, name in zip(converted.inputs, inputs):
        port.get_tensor().set_names({name})
    converted.outputs[0].get_tensor().set_names({output})
    converted.reshape({name: ov.PartialShape([-1, -1]) for name in inputs})
    target = folder / FILES["openvino", quantize]
    target.parent.mkdir(parents=True, exist_ok=True)
    if quantize == "int8":
        import nncf

        items = calibration.texts(CALIBRATION_SIZE) if kind == "bi-encoder" else calibration.pairs(CALIBRATION_SIZE)
        batches = [_features(model, items[i:i + 8]) for i in range(0, len(items), 8)]
        with progress_bar() as bar, _rich_default_console_quiet():  # our bar, not NNCF's own rich bars
            task = bar.add_task("int8 calibration (NNCF): batches run", total=None)
            dataset = nncf.Dataset(_Advancing([{n: b[n].numpy() for n in inputs} for b in batches], bar, task))
            converted = nncf.quantize(converted, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(batches))
    ov.save_model(converted, str(target), compress_to_fp16=False)
    return target


def export_model(model: str | ModelSpec, backend: Backend, out: str | Path, calibration: Calibration | None = None,
                 tolerance: Tolerance = Tolerance(), force: bool = False, threads: int | None = None) -> dict:
    """Export ``model`` for ``backend`` into the new folder ``out``; return its manifest.

    Static int8 (OpenVINO) needs ``calibration``; the equivalence sample is its held-out texts when given, else a
    built-in one (never a calibration text). Nothing is written at ``out`` unless the export succeeds and agrees (or ``force``)."""
    if not backend.exported:
        raise StagewiseError("option '--backend': export needs onnx or openvino (torch runs the model as it is)")
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    if read_manifest(spec.path) is not None:
        raise ModelError(f"'{spec.spec}' is already an exported folder: export its source model instead")
    kind = model_kind(spec.path)
    if kind == "base":
        raise ModelError(f"'{spec.spec}' is a plain base encoder, neither a bi-encoder nor a trained cross-encoder: "
                         "train it first (`stagewise train bi|cross`)")
    if backend.quantize == "int8" and backend.name == "openvino" and calibration is None:
        raise StagewiseError("option '--calibration': OpenVINO int8 is calibrated on your own texts: pass a dataset "
                             "or a text file (one text per line)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StagewiseError(f"option '--out': {out} already exists and is not empty; choose a new folder")
    _check_writable(out)
    require_export(backend)
    threads = set_threads(threads)
    reference = _load(spec, kind)
    try:
        transformer_module(reference)
    except ModelError as e:
        raise ModelError(f"'{spec.spec}': {e}") from None
    inputs, output = _input_names(reference), output_name(reference)
    manifest: dict = {}

    def fill(tmp: Path) -> None:
        for f in spec.path.iterdir():
            if f.name in (MANIFEST, "onnx", "openvino") or f.name.startswith("."):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        if backend.name == "onnx":
            file = _export_onnx(reference, tmp, backend.quantize, inputs, output)
        else:
            file = _export_openvino(reference, tmp, backend.quantize, inputs, output, kind, calibration)
        manifest.update({  # written once the equivalence is measured: a manifest without it is never on disk
            "format": 1,
            "kind": kind,
            "source": {"spec": spec.spec, "fingerprint": spec.fingerprint},
            "backend": backend.config(),
            "file": file.relative_to(tmp).as_posix(),
            "inputs": inputs,
            "calibration": calibration.record() if calibration and backend.quantize == "int8" else None,
            "tolerance": asdict(tolerance),
            "versions": versions(),
            "cpu": cpu(),
        })
        # the export as its loaders will run it: the source's modules (the same files as the copies) around the
        # runtime's session on the new file
        candidate = _load(spec, kind, threads=threads)
        candidate = attach_runtime(candidate, load_runtime(tmp, manifest["file"], backend, candidate, threads))
        sample = equivalence_sample(calibration)
        manifest["equivalence"] = {**equivalence(kind, reference, candidate, sample), "sample": sample.source}
        problems = failures(kind, manifest["equivalence"], tolerance)
        manifest["accepted"] = "forced" if problems and force else not problems
        if problems and not force:
            raise ModelError(f"export to {backend.label} drifts from PyTorch past the tolerance ({'; '.join(problems)}): "
                             "nothing written; use --force to keep it anyway")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    with _quiet_transformers(), span("export", f"{spec.name}@{backend.label}", 1, "models"):
        try:  # a killed export's temporary folder is removed by the next one (_atomic_dir)
            _atomic_dir(out, fill)  # tracing the model makes transformers talk about losses it will never compute
        except OSError as e:  # the disk filled up, or the folder went away under us
            raise StagewiseError(f"option '--out': cannot write {out} ({e.strerror or e}: {e.filename})") from None
    return manifest


def _check_writable(out: Path) -> None:
    """Refuse an ``--out`` where no folder can be made, before any work: a probe folder is made and removed where
    the new one would go (permissions alone say nothing on read-only or virtual file systems such as /proc)."""
    existing = next((p for p in out.absolute().parents if p.exists()), None)  # where the new folder would go
    if existing is None:
        return
    if not existing.is_dir():
        raise StagewiseError(f"option '--out': cannot create {out}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".stagewise-probe-", dir=existing))
    except OSError as e:
        raise StagewiseError(f"option '--out': cannot create {out}: {existing} does not take new folders "
                             f"({e.strerror})") from None


def prepare(model: str | ModelSpec, backend: Backend | None) -> tuple[ModelSpec, Backend]:
    """The model folder a stage should load for ``backend``, and the backend it will run on.

    An exported folder runs on its own backend. A plain model asked for ONNX, or for OpenVINO without int8, is
    exported once into the cache (keyed by its fingerprint) and checked like any export; OpenVINO int8 needs
    calibration data, so it must be exported explicitly."""
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    own = backend_of(spec.path, backend)
    if not own.exported or read_manifest(spec.path) is not None:
        return spec, own
    if own.name == "openvino" and own.quantize == "int8":
        raise StagewiseError(f"option '--quantize': OpenVINO int8 is calibrated on your texts: run `stagewise export "
                             f"{spec.spec} --backend openvino --quantize int8 --calibration DATA --out DIR` and use DIR")
    target = cache_dir() / "exports" / f"{spec.fingerprint}-{own.name}-{own.quantize}"
    if read_manifest(target) is None:
        export_model(spec, Backend(own.name, own.quantize), target)
    return resolve_model(str(target)), own
