"""Stage 3 of ``select``: which backend runs each chosen stage, for batch work and for per-query work.

Each backend × quantisation × dtype in ``SelectConfig.backends`` is a candidate for the chosen dense first stage and
for the chosen reranker. Every candidate is exported (calibrated on the user's texts, its equivalence checked on
held-out ones) and timed for both uses in interleaved rounds against PyTorch float32 measured in the same rounds
(:mod:`stagewise.selection.backend_timing`): batch work on a fixed sample of the corpus, per-query work one dev query (one
request's pairs) at a time. Each candidate faster than float32 in either use has its quality measured on a fixed
sample of dev queries (the first stage ranks a pool: float32's top ``POOL_DEPTH`` of each sampled query and its
judged documents; the reranker reorders the chosen first stage's top ``depth``, fused as the verdict fuses).

Per stage and use, the recommendation is the fastest candidate within ``backend_max_loss`` (relative nDCG@10) of
float32 on that sample; a timing that the machine's load disturbed recommends nothing. The recommended stage is
then confirmed on the whole dev split, and stays on float32 if it loses more there. None is assumed fastest: the
ranking flips between CPUs (bf16 and int8 need AMX / AVX-512 to pay).
"""

from __future__ import annotations

import random

import numpy as np

from stagewise.errors import StagewiseError
from stagewise.evaluation.metrics import compute_metrics, run_from_rankings
from stagewise.evaluation.runs import evaluate, evaluate_pipeline
from stagewise.models import per_query
from stagewise.models.backends import Backend, read_manifest, require_export
from stagewise.models.export import export_model, load_calibration
from stagewise.models.specs import has_transformer, resolve_model
from stagewise.models.warm_up import QUERY_TOKENS
from stagewise.progress import console
from stagewise.search.fusion import Fusion
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import DenseRetriever, build_first_stage
from stagewise.selection.backend_timing import ROUNDS, USES, batch_work, interleaved, query_work
from stagewise.selection.budget import QUERY_TEXT_SPEEDUP
from stagewise.timing import span

THROUGHPUT_SAMPLE = 64  # corpus documents (first stage) or (query, document) pairs (reranker) per batch round
QUERY_SAMPLE = 20  # dev queries per per-query round (× backend_timing.ROUNDS rounds: a stable p95)
QUALITY_SAMPLE = 50  # dev queries each candidate's quality is measured on; the chosen one then on all of dev
POOL_DEPTH = 30  # the first stage's sample pool: float32's top this many for each sampled query
TIE = 0.05  # speed-ups within this fraction of the fastest are a tie (noise, not a reason to export)


EXPORT_SECONDS = 5.0  # an export's fixed part (tracing, conversion, saving), whatever the model's size
EXPORT_ITEMS = 600  # documents (pairs) an export runs through the model at float32: calibration, equivalence check


def stage3_reserve(config, sizes, docs_per_second: float | None, corpus_docs_per_second: float | None,
                   pairs_per_second: float | None) -> tuple[float, float]:
    """Seconds of the time budget that stage 3 needs for the first stage and for the reranker, planned while stages
    1 and 2 plan theirs, from float32 rates
    measured on this machine (None: that stage has no model to run on another backend). Per stage: each exported
    candidate's export; every backend's timing rounds and its quality sample (float32's included); the whole-dev
    confirmation (the first stage encodes the corpus once more at most, its reference rankings being stage 1's
    cached ones; the reranker scores dev at the deepest depth once more, its reference being stage 2's)."""
    candidates = [b for b in (parse_backend(label) for label in config.backends) if not b.is_default]
    if not candidates:
        return 0.0, 0.0
    exports, backends = sum(b.exported for b in candidates), len(candidates) + 1
    first = reranker = 0.0
    if docs_per_second:
        timing = ((ROUNDS + 1) * THROUGHPUT_SAMPLE + ROUNDS * QUERY_SAMPLE / QUERY_TEXT_SPEEDUP  # + a warm-up round
                  + QUERY_TOKENS / QUERY_TEXT_SPEEDUP)  # its per-query warm-up: a query of every length
        first = (exports * (EXPORT_SECONDS + EXPORT_ITEMS / docs_per_second)
                 + backends * (_pool(sizes.corpus) + timing) / docs_per_second
                 + sizes.corpus / (corpus_docs_per_second or docs_per_second))
    if pairs_per_second:
        depth = max(sizes.depths)
        timing = (ROUNDS + 1) * THROUGHPUT_SAMPLE + ROUNDS * QUERY_SAMPLE * depth  # + a batch warm-up round
        reranker = (exports * (EXPORT_SECONDS + EXPORT_ITEMS / pairs_per_second)
                    + (backends * (QUALITY_SAMPLE * depth + timing) + sizes.dev_queries * depth) / pairs_per_second)
    return first, reranker


