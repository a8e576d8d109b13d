"""Benchmark: the persistent index and the search service on SciFact's corpus (5,183 abstracts).

    python benchmarks/scifact_index.py [--data ../shared/datasets/scifact] [--out benchmarks/results/scifact_index]

1. ANN and quantisation: for exact, HNSW, int8 and binary indexes (each with float32 rescoring of ``rescore × k``
   candidates), recall@10 against exact search, nDCG@10 on dev, vector-search time per query and its speed-up
   over exact search, memory of what is searched, and disk size. The same on a synthetic scale-up
   (``--scale`` vectors: SciFact's corpus vectors plus small Gaussian perturbations, queries are SciFact's),
   because at 5k documents exact search is already fast.
2. Load test over loopback: ``stagewise serve`` in a subprocess, ``--clients`` concurrent closed-loop clients for
   ``--seconds`` each with reranking on and off; throughput, p50/p95/p99 latency, and every answer checked
   against the same query answered in-process (no request lost, none answered wrongly).

Corpus embeddings come from the embedding cache, so a rerun skips encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from stagewise import CrossEncoderReranker, Pipeline, build_first_stage, compute_metrics, load_beir
from stagewise.evaluation.runs import run_from_rankings
from stagewise.search.vector_index import VectorIndex, VectorIndexConfig
from stagewise.serving.index import Index

HERE = Path(__file__).resolve().parent
SELECT_RUN = HERE / "results" / "scifact_select" / "train"
CONFIGS = [VectorIndexConfig("exact"), VectorIndexConfig("hnsw"), VectorIndexConfig("exact", "int8"),
           VectorIndexConfig("hnsw", "int8"), VectorIndexConfig("exact", "binary"), VectorIndexConfig("hnsw", "binary"),
           VectorIndexConfig("exact", "binary", rescore=10)]


def _default_model(name: str, fallback: str) -> str:
    path = SELECT_RUN / name / "model"
    return str(path) if path.is_dir() else fallback


def _search_ms(vectors: VectorIndex, queries: np.ndarray, k: int = 10, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Median milliseconds per single-query vector search (the best of ``repeats`` passes), and the rows found."""
    best = None
    for _ in range(repeats):
        times, rows = [], []
        for q in queries:
            start = time.perf_counter()
            r, _ = vectors.search(q[None, :], k)
            times.append(time.perf_counter() - start)
            rows.append(r[0])
        median = float(np.median(times)) * 1000
        best = median if best is None else min(best, median)
    return best, np.array(rows)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def ann_benchmark(dataset, model: str, scale: int, work: Path) -> dict:
    queries, qrels = dataset.split("dev")
    qids = list(queries)
    pipeline = Pipeline(build_first_stage(model))
    stage = pipeline.first_stage
    q = stage.encode_queries([queries[i] for i in qids])
    rows = {}
    exact_rows = exact_ms = None
    for config in CONFIGS:
        start = time.perf_counter()
        index = Index.build(Pipeline(build_first_stage(model)), dataset.corpus, work / f"ix-{config.label}-{config.rescore}",
                            config)
        build_s = time.perf_counter() - start
        dense = index.pipeline.first_stage
        ms, found = _search_ms(dense.vectors, q)
        ids = list(index.corpus)
        run = run_from_rankings({qid: [ids[r] for r in found_row] for qid, found_row in zip(qids, found)})
        ndcg = compute_metrics(qrels, run)[0]["ndcg@10"]
        if exact_rows is None:
            exact_rows, exact_ms = found, ms
        rows[f"{config.label} (rescore {config.rescore}×)" if config.quantization != "none" else config.label] = {
            "recall@10_vs_exact": round(_recall(found, exact_rows), 4), "ndcg@10": round(ndcg, 4),
            "search_ms_p50": round(ms, 3), "speedup_vs_exact": round(exact_ms / ms, 2),
            "memory_mb": round(dense.vectors.memory_bytes() / 1e6, 2),
            "disk_mb": round(index.describe()["disk_bytes"] / 1e6, 2), "build_s": round(build_s, 1)}
        print(config.label, rows[list(rows)[-1]], flush=True)
    # the scale-up: SciFact's vectors and perturbed copies of them, searched with SciFact's dev queries
    base = np.asarray(Index.load(work / "ix-exact-4").pipeline.first_stage.vectors.embeddings)
    rng = np.random.default_rng(0)
    copies = base[rng.integers(0, len(base), scale - len(base))]
    copies = copies + rng.normal(0, 0.03, copies.shape).astype(np.float32)
    big = np.vstack([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)]).astype(np.float32)
    scaled = {}
    exact_rows = exact_ms = None
    for config in CONFIGS:
        start = time.perf_counter()
        vectors = VectorIndex.build(big, config)
        build_s = time.perf_counter() - start
        ms, found = _search_ms(vectors, q, repeats=1)
        if exact_rows is None:
            exact_rows, exact_ms = found, ms
        name = f"{config.label} (rescore {config.rescore}×)" if config.quantization != "none" else config.label
        scaled[name] = {"recall@10_vs_exact": round(_recall(found, exact_rows), 4), "search_ms_p50": round(ms, 3),
                        "speedup_vs_exact": round(exact_ms / ms, 2),
                        "memory_mb": round(vectors.memory_bytes() / 1e6, 1), "build_s": round(build_s, 1)}
        print(f"scale {scale}", name, scaled[name], flush=True)
    return {"scifact": rows, f"synthetic_{scale}": scaled, "queries": len(qids), "model": model}


