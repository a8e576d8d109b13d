"""Benchmark: the reranker's recipe against its cost: sequence length, corpus pre-training, learning rate.

    python benchmarks/reranker_recipe_cost.py --data ../shared/datasets/scifact \
        --first-stage bm25+RUN/train/bi-minilm-l6/model --name scifact \
        [--lengths 128 192 256] [--pretrain 0 2000] [--learning-rates 1e-4 3e-4] \
        [--out benchmarks/results/reranker_recipe_cost]
    python benchmarks/reranker_recipe_cost.py --data default --first-stage bm25+minilm-l6 --name default

Each variant is one ``train_cross`` run of ``bert-tiny`` with ``select``'s recipe (3 epochs, lr 1e-4 unless
``--learning-rates``, 7 hard and 2 random negatives mined from ``--first-stage``) at one max_length and one
pre-training size, then evaluated as ``select`` evaluates it (every dev pair scored once at the deepest depth,
reranking alone and fused with the first stage at the weight chosen on dev, latency measured end to end on 20
queries), compared query by query with the first stage alone; batch scoring runs as ``select`` runs it
(``batch_precision`` auto: bf16 where it pays). Its cost is the training's wall time and the rates ``train_cross``
recorded (training pairs/s, scoring pairs/s). Finished variants are kept under ``--runs`` and not redone. The
documents keep the title first (``Document.full_text``), so a shorter length cuts the end of the abstract, never
the title.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from stagewise.data.loaders import load_dataset
from stagewise.evaluation.runs import compare, evaluate, evaluate_depths
from stagewise.models import batch_precision
from stagewise.rundir import cpu, versions
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import build_first_stage
from stagewise.training.config import CrossTrainConfig
from stagewise.training.cross import train_cross

RECIPE = {"epochs": 3, "learning_rate": 1e-4, "hard_negatives": 7, "random_negatives": 2, "depth": 20}
DEPTHS = [10, 20, 50]


def variant(dataset: str, first_stage: str, length: int, pretrain: int, lr: float, runs: Path) -> dict:
    name = f"len{length}-pre{pretrain}" + ("" if lr == RECIPE["learning_rate"] else f"-lr{lr:g}")
    out = runs / name
    config = CrossTrainConfig(model="bert-tiny", data=dataset, first_stage=first_stage, max_length=length,
                              pretrain_queries=pretrain, **{**RECIPE, "learning_rate": lr})
    started = time.perf_counter()
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else \
        train_cross(config, out, resume=(out / "config.json").is_file())
    wall = result.get("wall_seconds") or time.perf_counter() - started
    kinds = (result.get("time") or {}).get("by_kind", {})
    return {"name": name, "max_length": length, "pretrain_queries": pretrain, "learning_rate": lr,
            "model": result["model"],
            "train_wall_s": round(wall, 1), "health": (result.get("dev") or {}).get("health"),
            "rates": {k: {"rate": v.get("rate"), "unit": v.get("unit"), "seconds": v["seconds"]}
                      for k, v in kinds.items() if k in ("pretrain", "train", "score")}}


def evaluate_variant(row: dict, data, first, stage) -> None:
    reranker = CrossEncoderReranker(row["model"], max_length=row["max_length"])
    reranker.name = row["name"]
    pipeline = Pipeline(stage, reranker).index(data.corpus)
    started = time.perf_counter()
    results = evaluate_depths(data, "dev", first, pipeline, DEPTHS, latency_queries=20)
    row["evaluate_s"] = round(time.perf_counter() - started, 1)
    row["depths"] = []
    for r in results:
        c = compare(first, r)
        row["depths"].append({"depth": r.depth, "mode": r.mode, "ndcg@10": r.metrics["ndcg@10"],
                              "gain": c.mean_diff, "ci95": c.ci95, "p_value": c.p_value,
                              "weight": (r.fusion or {}).get("weight"), "p95_ms": r.latency["total"]["p95_ms"]})


def markdown(result: dict) -> str:
    lines = [f"# Reranker recipe against cost: {result['name']}", "",
             f"First stage `{result['first_stage']}`: dev nDCG@10 {result['first_stage_ndcg@10']:.4f}. "
             f"CPU: {result['environment']['cpu']['model']} ({result['environment']['cpu']['cores']} cores; "
             f"{' '.join(result['environment']['cpu']['flags'])}).", "",
             "| max_length | pre-training | lr | training s | train pairs/s | score pairs/s | best alone (depth) | "
             "best fused (depth, weight) | fused gain, p | p95 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["variants"]:
        alone = max((d for d in row["depths"] if d["mode"] == "rerank"), key=lambda d: d["ndcg@10"])
        fused = max((d for d in row["depths"] if d["mode"] == "fusion"), key=lambda d: d["ndcg@10"])
        rates = row["rates"]
        lr = row.get("learning_rate", RECIPE["learning_rate"])
        lines.append(f"| {row['max_length']} | {row['pretrain_queries']} | {lr:g} | {row['train_wall_s']:.0f} | "
                     f"{(rates.get('train') or {}).get('rate') or 0:.0f} | "
                     f"{(rates.get('score') or {}).get('rate') or 0:.0f} | "
                     f"{alone['ndcg@10']:.4f} ({alone['depth']}) | {fused['ndcg@10']:.4f} ({fused['depth']}, "
                     f"{fused['weight']:.2f}) | {fused['gain']:+.4f}, p = {fused['p_value']:.2g} | "
                     f"{fused['p95_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--first-stage", required=True)
    parser.add_argument("--name", required=True, help="Names the result files: <out>/<name>.json and .md")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--pretrain", type=int, nargs="+", default=[0, 2000])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[RECIPE["learning_rate"]])
    parser.add_argument("--out", default="benchmarks/results/reranker_recipe_cost")
    parser.add_argument("--runs", default="runs/reranker-recipe-cost")
    args = parser.parse_args()
    data = load_dataset(args.data)
    stage = build_first_stage(args.first_stage)
    first = evaluate(data, "dev", [stage], k=100, recall_cutoffs=DEPTHS)[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"name": args.name, "data": args.data, "first_stage": args.first_stage, "recipe": RECIPE,
              "first_stage_ndcg@10": first.metrics["ndcg@10"], "environment": {"cpu": cpu(), **versions()},
              "command": " ".join(sys.argv), "variants": []}
    for lr, pretrain, length in itertools.product(args.learning_rates, args.pretrain, args.lengths):
        with batch_precision.use("auto"):  # scoring as select scores: bf16 where this CPU makes it pay
            row = variant(args.data, args.first_stage, length, pretrain, lr, Path(args.runs) / args.name)
            evaluate_variant(row, data, first, stage)
        result["variants"].append(row)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str))
        (out / f"{args.name}.md").write_text(markdown(result))
        print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
