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

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import yaml

from stagewise.backend_selection import BackendSelection, deployed, first_stage_on, parse_backend, stage3_reserve
from stagewise.cache import EmbeddingCache
from stagewise.data import RetrievalDataset, load_dataset
from stagewise.errors import StagewiseError
from stagewise.evaluation import SystemResult, compare, evaluate, evaluate_depths, evaluate_pipeline, split_queries
from stagewise.fusion import Fusion
from stagewise.models import has_transformer, installed_aliases, model_kind, resolve_model
from stagewise.pipeline import Pipeline
from stagewise.progress import console
from stagewise.rerankers import CrossEncoderReranker
from stagewise.retrievers import build_first_stage
from stagewise.rundir import RunDir, cpu, seed_everything, versions
from stagewise.timing import recording, span, step
from stagewise.training import (INIT_STRATEGIES, MIN_EXAMPLES, BiTrainConfig, CrossTrainConfig, check_train_config,
                                pretraining_queries, train_bi, train_cross)

logger = logging.getLogger(__name__)

LATENCY_METRICS = ("p50_ms", "p95_ms", "mean_ms")


def _installed(*aliases: str) -> list[str]:
    """The default candidates: those of ``aliases`` installed here."""
    present = set(installed_aliases())
    return [a for a in aliases if a in present]


#: every backend candidate; the time budget and measured throughput decide how far each one is measured
BACKEND_CANDIDATES = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8")

#: select's cross-encoder recipe unless told otherwise: pre-trained on pseudo-queries from the corpus, then fine-tuned
CROSS_TRAINING = {"pretrain_queries": 2000}


@dataclass
class SelectConfig:
    """What ``select`` compares and under which budgets; a YAML file, a preset, or both (the file wins)."""

    data: str = "default"
    train_split: str = "train"
    dev_split: str = "dev"
    bm25: bool = True
    bi_encoders: list[str] = field(default_factory=lambda: _installed("minilm-l6", "static-64", "mpnet-base"))
    finetune_top: int = 2  # fine-tune the N best zero-shot bi-encoders
    hybrid: bool = True  # BM25 fused with the best dense first stage
    cross_encoders: list[str] = field(default_factory=lambda: _installed("bert-tiny", "minilm-l6"))
    init_strategies: list[str] = field(default_factory=lambda: list(INIT_STRATEGIES))
    depths: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100])
    bi_training: dict = field(default_factory=dict)  # BiTrainConfig fields, e.g. {epochs: 1}
    cross_training: dict = field(default_factory=lambda: dict(CROSS_TRAINING))  # CrossTrainConfig fields
    latency_budget_ms: float | None = None  # per query, on this machine
    latency_metric: str = "p95_ms"
    time_budget_min: float | None = None  # wall clock for the whole selection
    min_gain: float = 0.005  # a reranker must add at least this much nDCG@10 …
    alpha: float = 0.05  # … with a paired t-test p-value under this
    latency_queries: int = 20  # queries timed end to end at each rerank depth
    max_dev_queries: int | None = None
    fusion: bool = True  # also consider each reranker fused with the first stage (weight chosen on dev)
    test_split: str | None = None  # confirm the chosen pipeline once on this split (never used to choose)
    # stage 3: what runs each chosen stage (labels: torch, torch-bf16, onnx[-int8], openvino[-int8|-bf16])
    backends: list[str] = field(default_factory=lambda: list(BACKEND_CANDIDATES))
    backend_max_loss: float = 0.01  # relative nDCG@10 a faster backend may lose against PyTorch float32
    seed: int = 42


PRESETS: dict[str, dict] = {
    # ~10 minutes on a 2-core CPU on the embedded default dataset
    "quick": {
        "bi_encoders": ["minilm-l6", "static-64"], "finetune_top": 1, "cross_encoders": ["bert-tiny"],
        # from-finetuned-bi (about 30 minutes here, and collapsed in every measured run) is left to the full preset
        "init_strategies": ["base"], "depths": [5, 10, 20, 50],
        "bi_training": {"epochs": 1, "dev_corpus_size": 1000},
        "cross_training": {"epochs": 2, "learning_rate": 1e-4, "hard_negatives": 3, "random_negatives": 1,
                           "max_length": 128, "pretrain_queries": 500},
        "time_budget_min": 10, "latency_queries": 10,
        "backends": ["torch", "torch-bf16", "onnx", "onnx-int8"],  # the exports that take seconds, not a minute
    },
    "full": {"cross_training": dict(CROSS_TRAINING)},
}


