"""Model selection, stage by stage, measured on the user's data: the product's answer to "which pipeline?".

1. **First stage.** BM25 and each candidate bi-encoder zero-shot on dev; the most promising bi-encoders
   fine-tuned and measured again; BM25 fused with the best dense stage. Quality (nDCG@10, MRR@10, Recall at
   every rerank depth) and cost (latency per query, encoding throughput, index memory). The best one within
   the latency budget is chosen: on its own it is already a complete, deployable answer.
2. **Second stage, on top of the chosen first stage.** Each cross-encoder base and initialisation strategy
   (a different base, the bi-encoder's own base, the fine-tuned bi-encoder's weights) is fine-tuned on
   negatives mined from that first stage and evaluated at every rerank depth, with latency measured.
3. **Verdict.** The pipeline with the best dev nDCG@10 within the latency budget, each reranker at each depth
   either reranking alone or fused with the first stage (``fusion``); a second stage only when its gain is large
   enough and significant (paired test), explained in numbers.
4. **Confirmation** (``test_split``, optional). The chosen pipeline and its first stage alone, once, on a split
   that took no part in the choice: the dev gain is optimistic (the choice and the fusion weight were made on
   it); this one is not. It is reported, never used to choose.

Everything lands in a run directory: each finished step in ``steps/`` (so ``resume`` never redoes one), each
training run in ``train/``, the report (HTML, Markdown, JSON) and ``pipeline.yaml``. A wall-clock budget is
shared out between the expensive steps by their measured cost; what does not fit is shortened or skipped,
and the report says which and why.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from stagewise.cache import EmbeddingCache
from stagewise.data.loaders import RetrievalDataset, load_dataset
from stagewise.errors import StagewiseError
from stagewise.evaluation.runs import SystemResult, compare, evaluate, evaluate_depths, split_queries
from stagewise.models import batch_precision
from stagewise.models.specs import check_cross_encoder, display_name, has_transformer, model_kind, resolve_model
from stagewise.progress import console, warnings_on_console
from stagewise.rundir import RunDir, seed_everything
from stagewise.search.pipeline import Pipeline
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import build_first_stage
from stagewise.selection.backend_stage import BackendSelection
from stagewise.selection.budget import Allotment, TimeBudget
from stagewise.selection.config import SelectConfig
from stagewise.selection.outcome import assemble, backend_systems, chosen_pipeline, confirm
from stagewise.selection.plan import SHARED, SelectionPlan
from stagewise.selection.verdict import pareto_front
from stagewise.timing import recording, step
from stagewise.training.bi import train_bi
from stagewise.training.config import MIN_EXAMPLES, BiTrainConfig, CrossTrainConfig
from stagewise.training.cross import train_cross

logger = logging.getLogger(__name__)

def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------------------------
# Steps: each finished one is stored, so a resumed selection never redoes it
# --------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")


class Steps:
    """Finished steps under ``steps/``, and the time spent on them over every session (``steps/_spent.json``)."""

    def __init__(self, run: RunDir):
        self.run = run
        self.before = self.spent()

    def get(self, name: str) -> dict | None:
        path = self.run.path / "steps" / f"{_slug(name)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, name: str, record: dict) -> dict:
        """Store a finished step; return it as a resumed run will read it back (JSON types), so both runs agree."""
        path = self.run.write_json(f"steps/{_slug(name)}.json", record)
        self.save_spent(self.before + self.run.wall_seconds)
        return json.loads(path.read_text())

    def save_spent(self, seconds: float) -> float:
        self.run.write_json("steps/_spent.json", {"seconds": seconds})
        return seconds

    def spent(self) -> float:
        path = self.run.path / "steps" / "_spent.json"
        return json.loads(path.read_text())["seconds"] if path.is_file() else 0.0


def _result_record(result: SystemResult) -> dict:
    return {**result.summary(), "per_query": result.per_query, "rankings": result.rankings, "scores": result.scores}


def _as_result(record: dict) -> SystemResult:
    keep = {f.name for f in fields(SystemResult)}
    return SystemResult(**{k: v for k, v in record.items() if k in keep})


# --------------------------------------------------------------------------------------------
# The selection
# --------------------------------------------------------------------------------------------


class Selection:
    """One run of the staged strategy. ``select()`` is the entry point; this holds the shared state."""

    def __init__(self, config: SelectConfig, run: RunDir, dataset: RetrievalDataset):
        self.config, self.run, self.dataset = config, run, dataset
        self.steps = Steps(run)
        self.budget = TimeBudget(config.time_budget_min, spent=self.steps.spent())
        self.cache = EmbeddingCache()
        self.shared: dict = {}  # first stages by spec: one model load per model
        self.skipped: list[dict] = []
        self.estimates: list[dict] = []  # each planned step: its estimate, its share, what it then cost
        self.plan = SelectionPlan(self)
        self.dev_queries, self.dev_qrels = split_queries(dataset, config.dev_split, config.max_dev_queries)
        self.train_queries = len(dataset.split(config.train_split)[1])

    # ---- stage 1 --------------------------------------------------------------------------

    def first_stage(self, spec: str, name: str, kind: str, **extra) -> dict:
        """Evaluate one first stage on dev (or reuse the stored step): quality, latency, throughput, memory."""
        stored = self.steps.get(f"first-{name}")
        if stored:
            return stored
        with step(f"stage 1 / {name}"):
            return self._first_stage(spec, name, kind, **extra)

    def _first_stage(self, spec: str, name: str, kind: str, **extra) -> dict:
        stage = self._stage(spec, name)
        result = evaluate(self.dataset, self.config.dev_split, [stage], k=max(100, *self.config.depths),
                          max_queries=self.config.max_dev_queries, recall_cutoffs=self.config.depths)[0]
        record = {**_result_record(result), "name": name, "spec": spec, "kind": kind, "config": stage.config(),
                  "status": "ok", "note": "", "docs_per_second": result.encoding.get("docs_per_second"),
                  "index_bytes": stage.index_bytes(), "fine_tuned": False, "train_seconds": None, **extra}
        console.print(f"  {name}: dev nDCG@10 {result.metrics['ndcg@10']:.4f}, "
                      f"p50 {result.latency['first_stage']['p50_ms']:.1f} ms/query", highlight=False)
        return self.steps.put(f"first-{name}", record)

    def _stage(self, spec: str, name: str):
        stage = build_first_stage(spec, self.cache, self.shared)
        stage.name = name
        return stage

    def finetune_bi(self, zero_shot: dict) -> dict | None:
        base, name = zero_shot["spec"], f"{zero_shot['name']} fine-tuned"
        stored = self.steps.get(f"first-{name}")
        if stored:
            self.plan.done(name)
            return stored
        training = BiTrainConfig(**{**self.config.bi_training, "model": base, "data": self.config.data,
                                    "train_split": self.config.train_split, "dev_split": self.config.dev_split,
                                    "seed": self.config.seed, "compare_base": False})  # select measures both itself
        allotment = self.plan.allot(name)
        if allotment is not None and not allotment.runs:
            self._skip(name, self.plan.needed(allotment))
            self.plan.done(name)
            return None
        share, level = (None, None) if allotment is None else (allotment.share, allotment.level)
        if share is not None:  # training stops at the share less what comes around it (mining, evaluations)
            training.max_seconds = max(1.0, share - level.parts["around_s"])
            training.bf16 = level.settings["bf16"]
        run_dir = self.run.path / "train" / f"bi-{_slug(zero_shot['name'])}"
        console.print(f"  fine-tuning {zero_shot['name']}" + ("" if share is None else
                      f" (estimated {_minutes(level.seconds)}, at most {_minutes(share)})"), highlight=False)
        started = time.perf_counter()
        with step(f"stage 1 / {name}"):
            trained = _train(train_bi, training, run_dir)
        note = ""
        if trained["train"].get("stopped_at_time_limit"):
            note = (f"stopped after {trained['train']['steps']} of {trained['train']['max_steps']} steps at its "
                    "share of the time budget")
        record = self.first_stage(str(run_dir / "model"), name, "dense", fine_tuned=True, base=base,
                                  bi_run=str(run_dir), train_seconds=round(time.perf_counter() - started, 1))
        record.update(status="shortened" if note else "ok", note=note)
        if level is not None:
            self._estimated(name, level.seconds, share, started)
        self.plan.done(name)
        return self.steps.put(f"first-{name}", record)

    def _estimated(self, name: str, estimate: float, share: float | None, started: float) -> None:
        """Keep a step's estimate beside what it cost, so a wrong estimator shows in the run."""
        actual = time.perf_counter() - started
        self.estimates.append({"step": name, "estimated_s": round(estimate, 1),
                               "share_s": None if share is None else round(share, 1), "actual_s": round(actual, 1),
                               "actual_over_estimate": round(actual / estimate, 2) if estimate > 0 else None})

    def choose_first_stage(self, candidates: list[dict]) -> tuple[dict, str]:
        budget, metric = self.config.latency_budget_ms, self.config.latency_metric
        for c in candidates:
            c["within_budget"] = budget is None or c["latency"]["first_stage"][metric] <= budget
        fitting = [c for c in candidates if c["within_budget"]]
        if not fitting:
            fastest = min(candidates, key=lambda c: c["latency"]["first_stage"][metric])
            return fastest, (f"no first stage meets the {budget:g} ms {metric[:3]} latency budget; "
                             f"{fastest['name']} is the fastest")
        best = max(fitting, key=lambda c: (round(c["metrics"]["ndcg@10"], 4), -c["latency"]["first_stage"][metric]))
        within = f" within the {budget:g} ms {metric[:3]} latency budget" if budget is not None else ""
        return best, f"highest dev nDCG@10 ({best['metrics']['ndcg@10']:.3f}) among first stages{within}"

    # ---- stage 2 --------------------------------------------------------------------------

    def expected_rerankers(self, first_stages: list[dict], promising: list[dict]) -> list[dict]:
        """The cross-encoder starts stage 2 will try if the best zero-shot bi-encoder's line is chosen (what the plan
        reserves time for before stage 1 runs; it is made again once the first stage is chosen)."""
        dense = [c for c in first_stages if c["kind"] == "dense"]
        likely = max(dense or first_stages, key=lambda c: c["metrics"]["ndcg@10"], default=None)
        if likely is None:
            return []
        tuned = {z["spec"]: {"spec": z["spec"], "name": f"{z['name']} fine-tuned"} for z in promising}
        return self.reranker_candidates(likely, tuned)

    def reranker_candidates(self, chosen: dict, fine_tuned: dict[str, dict]) -> list[dict]:
        """Each cross-encoder start to try on the chosen first stage, or the reason it cannot be tried."""
        dense = chosen if chosen["kind"] == "dense" else chosen.get("dense")
        bi_base = dense.get("base", dense["spec"]) if dense else None
        bi_tuned = dense if dense and dense.get("fine_tuned") else fine_tuned.get(bi_base or "")
        wanted = []
        for strategy in self.config.init_strategies:
            if strategy == "base":
                wanted += [("same-as-bi" if base == bi_base else "base", base) for base in self.config.cross_encoders]
            elif strategy == "same-as-bi":
                wanted.append((strategy, bi_base))
            else:
                wanted.append((strategy, bi_tuned["spec"] if bi_tuned else None))
        out, seen = [], set()
        for strategy, model in wanted:
            if (strategy, model) in seen:
                continue
            seen.add((strategy, model))
            if strategy == "from-finetuned-bi":
                cand = {"name": f"cross from {bi_tuned['name']}" if bi_tuned else "cross from the fine-tuned bi-encoder",
                        "label": "initialised from the fine-tuned bi-encoder"}
            elif model is None:
                cand = {"name": "cross from the bi-encoder's base", "label": "same base as the bi-encoder"}
            else:
                cand = {"name": f"cross {display_name(model)}", "label": f"same base as the bi-encoder "
                        f"({display_name(model)})" if strategy == "same-as-bi" else f"a different base ({display_name(model)})"}
            cand.update(init=strategy, model=model, bi_base=bi_base)
            if strategy != "base" and bi_base is None:
                cand["skip"] = "the chosen first stage has no bi-encoder"
            elif model is None:
                cand["skip"] = "no fine-tuned bi-encoder (fine-tuning was skipped)"
            elif not has_transformer(resolve_model(model).path):
                cand["skip"] = f"{model} has no transformer to read query and document together"
            out.append(cand)
        return out

    def rerankers(self, chosen: dict, first_result: SystemResult, candidates: list[dict]) -> list[dict]:
        with step("plan"):
            self.plan.restage(candidates)
        records = []
        shared = sum(c["init"] != "base" and "skip" not in c and not self.steps.get(f"rerank-{c['name']}")
                     for c in candidates)  # the shared starts still to run share what is left of their step
        for cand in candidates:
            if "skip" in cand:
                self._skip(cand["name"], cand["skip"])
                records.append({**cand, "status": "skipped", "note": cand.pop("skip"), "depths": [], "health": None,
                                "train_seconds": None})
                continue
            step_name = SHARED if cand["init"] != "base" else cand["name"]
            stored = self.steps.get(f"rerank-{cand['name']}")
            if stored:
                records.append(stored)
            else:
                training = self.plan.recipe(cand["bi_base"] if cand["init"] != "base" else cand["model"],
                                            model=cand["model"], init="base", data=self.config.data,
                                            train_split=self.config.train_split, dev_split=self.config.dev_split,
                                            first_stage=chosen["spec"], seed=self.config.seed)
                if self.config.cross_training.get("pretrain_queries", 0) and not training.pretrain_queries:
                    cand = {**cand, "pretrain_note": "no pre-training: the corpus gives fewer than "
                            f"{MIN_EXAMPLES} pseudo-queries"}
                with step(f"stage 2 / {cand['name']}"):
                    records.append(self.reranker(cand, training, chosen, first_result,
                                                 self.plan.allot(step_name, shared)))
                shared -= step_name == SHARED
            if step_name != SHARED:
                self.plan.done(step_name)
        self.plan.done(SHARED)
        return records

    def reranker(self, cand: dict, training: CrossTrainConfig, chosen: dict, first_result: SystemResult,
                 allotment: Allotment | None) -> dict:
        record = {**cand, "status": "ok", "note": "", "depths": [], "health": None, "train_seconds": None}
        depths = list(self.config.depths)
        if allotment is not None:
            if not allotment.runs:  # not stored: a resumed selection with more time tries it again
                reason = self.plan.needed(allotment)
                self._skip(cand["name"], reason)
                return {**record, "status": "skipped", "note": reason, "estimated_seconds": round(
                    allotment.step.minimum, 1)}
            training, depths = self._fit(training, allotment)
            record.update(estimated_seconds=round(allotment.level.seconds, 1), cuts=allotment.level.cuts,
                          shared_recipe=cand["init"] != "base")
        share = None if allotment is None else allotment.share
        console.print(f"  training {cand['name']} ({cand['label']}" + ("" if share is None else
                      f"; estimated {_minutes(allotment.level.seconds)}, at most {_minutes(share)}") + ")"
                      + ("" if not record.get("cuts") else f": {'; '.join(record['cuts'])}"), highlight=False)
        notes = list(record.get("cuts") or [])  # what the time budget cut: the recipe, then the run itself
        run_dir = self.run.path / "train" / _slug(cand["name"])
        started = time.perf_counter()
        trained = _train(train_cross, training, run_dir)
        record.update(train_seconds=round(time.perf_counter() - started, 1), run=str(run_dir),
                      model_dir=trained["model"], max_length=training.max_length, init_warning=trained.get("init_warning"),
                      health=(trained.get("dev") or {}).get("health"),
                      max_length_fit=self.plan.lengths.get(cand["bi_base"] if cand["init"] != "base" else cand["model"]))
        pretrain = trained.get("pretrain") or {}
        record["pretrain"] = {k: pretrain.get(k) for k in ("queries", "kinds", "examples", "seconds", "steps", "skipped")
                              } if pretrain else None
        if "pretrain_note" in record:
            record["pretrain"] = {"skipped": record.pop("pretrain_note")}
        if pretrain.get("stopped_at_time_limit"):
            notes.append(f"pre-training stopped after {pretrain['steps']} of {pretrain['max_steps']} steps at its "
                         "share of the time budget")
        if trained["train"].get("stopped_at_time_limit"):
            notes.append(f"training stopped after {trained['train']['steps']} of {trained['train']['max_steps']} "
                         "steps at its share of the time budget")
        if share is not None:
            affordable = self._affordable_depths(depths, allotment.level.parts["evaluate_s"], share, started)
            if len(affordable) < len(depths):
                notes.append(f"depths {sorted(set(depths) - set(affordable))} not evaluated: they did not fit the "
                             "time left")
                depths = affordable
        reranker = CrossEncoderReranker(trained["model"], max_length=training.max_length)
        reranker.name = cand["name"]
        pipeline = Pipeline(self._stage(chosen["spec"], chosen["name"]), reranker).index(self.dataset.corpus)
        results = evaluate_depths(self.dataset, self.config.dev_split, first_result, pipeline, depths,
                                  self.config.latency_queries, self.config.max_dev_queries, self.config.fusion)
        record["depths"] = [self._depth_record(first_result, r) for r in results]
        record.update(status="shortened" if notes else "ok", note="; ".join(notes))
        if allotment is not None:
            self._estimated(cand["name"], allotment.level.seconds, share, started)
        return self.steps.put(f"rerank-{cand['name']}", record)

    def _fit(self, training: CrossTrainConfig, allotment: Allotment) -> tuple[CrossTrainConfig, list[int]]:
        """The recipe of the allotted level, each phase held to its part of the share (so that a low estimate
        cannot run over), and the depths it evaluates."""
        level, share = allotment.level, allotment.share
        training = replace(training, **{k: v for k, v in level.settings.items() if k != "depths"})
        if training.pretrain_queries and level.parts["pretrain_s"]:
            training.pretrain_max_seconds = max(1.0, share * level.parts["pretrain_s"] / level.seconds)
        training.max_seconds = max(1.0, share * level.parts["train_s"] / level.seconds)
        return training, list(level.settings.get("depths", self.config.depths))

    def _affordable_depths(self, depths: list[int], evaluate_s: float, share: float, started: float) -> list[int]:
        """Drop the deepest depths until scoring fits what is left of this candidate's share (keeping the
        shallowest, so that the training is never wasted)."""
        depths = list(depths)
        left = share - (time.perf_counter() - started)

        def pairs(ds):
            return max(ds) * len(self.dev_queries) + self.config.latency_queries * sum(ds)

        full = pairs(depths)
        while len(depths) > 1 and evaluate_s * pairs(depths) / full > left:
            depths.pop()
        return depths

    def _depth_record(self, first: SystemResult, result: SystemResult) -> dict:
        c = compare(first, result)
        return {**_result_record(result), "recall_ceiling": first.metrics.get(f"recall@{result.depth}"),
                "comparison": asdict(c)}

    def _skip(self, what: str, why: str) -> None:
        console.print(f"  [yellow]skipped[/] {what}: {why}", highlight=False)
        self.skipped.append({"what": what, "why": why})


