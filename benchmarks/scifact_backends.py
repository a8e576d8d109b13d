"""Benchmark: the backends (PyTorch float32 / bf16, ONNX Runtime, OpenVINO; int8 or not) of both stages on SciFact.

    python benchmarks/scifact_backends.py [--data ../shared/datasets/scifact] [--stage bi|cross|both]
        [--bi runs/sf-bi/model] [--cross runs/reranker_recipe/current---pre-training/model] [--only LABEL ...]
        [--docs 256] [--pairs 320] [--rounds 5] [--query-sample 20] [--load]
        [--out benchmarks/results/scifact_backends]

For the bi-encoder and the cross-encoder, each candidate (``torch`` float32 — the reference —, ``torch-bf16``,
``onnx``, ``onnx-int8``, ``openvino``, ``openvino-bf16`` on the float export, ``openvino-int8`` calibrated on
SciFact with ``load_calibration``) is exported once (kept under ``--work``, ignored by git) and loaded in this
one process, so that the ratios hold on a noisy machine:

1. Speed for both uses, measured with ``stagewise.selection.backend_timing`` (what ``select``'s stage 3 uses): batch work
   (bi-encoder docs/s encoding a fixed sample of ``--docs`` corpus documents; cross-encoder pairs/s scoring
   ``--pairs`` (dev query, candidate) pairs from the float32 first stage's top 20) and per-query work (one dev
   query's encoding; one dev query's 20 pairs), ``--query-sample`` queries per round. One warm-up per
   candidate (the bi-encoder's per-query one encodes a query of every token length 1..64, as a service does at
   load), then interleaved rounds, each measuring every candidate once (order rotated); a candidate's
   speed-up is the median of its per-round ratios to torch float32, with their range; per-query p50 and p95
   pool every query of every round. A timing whose float32 rounds disagree is repeated, then flagged.
2. Quality on SciFact dev: the bi-encoder's nDCG@10 of dense retrieval over the whole corpus (embeddings kept in
   an embedding cache under ``--work``, keyed by model fingerprint and backend, so a rerun is cheap), the
   cross-encoder's nDCG@10 of pure reranking of the float32 first stage's top 20; the relative change against
   torch float32, and the equivalence numbers (the export's manifest; for bf16, measured here on the same sample).
   Per stage and use, the recommended backend: the fastest losing at most 1% nDCG@10.
3. ``--load``: the service load test of ``benchmarks/scifact_index.py`` twice in this process, reranking at depth
   20: every stage on torch float32, then every stage on its recommended backends (batch and per query).

A candidate that fails to export or load on this CPU is recorded with its error. ``--max-queries`` and
``--corpus-limit`` are for smoke runs; a result made with them says so. Writes ``result.json`` and ``result.md``
under ``--out``; the CPU's model and flags are printed first and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from stagewise.cache import EmbeddingCache
from stagewise.data.loaders import RetrievalDataset, load_dataset
from stagewise.evaluation.metrics import compute_metrics, run_from_rankings
from stagewise.models.backends import Backend, read_manifest
from stagewise.models.export import equivalence, export_model, load_calibration
from stagewise.models.specs import resolve_model
from stagewise.rundir import cpu, versions
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import DenseRetriever
from stagewise.selection.backend_timing import USES, batch_work, interleaved, query_work

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEPTH = 20
REFERENCE = "torch"
# label -> (the backend it runs on, the export it runs from: None for PyTorch's own weights)
CANDIDATES = {
    "torch": (Backend(), None),
    "torch-bf16": (Backend("torch", dtype="bfloat16"), None),
    "onnx": (Backend("onnx"), Backend("onnx")),
    "onnx-int8": (Backend("onnx", "int8"), Backend("onnx", "int8")),
    "openvino": (Backend("openvino"), Backend("openvino")),
    "openvino-bf16": (Backend("openvino", dtype="bfloat16"), Backend("openvino")),
    "openvino-int8": (Backend("openvino", "int8"), Backend("openvino", "int8")),
}
KINDS = {"bi": "bi-encoder", "cross": "cross-encoder"}
MAX_LOSS = 0.01  # the load test's candidate: the fastest reranker losing at most 1% nDCG@10


def _default(path: str, *fallbacks: str) -> str:
    for p in (path, *fallbacks):
        if (REPO / p).is_dir():
            return str(REPO / p)
    return fallbacks[-1] if fallbacks else path


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


# ---- data --------------------------------------------------------------------------------------


def _restrict(dataset: RetrievalDataset, max_queries: int | None, corpus_limit: int | None) -> RetrievalDataset:
    """Smoke runs only: the first ``max_queries`` dev queries, and the first ``corpus_limit`` documents plus
    every document those queries judge (so that their nDCG@10 still means something)."""
    qrels = {split: dict(q) for split, q in dataset.qrels.items()}
    if max_queries:
        qrels["dev"] = {q: qrels["dev"][q] for q in sorted(qrels["dev"])[:max_queries]}
    corpus = dataset.corpus
    if corpus_limit:
        keep = set(list(corpus)[:corpus_limit]) | {d for judged in qrels["dev"].values() for d in judged}
        corpus = {d: doc for d, doc in corpus.items() if d in keep}
        qrels = {split: {q: {d: r for d, r in judged.items() if d in keep} for q, judged in split_qrels.items()}
                 for split, split_qrels in qrels.items()}
        qrels = {split: {q: j for q, j in split_qrels.items() if j} for split, split_qrels in qrels.items()}
    return RetrievalDataset(dataset.name, corpus, dataset.queries, qrels, dataset.source)


# ---- candidates --------------------------------------------------------------------------------


def _export(source: str, kind: str, backend: Backend, work: Path, calibration, force: bool) -> tuple[Path, dict, float]:
    """The export of ``source`` for ``backend``, made once and kept (keyed by the source's fingerprint)."""
    spec = resolve_model(source)
    folder = work / "exports" / f"{kind}-{backend.label}-{spec.fingerprint[:12]}"
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None:
        stale = manifest["source"]["fingerprint"] != spec.fingerprint or (
            backend.quantize == "int8" and backend.name == "openvino"
            and (manifest.get("calibration") or {}).get("hash") != calibration.record()["hash"])
        if not stale:
            return folder, manifest, 0.0
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest = export_model(spec, backend, folder, calibration=calibration, force=force)
    return folder, manifest, round(time.perf_counter() - start, 1)


def _precision(stage_object, backend: Backend) -> str:
    """What the transformer really computes in: OpenVINO only honours bf16 where the CPU has it."""
    model = stage_object.model[0].model  # sentence-transformers' Transformer module holds the transformer
    if hasattr(model, "precision"):  # OpenVINO's inference precision, as the compiled model reports it
        text = {"f32": "float32", "bf16": "bfloat16"}.get(model.precision, model.precision)
        return f"int8 (static) / {text}" if backend.quantize == "int8" else text
    if backend.name == "torch":
        return str(next(model.parameters()).dtype).replace("torch.", "")
    return "float32" if backend.quantize == "none" else "int8 (weights) / float32"


def build_candidates(stage: str, source: str, names: list[str], work: Path, calibration, force: bool,
                     cache: EmbeddingCache) -> dict:
    """Each candidate exported (where needed) and loaded; a failure is recorded, not raised."""
    kind = KINDS[stage]
    out = {}
    for name in names:
        backend, export_backend = CANDIDATES[name]
        row = {"backend": backend.config(), "label": backend.label}
        started = time.perf_counter()
        try:
            path, manifest = source, None
            if export_backend is not None:
                path, manifest, seconds = _export(source, kind, export_backend, work, calibration, force)
                row.update({"export": str(path), "export_seconds": seconds or None,
                            "export_reused": seconds == 0.0, "accepted": manifest.get("accepted"),
                            "manifest_equivalence": manifest.get("equivalence")})
            if stage == "bi":
                obj = DenseRetriever(str(path), backend=backend, cache=cache, show_progress=False)
            else:
                obj = CrossEncoderReranker(str(path), backend=backend)
            row["precision"] = _precision(obj, backend)
            row["object"] = obj
        except Exception as e:  # noqa: BLE001 - a backend this CPU cannot run is a result, not a crash
            row["error"] = _error(e)
            row["traceback"] = traceback.format_exc(limit=4)
            print(f"  {stage} {name}: FAILED {row['error']}", flush=True)
        row["load_seconds"] = round(time.perf_counter() - started, 1)
        out[name] = row
        if "object" in row:
            print(f"  {stage} {name}: ready ({row['precision']}, {row['load_seconds']} s)", flush=True)
    reference = out.get(REFERENCE, {}).get("object")
    for name, row in out.items():  # equivalence: the manifest's, else (bf16) measured here on the same sample
        if "object" not in row or name == REFERENCE:
            continue
        if row["backend"]["dtype"] == "bfloat16" or "manifest_equivalence" not in row:
            if reference is None:
                continue
            try:
                row["equivalence"] = {**equivalence(kind, reference.model, row["object"].model, calibration),
                                      "sample": calibration.source, "measured": "here"}
            except Exception as e:  # noqa: BLE001
                row["equivalence"] = {"error": _error(e)}
        else:
            row["equivalence"] = {**row["manifest_equivalence"], "measured": "export manifest"}
    return out


# ---- throughput --------------------------------------------------------------------------------


def timing(candidates: dict, batch_fn, query_fn, queries: dict, rounds: int, query_warm_up=None) -> dict:
    """Both uses in interleaved rounds against torch float32 (``stagewise.selection.backend_timing``);
    ``query_warm_up(stage)`` (when given) warms per-query work first, as a service does at load."""
    ready = {n: r for n, r in candidates.items() if "object" in r}
    out = {}
    for use in USES:
        work = {n: batch_work(lambda items, o=r["object"]: batch_fn(o, items), queries["batch"]) if use == "batch"
                else query_work(lambda one, o=r["object"]: query_fn(o, one[0]), queries["query"],
                                warm_up=query_warm_up and (lambda o=r["object"]: query_warm_up(o)))
                for n, r in ready.items()}
        measured = interleaved(work, REFERENCE, use, rounds=rounds)
        for name, error in measured["errors"].items():
            candidates[name]["error"] = error
            print(f"  {name}: {use} FAILED {error}", flush=True)
        for name, row in measured["candidates"].items():
            candidates[name]["throughput" if use == "batch" else "per_query"] = row
        out[use] = {k: v for k, v in measured.items() if k != "candidates"}
        print(f"  {use}: " + ", ".join(f"{n} {r.get('speedup', 0):.2f}×" for n, r in measured["candidates"].items())
              + (" (DISTURBED)" if measured["disturbed"] else ""), flush=True)
    return out


def first_pass(candidates: dict, pairs: list, rounds: int) -> dict:
    """The reranker's batch work with none of its documents' tokens cached (every round tokenizes them all, as
    a reranker's first pass over new documents does): speed-ups against torch float32's first pass."""
    def work(stage):
        return batch_work(lambda items: (stage.tokens.clear(), stage.score_pairs(items, per_query_work=False)), pairs)

    measured = interleaved({n: work(r["object"]) for n, r in candidates.items() if "object" in r}, REFERENCE,
                           "batch", rounds=rounds)
    print("  batch, first pass: " + ", ".join(f"{n} {r.get('speedup', 0):.2f}×"
                                                for n, r in measured["candidates"].items()), flush=True)
    return {"disturbed": measured["disturbed"],
            "candidates": {n: {k: r[k] for k in ("median", "speedup", "speedup_range") if k in r}
                           for n, r in measured["candidates"].items()}}


def recommend(candidates: dict) -> dict:
    """Per use, the fastest candidate losing at most ``MAX_LOSS`` nDCG@10 (a 5% tie goes to torch float32)."""
    out = {}
    for use, key in (("batch", "throughput"), ("query", "per_query")):
        fitting = {n: r[key]["speedup"] for n, r in candidates.items() if key in r and "error" not in r
                   and r.get("quality", {}).get("relative_change", -1) >= -MAX_LOSS}
        if not fitting:
            continue
        best = max(fitting.values())
        tied = [n for n, v in fitting.items() if v >= best * 0.95]
        out[use] = REFERENCE if REFERENCE in tied else max(tied, key=lambda n: fitting[n])
    return out


# ---- quality -----------------------------------------------------------------------------------


def _measured(name: str, row: dict, min_speedup: float | None) -> bool:
    """Whether a candidate's dev quality is measured: it loaded, and (with ``--quality-min-speedup``) it is at least
    that fast against torch float32 in either use, as ``select`` does (a slower one cannot be recommended; its equivalence on
    the sample still shows how close it is)."""
    if "object" not in row or "error" in row:
        return False
    ratios = [(row.get(key) or {}).get("speedup") for key in ("throughput", "per_query")]
    ratio = max((r for r in ratios if r is not None), default=None)  # faster in either use: it may be recommended
    if name != REFERENCE and min_speedup is not None and ratio is not None and ratio < min_speedup:
        row["quality_skipped"] = (f"{ratio:.2f}× torch float32 at best (batch or per query; < {min_speedup:g}): dev "
                                  "quality not measured")
        print(f"  {name}: {row['quality_skipped']}", flush=True)
        return False
    return True


def bi_quality(candidates: dict, dataset, queries: dict, qrels: dict, done=lambda: None,
               min_speedup: float | None = None) -> dict | None:
    """nDCG@10 of each candidate's dense retrieval over the whole corpus; the reference's top 20 per dev query.
    ``done`` is called after each candidate (the result so far is written)."""
    top = None
    qids = list(queries)
    for name, row in candidates.items():
        if not _measured(name, row, min_speedup):
            continue
        stage = row["object"]
        print(f"  bi {name}: indexing {len(dataset.corpus)} documents ({time.strftime('%H:%M:%S')})", flush=True)
        try:
            start = time.perf_counter()
            stage.index(dataset.corpus)
            seconds = time.perf_counter() - start
            rankings = stage.retrieve([queries[q] for q in qids], 100)
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
            continue
        metrics = compute_metrics(qrels, run_from_rankings({q: [d for d, _ in r] for q, r in zip(qids, rankings)}))[0]
        row["quality"] = {"ndcg@10": round(metrics["ndcg@10"], 4), "recall@100": round(metrics["recall@100"], 4),
                          "corpus_docs_per_second": round(stage.docs_per_second or 0.0, 2),
                          "corpus_from_cache": stage.from_cache, "index_seconds": round(seconds, 1)}
        print(f"  bi {name}: nDCG@10 {metrics['ndcg@10']:.4f} (corpus {'from cache' if stage.from_cache else 'encoded'}"
              f" at {stage.docs_per_second or 0:.1f} docs/s)", flush=True)
        if name == REFERENCE:
            top = {q: [d for d, _ in r[:DEPTH]] for q, r in zip(qids, rankings)}
        _relative(candidates)
        done()
    return top


def cross_quality(candidates: dict, dataset, queries: dict, qrels: dict, top: dict[str, list[str]],
                  min_speedup: float | None = None) -> None:
    """nDCG@10 of each candidate's pure reranking of the reference first stage's top 20."""
    pairs = [(queries[q], dataset.corpus[d].full_text()) for q in top for d in top[q]]
    for name, row in candidates.items():
        if not _measured(name, row, min_speedup):
            continue
        try:
            start = time.perf_counter()
            scores = row["object"].score_pairs(pairs)
            seconds = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
            continue
        rankings, i = {}, 0
        for q, docs in top.items():
            s = scores[i:i + len(docs)]
            i += len(docs)
            rankings[q] = [docs[j] for j in np.argsort(-s, kind="stable")]
        metrics = compute_metrics(qrels, run_from_rankings(rankings))[0]
        row["quality"] = {"ndcg@10": round(metrics["ndcg@10"], 4), "pairs": len(pairs),
                          "score_seconds": round(seconds, 1)}
        print(f"  cross {name}: nDCG@10 {metrics['ndcg@10']:.4f}", flush=True)
    _relative(candidates)


def _relative(candidates: dict) -> None:
    ref = candidates.get(REFERENCE, {}).get("quality", {}).get("ndcg@10")
    for row in candidates.values():
        if "quality" in row and ref:
            row["quality"]["relative_change"] = round((row["quality"]["ndcg@10"] - ref) / ref, 4)


# ---- report ------------------------------------------------------------------------------------


def _equivalence_text(e: dict | None, stage: str) -> str:
    if not e:
        return "reference" if e is None else ""
    if "error" in e:
        return f"failed: {e['error']}"
    head = (f"min cos {e['min_cosine']:.4f}, mean {e['mean_cosine']:.4f}" if stage == "bi"
            else f"Spearman {e['spearman']:.4f}, max Δ {e['max_abs_diff']:.3f}")
    return f"{head}, top-10 {e['top10_agreement']:.3f} ({'here' if e.get('measured') == 'here' else 'manifest'})"


def markdown(result: dict) -> str:
    c = result["cpu"]
    lines = [f"CPU: {c['model']}, {c['cores']} cores, flags {' '.join(c['flags'])}; {result['threads']} threads. "
             f"Runtimes: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "."]
    if result["smoke"]:
        lines += ["", f"**SMOKE RUN, not the full measurement**: {result['smoke']}."]
    for stage, data in result["stages"].items():
        unit = "docs/s" if stage == "bi" else "pairs/s"
        what = (f"encoding {data['items']} corpus documents" if stage == "bi"
                else f"scoring {data['items']} (dev query, top-{DEPTH} candidate) pairs")
        quality = ("dense retrieval over the corpus" if stage == "bi"
                   else f"pure reranking of the float32 first stage's top {DEPTH} (first stage alone: "
                        f"{data.get('first_stage_ndcg@10', float('nan')):.4f})")
        lines += ["", f"### {KINDS[stage]}: `{data['model']}`", "",
                  f"Batch: {what}. Per query: {data.get('per_query_what', '')}. {result['settings']['rounds']} "
                  "interleaved rounds; speed-ups are medians of per-round ratios to torch float32 (their range in "
                  "brackets); p50/p95 pool every query of every round. "
                  + ("**The float32 rounds disagreed (machine busy): these timings are flagged.** "
                     if any(t.get("disturbed") for t in data.get("timing", {}).values()) else "")
                  + f"Quality: nDCG@10 on SciFact dev ({data['queries']} queries, {data['corpus']} documents), "
                  f"{quality}.", "",
                  f"| candidate | batch {unit} median (min–max) | batch vs float32 | per-query p50 / p95 ms | "
                  "p95/p50 | per query vs float32 | nDCG@10 | relative change | equivalence | runs as |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in data["candidates"].items():
            t, p, q = row.get("throughput"), row.get("per_query"), row.get("quality")
            speed = f"{t['median']:.1f} ({t['min']:.1f}–{t['max']:.1f})" if t else "—"
            ndcg = f"{q['ndcg@10']:.4f}" if q else "not measured (slower)" if "quality_skipped" in row else "—"
            rel = f"{q['relative_change']:+.2%}" if q and "relative_change" in q else "—"
            eq = _equivalence_text(row.get("equivalence"), stage) if name != REFERENCE else "reference"
            runs = row.get("precision", "")
            if row["backend"]["dtype"] == "bfloat16" and runs == "float32":
                runs = "float32 (this CPU has no bf16: the same computation as `openvino`)"
            if "error" in row:
                runs = f"**failed**: {row['error']}"
            latency = f"{p['p50_ms']:.1f} / {p['p95_ms']:.1f}" if p else "—"
            tail = f"{p['p95_ms'] / p['p50_ms']:.2f}" if p and p["p50_ms"] else "—"
            lines.append(f"| {name} | {speed} | {_ratio(t)} | {latency} | {tail} | {_ratio(p)} | {ndcg} | {rel} | {eq} "
                         f"| {runs} |")
        first = data.get("first_pass")
        if first:
            lines += ["", "Batch, first pass (documents not yet tokenized: each round clears the reranker's token "
                      "cache, so every document is tokenized in it; the table's batch rounds find them cached, as "
                      "a reranker's repeated work does): " + ", ".join(
                          f"{n} {r['median']:.1f} {unit} ({_ratio(r)})" for n, r in first["candidates"].items())
                      + (" **(disturbed)**" if first["disturbed"] else "") + "."]
        rec = data.get("recommended") or {}
        lines += ["", f"Recommended (fastest within {MAX_LOSS:.0%} nDCG@10): batch **{rec.get('batch', '—')}**, "
                      f"per query **{rec.get('query', '—')}**."]
    load = result.get("load")
    if load:
        lines += ["", f"### Service load test (reranking at depth {DEPTH}, {load['clients']} clients, "
                  f"{load['seconds']} s per run)", ""]
        if "error" in load:
            lines.append(f"Not run: {load['error']}")
        else:
            lines += [f"Recommended: {load['candidate']}.", "",
                      "| server micro-batch | rerank | float32 q/s | recommended q/s | ratio | p95 ms (float32 / "
                      "recommended) | lost / wrong (float32; recommended) |", "|---|---|---|---|---|---|---|"]
            for a, b in zip(load["torch"]["runs"], load["fastest"]["runs"]):
                ratio = b["throughput_qps"] / a["throughput_qps"] if a["throughput_qps"] else float("nan")
                lines.append(f"| {a['max_batch']} | {'on' if a['rerank'] else 'off'} | {a['throughput_qps']:.2f} | "
                             f"{b['throughput_qps']:.2f} | {ratio:.2f}× | {a['p95_ms']:.0f} / {b['p95_ms']:.0f} | "
                             f"{_lost(a)}; {_lost(b)} |")
            lines += ["", f"Each stage on the backends recommended above for each use (losing at most {MAX_LOSS:.0%} "
                      "nDCG@10), against every stage on torch float32. Wrong answers are checked against the same "
                      "server's own pipeline searched in process before the load."]
    lines += ["", f"Wall time {result['wall_seconds'] / 60:.1f} min. Command: `{' '.join(result['command'])}`"]
    return "\n".join(lines) + "\n"


def _lost(run: dict) -> str:
    lost = run.get("requests", 0) - run.get("statuses", {}).get("200", run.get("requests", 0))
    return f"{lost} / {run.get('wrong', 0)}"


def _ratio(measured: dict | None) -> str:
    if not measured or measured.get("speedup") is None:
        return "—"
    low, high = measured["speedup_range"]
    return f"{measured['speedup']:.2f}× ({low:.2f}–{high:.2f})"


def _public(candidates: dict) -> dict:
    return {n: {k: v for k, v in r.items() if k not in ("object", "manifest_equivalence")} for n, r in
            candidates.items()}


# ---- load test ---------------------------------------------------------------------------------


def _deployed(candidates: dict, recommended: dict, source: str):
    """(model, backend, per-query setting) of a stage on its recommended backends."""
    batch, query = (candidates[recommended.get(use, REFERENCE)] for use in USES)

    def folder(row):
        return row.get("export") or source

    backend = Backend.from_config(batch["backend"])
    setting = None if query is batch else {"model": folder(query), **query["backend"]}
    return folder(batch), backend, setting


def load_test(dataset, bi: str, built: dict, recommended: dict, clients: int, seconds: float,
              cache: EmbeddingCache, sources: dict) -> dict:
    sys.path.insert(0, str(HERE))
    from scifact_index import load_benchmark

    base = {"clients": clients, "seconds": seconds, "max_loss": MAX_LOSS}
    if "cross" not in built or REFERENCE not in built["cross"] or "throughput" not in built["cross"][REFERENCE]:
        return {**base, "error": "the torch float32 reranker was not measured"}
    setups = {"torch": ({"type": "dense", "model": bi}, sources["cross"], None, None)}
    dense = {"type": "dense", "model": bi}
    if "bi" in built and recommended.get("bi"):
        model, backend, setting = _deployed(built["bi"], recommended["bi"], sources["bi"])
        dense = {"type": "dense", "model": model, **backend.config(), **({"per_query": setting} if setting else {})}
    model, backend, setting = _deployed(built["cross"], recommended.get("cross", {}), sources["cross"])
    setups["fastest"] = (dense, model, backend, setting)
    out = {**base, "candidate": "; ".join(f"{KINDS[s]} batch {r.get('batch', REFERENCE)}, per query "
                                          f"{r.get('query', REFERENCE)}" for s, r in recommended.items())}
    for key, (first, cross, backend, setting) in setups.items():
        work = Path(tempfile.mkdtemp(prefix="stagewise-backends-"))
        try:
            print(f"load test: {key}", flush=True)
            out[key] = load_benchmark(dataset, first, cross, DEPTH, clients, seconds, work, cross_backend=backend,
                                      cache=cache, cross_per_query=setting)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    out["ratio_rerank_qps"] = {str(a["max_batch"]): round(b["throughput_qps"] / a["throughput_qps"], 3)
                               for a, b in zip(out["torch"]["runs"], out["fastest"]["runs"]) if a["rerank"]}
    return out


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "scifact"))
    parser.add_argument("--bi", default=_default("runs/sf-bi/model", "minilm-l6"))
    parser.add_argument("--cross", default=_default("runs/reranker_recipe/current---pre-training/model",
                                                    "benchmarks/results/scifact_select/train/cross-bert-tiny/model"))
    parser.add_argument("--stage", choices=["bi", "cross", "both"], default="both")
    parser.add_argument("--only", nargs="*", choices=list(CANDIDATES), help="candidates (torch is always measured)")
    parser.add_argument("--docs", type=int, default=256, help="corpus documents per bi-encoder throughput call")
    parser.add_argument("--pairs", type=int, default=320, help="pairs per cross-encoder throughput call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--query-sample", type=int, default=20, help="dev queries per per-query round")
    parser.add_argument("--force", action="store_true", help="keep exports that drift past the tolerance")
    parser.add_argument("--load", action="store_true", help="then the service load test, torch vs the fastest")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--quality-min-speedup", type=float, help="measure dev quality only for candidates at least "
                                                                   "this fast against torch float32 (select's rule: 1)")
    parser.add_argument("--max-queries", type=int, help="smoke runs: only the first N dev queries")
    parser.add_argument("--corpus-limit", type=int, help="smoke runs: only the first N documents (+ judged ones)")
    parser.add_argument("--work", default=str(HERE / "results" / "scifact_backends" / "runs"),
                        help="exports and the embedding cache (ignored by git)")
    parser.add_argument("--out", default="benchmarks/results/scifact_backends")
    args = parser.parse_args()
    started = time.perf_counter()
    if not Path(args.data).is_dir():
        print(f"SciFact not found at {args.data}; pass --data", file=sys.stderr)
        return 1
    import torch

    machine = cpu()
    print(f"CPU: {machine['model']}, {machine['cores']} cores, flags: {' '.join(machine['flags'])}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    names = [REFERENCE] + [n for n in (args.only or CANDIDATES) if n != REFERENCE]
    stages = ["bi", "cross"] if args.stage == "both" else [args.stage]
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = EmbeddingCache(work / "embeddings")
    dataset = _restrict(load_dataset(args.data), args.max_queries, args.corpus_limit)
    queries, qrels = dataset.split("dev")
    calibration = load_calibration(args.data)
    smoke = ", ".join(s for s in (args.max_queries and f"--max-queries {args.max_queries}",
                                  args.corpus_limit and f"--corpus-limit {args.corpus_limit}") if s)
    result = {"command": ["python", "benchmarks/scifact_backends.py", *sys.argv[1:]], "cpu": machine,
              "versions": versions(), "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "smoke": smoke or False,
              "settings": {"docs": args.docs, "pairs": args.pairs, "rounds": args.rounds, "depth": DEPTH,
                           "force": args.force, "calibration": calibration.record()},
              "stages": {}}

    def write() -> None:
        for stage, candidates in built.items():
            result["stages"][stage]["candidates"] = _public(candidates)
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "result.md").write_text(markdown(result))

    rng = random.Random(0)
    texts = [dataset.corpus[d].full_text() for d in rng.sample(sorted(dataset.corpus), min(args.docs,
                                                                                           len(dataset.corpus)))]
    built, top = {}, None
    for stage in stages:
        source = args.bi if stage == "bi" else args.cross
        print(f"== {KINDS[stage]} {source}: preparing {', '.join(names)}", flush=True)
        built[stage] = build_candidates(stage, source, names, work, calibration, args.force, cache)
        data = {"model": source, "fingerprint": resolve_model(source).fingerprint, "unit":
                "docs/s" if stage == "bi" else "pairs/s", "queries": len(queries), "corpus": len(dataset.corpus)}
        result["stages"][stage] = data
        timed = [queries[q] for q in sorted(queries)[:args.query_sample]]
        if stage == "bi":
            data["items"] = len(texts)
            data["per_query_what"] = "encoding one dev query"
            print(f"== timing: {len(texts)} documents; {len(timed)} single queries; × {args.rounds} rounds", flush=True)
            data["timing"] = timing(built[stage], lambda s, items: s.encode_documents(items, show_progress=False),
                                    lambda s, one: s.encode_queries([one]), {"batch": texts, "query": timed},
                                    args.rounds, query_warm_up=lambda s: s.warm_up_queries())
            print("== quality: dense retrieval on dev", flush=True)
            write()
            top = bi_quality(built[stage], dataset, queries, qrels, write, args.quality_min_speedup)
        else:
            if top is None:  # --stage cross: the float32 first stage's top 20 (its corpus embeddings cached)
                reference_bi = DenseRetriever(args.bi, cache=cache, show_progress=False)
                reference_bi.index(dataset.corpus)
                qids = list(queries)
                top = {q: [d for d, _ in r] for q, r in zip(qids, reference_bi.retrieve([queries[q] for q in qids],
                                                                                          DEPTH))}
            data["first_stage"] = args.bi
            data["first_stage_ndcg@10"] = round(compute_metrics(qrels, run_from_rankings(top))[0]["ndcg@10"], 4)
            pairs = [(queries[q], dataset.corpus[d].full_text()) for q in top for d in top[q]][:args.pairs]
            data["items"] = len(pairs)
            data["per_query_what"] = f"scoring one dev query's top-{DEPTH} pairs"
            per_request = [[(queries[q], dataset.corpus[d].full_text()) for d in top[q]] for q in sorted(queries)
                           [:args.query_sample] if q in top]
            print(f"== timing: {len(pairs)} pairs; {len(per_request)} single requests; × {args.rounds} rounds",
                  flush=True)
            data["timing"] = timing(built[stage], lambda s, items: s.score_pairs(items, per_query_work=False),
                                    lambda s, one: s.score_pairs(one, per_query_work=True),
                                    {"batch": pairs, "query": per_request}, args.rounds)
            data["first_pass"] = first_pass(built[stage], pairs, args.rounds)
            print("== quality: pure reranking on dev", flush=True)
            cross_quality(built[stage], dataset, queries, qrels, top, args.quality_min_speedup)
        data["recommended"] = recommend(built[stage])
        write()
    if args.load:
        recommended = {stage: result["stages"][stage].get("recommended", {}) for stage in built}
        result["load"] = load_test(dataset, args.bi, built, recommended, args.clients, args.seconds, cache,
                                   {"bi": args.bi, "cross": args.cross})
        write()
    write()
    print(markdown(result))
    print(f"written {out / 'result.json'} and {out / 'result.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