def load_select_config(path: str | Path | None = None, preset: str | None = None, **overrides) -> SelectConfig:
    """Defaults, then the preset, then the YAML file, then explicit overrides (None values are ignored)."""
    if preset is not None and preset not in PRESETS:
        raise StagewiseError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    values: dict = copy.deepcopy(PRESETS.get(preset or "full", {}))
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise StagewiseError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise StagewiseError(f"{path}:{line}: not valid UTF-8 (byte {e.start + 1})") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise StagewiseError(f"{path}:{'' if line is None else line + 1}: invalid YAML ({e.problem})") from None
        if not isinstance(loaded, dict):
            raise StagewiseError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        known = {f.name for f in fields(SelectConfig)}
        for key in loaded:
            if key not in known:
                raise StagewiseError(f"{path}: field '{key}': unknown setting (known: {', '.join(sorted(known))})")
        _merge(values, loaded)
    _merge(values, {k: v for k, v in overrides.items() if v is not None})
    config = SelectConfig(**values)
    _check_config(config, path)
    return config


def _merge(values: dict, new: dict) -> None:
    """Later settings win; the training dicts are merged key by key (a file's epochs keeps a preset's lr)."""
    for key, value in new.items():
        if key in ("bi_training", "cross_training") and isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value


_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float), "None": (type(None),), "list": (list,),
          "dict": (dict,)}


def _fits(value, annotation: str) -> bool:
    """Whether a YAML value fits a dataclass field's annotation (a string: ``float | None``, ``list[str]``); a bool
    is no number and a number no bool."""
    for option in (a.strip() for a in annotation.split("|")):
        base, _, inner = option.partition("[")
        kinds = _TYPES.get(base)
        if kinds is None:
            return True  # not a type this checks
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            continue
        if base == "list" and inner and not all(_fits(v, inner.rstrip("]")) for v in value):
            continue
        return True
    return False


def _check_config(config: SelectConfig, path) -> None:
    where = f"{path}: " if path else ""
    for f in fields(SelectConfig):
        value, kind = getattr(config, f.name), {"list": list, "dict": dict}.get(str(f.type).split("[")[0])
        if kind and not isinstance(value, kind):
            raise StagewiseError(f"{where}field '{f.name}': a {kind.__name__} is needed, got {value!r}")
        if not _fits(value, str(f.type)):
            raise StagewiseError(f"{where}field '{f.name}': expected {f.type}, got {value!r}")
    for name, low, strict, high in (("finetune_top", 0, False, None), ("latency_budget_ms", 0, True, None),
                                    ("time_budget_min", 0, True, None), ("alpha", 0, True, None),
                                    ("max_dev_queries", 1, False, None), ("seed", 0, False, 2**32 - 1)):
        value = getattr(config, name)
        if value is not None and (not (value > low if strict else value >= low)  # NaN fails every comparison
                                  or (high is not None and not value <= high)):
            rule = (f"greater than {low}" if strict else f"at least {low}") + (f" and at most {high}" if high else "")
            raise StagewiseError(f"{where}field '{name}': must be {rule}, got {value!r}")
    if not math.isfinite(config.min_gain):
        raise StagewiseError(f"{where}field 'min_gain': must be a finite number, got {config.min_gain!r}")
    if config.latency_queries < 1:
        raise StagewiseError(f"{where}field 'latency_queries': at least 1 query must be timed")
    if not config.depths or any(type(d) is not int or d < 1 for d in config.depths):
        raise StagewiseError(f"{where}field 'depths': positive integers are needed, got {config.depths}")
    config.depths = sorted(set(config.depths))
    if config.latency_metric not in LATENCY_METRICS:
        raise StagewiseError(f"{where}field 'latency_metric': one of {', '.join(LATENCY_METRICS)}, "
                             f"not '{config.latency_metric}'")
    for s in config.init_strategies:
        if s not in INIT_STRATEGIES:
            raise StagewiseError(f"{where}field 'init_strategies': '{s}' is not one of {', '.join(INIT_STRATEGIES)}")
    for name, cls in (("bi_training", BiTrainConfig), ("cross_training", CrossTrainConfig)):
        unknown = set(getattr(config, name)) - {f.name for f in fields(cls)}
        if unknown:
            raise StagewiseError(f"{where}field '{name}': unknown training settings {sorted(unknown)}")
        annotations = {f.name: str(f.type) for f in fields(cls)}
        for key, value in getattr(config, name).items():
            if not _fits(value, annotations[key]):
                raise StagewiseError(f"{where}field '{name}': setting '{key}': expected {annotations[key]}, "
                                     f"got {value!r}")
        try:  # ranges too: a bad epochs or batch size must not surface only when its training starts
            check_train_config(cls(**getattr(config, name)))
        except StagewiseError as e:
            raise StagewiseError(f"{where}field '{name}': {e}") from None
    if not config.bm25 and not config.bi_encoders:
        raise StagewiseError(f"{where}no first stage to select from: enable bm25 or name bi_encoders")
    for label in config.backends:
        try:
            parse_backend(label)
        except StagewiseError as e:
            raise StagewiseError(f"{where}{e}") from None
    if not 0 <= config.backend_max_loss < 1:
        raise StagewiseError(f"{where}field 'backend_max_loss': a fraction between 0 and 1, got {config.backend_max_loss!r}")
    if not isinstance(config.fusion, bool):
        raise StagewiseError(f"{where}field 'fusion': true or false, not {config.fusion!r}")
    if config.test_split is not None and (not isinstance(config.test_split, str) or config.test_split in (
            config.dev_split, config.train_split)):
        raise StagewiseError(f"{where}field 'test_split': a split other than the train and dev splits is needed "
                             f"(it confirms the choice on queries that took no part in it), not {config.test_split!r}")