def _train(fn, training, run_dir: Path) -> dict:
    """Run a training, resuming an interrupted one in the same directory, or read a finished one."""
    if (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text())
    return fn(training, run_dir, resume=(run_dir / "config.json").is_file())


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def select(config: SelectConfig, out: str | Path, resume: bool = False, report: bool = True) -> dict:
    """Run the staged strategy; write steps, trainings, ``pipeline.yaml`` and the report into ``out``."""
    seed_everything(config.seed)
    dataset = load_dataset(config.data)
    for split in (config.train_split, config.dev_split, config.test_split):
        if split is not None:
            dataset.split(split)  # a missing split fails before any work
    for model in [*config.bi_encoders, *config.cross_encoders]:
        resolve_model(model)  # a missing model fails now, not an hour in
    for model in config.bi_encoders:
        if model_kind(resolve_model(model).path) == "cross-encoder":
            raise StagewiseError(f"bi_encoders: '{model}' is a cross-encoder")
    for model in config.cross_encoders:
        try:
            check_cross_encoder(resolve_model(model))
        except StagewiseError as e:
            raise StagewiseError(f"cross_encoders: {e}") from None
    run_config = {"command": "select", **asdict(config), "dataset_fingerprint": dataset.fingerprint()}
    with RunDir(out, run_config, resume=resume) as run, recording() as timings, warnings_on_console(), \
            batch_precision.use(config.batch_precision) as precision:
        s = Selection(config, run, dataset)
        console.print(f"[bold]Stage 1[/]: first stages on {dataset.name} / {config.dev_split} "
                      f"({len(s.dev_queries)} queries, {len(dataset.corpus)} documents)")
        candidates = [s.first_stage("bm25", "bm25", "bm25")] if config.bm25 else []
        zero_shot = [s.first_stage(m, display_name(m), "dense", base=m) for m in config.bi_encoders]
        candidates += zero_shot
        promising = sorted(zero_shot, key=lambda c: -c["metrics"]["ndcg@10"])[: config.finetune_top]
        s.plan.make(zero_shot, promising, s.expected_rerankers(candidates, promising))
        fine_tuned = {}
        for z in promising:
            tuned = s.finetune_bi(z)
            if tuned:
                fine_tuned[z["spec"]] = tuned
                candidates.append(tuned)
        dense = [c for c in candidates if c["kind"] == "dense"]
        if config.hybrid and config.bm25 and dense:
            best_dense = max(dense, key=lambda c: c["metrics"]["ndcg@10"])
            hybrid = s.first_stage(f"bm25+{best_dense['spec']}", f"bm25+{best_dense['name']}", "hybrid")
            hybrid["dense"] = best_dense
            candidates.append(hybrid)
        chosen, reason = s.choose_first_stage(candidates)
        console.print(f"  chosen: [bold]{chosen['name']}[/] ({reason})", highlight=False)

        console.print(f"[bold]Stage 2[/]: rerankers on {chosen['name']} at depths {config.depths}")
        first_result = _as_result(chosen)
        rerankers = s.rerankers(chosen, first_result, s.reranker_candidates(chosen, fine_tuned))
        result = assemble(s, candidates, chosen, reason, rerankers)
        with step("stage 3"):
            result["backends"] = BackendSelection(s, chosen, result["verdict"], rerankers).run()
        result["verdict"]["summary"] += result["backends"]["summary"]
        result["verdict"]["backends"] = result["backends"]["recommended"]
        result["systems"] += backend_systems(result["backends"])
        pareto_front(result["systems"])
        pipeline = chosen_pipeline(s, chosen, rerankers, result["verdict"], result["backends"])
        result["pipeline_yaml"] = str(pipeline.save(run.path / "pipeline.yaml").relative_to(run.path))
        if config.test_split:  # only now that the choice is made and written
            console.print(f"[bold]Confirmation[/]: the chosen pipeline on {config.test_split}, once")
            with step("confirmation"):
                result["confirmation"] = confirm(dataset, config.test_split, run.path / "pipeline.yaml", s.cache,
                                                 config.latency_metric)
            result["verdict"]["summary"].append(result["confirmation"]["summary"])
        # every session of this run, resumed ones included; stored so that a resumed run counts this one whole
        result["wall_seconds"] = round(s.steps.save_spent(s.budget.spent()), 1)
        result["budget"]["used_s"] = result["wall_seconds"]
        result["time"] = {**timings.breakdown(), "estimates": s.estimates}
        result["budget"]["plan"] = s.plan.planned
        result["batch_precision"] = {"mode": config.batch_precision, "models": precision.summary()}
        if report:
            from stagewise.selection.report.write import write_report

            result["report"] = {k: str(Path(v).relative_to(run.path)) for k, v in write_report(result, run.path).items()}
        run.finish({"verdict": result["verdict"], "report": result.get("report"), "pipeline": result["pipeline_yaml"],
                    "confirmation": result.get("confirmation")})
    return result
