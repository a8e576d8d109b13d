"""What a selection run hands over: its result (the report's input), the chosen pipeline, and its confirmation.

Kept apart from the staged strategy (:mod:`stagewise.selection.strategy`), which measures; this module only
assembles what was measured into the result dict, builds the recommended :class:`~stagewise.search.pipeline.Pipeline`
on stage 3's backends, and evaluates it once on a held-out split.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.cache import EmbeddingCache
from stagewise.data.dataset import RetrievalDataset
from stagewise.evaluation.runs import evaluate_pipeline
from stagewise.models import per_query
from stagewise.models.backends import Backend
from stagewise.rundir import cpu, versions
from stagewise.search.fusion import Fusion
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import build_first_stage
from stagewise.selection.backend_stage import deployed, first_stage_on
from stagewise.selection.verdict import _latency, _mode, pareto_front, verdict

if TYPE_CHECKING:
    from stagewise.selection.strategy import Selection


def confirm(dataset: RetrievalDataset, split: str, path: Path, cache: EmbeddingCache | None = None,
            metric: str = "p95_ms") -> dict:
    """The chosen pipeline, as written to ``path``, and its first stage alone, once on ``split`` after the choice.

    The dev gain is optimistic: the pipeline and its fusion weight were chosen on those queries. These are not,
    so this is the honest estimate; it is reported and never used to choose. Same numbers as ``eval --pipeline``.
    """
    first, final, c = evaluate_pipeline(dataset, split, Pipeline.load(path, cache))
    final = final or first
    out = {"split": split, "queries": len(first.per_query), "first_stage": first.name, "pipeline": final.name,
           "first_stage_ndcg@10": first.metrics["ndcg@10"], "pipeline_ndcg@10": final.metrics["ndcg@10"],
           "first_stage_latency_ms": _latency(first.summary(), metric),
           "pipeline_latency_ms": _latency(final.summary(), metric),
           "comparison": asdict(c) if c else None}
    where = f"On the held-out {split} split ({out['queries']} queries, never used to choose), "
    if c is None:
        out["summary"] = where + f"{first.name} alone scores nDCG@10 {first.metrics['ndcg@10']:.3f}."
    else:
        out["summary"] = (where + f"{final.name} scores nDCG@10 {c.mean_b:.3f} against {c.mean_a:.3f} for "
                          f"{first.name} alone: {c.mean_diff:+.3f} (95% CI {c.ci95[0]:+.3f} to {c.ci95[1]:+.3f}, "
                          f"paired t-test p = {c.p_value:.3g}; better on {c.wins} queries, worse on {c.losses}).")
    return out


def backend_systems(backends: dict) -> list[dict]:
    """Stage 3's confirmed stages, as deployed on their recommended backends, on the quality-against-latency plot."""
    out = []
    for stage, c in backends.get("confirmation", {}).items():
        latency = c["latency"]["total" if stage == "reranker" else "first_stage"]
        out.append({"name": c["name"], "stage": "backend", "ndcg@10": c["ndcg@10"], "p50_ms": latency["p50_ms"],
                    "p95_ms": latency["p95_ms"], "latency_ms": c["latency_ms"], "within_budget": True})
    return out


def chosen_pipeline(s: Selection, chosen: dict, rerankers: list[dict], v: dict, backends: dict | None = None) -> Pipeline:
    """The chosen pipeline, each stage on the backends stage 3 recommends for its batch and per-query work."""
    backends = backends or {}
    first_backend = deployed(backends, "first_stage")
    first = build_first_stage(first_stage_on(chosen["config"], *first_backend) if first_backend else chosen["config"],
                              s.cache)
    first.name = chosen["name"]
    if first_backend:
        model, backend, setting = first_backend
        first.name = per_query.name(f"{chosen['name']}@{backend.label}", setting and Backend.from_config(setting).label)
    if not v["reranker_worth_it"]:
        return Pipeline(first)
    r = next(r for r in rerankers if r["name"] == v["reranker"])
    model, backend, setting = deployed(backends, "reranker") or (r["model_dir"], None, None)
    reranker = CrossEncoderReranker(model, max_length=r["max_length"], backend=backend, per_query_setting=setting)
    reranker.name = per_query.name(r["name"] + (f"@{backend.label}" if backend else ""),
                                   reranker.per_query and reranker.per_query.label)
    return Pipeline(first, reranker, depth=v["depth"], fusion=Fusion.from_config(v.get("fusion")))


def assemble(s: Selection, candidates: list[dict], chosen: dict, reason: str, rerankers: list[dict]) -> dict:
    """The run's result before stage 3: every measured system, the verdict, and what the report is made from."""
    config, metric = s.config, s.config.latency_metric
    decision = verdict(config, chosen, rerankers)
    systems = [{"name": c["name"], "stage": "first_stage", "ndcg@10": c["metrics"]["ndcg@10"],
                "p50_ms": _latency(c, "p50_ms"), "p95_ms": _latency(c, "p95_ms"), "latency_ms": _latency(c, metric),
                "within_budget": c.get("within_budget", True)} for c in candidates]
    systems += [{"name": d["name"], "stage": "pipeline", "mode": _mode(d), "ndcg@10": d["metrics"]["ndcg@10"],
                 "p50_ms": _latency(d, "p50_ms"), "p95_ms": _latency(d, "p95_ms"), "latency_ms": _latency(d, metric),
                 "within_budget": d["within_budget"]} for r in rerankers for d in r["depths"]]
    pareto_front(systems)
    per_query = None
    shown = decision.get("best_reranked")
    if shown:
        d = next(d for r in rerankers for d in r["depths"] if d["name"] == shown)
        per_query = {"a": chosen["name"], "b": shown, "metric": "ndcg@10",
                     "diffs": {q: d["per_query"][q]["ndcg@10"] - chosen["per_query"][q]["ndcg@10"]
                               for q in d["per_query"]}}
    lean = ("per_query", "rankings", "scores", "config", "dense")
    import torch

    return {
        "format": 1,
        "title": f"Stagewise model selection: {s.dataset.name} ({config.dev_split})",
        "created": s.run.config["created"],
        "dataset": {"name": s.dataset.name, "source": str(s.dataset.source), "fingerprint": s.dataset.fingerprint(),
                    "documents": len(s.dataset.corpus), "train_queries": s.train_queries,
                    "dev_queries": len(s.dev_queries), "dev_split": config.dev_split, "train_split": config.train_split},
        "machine": {"cpus": os.cpu_count(), "cpu": cpu()["model"], "cpu_flags": " ".join(cpu()["flags"]),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **versions()},
        "config": asdict(config),
        "budget": {"time_budget_s": None if config.time_budget_min is None else config.time_budget_min * 60,
                   "latency_budget_ms": config.latency_budget_ms, "latency_metric": metric},
        "first_stage": {"candidates": [{k: v for k, v in c.items() if k not in lean} for c in candidates],
                        "chosen": chosen["name"], "reason": reason},
        "rerankers": [{**{k: v for k, v in r.items() if k not in lean},
                       "depths": [{k: v for k, v in d.items() if k not in lean} for d in r["depths"]]}
                      for r in rerankers],
        "systems": systems,
        "verdict": decision,
        "per_query": per_query,
        "skipped": s.skipped,
    }
