"""Stage 3 of ``select``: which backend runs each chosen stage, measured on this machine and the user's dev split.

Each backend × quantisation × dtype in ``SelectConfig.backends`` is a candidate for the chosen dense first stage and
for the chosen reranker: exported (calibrated on the user's own texts, equivalence checked), then measured for dev
nDCG@10, latency per query and throughput on a fixed sample of the corpus. The recommendation is the fastest
candidate whose nDCG@10 is within ``backend_max_loss`` (relative) of PyTorch float32's; none is assumed fastest, as
the ranking flips between CPUs (bf16 and int8 need AMX / AVX-512 to pay).
"""

from __future__ import annotations

import time

from stagewise.backends import Backend, read_manifest, require_export
from stagewise.errors import StagewiseError
from stagewise.evaluation import evaluate, evaluate_pipeline
from stagewise.export import export_model, load_calibration
from stagewise.fusion import Fusion
from stagewise.models import has_transformer, resolve_model
from stagewise.pipeline import Pipeline
from stagewise.progress import console
from stagewise.rerankers import CrossEncoderReranker
from stagewise.retrievers import build_first_stage
from stagewise.timing import span

THROUGHPUT_SAMPLE = 64  # corpus documents (first stage) or (query, document) pairs (reranker) timed per candidate
THROUGHPUT_REPEATS = 3  # the best of these, so a burst from another process does not decide
LATENCY_TIE = 0.05  # latencies within this fraction of the fastest are a tie (noise, not a reason to export)


SECONDS_PER_CANDIDATE = 30.0  # what stages 1 and 2 leave of a time budget for each backend candidate: an export
# and a timing (a float32 export of MiniLM takes about 10 s here, NNCF's int8 about 45 s)


def stage3_reserve(config) -> float:
    """Seconds of the time budget that stage 3 needs, set aside while stages 1 and 2 plan theirs."""
    return SECONDS_PER_CANDIDATE * sum(not parse_backend(b).is_default for b in config.backends)


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


def _best_rate(fn, items: list, what: str) -> float:
    with span("probe", f"{what}: throughput", 1, "probes"):
        fn(items[:2])  # warm-up: first calls allocate and compile
        best = 0.0
        for _ in range(THROUGHPUT_REPEATS):
            start = time.perf_counter()
            fn(items)
            best = max(best, len(items) / max(time.perf_counter() - start, 1e-9))
        return best


def _dense_config(config: dict) -> dict | None:
    """The dense stage inside a first-stage config (itself, or a hybrid's)."""
    if config.get("type") == "dense":
        return config
    return next((c for c in config.get("stages", []) if c.get("type") == "dense"), None)


def first_stage_on(config: dict, model: str, backend: Backend) -> dict:
    """A first-stage config whose dense stage runs ``model`` on ``backend``."""
    def swap(c: dict) -> dict:
        if c.get("type") == "dense":
            return {**c, "model": model, **backend.config()}
        return {**c, "stages": [swap(s) for s in c.get("stages", [])]} if c.get("type") == "hybrid" else c
    return swap(config)