# --------------------------------------------------------------------------------------------
# The time budget
# --------------------------------------------------------------------------------------------


class TimeBudget:
    """Wall-clock time shared out between the remaining expensive steps in proportion to their estimated cost."""

    def __init__(self, minutes: float | None, clock: Callable[[], float] = time.perf_counter, spent: float = 0.0):
        self.seconds = None if minutes is None else minutes * 60.0
        self.clock = clock
        self.start = clock() - spent  # a resumed run has already spent some of its budget

    def spent(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return math.inf if self.seconds is None else max(0.0, self.seconds - self.spent())

    def plan(self, estimate: float, later: float = 0.0, minimum: float = 0.25) -> tuple[str, float | None]:
        """The step's share of what remains, in proportion to its estimated cost against ``later`` (the steps
        still to come): ``("run", share)`` when the estimate fits it, ``("shorten", share)`` when at least
        ``minimum`` of it does, else ``("skip", share)``. A step is held to its share even when its estimate
        fitted, so a wrong estimate cannot eat the others' time. No budget: ``("run", None)``."""
        if self.seconds is None:
            return "run", None
        share = self.remaining() * estimate / max(estimate + later, 1e-9)
        if estimate <= share:
            return "run", share
        if share >= minimum * estimate:
            return "shorten", share
        return "skip", share


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

    def _bi_estimate(self, zero_shot: dict, training: BiTrainConfig) -> tuple[float, float]:
        """Seconds to fine-tune a bi-encoder, and to mine, evaluate and re-encode around the training, from
        its measured corpus encoding rate (a training step's forward and backward pass ≈ 3 forward passes)."""
        rate = zero_shot.get("docs_per_second") or 50.0
        corpus = len(self.dataset.corpus)
        steps = math.ceil(self.train_queries / training.batch_size) * training.epochs
        texts_per_step = training.batch_size * (2 + training.num_negatives)
        evals = min(training.dev_corpus_size, corpus) * math.ceil(training.epochs)
        return 3 * steps * texts_per_step / rate, (evals + 2 * corpus) / rate

    def finetune_bi(self, zero_shot: dict, later: float) -> dict | None:
        base, name = zero_shot["spec"], f"{zero_shot['name']} fine-tuned"
        stored = self.steps.get(f"first-{name}")
        if stored:
            return stored
        training = BiTrainConfig(**{**self.config.bi_training, "model": base, "data": self.config.data,
                                    "train_split": self.config.train_split, "dev_split": self.config.dev_split,
                                    "seed": self.config.seed})
        train_s, around_s = self._bi_estimate(zero_shot, training)
        estimate = train_s + around_s
        decision, seconds = self.budget.plan(estimate, later)
        if decision == "skip":
            self._skip(name, f"estimated {_minutes(estimate)} to fine-tune; its share of the time budget is "
                             f"{_minutes(seconds)}")
            return None
        training.max_seconds = None if seconds is None else max(1.0, seconds - around_s)
        run_dir = self.run.path / "train" / f"bi-{_slug(zero_shot['name'])}"
        console.print(f"  fine-tuning {zero_shot['name']} (estimated {_minutes(estimate)}"
                      + (f", at most {_minutes(seconds)}" if seconds else "") + ")", highlight=False)
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
        self._estimated(name, estimate, seconds, started)
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
            cand.update(init=strategy, model=model)
            if strategy != "base" and bi_base is None:
                cand["skip"] = "the chosen first stage has no bi-encoder"
            elif model is None:
                cand["skip"] = "no fine-tuned bi-encoder (fine-tuning was skipped)"
            elif not has_transformer(resolve_model(model).path):
                cand["skip"] = f"{model} has no transformer to read query and document together"
            out.append(cand)
        return out

    def _cross_estimate(self, training: CrossTrainConfig, pairs_per_second: float) -> tuple[float, float]:
        """Seconds to train (with its dev evaluations) and to evaluate every depth, from a measured scoring rate."""
        dev = len(self.dev_queries)
        group = 1 + training.hard_negatives + training.random_negatives
        train = (3 * self.train_queries * group * training.epochs + dev * training.depth * (math.ceil(training.epochs) + 1)
                 + _pretrain_estimate(training, pairs_per_second, len(self.dataset.corpus)) * pairs_per_second)
        evaluation = dev * max(self.config.depths) + self.config.latency_queries * sum(self.config.depths)
        return train / pairs_per_second, evaluation / pairs_per_second

    def rerankers(self, chosen: dict, first_result: SystemResult, candidates: list[dict]) -> list[dict]:
        records, left = [], sum("skip" not in c for c in candidates)
        for cand in candidates:
            if "skip" in cand:
                self._skip(cand["name"], cand["skip"])
                records.append({**cand, "status": "skipped", "note": cand.pop("skip"), "depths": [], "health": None,
                                "train_seconds": None})
                continue
            left -= 1
            stored = self.steps.get(f"rerank-{cand['name']}")
            if stored:
                records.append(stored)
                continue
            training = CrossTrainConfig(**{"depth": min(20, max(self.config.depths)), **self.config.cross_training,
                                           "model": cand["model"], "init": "base", "data": self.config.data,
                                           "train_split": self.config.train_split, "dev_split": self.config.dev_split,
                                           "first_stage": chosen["spec"], "seed": self.config.seed})
            if training.pretrain_queries and len(pretraining_queries(training, self.dataset)) < MIN_EXAMPLES:
                training.pretrain_queries = 0  # a corpus of short or untitled texts: fine-tune on the labels alone
                cand = {**cand, "pretrain_note": "no pre-training: the corpus gives fewer than "
                        f"{MIN_EXAMPLES} pseudo-queries"}
            with step(f"stage 2 / {cand['name']}"):
                rate = _pairs_per_second(cand["model"], training.max_length, self.dataset, self.dev_queries)
            train_s, eval_s = self._cross_estimate(training, rate)
            later = left * (train_s + eval_s) + stage3_reserve(self.config)  # the others' cost, at this one's rate
            pretrain_s = _pretrain_estimate(training, rate, len(self.dataset.corpus))
            with step(f"stage 2 / {cand['name']}"):
                records.append(self.reranker(cand, training, chosen, first_result, train_s, eval_s, later,
                                             pretrain_s))
        return records

    def reranker(self, cand: dict, training: CrossTrainConfig, chosen: dict, first_result: SystemResult,
                 train_s: float, eval_s: float, later: float, pretrain_s: float = 0.0) -> dict:
        record = {**cand, "status": "ok", "note": "", "depths": [], "health": None, "train_seconds": None,
                  "estimated_seconds": round(train_s + eval_s, 1)}
        decision, seconds = self.budget.plan(train_s + eval_s, later)
        if decision == "skip":  # not stored: a resumed selection with more time tries it again
            reason = f"estimated {_minutes(train_s + eval_s)}; its share of the time budget is {_minutes(seconds)}"
            self._skip(cand["name"], reason)
            return {**record, "status": "skipped", "note": reason}
        notes = []  # what the time budget cut short
        if seconds is not None:  # each phase stops at its share
            share = seconds * train_s / (train_s + eval_s)
            if pretrain_s:
                training.pretrain_max_seconds = max(1.0, share * pretrain_s / train_s)
            training.max_seconds = max(1.0, share * (1 - pretrain_s / train_s))
        console.print(f"  training {cand['name']} ({cand['label']}; estimated {_minutes(train_s + eval_s)}"
                      + (f", at most {_minutes(seconds)}" if seconds else "") + ")", highlight=False)
        run_dir = self.run.path / "train" / _slug(cand["name"])
        started = time.perf_counter()
        trained = _train(train_cross, training, run_dir)
        record.update(train_seconds=round(time.perf_counter() - started, 1), run=str(run_dir),
                      model_dir=trained["model"], max_length=training.max_length, init_warning=trained.get("init_warning"),
                      health=(trained.get("dev") or {}).get("health"))
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
        depths = self._affordable_depths(eval_s, seconds, started)
        if len(depths) < len(self.config.depths):
            dropped = sorted(set(self.config.depths) - set(depths))
            notes.append(f"depths {dropped} not evaluated: they did not fit the time budget")
        reranker = CrossEncoderReranker(trained["model"], max_length=training.max_length)
        reranker.name = cand["name"]
        pipeline = Pipeline(self._stage(chosen["spec"], chosen["name"]), reranker).index(self.dataset.corpus)
        results = evaluate_depths(self.dataset, self.config.dev_split, first_result, pipeline, depths,
                                  self.config.latency_queries, self.config.max_dev_queries, self.config.fusion)
        record["depths"] = [self._depth_record(first_result, r) for r in results]
        record.update(status="shortened" if notes else "ok", note="; ".join(notes))
        self._estimated(cand["name"], train_s + eval_s, seconds, started)
        return self.steps.put(f"rerank-{cand['name']}", record)

    def _affordable_depths(self, eval_s: float, share: float | None, started: float) -> list[int]:
        """Drop the deepest depths until scoring fits what is left of this candidate's share (keeping the
        shallowest, so that the training is never wasted)."""
        depths = list(self.config.depths)
        if share is None:
            return depths
        left = share - (time.perf_counter() - started)

        def pairs(ds):
            return max(ds) * len(self.dev_queries) + self.config.latency_queries * sum(ds)

        full = pairs(depths)
        while len(depths) > 1 and eval_s * pairs(depths) / full > left:
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


def _pretrain_estimate(training: CrossTrainConfig, pairs_per_second: float, documents: int) -> float:
    """Seconds of pre-training on pseudo-queries (training costs about three scorings per pair)."""
    pairs = min(training.pretrain_queries, documents) * (1 + training.hard_negatives + training.random_negatives)
    seconds = 3 * pairs * training.pretrain_epochs / pairs_per_second
    return seconds if training.pretrain_max_seconds is None else min(seconds, training.pretrain_max_seconds)


def display_name(model: str) -> str:
    """An alias as is; a directory by its last component (its parent's, for a run's ``model/``)."""
    spec = resolve_model(model)
    if spec.alias:
        return spec.alias
    path = Path(model)
    return path.parent.name if path.name == "model" and path.parent.name else path.name or model


def _pairs_per_second(model: str, max_length: int, dataset: RetrievalDataset, queries: dict) -> float:
    """Measure a cross-encoder's scoring rate on this machine on real (query, document) pairs."""
    from stagewise.models import load_cross_encoder

    cross = load_cross_encoder(model, max_length=max_length, warn_untrained=False)
    query = next(iter(queries.values()))
    pairs = [(query, d.full_text()) for d in list(dataset.corpus.values())[:32]]
    with span("probe", f"{display_name(model)}: scoring rate", 1, "probes"):
        cross.predict(pairs[:4], show_progress_bar=False)  # warm-up
        start = time.perf_counter()
        cross.predict(pairs, batch_size=32, show_progress_bar=False)
        return len(pairs) / max(time.perf_counter() - start, 1e-6)


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------


def _latency(row: dict, metric: str) -> float:
    lat = row["latency"]
    return (lat.get("total") or lat["first_stage"])[metric]


def pareto_front(rows: list[dict]) -> None:
    """Mark ``pareto``: no other row is at least as good on both nDCG@10 and latency and better on one."""
    for r in rows:
        r["pareto"] = not any(
            o is not r and o["ndcg@10"] >= r["ndcg@10"] and o["latency_ms"] <= r["latency_ms"]
            and (o["ndcg@10"] > r["ndcg@10"] or o["latency_ms"] < r["latency_ms"]) for o in rows)


def _mode(row: dict) -> str:
    return row.get("mode") or "rerank"  # a depth record stored before fusion existed reranks


def _collapsed(reranker: dict) -> bool:
    return bool((reranker.get("health") or {}).get("collapsed"))


def _how(reranker: dict, row: dict) -> str:
    """The summary's words for an option: reranked by X at depth 20, fused with the first stage at weight 0.40."""
    how = f"reranked by {reranker['name']} at depth {row['depth']}"
    if _mode(row) == "fusion":
        f = row["fusion"]
        how += (f", fused with the first stage at weight {f['weight']:.2f}"
                + ("" if f["normalization"] == "minmax" else f" ({f['normalization']})"))
    return how


def verdict(config: SelectConfig, chosen: dict, rerankers: list[dict]) -> dict:
    """The recommended pipeline and the numbers that explain it.

    Every reranker at every depth is an option twice over: reranking alone, and fused with the first stage. An
    option must fit the latency budget and add at least ``min_gain`` nDCG@10 with p < ``alpha``; otherwise the
    first stage alone. At equal quality the faster option wins, then pure reranking (the simpler). A collapsed
    reranker never reranks alone (its order says nothing), but its fusion may be recommended under the same
    rules: fusion is judged by its own measured gain, and where the reranker's scores carry nothing the weight
    chosen falls to 0, which gains nothing.
    """
    metric, budget = config.latency_metric, config.latency_budget_ms
    first_ndcg = chosen["metrics"]["ndcg@10"]
    options = []
    for r in rerankers:
        for d in r["depths"]:
            d["within_budget"] = budget is None or _latency(d, metric) <= budget
            if d["within_budget"]:
                options.append((r, d))
    eligible = [(r, d) for r, d in options if not _collapsed(r) or _mode(d) == "fusion"]
    best = max(eligible or options, default=None,  # a collapsed reranker alone is only shown when nothing else fits
               key=lambda x: (round(x[1]["metrics"]["ndcg@10"], 4), -_latency(x[1], metric), _mode(x[1]) == "rerank"))
    out: dict = {"first_stage": chosen["name"], "first_stage_ndcg@10": first_ndcg,
                 "first_stage_latency_ms": _latency(chosen, metric), "reranker": None, "depth": None, "mode": None,
                 "fusion": None, "reranker_worth_it": False, "name": chosen["name"], "ndcg@10": first_ndcg,
                 "latency_ms": _latency(chosen, metric)}
    summary = []
    if best is not None:
        r, d = best
        c, fused, collapsed = d["comparison"], _mode(d) == "fusion", _collapsed(r)
        out.update(best_reranked=d["name"], best_mode=_mode(d), gain=c["mean_diff"], ci95=c["ci95"],
                   p_value=c["p_value"], wins=c["wins"], losses=c["losses"], ties=c["ties"],
                   recall_ceiling=d["recall_ceiling"])
        worth = (c["mean_diff"] >= config.min_gain and c["p_value"] < config.alpha and (fused or not collapsed))
        if worth:
            out.update(reranker=r["name"], depth=d["depth"], mode=_mode(d), fusion=d.get("fusion") if fused else None,
                       reranker_worth_it=True, name=d["name"], **{"ndcg@10": d["metrics"]["ndcg@10"]},
                       latency_ms=_latency(d, metric))
        out.update(_depth_curve(r, first_ndcg, _mode(d)))
        detail = (f"(95% CI {c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}, paired t-test p = {c['p_value']:.3g}; "
                  f"better on {c['wins']} queries, worse on {c['losses']})")
        if worth:
            summary.append(f"Recommended: {chosen['name']}, {_how(r, d)} (dev nDCG@10 {d['metrics']['ndcg@10']:.3f}, "
                           f"{metric[:3]} {_latency(d, metric):.0f} ms per query).")
            summary.append(f"{'Fusion' if fused else 'Reranking'} adds {c['mean_diff']:+.3f} nDCG@10 {detail} over "
                           "the first stage alone.")
            if fused:
                summary.append(_alone_note(r, d, first_ndcg, collapsed) + "The fusion weight was chosen on these "
                               "same dev queries, so this gain is optimistic: a test split confirms it (test_split).")
        else:
            why = ("its scores collapsed" if collapsed and not fused else "fused, its best weight on dev is 0: it "
                   "adds nothing to the first stage's order" if fused and d["fusion"]["weight"] == 0 else
                   "reranking lowers nDCG@10" if c["mean_diff"] < 0 else
                   f"the gain is below the {config.min_gain:g} minimum"
                   if c["mean_diff"] < config.min_gain else f"the gain is not significant (p ≥ {config.alpha:g})")
            summary.append(f"Recommended: {chosen['name']} alone (dev nDCG@10 {first_ndcg:.3f}, {metric[:3]} "
                           f"{_latency(chosen, metric):.0f} ms per query). The reranker is not worth it: {why}.")
            alone = _alone_note(r, d, first_ndcg, collapsed) if fused else ""
            summary.append((f"The best reranked pipeline within budget, {d['name']}, changes nDCG@10 by "
                            f"{c['mean_diff']:+.3f} {detail}. " + alone).strip())
        if d["recall_ceiling"] is not None:
            summary.append(f"At depth {d['depth']} the first stage retrieves {d['recall_ceiling']:.0%} of the "
                           "relevant documents: the ceiling for reranking.")
        if out.get("depth_90pct") is not None:
            summary.append(f"Depth {out['depth_90pct']} reaches 90% of {r['name']}'s peak gain"
                           + (" when fused" if fused else "")
                           + f" ({out['peak_gain']:+.3f} at depth {out['peak_depth']})"
                           + ("; the gain then declines deeper." if out["peaks_and_declines"] else "."))
    else:
        reason = ("no reranker fits the latency budget" if any(r["depths"] for r in rerankers)
                  else "no reranker was evaluated")
        summary.append(f"Recommended: {chosen['name']} alone (dev nDCG@10 {first_ndcg:.3f}, {metric[:3]} "
                       f"{_latency(chosen, metric):.0f} ms per query): {reason}.")
    out["init_costs"] = _init_costs(rerankers)
    for cost in out["init_costs"]:
        if cost["vs_best_other"] is not None:
            summary.append(f"The {cost['init']} start ({cost['label']}) reached {cost['best_ndcg@10']:.3f} nDCG@10, "
                           f"{cost['vs_best_other']:+.3f} against the best other start"
                           + (f" ({cost['train_seconds']:.0f} s of training)" if cost["train_seconds"] else "")
                           + (", and its scores collapsed." if cost["collapsed"] else "."))
    out["summary"] = summary
    return out


def _alone_note(reranker: dict, row: dict, first_ndcg: float, collapsed: bool) -> str:
    """A fused option against its reranker alone at the same depth (empty where that was not measured)."""
    pure = next((x for x in reranker["depths"] if _mode(x) == "rerank" and x["depth"] == row["depth"]), None)
    if pure is None:
        return ""
    return (f"Reranking alone at depth {row['depth']} reaches {pure['metrics']['ndcg@10']:.3f} "
            f"({pure['metrics']['ndcg@10'] - first_ndcg:+.3f})" + ("; its scores collapsed" if collapsed else "")
            + ". ")


def _depth_curve(reranker: dict, first_ndcg: float, mode: str = "rerank") -> dict:
    gains = [(d["depth"], d["metrics"]["ndcg@10"] - first_ndcg) for d in reranker["depths"] if _mode(d) == mode]
    peak_depth, peak = max(gains, key=lambda x: (x[1], -x[0]))
    if peak <= 0:
        return {"peak_depth": peak_depth, "peak_gain": peak, "depth_90pct": None, "peaks_and_declines": False}
    depth_90 = min(d for d, g in gains if g >= 0.9 * peak)
    return {"peak_depth": peak_depth, "peak_gain": peak, "depth_90pct": depth_90,
            "peaks_and_declines": gains[-1][0] > peak_depth and gains[-1][1] < peak - 1e-3}


def _init_costs(rerankers: list[dict]) -> list[dict]:
    """Each shared-initialisation start (same-as-bi, from-finetuned-bi) against the best other start, reranking
    alone: the cross-encoders themselves, not what fusion with the first stage makes of them."""
    def best(r):
        return max((d["metrics"]["ndcg@10"] for d in r["depths"] if _mode(d) == "rerank"), default=None)

    out = []
    for r in rerankers:
        if r["init"] == "base":
            continue
        others = [best(o) for o in rerankers if o is not r and best(o) is not None]
        mine = best(r)
        out.append({"init": r["init"], "label": r["label"], "status": r["status"], "best_ndcg@10": mine,
                    "vs_best_other": None if mine is None or not others else mine - max(others),
                    "train_seconds": r.get("train_seconds"), "collapsed": _collapsed(r)})
    return out


def confirm(dataset: RetrievalDataset, split: str, path: Path, cache: EmbeddingCache | None = None,
            metric: str = "p95_ms") -> dict:
    """The chosen pipeline, as written to ``path``, and its first stage alone, once on ``split`` after the choice.

    The dev gain is optimistic: the pipeline and its fusion weight were chosen on those queries. These are not,
    so this is the honest estimate; it is reported and never used to choose. Same numbers as ``eval --pipeline``.
    """
    first, final, c = evaluate_pipeline(dataset, split, Pipeline.load(path, cache))
    final = final or first
    out = {"split": split, "queries": len(first.per_query), "first_stage": first.name, "pipeline": final.name,
           "first_stage_ndcg@10": first.metrics["ndcg@10"], "pipeline_ndcg@10": final.metrics["ndcg@10"],
           "first_stage_latency_ms": _latency(first.summary(), metric),
           "pipeline_latency_ms": _latency(final.summary(), metric),
           "comparison": asdict(c) if c else None}
    where = f"On the held-out {split} split ({out['queries']} queries, never used to choose), "
    if c is None:
        out["summary"] = where + f"{first.name} alone scores nDCG@10 {first.metrics['ndcg@10']:.3f}."
    else:
        out["summary"] = (where + f"{final.name} scores nDCG@10 {c.mean_b:.3f} against {c.mean_a:.3f} for "
                          f"{first.name} alone: {c.mean_diff:+.3f} (95% CI {c.ci95[0]:+.3f} to {c.ci95[1]:+.3f}, "
                          f"paired t-test p = {c.p_value:.3g}; better on {c.wins} queries, worse on {c.losses}).")
    return out


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
    run_config = {"command": "select", **asdict(config), "dataset_fingerprint": dataset.fingerprint()}
    with RunDir(out, run_config, resume=resume) as run, recording() as timings:
        s = Selection(config, run, dataset)
        console.print(f"[bold]Stage 1[/]: first stages on {dataset.name} / {config.dev_split} "
                      f"({len(s.dev_queries)} queries, {len(dataset.corpus)} documents)")
        candidates = [s.first_stage("bm25", "bm25", "bm25")] if config.bm25 else []
        zero_shot = [s.first_stage(m, display_name(m), "dense", base=m) for m in config.bi_encoders]
        candidates += zero_shot
        promising = sorted(zero_shot, key=lambda c: -c["metrics"]["ndcg@10"])[: config.finetune_top]
        estimates = [sum(s._bi_estimate(z, BiTrainConfig(**config.bi_training))) for z in promising]
        fine_tuned = {}
        for i, z in enumerate(promising):
            tuned = s.finetune_bi(z, later=sum(estimates[i + 1:]) + _stage2_guess(estimates[i], config)
                                  + stage3_reserve(config))
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
        result = _assemble(s, candidates, chosen, reason, rerankers)
        with step("stage 3"):
            result["backends"] = BackendSelection(s, chosen, result["verdict"], rerankers).run()
        result["verdict"]["summary"] += result["backends"]["summary"]
        result["verdict"]["backends"] = result["backends"]["recommended"]
        result["systems"] += _backend_systems(result["backends"])
        pareto_front(result["systems"])
        pipeline = _pipeline(s, chosen, rerankers, result["verdict"], result["backends"])
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
        if report:
            from stagewise.report import write_report

            result["report"] = {k: str(Path(v).relative_to(run.path)) for k, v in write_report(result, run.path).items()}
        run.finish({"verdict": result["verdict"], "report": result.get("report"), "pipeline": result["pipeline_yaml"],
                    "confirmation": result.get("confirmation")})
    return result


def _stage2_guess(bi_estimate: float, config: SelectConfig) -> float:
    """Before any cross-encoder is measured, reserve for stage 2 about what one bi-encoder fine-tuning costs each."""
    return bi_estimate * 0.5 * max(1, len(config.cross_encoders)) if config.cross_encoders else 0.0


def _backend_systems(backends: dict) -> list[dict]:
    """Stage 3's measured candidates as systems on the quality-against-latency plot (PyTorch float32's are there)."""
    return [{"name": r["name"], "stage": "backend", "ndcg@10": r["ndcg@10"], "p50_ms": r["latency"]["total" if stage ==
             "reranker" else "first_stage"]["p50_ms"], "p95_ms": r["latency"]["total" if stage == "reranker" else
             "first_stage"]["p95_ms"], "latency_ms": r["latency_ms"], "within_budget": True}
            for stage, rows in backends.get("stages", {}).items() for r in rows
            if r["status"] == "ok" and r["backend"] != "torch"]


def _pipeline(s: Selection, chosen: dict, rerankers: list[dict], v: dict, backends: dict | None = None) -> Pipeline:
    """The chosen pipeline, each stage on the backend stage 3 recommends."""
    backends = backends or {}
    first_backend = deployed(backends, "first_stage")
    first = build_first_stage(first_stage_on(chosen["config"], *first_backend) if first_backend else chosen["config"],
                              s.cache)
    first.name = chosen["name"] + (f"@{first_backend[1].label}" if first_backend else "")
    if not v["reranker_worth_it"]:
        return Pipeline(first)
    r = next(r for r in rerankers if r["name"] == v["reranker"])
    reranker_backend = deployed(backends, "reranker")
    model, backend = reranker_backend or (r["model_dir"], None)
    reranker = CrossEncoderReranker(model, max_length=r["max_length"], backend=backend)
    reranker.name = r["name"]
    return Pipeline(first, reranker, depth=v["depth"], fusion=Fusion.from_config(v.get("fusion")))


def _assemble(s: Selection, candidates: list[dict], chosen: dict, reason: str, rerankers: list[dict]) -> dict:
    config, metric = s.config, s.config.latency_metric
    decision = verdict(config, chosen, rerankers)
    systems = [{"name": c["name"], "stage": "first_stage", "ndcg@10": c["metrics"]["ndcg@10"],
                "p50_ms": _latency(c, "p50_ms"), "p95_ms": _latency(c, "p95_ms"), "latency_ms": _latency(c, metric),
                "within_budget": c.get("within_budget", True)} for c in candidates]
    systems += [{"name": d["name"], "stage": "pipeline", "mode": _mode(d), "ndcg@10": d["metrics"]["ndcg@10"],
                 "p50_ms": _latency(d, "p50_ms"), "p95_ms": _latency(d, "p95_ms"), "latency_ms": _latency(d, metric),
                 "within_budget": d["within_budget"]} for r in rerankers for d in r["depths"]]
    pareto_front(systems)
    per_query = None
    shown = decision.get("best_reranked")
    if shown:
        d = next(d for r in rerankers for d in r["depths"] if d["name"] == shown)
        per_query = {"a": chosen["name"], "b": shown, "metric": "ndcg@10",
                     "diffs": {q: d["per_query"][q]["ndcg@10"] - chosen["per_query"][q]["ndcg@10"]
                               for q in d["per_query"]}}
    lean = ("per_query", "rankings", "scores", "config", "dense")
    import torch

    return {
        "format": 1,
        "title": f"Stagewise model selection: {s.dataset.name} ({config.dev_split})",
        "created": s.run.config["created"],
        "dataset": {"name": s.dataset.name, "source": str(s.dataset.source), "fingerprint": s.dataset.fingerprint(),
                    "documents": len(s.dataset.corpus), "train_queries": s.train_queries,
                    "dev_queries": len(s.dev_queries), "dev_split": config.dev_split, "train_split": config.train_split},
        "machine": {"cpus": os.cpu_count(), "cpu": cpu()["model"], "cpu_flags": " ".join(cpu()["flags"]),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **versions()},
        "config": asdict(config),
        "budget": {"time_budget_s": None if config.time_budget_min is None else config.time_budget_min * 60,
                   "latency_budget_ms": config.latency_budget_ms, "latency_metric": metric},
        "first_stage": {"candidates": [{k: v for k, v in c.items() if k not in lean} for c in candidates],
                        "chosen": chosen["name"], "reason": reason},
        "rerankers": [{**{k: v for k, v in r.items() if k not in lean},
                       "depths": [{k: v for k, v in d.items() if k not in lean} for d in r["depths"]]}
                      for r in rerankers],
        "systems": systems,
        "verdict": decision,
        "per_query": per_query,
        "skipped": s.skipped,
    }
