"""Benchmark: fine-tune both stages on SciFact train, measure on SciFact dev.

    python benchmarks/scifact_training.py [--data ../shared/datasets/scifact] [--out benchmarks/results/scifact_training]

1. minilm-l6 as bi-encoder: MultipleNegativesRankingLoss with one hard negative per query mined from the
   base model (ranks 10-50, relative margin 0.05), 3 epochs, best dev checkpoint kept.
2. Cross-encoders from bert-tiny and minilm-l6 bases, BCE on negatives mined from the fine-tuned
   bi-encoder's top 20 plus random ones; reranking the fine-tuned bi-encoder's top 20 and top 50.

Each step is a run directory under --out; a finished step is not redone (delete it to rerun), an
interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stagewise import CrossEncoderReranker, DenseRetriever, build_first_stage, evaluate, load_beir
from stagewise.cli.evaluate import results_table
from stagewise.progress import console
from stagewise.training.bi import train_bi
from stagewise.training.config import BiTrainConfig, CrossTrainConfig
from stagewise.training.cross import train_cross

CROSS = {
    "bert-tiny": dict(model="bert-tiny", init="base", epochs=3, learning_rate=1e-4, batch_size=16),
    "minilm-l6": dict(model="minilm-l6", init="base", epochs=1, learning_rate=5e-5, batch_size=16),
}


def _step(out: Path, fn, config):
    """Run a training step unless it finished before; resume it if it was interrupted."""
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    return fn(config, out, resume=(out / "config.json").is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "scifact"))
    parser.add_argument("--out", default="benchmarks/results/scifact_training")
    parser.add_argument("--cross", nargs="*", default=list(CROSS), help="cross-encoder bases to train")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        print(f"SciFact not found at {args.data}; pass --data", file=sys.stderr)
        return 1
    out = Path(args.out)
    timings = {}

    started = time.perf_counter()
    bi = _step(out / "bi-minilm-l6", train_bi, BiTrainConfig(
        data=args.data, model="minilm-l6", epochs=3, learning_rate=5e-5, batch_size=32, hard_negatives="model",
        num_negatives=1, range_min=10, range_max=50, relative_margin=0.05))
    timings["bi-minilm-l6"] = bi.get("wall_seconds", time.perf_counter() - started)
    bi_model = str(out / "bi-minilm-l6" / "model")

    cross_results = {}
    for name in args.cross:
        started = time.perf_counter()
        cross_results[name] = _step(out / f"cross-{name}", train_cross, CrossTrainConfig(
            data=args.data, bi_run=str(out / "bi-minilm-l6"), first_stage=bi_model, depth=20, hard_negatives=7,
            random_negatives=2, **CROSS[name]))
        timings[f"cross-{name}"] = cross_results[name].get("wall_seconds", time.perf_counter() - started)

    dataset = load_beir(args.data)
    shared: dict = {}
    first_stages = [build_first_stage("bm25", shared=shared), DenseRetriever("minilm-l6"), DenseRetriever(bi_model)]
    first_stages[2].name = "minilm-l6 fine-tuned"
    results = evaluate(dataset, "dev", first_stages)
    for name, result in cross_results.items():
        reranker = CrossEncoderReranker(result["model"])
        reranker.name = f"cross {name} fine-tuned"
        results += [r for r in evaluate(dataset, "dev", [first_stages[2]], reranker, depths=(20, 50))
                    if r.stage == "pipeline"]
    console.print(results_table(results, "SciFact dev: fine-tuned stages"))
    lines = ["| system | nDCG@10 | MRR@10 | Recall@10 | Recall@100 | first stage Recall@depth | p50 ms/query | p95 ms/query |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lat = r.latency.get("total") or r.latency["first_stage"]
        ceiling = f"{r.metrics[f'recall@{r.depth}']:.3f}" if r.depth else ""
        lines.append(f"| {r.name} | {r.metrics['ndcg@10']:.3f} | {r.metrics['mrr@10']:.3f} | {r.metrics['recall@10']:.3f} "
                     f"| {r.metrics['recall@100']:.3f} | {ceiling} | {lat['p50_ms']:.1f} | {lat['p95_ms']:.1f} |")
    lines += ["", "| training run | wall time | steps | best dev nDCG@10 during training (bi: 2,000-doc dev subset; cross: top-20 rerank) | note |", "|---|---|---|---|---|"]
    for name, seconds in timings.items():
        result = bi if name.startswith("bi") else cross_results[name.removeprefix("cross-")]
        train = result["train"]
        note = ""
        if "health" in result.get("dev", {}):
            health = result["dev"]["health"]
            note = "; ".join(health["reasons"]) or "healthy"
        best = train.get("best_dev_ndcg@10")
        lines.append(f"| {name} | {seconds / 60:.1f} min | {train['steps']} | {'' if best is None else f'{best:.3f}'} | {note} |")
    table = "\n".join(lines)
    (out / f"table-{'-'.join(args.cross)}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
