"""Per-query work on its own backend, beside the stage's batch backend.

Batch work (encoding a corpus, scoring many pairs) and per-query work (one query's encoding, one request's
pairs) can be fastest on different backends: int8 kernels may win on large batches while bf16 answers one short
query sooner. A stage's ``per_query`` setting in ``pipeline.yaml`` names the model folder and backend its
per-query work runs on; without it, one backend does both (the simple setting, kept whenever one wins both)::

    reranker:
      model: exports/reranker-openvino-int8   # batch work
      backend: openvino
      quantize: int8
      per_query: {model: ../train/cross/model, backend: torch, dtype: bfloat16}

Both must be the same model (an export answers to its source's fingerprint), so their scores agree within the
export's checked equivalence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from stagewise.errors import StagewiseError
from stagewise.models.backends import Backend, fingerprints
from stagewise.models.specs import ModelSpec
from stagewise.search import pipeline_schema

KEY = "per_query"


@dataclass
class PerQuery:
    """The per-query model of a stage: its folder, its backend and the loaded model."""

    spec: ModelSpec
    backend: Backend
    model: object

    def config(self) -> dict:
        return {"model": self.spec.spec, "fingerprint": self.spec.fingerprint, **self.backend.config()}

    @property
    def label(self) -> str:
        return self.backend.label


def setting(value, where: str) -> tuple[str, Backend] | None:
    """A ``per_query`` setting's model and backend, checked (None: the stage's own model does per-query work)."""
    if value is None:
        return None
    try:
        pipeline_schema.check(value, pipeline_schema.PER_QUERY, KEY)
    except StagewiseError as e:
        raise StagewiseError(f"{where}: {e}") from None
    return value["model"], Backend.from_config(value)


def load(value, owner: ModelSpec, where: str, prepare: Callable, loader: Callable) -> PerQuery | None:
    """Load a stage's per-query model: ``prepare(model, backend)`` resolves (and exports where needed),
    ``loader(spec, backend)`` loads. Refused unless it is the same model as the stage's own."""
    parsed = setting(value, where)
    if parsed is None:
        return None
    spec, backend = prepare(*parsed)
    if not fingerprints(spec) & fingerprints(owner):
        raise StagewiseError(f"{where}: field '{KEY}': '{spec.spec}' is not the stage's model '{owner.spec}' "
                             "(nor an export of it)")
    return PerQuery(spec, backend, loader(spec, backend))


def name(stage_name: str, per_query_label: str | None) -> str:
    """``minilm-l6@onnx-int8 (per query: torch-bf16)``: a stage's name says where its per-query work runs."""
    return stage_name if not per_query_label else f"{stage_name} (per query: {per_query_label})"