# ---- load test ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def _load(url: str, texts: list[str], expected: dict, rerank: bool, clients: int, seconds: float) -> dict:
    """``clients`` closed-loop clients for ``seconds``; every answer compared with the in-process one."""
    import httpx

    latencies, statuses, wrong, lock = [], {}, [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(n: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = n
            while time.perf_counter() < stop:
                text = texts[i % len(texts)]
                i += clients
                start = time.perf_counter()
                try:
                    r = http.post(f"{url}/search", json={"query": text, "k": 10, "rerank": rerank})
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(elapsed * 1000)
                        got = [(h["doc_id"], h["score"]) for h in r.json()["hits"]]
                        want = expected[text]
                        if [d for d, _ in got] != [d for d, _ in want] or not np.allclose(
                                [s for _, s in got], [s for _, s in want], atol=1e-3):
                            wrong.append({"query": text, "got": got[:3], "want": want[:3]})

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.array(latencies)
    done = int(sum(v for k, v in statuses.items()))
    return {"rerank": rerank, "clients": clients, "seconds": round(wall, 1), "requests": done,
            "ok": statuses.get(200, 0), "statuses": {str(k): v for k, v in statuses.items()},
            "wrong": len(wrong), "wrong_examples": wrong[:3], "throughput_qps": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def load_benchmark(dataset, bi: str | dict, cross: str, depth: int, clients: int, seconds: float, work: Path,
                   cross_backend=None, cache=None, cross_per_query: dict | None = None) -> dict:
    """``bi`` is a first-stage spec or config (a dense config may name backends); ``cross_backend`` and
    ``cross_per_query`` run the reranker's batch and per-query work on other backends
    (benchmarks/scifact_backends.py); ``cache`` is the embedding cache the first stage reads."""
    pipeline = Pipeline(build_first_stage(bi, cache), CrossEncoderReranker(cross, backend=cross_backend,
                                                                          per_query_setting=cross_per_query),
                        depth=depth)
    untrained = not pipeline.reranker.trained  # the bert-tiny fallback: speed is measured here, not quality
    index = Index.build(pipeline, dataset.corpus, work / "ix-serve", VectorIndexConfig("hnsw"),
                        allow_untrained_reranker=untrained)
    queries, _ = dataset.split("dev")
    texts = list(queries.values())
    expected = {rerank: {t: [(h.doc_id, h.score) for h in index.search(t, 10, rerank=rerank)] for t in texts}
                for rerank in (False, True)}
    results, stats = [], {}
    for max_batch in (32, 1):  # micro-batching on (the default), then off: what batching buys
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "stagewise.cli", "serve", str(work / "ix-serve"), "--port",
                                   str(port), "--timeout", "30", "--max-batch", str(max_batch)]
                                  + (["--allow-untrained-reranker"] if untrained else []),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_ready(url, server)
            _load(url, texts[:20], expected[False], False, clients, 3)  # warm-up
            for rerank in (False, True):
                results.append({"max_batch": max_batch, **_load(url, texts, expected[rerank], rerank, clients,
                                                                  seconds)})
                print(results[-1], flush=True)
            import httpx

            stats[max_batch] = httpx.get(f"{url}/stats").json()
        finally:
            server.terminate()
            server.wait(30)
    return {"pipeline": index.pipeline.name, "depth": depth, "runs": results,
            "server_batch_size": {b: s["batch_size"] for b, s in stats.items()},
            "server_stage_ms": {b: s["batch_stage_ms"] for b, s in stats.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parents[0] / ".." / "shared" / "datasets" / "scifact"))
    parser.add_argument("--out", default="benchmarks/results/scifact_index")
    parser.add_argument("--bi", default=_default_model("bi-minilm-l6", "minilm-l6"),
                        help="bi-encoder (default: the one fine-tuned by benchmarks/scifact_select.py, if present)")
    parser.add_argument("--cross", default=_default_model("cross-bert-tiny", "bert-tiny"),
                        help="cross-encoder (default: bert-tiny as fine-tuned by benchmarks/scifact_select.py, if present)")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--scale", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--part", choices=["all", "ann", "load"], default="all")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        print(f"SciFact not found at {args.data}; pass --data", file=sys.stderr)
        return 1
    dataset = load_beir(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stagewise-bench-"))
    machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for part, run in (("ann", lambda: ann_benchmark(dataset, args.bi, args.scale, work)),
                          ("load", lambda: load_benchmark(dataset, args.bi, args.cross, args.depth, args.clients,
                                                          args.seconds, work))):
            if args.part in ("all", part):
                (out / f"result-{part}.json").write_text(json.dumps({"machine": machine, part: run()}, indent=2))
                print(f"written {out / f'result-{part}.json'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