def _pool(corpus: int) -> float:
    """The expected size of the first stage's quality pool: the distinct documents among the sampled queries' top
    ``POOL_DEPTH``, as if drawn at random from the corpus (the default dataset: 936 expected, 934 measured)."""
    draws = QUALITY_SAMPLE * POOL_DEPTH
    return corpus * (1 - (1 - 1 / corpus) ** draws) if corpus else 0.0


def parse_backend(label: str) -> Backend:
    """``torch``, ``torch-bf16``, ``onnx``, ``onnx-int8``, ``openvino``, ``openvino-int8``, ``openvino-bf16``."""
    name, *rest = str(label).split("-")
    if any(r not in ("int8", "bf16") for r in rest):
        raise StagewiseError(f"field 'backends': '{label}' is not a backend label (e.g. torch, torch-bf16, onnx-int8, "
                             "openvino-int8)")
    try:
        backend = Backend(name, "int8" if "int8" in rest else "none", "bfloat16" if "bf16" in rest else "float32")
    except StagewiseError as e:  # the option's own words, said of the setting
        raise StagewiseError(f"field 'backends': '{label}': {str(e).split(': ', 1)[-1]}") from None
    if backend.label != label:
        raise StagewiseError(f"field 'backends': write '{backend.label}', not '{label}'")
    return backend


def _dense_config(config: dict) -> dict | None:
    """The dense stage inside a first-stage config (itself, or a hybrid's)."""
    if config.get("type") == "dense":
        return config
    return next((c for c in config.get("stages", []) if c.get("type") == "dense"), None)


def first_stage_on(config: dict, model: str, backend: Backend, per_query_setting: dict | None = None) -> dict:
    """A first-stage config whose dense stage runs ``model`` on ``backend`` (and its queries on
    ``per_query_setting``'s model and backend, when given)."""
    def swap(c: dict) -> dict:
        if c.get("type") == "dense":
            c = {k: v for k, v in c.items() if k != per_query.KEY}
            return {**c, "model": model, **backend.config(),
                    **({per_query.KEY: per_query_setting} if per_query_setting else {})}
        return {**c, "stages": [swap(s) for s in c.get("stages", [])]} if c.get("type") == "hybrid" else c
    return swap(config)


