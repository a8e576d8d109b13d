"""Benchmark: the search service under a flood of maximal requests, with real models, at its default settings.

    python benchmarks/service_flood.py [--data ../shared/datasets/scifact] [--out benchmarks/results/service_flood]

``stagewise serve`` runs in a subprocess over a BM25 + cross-encoder index (the probe's setup). In one run:

1. the probe's request (64 queries, k 100, depth 200: 12,800 pairs), which must be refused at once;
2. normal latency: single reranked and first-stage-only requests, one after another;
3. a flood: ``--flooders`` closed-loop clients sending 64-query batch requests at ``--flood-depth`` (10: 640 pairs,
   which one at a time this service can answer within its timeout) for ``--seconds``, while two probe clients send
   a first-stage-only and a reranked request every 100 ms;
4. after the flood: the first reranked request's latency, then the median of 20.

Reports statuses, latencies (median, p95), the lanes' counters from /stats, and the machine (CPU model, flags).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scifact_index import _free_port, _wait_ready  # noqa: E402


def _machine() -> dict:
    info = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Flags"):
            info[key.strip()] = value.strip()
    flags = set(info.pop("Flags", "").split())
    info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    return info


def _quantiles(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    return {"n": len(a), "p50_ms": round(float(np.median(a)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "max_ms": round(float(a.max()), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent / ".." / "shared" / "datasets" / "scifact"),
                        help="a BEIR folder (default SciFact), or 'default'")
    parser.add_argument("--cross", default="bert-tiny", help="the reranker (an untrained base is allowed here: "
                                                             "this measures the service, not ranking quality)")
    parser.add_argument("--flooders", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--flood-depth", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/service_flood")
    args = parser.parse_args()

    import httpx

    from stagewise import CrossEncoderReranker, Pipeline, build_first_stage
    from stagewise.data.loaders import load_dataset
    from stagewise.serving.index import Index

    data = args.data if args.data == "default" or Path(args.data).is_dir() else "default"
    dataset = load_dataset(data)
    queries = list(dataset.split("dev")[0].values())
    work = Path(tempfile.mkdtemp(prefix="service-flood-"))
    pipeline = Pipeline(build_first_stage("bm25"), CrossEncoderReranker(args.cross), depth=20)
    untrained = not pipeline.reranker.trained
    Index.build(pipeline, dataset.corpus, work / "idx", allow_untrained_reranker=untrained)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "stagewise.cli", "serve", str(work / "idx"), "--port", str(port)]
    server = subprocess.Popen(command + (["--allow-untrained-reranker"] if untrained else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result: dict = {"machine": _machine(), "data": data, "documents": len(dataset.corpus), "reranker": args.cross,
                    "depth": 20, "flooders": args.flooders, "flood_seconds": args.seconds,
                    "flood_request": f"64 queries x depth {args.flood_depth}"}
    try:
        _wait_ready(url, server)
        http = httpx.Client(base_url=url, timeout=60)

        def timed(body: dict, path: str = "/search") -> tuple[int, float]:
            start = time.perf_counter()
            status = http.post(path, json=body).status_code
            return status, (time.perf_counter() - start) * 1000

        probe = {"queries": queries[:64], "k": 100, "depth": 200}
        status, ms = timed(probe, "/search/batch")
        result["probe_request"] = {"status": status, "ms": round(ms, 1), "error": http.post("/search/batch",
                                                                                               json=probe).json()}
        for q in queries[:10]:  # warm-up
            timed({"query": q})
        result["normal"] = {
            "reranked": _quantiles([timed({"query": q})[1] for q in queries[10:40]]),
            "first_stage": _quantiles([timed({"query": q, "rerank": False})[1] for q in queries[10:40]])}
        print("normal", result["normal"], flush=True)

        stop = threading.Event()
        flood_statuses: dict = {}
        flood_ms: list[float] = []
        probes: dict = {"first_stage": [], "reranked": []}
        probe_statuses: dict = {"first_stage": {}, "reranked": {}}
        lock = threading.Lock()
        maximal = {"queries": queries[:64], "k": 10, "depth": args.flood_depth}

        def flooder(n: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    start = time.perf_counter()
                    status = c.post("/search/batch", json=maximal).status_code
                    with lock:
                        flood_statuses[status] = flood_statuses.get(status, 0) + 1
                        flood_ms.append((time.perf_counter() - start) * 1000)
                    if status == 503:
                        time.sleep(0.05)

        def prober(kind: str) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                i = 0
                while not stop.is_set():
                    body = {"query": queries[40 + i % 20], **({"rerank": False} if kind == "first_stage" else {})}
                    start = time.perf_counter()
                    status = c.post("/search", json=body).status_code
                    with lock:
                        probe_statuses[kind][status] = probe_statuses[kind].get(status, 0) + 1
                        if status == 200:
                            probes[kind].append((time.perf_counter() - start) * 1000)
                    i += 1
                    time.sleep(0.1)

        threads = [threading.Thread(target=flooder, args=(n,)) for n in range(args.flooders)]
        threads += [threading.Thread(target=prober, args=(kind,)) for kind in probes]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        result["flood"] = {"statuses": {str(k): v for k, v in flood_statuses.items()}, "latency": _quantiles(flood_ms),
                           "during": {k: {"statuses": {str(s): n for s, n in probe_statuses[k].items()},
                                          **_quantiles(v)} for k, v in probes.items()}}
        print("flood", result["flood"], flush=True)
        first_status, first_ms = timed({"query": queries[0]})
        after = [timed({"query": q})[1] for q in queries[60:80]]
        result["after"] = {"first_status": first_status, "first_ms": round(first_ms, 1), "reranked": _quantiles(after)}
        result["lanes"] = http.get("/stats").json()["lanes"]
        print("after", result["after"], result["lanes"], flush=True)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
