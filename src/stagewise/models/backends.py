"""Backends: how a model's transformer runs — PyTorch (float32 or bfloat16), ONNX Runtime or OpenVINO.

A :class:`Backend` names one; an exported folder (``export.json``, see :mod:`stagewise.models.export`) says which it was
made for; :mod:`stagewise.models.runtimes` runs it inside sentence-transformers' own model objects. The folders use
sentence-transformers' file layout (``onnx/model*.onnx``, ``openvino/openvino_model*.xml``): that is the seam
where its own ``backend="onnx"|"openvino"`` can take over once optimum supports transformers 5.

Which backend is fastest depends on the CPU (AMX and AVX-512 make bf16 and int8 fast; on AVX2 they may be
slower than float32), so nothing here picks one: ``select`` and the benchmark measure them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from stagewise.errors import ModelError, StagewiseError
from stagewise.limits import MAX_THREADS

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
    def batch_invariant(self) -> bool:
        """Whether a text's output is the same whatever else shares its batch. ONNX Runtime's dynamic int8 scales
        activations per batch, and bf16 kernels round differently for other batch shapes (measured: a service's
        micro-batched bf16 answers flipped near-ties that single queries did not), so a query's answer would
        depend on who else is searching: on them, per-query work runs one query at a time."""
        return not (self.name == "onnx" and self.quantize == "int8") and self.dtype != "bfloat16"

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


def require_export(backend: "Backend") -> None:
    """What exporting for ``backend`` needs: onnx and onnxruntime's tools; OpenVINO alone, and NNCF for int8."""
    require(backend.name, export=backend.name == "onnx" or backend.quantize == "int8")


def set_threads(threads: int | None) -> int:
    """The intra-op thread count every backend uses: ``threads``, else ``OMP_NUM_THREADS``, else PyTorch's own."""
    import torch

    where = "option '--threads'"
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads, where = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if threads is not None:
        if not 1 <= threads <= MAX_THREADS:
            raise StagewiseError(f"{where}: must be between 1 and {MAX_THREADS}, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# Exported folders: the model's own files, the runtime's file, and export.json saying what it is
# --------------------------------------------------------------------------------------------

MANIFEST = "export.json"


#: What an export in progress keeps in its temporary folder (``.NAME-xxxxxxxx``, see ``models._atomic_dir``), locked
#: while it runs: a folder holding it is unfinished, and stale once no process holds its lock.
UNFINISHED = ".stagewise-unfinished"


def read_manifest(folder: Path) -> dict | None:
    """An exported folder's ``export.json`` (None for a plain model folder).

    Only a finished export counts: one whose manifest records the equivalence to PyTorch and its acceptance (within
    the tolerance, or forced). A killed export's temporary folder (a manifest written before the check, or our
    unfinished marker) is refused, so that nothing loads a model whose agreement was never measured."""
    import json

    path = Path(folder) / MANIFEST
    if (Path(folder) / UNFINISHED).exists():
        raise ModelError(f"'{folder}' is an unfinished export (interrupted, or still running): export the model again")
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        Backend.from_config(manifest["backend"], f"{path}: field 'backend'")
        manifest["file"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: not an export manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest.get("equivalence"), dict) or manifest.get("accepted") not in (True, "forced"):
        raise ModelError(f"{path}: field 'equivalence': no accepted equivalence to PyTorch is recorded (an "
                         "interrupted export?): export the model again")
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