class BackendSelection:
    """Measures every backend candidate for the chosen stages; ``run()`` returns the stage's record."""

    def __init__(self, s, chosen: dict, verdict: dict, rerankers: list[dict]):
        self.s, self.chosen, self.verdict, self.rerankers = s, chosen, verdict, rerankers
        self.config = s.config
        self.candidates = [parse_backend(b) for b in self.config.backends]
        self._calibration = None
        self._rankings: dict | None = None

    def calibration(self):
        """The user's own texts: corpus documents and training queries (never the dev or test queries that
        measure the result)."""
        if self._calibration is None:
            self._calibration = load_calibration(self.config.data, seed=self.config.seed)
            train = set(self.s.dataset.split(self.config.train_split)[0].values())
            self._calibration.queries = [q for q in self._calibration.queries if q in train]
            held = self._calibration.held_out  # none where the data is too small to spare any
            if held is not None:
                held.queries = [q for q in held.queries if q in train]
        return self._calibration

    def _export(self, model: str, backend: Backend, stage: str) -> tuple[str, dict | None]:
        """The model folder for ``backend`` (exported once into the run folder) and its export manifest."""
        if not backend.exported:
            return model, None
        folder = self.s.run.path / "exports" / f"{stage}-{backend.name}-{backend.quantize}"
        manifest = read_manifest(folder)
        if manifest is None:
            manifest = export_model(model, Backend(backend.name, backend.quantize), folder, self.calibration())
        return str(folder), manifest

    def _reranker_record(self) -> dict | None:
        return next((r for r in self.rerankers if r["name"] == self.verdict.get("reranker")), None)

    def _load(self, stage: str, backend: Backend):
        """The stage on ``backend``: exported where it needs to be, loaded as a deployment would load it."""
        if stage == "first_stage":
            dense = _dense_config(self.chosen["config"])
            folder, manifest = self._export(dense["model"], backend, "first-stage")
            return DenseRetriever(folder, backend=backend, cache=self.s.cache, show_progress=False,
                                  max_seq_length=dense.get("max_seq_length")), folder, manifest
        r = self._reranker_record()
        folder, manifest = self._export(r["model_dir"], backend, "reranker")
        return CrossEncoderReranker(folder, max_length=r["max_length"], backend=backend), folder, manifest

    def _candidates(self, stage: str) -> tuple[list[dict], dict]:
        """A row per candidate (PyTorch float32 first: every ratio is against it) and the loaded stages."""
        rows, loaded = [], {}
        for backend in [Backend()] + [b for b in self.candidates if not b.is_default]:
            row = {"stage": stage, "backend": backend.label, "config": backend.config(), "status": "ok", "note": ""}
            rows.append(row)
            try:
                if backend.exported:
                    require_export(backend)
                with span("export", f"{stage}@{backend.label}", 1, "models"):
                    loaded[backend.label], row["model"], manifest = self._load(stage, backend)
                row["equivalence"] = (manifest or {}).get("equivalence")
            except StagewiseError as e:  # a missing runtime, or an export past the tolerance
                row.update(status="skipped" if "not installed" in str(e) else "refused", note=str(e))
            except RuntimeError as e:  # a runtime that fails on this CPU (say bf16 where it has no support)
                row.update(status="failed", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return rows, loaded

    # ---- what each use does, on data the user searches -------------------------------------------

    def _dev_sample(self, n: int) -> list[str]:
        """A fixed sample of dev query ids (seeded, the same for every candidate and every rerun)."""
        ids = sorted(self.s.dev_queries)
        return sorted(random.Random(self.config.seed).sample(ids, min(n, len(ids))))

    def _first_rankings(self) -> dict[str, list[tuple[str, float]]]:
        """The chosen first stage's rankings of every dev query, as stage 1 deployed it (float32)."""
        if self._rankings is None:
            first = build_first_stage(self.chosen["config"], self.s.cache)
            first.index(self.s.dataset.corpus)
            qids = list(self.s.dev_queries)
            k = max(100, self.verdict.get("depth") or 0)
            self._rankings = dict(zip(qids, first.retrieve([self.s.dev_queries[q] for q in qids], k)))
        return self._rankings

    def _pairs(self, qid: str) -> list[tuple[str, str]]:
        depth = self.verdict["depth"]
        return [(self.s.dev_queries[qid], self.s.dataset.corpus[d].full_text())
                for d, _ in self._first_rankings()[qid][:depth]]

    def _work(self, stage: str, obj, use: str):
        corpus = self.s.dataset.corpus
        timed = self._dev_sample(QUERY_SAMPLE)
        if stage == "first_stage":
            if use == "batch":
                ids = random.Random(self.config.seed).sample(sorted(corpus), min(THROUGHPUT_SAMPLE, len(corpus)))
                return batch_work(lambda texts: obj.encode_documents(texts, show_progress=False),
                                  [corpus[d].full_text() for d in ids])
            # warmed as a service warms it at load (every query length), so it is timed as that service answers
            return query_work(obj.encode_queries, [self.s.dev_queries[q] for q in timed], self.config.latency_metric,
                              warm_up=obj.warm_up_queries)
        if use == "batch":
            pairs = [p for q in sorted(self.s.dev_queries) for p in self._pairs(q)][:THROUGHPUT_SAMPLE]
            return batch_work(lambda items: obj.score_pairs(items, per_query_work=False), pairs)
        return query_work(lambda one: obj.score_pairs(one[0], per_query_work=True), [self._pairs(q) for q in timed],
                          self.config.latency_metric)

    # ---- quality ---------------------------------------------------------------------------------

    def _first_stage_ndcg(self, obj, qids: list[str], pool: list[str]) -> float:
        """nDCG@10 of the dense stage ranking ``pool`` for ``qids`` (documents encoded as batch work, queries as
        per-query work, as deployed)."""
        corpus = self.s.dataset.corpus
        docs = obj.encode_documents([corpus[d].full_text() for d in pool], show_progress=False)
        queries = obj.encode_queries([self.s.dev_queries[q] for q in qids])
        scores = np.asarray(obj.model.similarity(queries, docs), dtype=np.float64)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :100]
        return self._ndcg({q: [pool[j] for j in row] for q, row in zip(qids, order)}, qids)

    def _reranked_ndcg(self, obj, qids: list[str], per_query_work: bool) -> float:
        """nDCG@10 of the chosen first stage's top ``depth`` reordered by ``obj`` (fused as the verdict fuses)."""
        depth, fusion = self.verdict["depth"], Fusion.from_config(self.verdict.get("fusion"))
        pairs = {q: self._pairs(q) for q in qids}
        if per_query_work:
            scores = {q: obj.score_pairs(pairs[q], per_query_work=True) for q in qids}
        else:
            flat = obj.score_pairs([p for q in qids for p in pairs[q]], per_query_work=False).tolist()
            scores, i = {}, 0
            for q in qids:
                scores[q], i = flat[i:i + len(pairs[q])], i + len(pairs[q])
        rankings = {}
        for q in qids:
            ranked = self._first_rankings()[q]
            order, _ = fusion.order([s for _, s in ranked[:depth]], list(scores[q]))
            rankings[q] = [ranked[j][0] for j in order] + [d for d, _ in ranked[depth:]]
        return self._ndcg(rankings, qids)

    def _ndcg(self, rankings: dict, qids: list[str]) -> float:
        qrels = {q: self.s.dev_qrels[q] for q in qids if q in self.s.dev_qrels}
        return compute_metrics(qrels, run_from_rankings(rankings))[0]["ndcg@10"]

    def _quality(self, stage: str, rows: list[dict], loaded: dict) -> dict:
        """Each candidate faster than float32 in either use, and float32 itself, on the fixed dev sample."""
        qids = [q for q in self._dev_sample(QUALITY_SAMPLE) if q in self.s.dev_qrels]
        sample = {"queries": len(qids)}
        if stage == "first_stage":
            pool = list(dict.fromkeys([d for q in qids for d, _ in self._first_rankings()[q][:POOL_DEPTH]]
                                      + [d for q in qids for d in self.s.dev_qrels[q] if d in self.s.dataset.corpus]))
            sample["pool"] = len(pool)
            measure = lambda obj: self._first_stage_ndcg(obj, qids, pool)  # noqa: E731
            items = len(pool) + len(qids)
        else:
            measure = lambda obj: self._reranked_ndcg(obj, qids, per_query_work=False)  # noqa: E731
            items = len(qids) * self.verdict["depth"]
        reference = None
        for row in rows:
            faster = any((row.get(use) or {}).get("speedup", 0) > 1 + TIE for use in USES)
            if row["status"] != "ok" or not (row["backend"] == "torch" or faster):
                if row["status"] == "ok":
                    row["note"] = "not faster than PyTorch float32 here in either use: quality not measured"
                continue
            cost = items / max(row["batch"]["median"], 1e-9)
            if row["backend"] != "torch" and self.s.budget.remaining() < cost:
                row.update(status="skipped", note=f"its quality check takes about {cost / 60:.1f} min; "
                                                  f"{self.s.budget.remaining() / 60:.1f} min of the budget are left")
                continue
            with span("evaluate", f"{stage}@{row['backend']}: dev sample", len(qids), "queries"):
                row["ndcg@10"] = measure(loaded[row["backend"]])
            if reference is None:
                reference = row["ndcg@10"]
            row["relative_change"] = row["ndcg@10"] / max(reference, 1e-9) - 1
        return sample

    # ---- the choice ------------------------------------------------------------------------------

    def _recommend(self, rows: list[dict], use: str, disturbed: bool) -> dict | None:
        """The fastest for ``use`` within the allowed relative nDCG@10 loss. Speed-ups within ``TIE`` of the
        fastest are a tie, which goes to PyTorch float32 (no export), then to the smaller loss, then to speed. A
        disturbed timing recommends PyTorch float32 (nothing measured can be trusted to beat it)."""
        fitting = [r for r in rows if r["status"] == "ok" and r.get("relative_change") is not None
                   and r["relative_change"] >= -self.config.backend_max_loss and (r.get(use) or {}).get("speedup")]
        if not fitting:
            return None
        if disturbed:
            return next((r for r in fitting if r["backend"] == "torch"), None)
        fastest = max(r[use]["speedup"] for r in fitting)
        tied = [r for r in fitting if r[use]["speedup"] >= fastest * (1 - TIE)]
        return max(tied, key=lambda r: (r["backend"] == "torch", round(r["relative_change"], 4), r[use]["speedup"]))

    def _stage(self, stage: str) -> dict:
        rows, loaded = self._candidates(stage)
        timing = {}
        for use in USES:
            with span("probe", f"{stage}: {use} timing", len(loaded), "backends"):
                measured = interleaved({label: self._work(stage, obj, use) for label, obj in loaded.items()},
                                       "torch", use)
            timing[use] = {k: v for k, v in measured.items() if k != "candidates"}
            for row in rows:
                if row["backend"] in measured["errors"]:
                    row.update(status="failed", note=measured["errors"][row["backend"]])
                elif row["backend"] in measured["candidates"]:
                    row[use] = measured["candidates"][row["backend"]]
        sample = self._quality(stage, rows, loaded)
        chosen = {use: self._recommend(rows, use, timing[use]["disturbed"]) for use in USES}
        for row in rows:
            row["recommended"] = [use for use in USES if chosen[use] is row]
        return {"rows": rows, "timing": timing, "sample": sample, "chosen": chosen, "loaded": loaded}

    # ---- confirmation on the whole dev split -----------------------------------------------------

    def _confirm(self, stage: str, result: dict) -> dict | None:
        """The recommended stage (both uses, as deployed) on the whole dev split against float32's own number;
        None where float32 stays for both uses (nothing to confirm)."""
        chosen = result["chosen"]
        if all(c is None or c["backend"] == "torch" for c in chosen.values()):
            return None
        setting = deployed({"stages": {stage: result["rows"]}, "recommended": {stage: _labels(chosen)}}, stage)
        model, backend, query = setting
        metric = self.config.latency_metric
        with span("evaluate", f"{stage}: confirmation on dev", len(self.s.dev_queries), "queries"):
            if stage == "first_stage":
                first = build_first_stage(first_stage_on(self.chosen["config"], model, backend, query), self.s.cache)
                got = evaluate(self.s.dataset, self.config.dev_split, [first], k=max(100, *self.config.depths),
                               max_queries=self.config.max_dev_queries)[0]
                out = {"name": first.name, "ndcg@10": got.metrics["ndcg@10"], "latency": got.latency,
                       "reference_ndcg@10": self.chosen["metrics"]["ndcg@10"],
                       "latency_ms": got.latency["first_stage"][metric]}
            else:
                r = self._reranker_record()
                reranker = CrossEncoderReranker(model, max_length=r["max_length"], backend=backend,
                                                per_query_setting=query)
                first = build_first_stage(self.chosen["config"], self.s.cache)
                first.name = self.chosen["name"]
                pipeline = Pipeline(first, reranker, depth=self.verdict["depth"],
                                    fusion=Fusion.from_config(self.verdict.get("fusion"))).index(self.s.dataset.corpus)
                _, final, _ = evaluate_pipeline(self.s.dataset, self.config.dev_split, pipeline,
                                                self.config.max_dev_queries)
                reference = next(d for d in r["depths"] if d["name"] == self.verdict["name"])
                out = {"name": final.name, "ndcg@10": final.metrics["ndcg@10"], "latency": final.latency,
                       "reference_ndcg@10": reference["metrics"]["ndcg@10"],
                       "latency_ms": final.latency["total"][metric]}
                if query is not None:  # the batch backend is not what answers one query: check it on batches too
                    qids = [q for q in self.s.dev_queries if q in self.s.dev_qrels]
                    batch = self._reranked_ndcg(reranker, qids, per_query_work=False)
                    alone = self._reranked_ndcg(result["loaded"]["torch"], qids, per_query_work=False)
                    out["batch_relative_change"] = batch / max(alone, 1e-9) - 1
        out["relative_change"] = out["ndcg@10"] / max(out["reference_ndcg@10"], 1e-9) - 1
        worst = min(out["relative_change"], out.get("batch_relative_change", 0.0))
        out["confirmed"] = worst >= -self.config.backend_max_loss
        return out

    def run(self) -> dict:
        out: dict = {"stages": {}, "timing": {}, "samples": {}, "confirmation": {}, "recommended": {}, "summary": [],
                     "max_loss": self.config.backend_max_loss}
        if all(b.is_default for b in self.candidates):  # nothing to compare PyTorch float32 with
            return out
        dense = _dense_config(self.chosen["config"])
        work = []
        if dense is None:
            out["summary"].append("Backends: the chosen first stage has no model (BM25), so it has no backend.")
        elif not has_transformer(resolve_model(dense["model"]).path):
            out["summary"].append("Backends: the chosen first stage is a static embedding model: no transformer to "
                                  "run on another backend.")
        else:
            work.append("first_stage")
        if self._reranker_record() is not None:
            work.append("reranker")
        console.print(f"[bold]Stage 3[/]: backends {', '.join(b.label for b in self.candidates)} for "
                      + (" and ".join(stage.replace("_", " ") for stage in work) or "no stage"))
        for stage in work:
            stored = self.s.steps.get(f"backends-{stage}")
            if stored is None:
                result = self._stage(stage)
                confirmation = self._confirm(stage, result)
                if confirmation is not None and not confirmation["confirmed"]:
                    for row in result["rows"]:
                        row["recommended"] = ["batch", "query"] if row["backend"] == "torch" else []
                    result["chosen"] = {use: result["rows"][0] for use in USES}
                stored = self.s.steps.put(f"backends-{stage}", {
                    "rows": result["rows"], "timing": result["timing"], "sample": result["sample"],
                    "confirmation": confirmation, "recommended": _labels(result["chosen"])})
            out["stages"][stage], out["timing"][stage] = stored["rows"], stored["timing"]
            out["samples"][stage], out["recommended"][stage] = stored["sample"], stored["recommended"]
            if stored["confirmation"]:
                out["confirmation"][stage] = stored["confirmation"]
            _print(stage, stored)
            out["summary"].append(_summary(stage, stored, self.config.backend_max_loss))
        return out


