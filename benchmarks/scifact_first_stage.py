"""Benchmark: BM25, all-MiniLM-L6-v2 (minilm-l6) and their RRF fusion on SciFact dev.

    python benchmarks/scifact_first_stage.py [--data ../shared/datasets/scifact] [--out benchmarks/results/scifact_first_stage]

Reference on this dev split (plain bm25s with English stop words / plain sentence-transformers):
BM25 nDCG@10 0.673, Recall@100 0.910; all-MiniLM-L6-v2 nDCG@10 0.672, Recall@100 0.945.
Corpus embeddings are cached, so a second run skips the ~15 minute encoding on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from stagewise import build_first_stage, evaluate, load_beir, save_results
from stagewise.cli.evaluate import results_table
from stagewise.progress import console

REFERENCE = {"bm25": (0.673, 0.910), "minilm-l6": (0.672, 0.945)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "scifact"))
    parser.add_argument("--out", default="benchmarks/results/scifact_first_stage")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        print(f"SciFact not found at {args.data}; pass --data", file=sys.stderr)
        return 1
    dataset = load_beir(args.data)
    shared: dict = {}
    specs = ["bm25", "minilm-l6", "bm25+minilm-l6"]
    started = time.perf_counter()
    stages = [build_first_stage(s, shared=shared) for s in specs]
    results = evaluate(dataset, "dev", stages)
    wall = time.perf_counter() - started
    save_results(results, args.out, {"data": args.data, "split": "dev", "first_stages": specs})
    console.print(results_table(results, "SciFact dev"))
    lines = ["| first stage | nDCG@10 | MRR@10 | Recall@10 | Recall@100 | MAP@100 | p50 ms/query | corpus docs/s | reference nDCG@10 / R@100 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, ref = r.metrics, REFERENCE.get(r.name)
        rate = r.encoding.get("docs_per_second")
        lines.append(
            f"| {r.name} | {m['ndcg@10']:.3f} | {m['mrr@10']:.3f} | {m['recall@10']:.3f} | {m['recall@100']:.3f} "
            f"| {m['map@100']:.3f} | {r.latency['first_stage']['p50_ms']:.1f} | {'' if rate is None else f'{rate:.1f}'} "
            f"| {'' if ref is None else f'{ref[0]:.3f} / {ref[1]:.3f}'} |"
        )
    table = "\n".join(lines)
    Path(args.out, "table.md").write_text(table + "\n")
    Path(args.out, "environment.json").write_text(json.dumps(
        {"python": platform.python_version(), "machine": platform.machine(), "wall_seconds": round(wall, 1)}, indent=2))
    print(table)
    print(f"wall time {wall:.0f}s (encoding from cache: {[r.encoding.get('from_cache') for r in results if r.encoding]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
