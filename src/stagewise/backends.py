"""Backends: how a model's transformer runs — PyTorch (float32 or bfloat16), ONNX Runtime or OpenVINO.

Every backend sits behind the same sentence-transformers model object: its tokenizer, pooling, normalisation
and the cross-encoder's activation stay sentence-transformers' own modules, and only the transformer's forward
pass is swapped for a runtime session (:func:`attach_runtime`). That is the seam where sentence-transformers' own
``backend="onnx"|"openvino"`` can take over once optimum supports transformers 5: the exported folders already
use its file layout (``onnx/model*.onnx``, ``openvino/openvino_model*.xml``).

Which backend is fastest depends on the CPU (AMX and AVX-512 make bf16 and int8 fast; on AVX2 they may be
slower than float32), so nothing here picks one: ``select`` and the benchmark measure them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from stagewise.errors import ModelError, StagewiseError

BACKENDS = ("torch", "onnx", "openvino")
QUANTIZATIONS = ("none", "int8")
DTYPES = ("float32", "bfloat16")

# the extra that installs each backend's runtime, and the module that proves it is there
_EXTRAS = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
_EXPORT_MODULES = {"onnx": ("onnx", "onnxruntime.quantization"), "openvino": ("nncf",)}


@dataclass(frozen=True)
class Backend:
    """A backend, a quantisation and a dtype; validated on construction, so bad options fail before any work."""

    name: str = "torch"
    quantize: str = "none"
    dtype: str = "float32"

    def __post_init__(self):
        for option, value, allowed in (("--backend", self.name, BACKENDS), ("--quantize", self.quantize, QUANTIZATIONS),
                                       ("--dtype", self.dtype, DTYPES)):
            if value not in allowed:
                raise StagewiseError(f"option '{option}': must be one of {', '.join(allowed)}, got {value!r}")
        if self.name == "torch" and self.quantize != "none":
            raise StagewiseError("option '--quantize': int8 needs '--backend onnx' or '--backend openvino' "
                                 "(export the model with `stagewise export`)")
        if self.name == "onnx" and self.dtype != "float32":
            raise StagewiseError("option '--dtype': bfloat16 runs on '--backend torch' or '--backend openvino'; "
                                 "ONNX Runtime's CPU kernels are float32 or int8")

    @property
    def label(self) -> str:
        """``torch``, ``torch-bf16``, ``onnx-int8``, ``openvino-bf16`` …: a name for reports and file names."""
        parts = [self.name] + (["int8"] if self.quantize == "int8" else []) + (["bf16"] if self.dtype == "bfloat16" else [])
        return "-".join(parts)

    @property
    def is_default(self) -> bool:
        return self == Backend()

    @property
    def exported(self) -> bool:
        """Whether this backend runs from an exported folder (PyTorch runs the model's own weights)."""
        return self.name != "torch"

    def config(self) -> dict:
        return {"backend": self.name, "quantize": self.quantize, "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict | None, where: str = "backend") -> "Backend":
        config = config or {}
        try:
            return cls(config.get("backend", "torch"), config.get("quantize", "none"), config.get("dtype", "float32"))
        except StagewiseError as e:
            raise StagewiseError(f"{where}: {e}") from None


def require(backend: str, export: bool = False):
    """Import a backend's runtime (and its export tools), or fail in one line naming the extra that installs it."""
    module, extra = _EXTRAS[backend]
    for name in (module,) + (_EXPORT_MODULES[backend] if export else ()):
        try:
            importlib.import_module(name)
        except ImportError:
            raise ModelError(f"backend '{backend}' needs {name.split('.')[0]}, which is not installed: "
                             f"pip install -e \".[{extra}]\"") from None
    return importlib.import_module(module)


def set_threads(threads: int | None) -> int:
    """The intra-op thread count every backend uses: ``threads``, else ``OMP_NUM_THREADS``, else PyTorch's own."""
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads is not None:
        if threads < 1:
            raise StagewiseError(f"option '--threads': must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# Runtime sessions in place of the transformer
# --------------------------------------------------------------------------------------------


def _runtime_base():
    import torch

    return torch.nn.Module


class _RuntimeModel(_runtime_base()):
    """Stands in for the Hugging Face model inside sentence-transformers' ``Transformer`` module: takes the
    tokenizer's tensors, returns the output the module reads (``last_hidden_state`` or ``logits``). A module with
    no parameters, so moving, evaluating or counting it costs nothing."""

    def __init__(self, config, inputs: list[str], output: str):
        super().__init__()
        self.config, self.inputs, self.output = config, inputs, output

    def forward(self, **features):
        import numpy as np
        import torch

        feeds = {}
        for name in self.inputs:
            value = features.get(name)
            if value is None and name == "token_type_ids":
                value = torch.zeros_like(features["input_ids"])
            feeds[name] = np.ascontiguousarray(value.cpu().numpy().astype(np.int64))
        return {self.output: torch.from_numpy(np.asarray(self.run(feeds), dtype=np.float32))}

    def run(self, feeds: dict):
        raise NotImplementedError


class OnnxRuntimeModel(_RuntimeModel):
    def __init__(self, path: Path, config, output: str, threads: int):
        ort = require("onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        super().__init__(config, [i.name for i in session.get_inputs()], output)
        self.session = session

    def run(self, feeds: dict):
        return self.session.run([self.output], feeds)[0]


class OpenVINOModel(_RuntimeModel):
    def __init__(self, path: Path, config, output: str, threads: int, dtype: str):
        ov = require("openvino")
        core = ov.Core()
        properties = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bfloat16" else "f32"}
        compiled = core.compile_model(core.read_model(str(path)), "CPU", properties)
        super().__init__(config, [i.get_any_name() for i in compiled.inputs], output)
        self.compiled, self.request = compiled, compiled.create_infer_request()
        self.precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))  # bf16 only where the CPU has it

    def run(self, feeds: dict):
        return self.request.infer(feeds)[self.output]


def transformer_module(model):
    """The sentence-transformers ``Transformer`` module whose forward pass a backend replaces."""
    first = model[0]
    if not hasattr(first, "model") or not hasattr(first, "modality_config"):
        raise ModelError(f"'{type(first).__name__}' is not a transformer: only transformer models have backends "
                         "(static embeddings are already plain lookups)")
    return first


def output_name(model) -> str:
    """``last_hidden_state`` for a bi-encoder, ``logits`` for a cross-encoder: what the Transformer module reads."""
    name = transformer_module(model).modality_config["text"]["method_output_name"]
    return name if isinstance(name, str) else name[0]


def attach_runtime(model, runtime: _RuntimeModel):
    """Swap the transformer's forward pass for a runtime session; everything around it stays as it was."""
    module = transformer_module(model)
    module.model = runtime
    module.backend = "onnx" if isinstance(runtime, OnnxRuntimeModel) else "openvino"  # no torch-only input packing
    module.model_forward_params = set(runtime.inputs) | {"return_dict"}
    module._declared_forward_params = set(runtime.inputs)
    return model


def load_runtime(folder: Path, file: str, backend: Backend, model, threads: int) -> _RuntimeModel:
    config = transformer_module(model).model.config
    if not (folder / file).is_file():
        raise ModelError(f"'{folder}': its {MANIFEST} names {file}, which is missing")
    if backend.name == "onnx":
        return OnnxRuntimeModel(folder / file, config, output_name(model), threads)
    return OpenVINOModel(folder / file, config, output_name(model), threads, backend.dtype)


def to_bfloat16(model):
    """PyTorch bfloat16: no export; fast where the CPU has AMX or AVX-512 BF16, slow where it must emulate it."""
    import torch

    transformer_module(model).model.to(torch.bfloat16)
    return model


# --------------------------------------------------------------------------------------------
# Exported folders: the model's own files, the runtime's file, and export.json saying what it is
# --------------------------------------------------------------------------------------------

MANIFEST = "export.json"


def read_manifest(folder: Path) -> dict | None:
    """An exported folder's ``export.json`` (None for a plain model folder)."""
    import json

    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        Backend.from_config(manifest["backend"], f"{path}: field 'backend'")
        manifest["file"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: not an export manifest ({type(e).__name__}: {e})") from None
    return manifest


def fingerprints(spec) -> set[str]:
    """The identities a model spec answers to: its own fingerprint and, for an export, its source model's (an index
    built with the source may be searched through an export of it, which the export's equivalence check vouches for)."""
    manifest = read_manifest(spec.path)
    return {spec.fingerprint} | ({manifest["source"]["fingerprint"]} if manifest else set())


def stage_name(spec, backend: Backend) -> str:
    """``minilm-l6`` on torch, ``minilm-l6@onnx-int8`` on another backend (an export is named by its source)."""
    manifest = read_manifest(spec.path)
    base = manifest["source"]["spec"] if manifest else spec.name
    return base if backend.is_default else f"{base}@{backend.label}"


def backend_of(folder: Path, requested: Backend | None = None) -> Backend:
    """The backend a model folder runs on: an exported folder's own, else ``requested`` (torch by default).

    Asking an exported folder for another backend is an error, not a silent switch."""
    manifest = read_manifest(folder)
    if manifest is None:
        return requested or Backend()
    own = Backend.from_config(manifest["backend"])
    if requested is None or requested.is_default:
        return own
    if (requested.name, requested.quantize) == (own.name, own.quantize):
        return requested  # the dtype is OpenVINO's inference precision, chosen when loading
    if requested != own:
        raise ModelError(f"'{folder}' is exported for {own.label}, not {requested.label}: pass its source model "
                         f"({manifest['source']['spec']}) or another export")
    return own


def apply_backend(model, folder: Path, backend: Backend | None = None, threads: int | None = None):
    """Run a just-loaded sentence-transformers model on its backend (see :func:`backend_of`)."""
    backend = backend_of(folder, backend)
    threads = set_threads(threads)
    if backend.name == "torch":
        return to_bfloat16(model) if backend.dtype == "bfloat16" else model
    manifest = read_manifest(folder)
    if manifest is None:
        raise ModelError(f"'{folder}' is not exported for {backend.label}: run `stagewise export {folder} "
                         f"--backend {backend.name} --quantize {backend.quantize} --out DIR` and use DIR")
    return attach_runtime(model, load_runtime(Path(folder), manifest["file"], backend, model, threads))