class BackendSelection:
    """Measures every backend candidate for the chosen stages; ``run()`` returns the stage's record."""

    def __init__(self, s, chosen: dict, verdict: dict, rerankers: list[dict]):
        self.s, self.chosen, self.verdict, self.rerankers = s, chosen, verdict, rerankers
        self.config = s.config
        self.candidates = [parse_backend(b) for b in self.config.backends]
        self._calibration = None

    def calibration(self):
        """The user's own texts: corpus documents and training queries (never the dev or test queries that
        measure the result)."""
        if self._calibration is None:
            self._calibration = load_calibration(self.config.data, seed=self.config.seed)
            train = set(self.s.dataset.split(self.config.train_split)[0].values())
            self._calibration.queries = [q for q in self._calibration.queries if q in train]
        return self._calibration

    def _missing(self, backend: Backend) -> str | None:
        if not backend.exported:
            return None
        try:
            require_export(backend)
        except StagewiseError as e:
            return str(e)
        return None

    def _export(self, model: str, backend: Backend, stage: str) -> tuple[str, dict | None]:
        """The model folder for ``backend`` (exported once into the run folder) and its export manifest."""
        if not backend.exported:
            return model, None
        folder = self.s.run.path / "exports" / f"{stage}-{backend.name}-{backend.quantize}"
        manifest = read_manifest(folder)
        if manifest is None:
            manifest = export_model(model, Backend(backend.name, backend.quantize), folder, self.calibration())
        return str(folder), manifest

    def _row(self, backend: Backend, stage: str, reference: dict | None) -> dict:
        """Export, time on the sample, and (when faster than PyTorch float32 and within the time budget) measure
        dev quality and latency."""
        step = f"backend-{stage}-{backend.label}"
        stored = self.s.steps.get(step)
        if stored:
            return stored
        row = {"stage": stage, "backend": backend.label, "config": backend.config(), "status": "ok", "note": ""}
        missing = self._missing(backend)
        if missing:
            return {**row, "status": "skipped", "note": missing}  # not stored: installing the extra makes it run
        try:
            built, rate, manifest = self._build(stage, backend)
            row.update(rate=rate, unit="docs/s" if stage == "first_stage" else "pairs/s",
                       equivalence=(manifest or {}).get("equivalence"), model=built["model"])
            if reference and reference.get("rate"):
                row["speedup"] = rate / max(reference["rate"], 1e-9)
            cost = 0.0 if backend.is_default else self._quality_cost(stage, rate)
            if row.get("speedup", 1.0) < 1:
                row.update(status="slower", note=f"{row['speedup']:.2f}× PyTorch float32's throughput on this "
                                                  "machine: not measured further")
            elif self.s.budget.remaining() < cost:
                row.update(status="skipped", note=f"measuring it on dev takes about {cost / 60:.1f} min; "
                                                  f"{self.s.budget.remaining() / 60:.1f} min of the budget are left")
                return row  # not stored: a resumed run with more time measures it
            else:
                row.update(self._measured(stage) if backend.is_default else self._quality(stage, built))
                if reference and "ndcg@10" in reference:
                    row["relative_change"] = row["ndcg@10"] / max(reference["ndcg@10"], 1e-9) - 1
        except StagewiseError as e:  # an export past the tolerance …
            row.update(status="refused", note=str(e))
        except RuntimeError as e:  # a runtime that fails on this CPU (say bf16 where it has no support)
            row.update(status="failed", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        ok = row["status"] == "ok"
        console.print(f"  {stage.replace('_', ' ')} on {backend.label}: " + (
            f"dev nDCG@10 {row['ndcg@10']:.4f}, {row['rate']:.1f} {row['unit']}, {self.config.latency_metric[:3]} "
            f"{row['latency_ms']:.0f} ms" if ok else f"{row['status']}: {row['note']}"), highlight=False)
        return self.s.steps.put(step, row)

    def _quality_cost(self, stage: str, rate: float) -> float:
        """Seconds to measure a candidate on dev: encode the corpus, or score every dev query's candidates."""
        if stage == "first_stage":
            return (len(self.s.dataset.corpus) + len(self.s.dev_queries)) / rate
        return len(self.s.dev_queries) * self.verdict["depth"] / rate

    def _build(self, stage: str, backend: Backend) -> tuple[dict, float, dict | None]:
        """The stage on ``backend`` and its throughput on a fixed sample of the corpus."""
        texts = [d.full_text() for d in list(self.s.dataset.corpus.values())[:THROUGHPUT_SAMPLE]]
        if stage == "first_stage":
            folder, manifest = self._export(_dense_config(self.chosen["config"])["model"], backend, "first-stage")
            first = build_first_stage(first_stage_on(self.chosen["config"], folder, backend), self.s.cache)
            first.name = f"{self.chosen['name']}@{backend.label}"
            retriever = first if hasattr(first, "encode_documents") else next(
                x for x in first.stages if hasattr(x, "encode_documents"))
            rate = _best_rate(lambda t: retriever.encode_documents(t, show_progress=False), texts, first.name)
            return {"model": folder, "first_stage": first}, rate, manifest
        r = self._reranker_record()
        folder, manifest = self._export(r["model_dir"], backend, "reranker")
        reranker = CrossEncoderReranker(folder, max_length=r["max_length"], backend=backend)
        reranker.name = f"{r['name']}@{backend.label}"
        query = next(iter(self.s.dev_queries.values()))
        rate = _best_rate(reranker.score_pairs, [(query, t) for t in texts], reranker.name)
        return {"model": folder, "reranker": reranker}, rate, manifest

    def _quality(self, stage: str, built: dict) -> dict:
        """Dev nDCG@10 and latency per query: the first stage alone, or the chosen pipeline with this reranker."""
        metric = self.config.latency_metric
        if stage == "first_stage":
            first = built["first_stage"]
            result = evaluate(self.s.dataset, self.config.dev_split, [first], k=max(100, *self.config.depths),
                              max_queries=self.config.max_dev_queries)[0]
            return {"name": first.name, "ndcg@10": result.metrics["ndcg@10"], "latency": result.latency,
                    "latency_ms": result.latency["first_stage"][metric]}
        first = build_first_stage(self.chosen["config"], self.s.cache)
        first.name = self.chosen["name"]
        pipeline = Pipeline(first, built["reranker"], depth=self.verdict["depth"],
                            fusion=Fusion.from_config(self.verdict.get("fusion"))).index(self.s.dataset.corpus)
        _, final, _ = evaluate_pipeline(self.s.dataset, self.config.dev_split, pipeline, self.config.max_dev_queries)
        return {"name": final.name, "ndcg@10": final.metrics["ndcg@10"], "latency": final.latency,
                "latency_ms": final.latency["total"][metric]}

    def _measured(self, stage: str) -> dict:
        """PyTorch float32's dev quality and latency, as stages 1 and 2 already measured them."""
        metric = self.config.latency_metric
        if stage == "first_stage":
            return {"name": self.chosen["name"], "ndcg@10": self.chosen["metrics"]["ndcg@10"],
                    "latency": self.chosen["latency"], "latency_ms": self.chosen["latency"]["first_stage"][metric]}
        row = next(d for d in self._reranker_record()["depths"] if d["name"] == self.verdict["name"])
        return {"name": row["name"], "ndcg@10": row["metrics"]["ndcg@10"], "latency": row["latency"],
                "latency_ms": row["latency"]["total"][metric]}

    def _reranker_record(self) -> dict | None:
        return next((r for r in self.rerankers if r["name"] == self.verdict.get("reranker")), None)

    # ---- the stage -----------------------------------------------------------------------------

    def _stage_rows(self, stage: str) -> list[dict]:
        """PyTorch float32 first (every ratio is against it, measured in this process), then the others."""
        reference = self._row(Backend(), stage, None)
        rows = [reference] + [self._row(b, stage, reference) for b in self.candidates if not b.is_default]
        if reference["status"] == "ok":
            reference.update(speedup=1.0, relative_change=0.0)
        return rows

    def _recommend(self, rows: list[dict]) -> dict | None:
        """The fastest by the latency metric within the allowed relative nDCG@10 loss. Candidates within
        ``LATENCY_TIE`` of the fastest are a tie, which goes to PyTorch float32 (no export), then to the smaller
        loss (a float32 export before an int8 one), then to the higher throughput."""
        fitting = [r for r in rows if r["status"] == "ok" and "relative_change" in r
                   and r["relative_change"] >= -self.config.backend_max_loss]
        if not fitting:
            return None
        fastest = min(r["latency_ms"] for r in fitting)
        tied = [r for r in fitting if r["latency_ms"] * (1 - LATENCY_TIE) <= fastest]
        return max(tied, key=lambda r: (r["backend"] == "torch", round(r.get("relative_change", 0.0), 4), r["rate"]))

    def run(self) -> dict:
        out: dict = {"stages": {}, "recommended": {}, "summary": [], "max_loss": self.config.backend_max_loss}
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
            rows = self._stage_rows(stage)
            best = self._recommend(rows)
            out["stages"][stage] = rows
            out["recommended"][stage] = best["backend"] if best else None
            if best:
                for r in rows:
                    r["recommended"] = r is best
                out["summary"].append(_summary(stage, best, rows, self.config.backend_max_loss))
        return out


def _summary(stage: str, best: dict, rows: list[dict], max_loss: float) -> str:
    what = stage.replace("_", " ").capitalize()
    slower = [f"{r['backend']} {r['speedup']:.2f}×" for r in rows if r.get("speedup", 1) < 1]
    if best["backend"] == "torch":
        line = f"{what}: stays on PyTorch float32; no other backend was clearly faster within a {max_loss:.0%} loss here."
    else:
        line = (f"{what}: run it on {best['backend']} ({best['speedup']:.2f}× PyTorch float32's throughput, "
                f"nDCG@10 {best['relative_change']:+.1%} relative; the fastest within a {max_loss:.0%} loss on "
                "this machine).")
    if slower:
        line += f" Slower than PyTorch float32 here: {', '.join(slower)}."
    return line


def deployed(backends: dict, stage: str) -> tuple[str, Backend] | None:
    """The model folder and backend ``select`` recommends for ``stage``; None where PyTorch float32 stays."""
    best = next((r for r in backends.get("stages", {}).get(stage, []) if r.get("recommended")), None)
    if best is None or best["backend"] == "torch":
        return None
    return best["model"], Backend.from_config(best["config"])