def _labels(chosen: dict) -> dict:
    return {use: (row or {}).get("backend", "torch") for use, row in chosen.items()}


def _print(stage: str, stored: dict) -> None:
    for r in stored["rows"]:
        if r["status"] != "ok":
            text = f"{r['status']}: {r['note']}"
        else:
            b, q = r.get("batch") or {}, r.get("query") or {}
            text = (f"batch {b.get('speedup', 0):.2f}× ({b.get('median', 0):.1f}/s), per query "
                    f"{q.get('speedup', 0):.2f}× (p50 {q.get('p50_ms', 0):.1f} ms, p95 {q.get('p95_ms', 0):.1f} ms)"
                    + (f", sample nDCG@10 {r['ndcg@10']:.4f}" if "ndcg@10" in r else ""))
        console.print(f"  {stage.replace('_', ' ')} on {r['backend']}: {text}", highlight=False)


def _summary(stage: str, stored: dict, max_loss: float) -> str:
    what = stage.replace("_", " ").capitalize()
    rows = {r["backend"]: r for r in stored["rows"]}
    rec = stored["recommended"]
    disturbed = [use for use, t in stored["timing"].items() if t.get("disturbed")]
    parts = []
    for use, words in (("batch", "batch work"), ("query", "per-query work")):
        r = rows.get(rec.get(use))
        if r is None or r["backend"] == "torch":
            parts.append(f"{words} stays on PyTorch float32")
        else:
            parts.append(f"{words} on {r['backend']} ({r[use]['speedup']:.2f}× float32, nDCG@10 "
                         f"{r['relative_change']:+.1%} on the dev sample)")
    line = f"{what}: {'; '.join(parts)}; the fastest within a {max_loss:.0%} loss on this machine."
    if disturbed:
        line += (f" The {' and '.join(disturbed)} timing was disturbed by other load on the machine (PyTorch float32's "
                 "own rounds disagreed, also when repeated): not acted on; run it again on a quiet machine.")
    c = stored.get("confirmation")
    if c:
        line += (f" On the whole dev split: nDCG@10 {c['ndcg@10']:.4f} against float32's {c['reference_ndcg@10']:.4f} "
                 f"({c['relative_change']:+.2%})" + ("." if c["confirmed"] else
                                                     f", past the {max_loss:.0%} loss: it stays on PyTorch float32."))
    return line


def deployed(backends: dict, stage: str) -> tuple[str, Backend, dict | None] | None:
    """The model folder and backend ``select`` recommends for ``stage``'s batch work, and the per-query setting
    where per-query work runs on another; None where PyTorch float32 stays for both."""
    rows = {r["backend"]: r for r in backends.get("stages", {}).get(stage, [])}
    chosen = backends.get("recommended", {}).get(stage) or {}
    batch, query = rows.get(chosen.get("batch")), rows.get(chosen.get("query"))
    if batch is None or query is None or batch["backend"] == query["backend"] == "torch":
        return None
    setting = None if query is batch else {"model": query["model"], **query["config"]}
    return batch["model"], Backend.from_config(batch["config"]), setting
