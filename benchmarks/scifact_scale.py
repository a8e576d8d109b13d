"""Benchmark: the scale-out path on this machine: Ray encoding against in-process, Milvus Lite against exact search.

    python benchmarks/scifact_scale.py [--data ../shared/datasets/scifact] [--docs 1000] [--out benchmarks/results/scifact_scale]

1. Encoding the first ``--docs`` SciFact abstracts (their real lengths) with ``minilm-l6``, in this process and
   on a local Ray (``--engine ray``: Ray Data actors, one model each), in one process one after the other:
   throughput of each, their ratio, and the largest difference between the two sets of embeddings.
   On 2 cores parity is the honest expectation; the point is that the same code runs on a cluster.
2. Milvus Lite against the embedded exact index, over the full corpus with the SciFact-fine-tuned MiniLM
   (cached embeddings): recall@10 against exact, nDCG@10 on dev, search latency per query, build time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stagewise import build_first_stage, compute_metrics, load_beir
from stagewise.evaluation.runs import run_from_rankings
from stagewise.scale import engine
from stagewise.scale.milvus import MilvusVectors
from stagewise.search.vector_index import VectorIndex, VectorIndexConfig

HERE = Path(__file__).resolve().parent
FINETUNED = HERE / "results" / "scifact_select" / "train" / "bi-minilm-l6" / "model"


def encoding(dataset, docs: int) -> dict:
    texts = [d.full_text() for d in list(dataset.corpus.values())[:docs]]
    stage = build_first_stage("minilm-l6", show_progress=False)
    stage.encode_documents(texts[:32])  # warm-up
    start = time.perf_counter()
    local = stage.encode_documents(texts)
    local_s = time.perf_counter() - start
    with engine.use("ray") as settings:
        start = time.perf_counter()
        distributed = stage.encode_documents(texts)
        ray_s = time.perf_counter() - start
        import ray

        cpus = ray.cluster_resources().get("CPU")
    result = {"documents": len(texts), "local_docs_per_s": round(len(texts) / local_s, 1),
              "ray_docs_per_s": round(len(texts) / ray_s, 1), "ray_over_local": round(local_s / ray_s, 2),
              "max_abs_diff": float(np.abs(local - distributed).max()), "ray_cpus": cpus,
              "ray_batch_size": settings.batch_size, "note": "Ray time includes starting its actors and loading "
                                                             "one model per actor"}
    print(result, flush=True)
    return result


def _search_ms(vectors, queries: np.ndarray, k: int = 10) -> tuple[float, np.ndarray]:
    times, rows = [], []
    for q in queries:
        start = time.perf_counter()
        r, _ = vectors.search(q[None, :], k)
        times.append(time.perf_counter() - start)
        rows.append(r[0])
    return float(np.median(times)) * 1000, np.array(rows)


def milvus(dataset, model: str, work: Path) -> dict:
    queries, qrels = dataset.split("dev")
    qids = list(queries)
    stage = build_first_stage(model)
    stage.index(dataset.corpus)  # embeddings from the cache
    embeddings = np.asarray(stage.vectors.embeddings)
    q = stage.encode_queries([queries[i] for i in qids])
    ids = list(dataset.corpus)
    exact = VectorIndex.build(embeddings)
    start = time.perf_counter()
    lite = MilvusVectors.build(embeddings, VectorIndexConfig("milvus", uri=str(work / "milvus.db")))
    build_s = time.perf_counter() - start
    out = {}
    exact_rows = None
    for name, vectors in (("exact (embedded)", exact), ("milvus lite", lite)):
        _search_ms(vectors, q[:10])  # warm-up
        ms, rows = _search_ms(vectors, q)
        exact_rows = rows if exact_rows is None else exact_rows
        start = time.perf_counter()
        vectors.search(q, 10)  # all dev queries in one call, as the service's micro-batches do
        batched_ms = (time.perf_counter() - start) * 1000 / len(q)
        run = run_from_rankings({qid: [ids[r] for r in row] for qid, row in zip(qids, rows)})
        out[name] = {"recall@10_vs_exact": round(float(np.mean([len(set(a) & set(b)) / 10
                                                                 for a, b in zip(rows, exact_rows)])), 4),
                     "ndcg@10": round(compute_metrics(qrels, run)[0]["ndcg@10"], 4),
                     "search_ms_p50": round(ms, 3), "batched_ms_per_query": round(batched_ms, 3)}
        print(name, out[name], flush=True)
    out["milvus lite"]["build_s"] = round(build_s, 1)
    scores_exact = exact.search(q, 10)[1]
    scores_lite = lite.search(q, 10)[1]
    out["max_score_diff"] = float(np.abs(scores_exact - scores_lite).max())
    return {"model": model, "documents": len(ids), "queries": len(qids), **out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parents[0] / ".." / "shared" / "datasets" / "scifact"))
    parser.add_argument("--out", default="benchmarks/results/scifact_scale")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--bi", default=str(FINETUNED) if FINETUNED.is_dir() else "minilm-l6")
    parser.add_argument("--part", choices=["all", "ray", "milvus"], default="all")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        print(f"SciFact not found at {args.data}; pass --data", file=sys.stderr)
        return 1
    dataset = load_beir(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if args.part in ("all", "ray"):
        result = {"machine": machine, "ray": encoding(dataset, args.docs)}
        (out / "result-ray.json").write_text(json.dumps(result, indent=2))
    if args.part in ("all", "milvus"):
        with tempfile.TemporaryDirectory() as work:
            result = {"machine": machine, "milvus": milvus(dataset, args.bi, Path(work))}
        (out / "result-milvus.json").write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
