"""Runtime sessions (ONNX Runtime, OpenVINO) in place of a sentence-transformers model's transformer.

Only the transformer's forward pass is swapped (:func:`attach_runtime`); the tokenizer, pooling, normalisation
and the cross-encoder's activation stay sentence-transformers' own modules, so an exported model truncates,
pools and scores exactly as the PyTorch one does. :func:`apply_backend` is what every model load goes through.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from stagewise.errors import ModelError
from stagewise.models.backends import MANIFEST, Backend, backend_of, read_manifest, require, set_threads


class _RuntimeModel(torch.nn.Module):
    """Stands in for the Hugging Face model inside sentence-transformers' ``Transformer`` module: takes the
    tokenizer's tensors, returns the output the module reads (``last_hidden_state`` or ``logits``). A module with
    no parameters, so moving, evaluating or counting it costs nothing."""

    def __init__(self, config, inputs: list[str], output: str):
        super().__init__()
        self.config, self.inputs, self.output = config, inputs, output

    def forward(self, **features):
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
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # bf16 only where the CPU has it
        if dtype == "bfloat16" and self.precision != "bf16":
            warnings.warn(f"OpenVINO runs {path.name} in {self.precision}, not bfloat16: this CPU has no bf16",
                          stacklevel=2)

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
    transformer_module(model).model.to(torch.bfloat16)
    return model


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
