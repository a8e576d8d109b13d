"""Fusion: the final order of the reranked candidates from *both* stages' scores, not the reranker's alone.

A cross-encoder trained from a few hundred labels can be weaker than a fine-tuned first stage on its own and
still carry signal that the first stage lacks. Fusion keeps both: per query, each stage's scores over the
reranked candidates are normalised (min-max or z-score), and the final score is
``weight × reranker + (1 − weight) × first stage``. Weight 1 is pure reranking, weight 0 the first stage's own
order, so a weight chosen on dev (``choose_fusion``) can never be worse than the first stage there.

Why our own few lines and not ranx's ``fuse``/``optimize_fusion``: the same function must run per query inside
the search service (microseconds over 20 candidates, no Run objects, no numba JIT at start-up), and the choice
is a one-dimensional grid that pytrec_eval already scores; ranx would add numba and llvmlite for that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from stagewise.errors import StagewiseError
from stagewise.evaluation.metrics import compute_metrics, run_from_rankings

NORMALIZATIONS = ("minmax", "zscore")
FIRST_STAGE_SIGNALS = ("score", "rank")  # the first stage's score, or its rank (for stages whose scores mislead)
WEIGHT_GRID = tuple(i / 20 for i in range(21))

#: One query's reranked candidates in first-stage order: (doc id, first-stage score, reranker score).
Candidates = list[tuple[str, float, float]]


@dataclass(frozen=True)
class Fusion:
    """How a pipeline combines the two stages' scores; weight 1 with no other setting is pure reranking."""

    weight: float = 1.0  # the reranker's share of the final score
    normalization: str = "minmax"
    first_stage: str = "score"

    def __post_init__(self):
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(
                self.weight) or not 0.0 <= self.weight <= 1.0:
            raise StagewiseError(f"fusion weight must be a number from 0 to 1, got {self.weight!r}")
        if self.normalization not in NORMALIZATIONS:
            raise StagewiseError(f"fusion normalization must be one of {', '.join(NORMALIZATIONS)}, "
                                 f"not {self.normalization!r}")
        if self.first_stage not in FIRST_STAGE_SIGNALS:
            raise StagewiseError(f"fusion first_stage must be one of {', '.join(FIRST_STAGE_SIGNALS)}, "
                                 f"not {self.first_stage!r}")
        object.__setattr__(self, "weight", float(self.weight))

    @property
    def pure_rerank(self) -> bool:
        return self.weight == 1.0

    @property
    def label(self) -> str:
        if self.pure_rerank:
            return "rerank"
        return f"fusion {self.weight:.2f}×reranker ({self.normalization}, first-stage {self.first_stage})"

    def fuse(self, first_scores: Sequence[float], rerank_scores: Sequence[float]) -> np.ndarray:
        """Fused scores of one query's reranked candidates, given in first-stage order (best first)."""
        rerank = np.asarray(rerank_scores, dtype=np.float64)
        if self.pure_rerank:
            return rerank
        first = (np.asarray(first_scores, dtype=np.float64) if self.first_stage == "score"
                 else -np.arange(1, len(rerank) + 1, dtype=np.float64))
        return self.weight * normalize(rerank, self.normalization) + (1.0 - self.weight) * normalize(
            first, self.normalization)

    def order(self, first_scores: Sequence[float], rerank_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Positions best first (ties keep first-stage order) and the fused scores."""
        fused = self.fuse(first_scores, rerank_scores)
        return np.argsort(-fused, kind="stable"), fused

    def config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, value, where: str = "fusion") -> "Fusion":
        """From a ``pipeline.yaml`` or request mapping; a bad field is refused naming it."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise StagewiseError(f"{where}: a mapping (weight, normalization, first_stage) is needed, got {value!r}")
        unknown = set(value) - {"weight", "normalization", "first_stage"}
        if unknown:
            raise StagewiseError(f"{where}: unknown field '{sorted(unknown)[0]}' (known: weight, normalization, "
                                 "first_stage)")
        try:
            return cls(**value)
        except StagewiseError as e:
            raise StagewiseError(f"{where}: {e}") from None


def normalize(values: np.ndarray, method: str) -> np.ndarray:
    """Per-query normalisation; a query whose candidates all score the same gets zeros (no preference)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    if method == "minmax":
        span = values.max() - values.min()
        return (values - values.min()) / span if span > 0 else np.zeros_like(values)
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


def fused_rankings(candidates: dict[str, Candidates], fusion: Fusion, depth: int,
                   below: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Each query's top ``depth`` in fused order, followed by ``below`` (the first stage's order past the depth)."""
    out = {}
    for qid, cands in candidates.items():
        top = cands[:depth]
        order, _ = fusion.order([c[1] for c in top], [c[2] for c in top])
        out[qid] = [top[i][0] for i in order] + list((below or {}).get(qid, [d for d, _, _ in cands[depth:]]))
    return out


def choose_fusion(qrels: dict, candidates: dict[str, Candidates], depth: int,
                  below: dict[str, list[str]] | None = None, weights: Sequence[float] = WEIGHT_GRID,
                  normalizations: Sequence[str] = NORMALIZATIONS, first_stage: Sequence[str] = ("score",),
                  metric: str = "ndcg@10") -> tuple[Fusion, list[dict]]:
    """The fusion with the best mean ``metric`` on these (dev) queries, and every option's score.

    Ties go to the smaller weight: the option closer to the first stage alone. Weight 0 is always an option, so
    the chosen fusion is never worse than the first stage on the queries it was chosen on.
    """
    if not weights:
        raise StagewiseError("fusion weights: at least one weight is needed")
    table, best, best_value = [], None, -math.inf
    for signal in first_stage:
        for normalization in normalizations:
            for weight in sorted(set(weights) | {0.0}):
                fusion = Fusion(weight, normalization, signal)
                means, _ = compute_metrics(qrels, run_from_rankings(fused_rankings(candidates, fusion, depth, below)))
                table.append({**fusion.config(), metric: means[metric]})
                if means[metric] > best_value + 1e-12:
                    best, best_value = fusion, means[metric]
    return best, table
