"""Fine-tune both stages with sentence-transformers' trainers, each with the objective that suits it.

* ``train_bi``: a bi-encoder, contrastive by default (MultipleNegativesRankingLoss) with hard negatives
  mined by ``mine_hard_negatives`` from the base model, or by BM25.
* ``train_cross``: a cross-encoder, on negatives mined from the first stage it will rerank, at the
  depth it will rerank, plus random ones, so it learns the mistakes it will actually see; optionally
  pre-trained first on pseudo-queries made from the corpus (``pseudo_queries``), since a few hundred
  labelled queries are too few for a start that was never a reranker.

Both write a :class:`RunDir` (config, data fingerprints, metrics per evaluation, the model) and can resume.
Our part is choosing and wiring; losses, mining, trainers and model cards are sentence-transformers'.
"""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from stagewise import batch_precision
from stagewise.batch_precision import pair_sample, spread_sample
from stagewise.data import RetrievalDataset, TrainingExamples, load_dataset, load_training_examples
from stagewise.errors import DataError, StagewiseError
from stagewise.evaluation import compute_metrics, run_from_rankings
from stagewise.limits import (MAX_BATCH, MAX_CANDIDATES, MAX_COUNT, MAX_EPOCHS, MAX_LEARNING_RATE, MAX_PATIENCE,
                              MAX_SECONDS, MAX_TOKENS, MAX_WEIGHT)
from stagewise.models import ModelSpec, check_cross_encoder, has_transformer, load_bi_encoder, model_kind, resolve_model
from stagewise.progress import library_bars_off, map_chunks
from stagewise.pseudo_queries import KINDS as PSEUDO_QUERY_KINDS
from stagewise.pseudo_queries import make_pseudo_queries, mine_pseudo_negatives
from stagewise.rundir import RunDir, seed_everything
from stagewise.timing import recording, span
from stagewise.vector_index import inner_products

logger = logging.getLogger(__name__)

MIN_EXAMPLES = 8
#: How many times a run logs its training loss by default: enough to show its course, in metrics.jsonl too.
LOSS_POINTS = 20

BI_LOSSES = {
    "mnrl": "MultipleNegativesRankingLoss: in-batch and hard negatives (contrastive); the default for pairs",
    "cached-mnrl": "CachedMultipleNegativesRankingLoss: large effective batches in small memory",
    "gist": "GISTEmbedLoss: the base model guides, dropping in-batch false negatives",
    "triplet": "TripletLoss: (query, positive, negative) with a margin",
    "contrastive": "ContrastiveLoss: labelled pairs (0/1)",
    "online-contrastive": "OnlineContrastiveLoss: labelled pairs, hard pairs only; the default for 0/1 scores",
    "cosent": "CoSENTLoss: scored pairs; the default for graded scores",
    "margin-mse": "MarginMSELoss: distil a cross-encoder teacher's margins (needs --teacher)",
}
CROSS_LOSSES = {
    "bce": "BinaryCrossEntropyLoss: relevant / not relevant pairs; the default",
    "mse": "MSELoss: graded or scored pairs; the default for scored pairs",
    "cross-entropy": "softmax cross-entropy over each query's list (cross-encoder MultipleNegativesRankingLoss)",
    "listnet": "ListNetLoss: listwise, over each query's candidates",
    "lambda": "LambdaLoss: listwise, NDCG-weighted",
}
INIT_STRATEGIES = ("base", "same-as-bi", "from-finetuned-bi")
_PAIR_LOSSES = {"mnrl", "cached-mnrl", "gist", "triplet", "margin-mse"}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass
class TrainArgs:
    """What both trainings share. CPU-friendly defaults; a GPU is used when present."""

    data: str = "default"  # BEIR folder or 'default': corpus, train and dev splits
    train_split: str = "train"
    train_file: str | None = None  # JSONL/CSV/TSV pairs, tuples or scored pairs instead of the split
    dev_split: str | None = "dev"
    loss: str | None = None  # None: follows from the data's shape
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float | None = None  # None: 5e-5, or 0.2 for a static embedding model (no transformer)
    warmup_ratio: float = 0.1
    eval_steps: int | None = None  # None: evaluate (and checkpoint) once per epoch
    early_stopping_patience: int | None = 2
    logging_steps: int | None = None  # None: the loss is logged LOSS_POINTS times a run (every step in a tiny one)
    seed: int = 42
    max_seconds: float | None = None  # stop training (with a last evaluation) once this much time has passed
    bf16: bool = False  # bf16 mixed precision (autocast): faster only where the CPU has AMX / AVX-512 BF16


@dataclass
class BiTrainConfig(TrainArgs):
    model: str = "minilm-l6"
    max_seq_length: int | None = 256
    hard_negatives: str = "model"  # model | bm25 | none
    num_negatives: int = 1
    range_min: int = 10  # skip the very top candidates: most likely unlabelled positives
    range_max: int = 50
    relative_margin: float | None = 0.05  # a negative must score under 95% of the positive
    negative_filter: str | None = None  # a cross-encoder that drops negatives it scores like positives
    teacher: str | None = None  # a cross-encoder whose margins MarginMSELoss distils
    dev_corpus_size: int = 2000  # dev evaluation during training: relevant docs + a fixed sample
    compare_base: bool = True  # at the end, the base and the fine-tuned model on the full dev corpus (select: its own)


@dataclass
class CrossTrainConfig(TrainArgs):
    model: str = "bert-tiny"  # the base, for --init base
    init: str = "base"  # base | same-as-bi | from-finetuned-bi
    bi_run: str | None = None  # a train-bi run directory: its base and its fine-tuned model
    first_stage: str | None = None  # what mines negatives; default: the bi run's model, else bm25
    depth: int = 20  # mine where the reranker will work: the first stage's top `depth`
    hard_negatives: int = 7  # per query, from the top `depth`
    random_negatives: int = 2  # per query, from the whole corpus
    skip_top: int = 0  # hard negatives from below the first stage's top N (unjudged positives hide there)
    pos_weight: float | None = None  # bce's weight on positives; None: the negative/positive ratio
    max_length: int = 256
    batch_size: int = 16
    warmup_ratio: float = 0.1
    # pre-training on the corpus's own pseudo-queries (pseudo_queries.py) before the labelled pairs; 0: none
    pretrain_queries: int = 0
    pretrain_kind: str = "auto"  # auto | title | sentence
    pretrain_epochs: float = 1.0
    pretrain_skip: int = 2  # negatives from below the first stage's top N (and always below the source document)
    pretrain_max_seconds: float | None = None
    max_train_queries: int | None = None  # train on a fixed sample of this many labelled queries (a shortened trial)
    dev_sample: int | None = None  # dev evaluations during training on a fixed sample of this many queries


#: Each numeric setting's range: (lowest, whether the lowest itself is excluded, highest). None values (where a
#: setting allows None) are not checked. Every range is finite: what the trainers, samplers and tokenizers can
#: really serve (an infinite epoch count or a billion-token length fails deep inside them). The training commands'
#: options take their bounds from here (``cli._train_range``).
RANGES = {
    "epochs": (0, True, MAX_EPOCHS), "batch_size": (1, False, MAX_BATCH),
    "learning_rate": (0, False, MAX_LEARNING_RATE), "warmup_ratio": (0, False, 1), "eval_steps": (1, False, MAX_COUNT),
    "early_stopping_patience": (0, False, MAX_PATIENCE),
    "logging_steps": (0, True, MAX_COUNT), "seed": (0, False, 2**32 - 1), "max_seconds": (0, True, MAX_SECONDS),
    "max_seq_length": (1, False, MAX_TOKENS), "num_negatives": (1, False, MAX_CANDIDATES),
    "range_min": (0, False, MAX_CANDIDATES), "range_max": (1, False, MAX_CANDIDATES), "relative_margin": (0, False, 1),
    "dev_corpus_size": (1, False, MAX_COUNT), "depth": (1, False, MAX_CANDIDATES),
    "hard_negatives": (0, False, MAX_CANDIDATES), "random_negatives": (0, False, MAX_CANDIDATES),
    "skip_top": (0, False, MAX_CANDIDATES), "pos_weight": (0, True, MAX_WEIGHT), "max_length": (1, False, MAX_TOKENS),
    "pretrain_queries": (0, False, MAX_COUNT), "pretrain_epochs": (0, True, MAX_EPOCHS),
    "pretrain_skip": (0, False, MAX_CANDIDATES), "pretrain_max_seconds": (0, True, MAX_SECONDS),
    "max_train_queries": (1, False, MAX_COUNT), "dev_sample": (1, False, MAX_COUNT),
}
#: How ``train bi`` mines hard negatives.
MINERS = ("model", "bm25", "none")
#: The training commands' option for each setting whose name it does not simply spell (None: no option).
_OPTIONS = {"learning_rate": "--lr", "early_stopping_patience": "--patience", "warmup_ratio": None,
            "logging_steps": None, "max_seconds": None, "pretrain_max_seconds": None}


def _setting(name: str) -> str:
    """``setting 'depth' (--depth)``: the name in a settings file and the option on the command line."""
    option = _OPTIONS.get(name, "--" + name.replace("_", "-"))
    return f"setting '{name}'" + (f" ({option})" if option else "")


def check_train_config(config: TrainArgs) -> None:
    """Refuse a setting that training would refuse or fail on, before any work starts, naming the setting: numbers
    out of their range (NaN and infinity included) and names that are not one of the choices. ``train bi``,
    ``train cross`` and ``select`` (its ``bi_training`` and ``cross_training``) all check through here."""
    for name, (low, open_low, high) in RANGES.items():
        value = getattr(config, name, None)
        if value is None or isinstance(value, str):  # BiTrainConfig.hard_negatives names a miner
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StagewiseError(f"{_setting(name)}: expected a number, got {value!r}")
        if not (value > low if open_low else value >= low) or not value <= high:
            rule = f"greater than {low:g}" if open_low else f"at least {low:g}"
            raise StagewiseError(f"{_setting(name)}: must be {rule} and at most {high:g}, got {value!r}")
    if isinstance(config, BiTrainConfig):
        if config.loss is not None and config.loss not in BI_LOSSES:
            raise StagewiseError(f"unknown bi-encoder loss '{config.loss}' (choose from {', '.join(BI_LOSSES)})")
        if config.hard_negatives not in MINERS:
            raise StagewiseError(f"--hard-negatives must be {', '.join(MINERS[:-1])} or {MINERS[-1]}, "
                                 f"not '{config.hard_negatives}'")
        if config.range_min >= config.range_max:
            raise StagewiseError(f"setting 'range_min' ({config.range_min}) must be below 'range_max' "
                                 f"({config.range_max}): no candidate lies between them to mine")
    if isinstance(config, CrossTrainConfig):
        if config.loss is not None and config.loss not in CROSS_LOSSES:
            raise StagewiseError(f"unknown cross-encoder loss '{config.loss}' (choose from {', '.join(CROSS_LOSSES)})")
        if config.init not in INIT_STRATEGIES:
            raise StagewiseError(f"--init must be one of {', '.join(INIT_STRATEGIES)}, not '{config.init}'")
        if config.pretrain_kind not in PSEUDO_QUERY_KINDS:
            raise StagewiseError(f"--pretrain-kind must be one of {', '.join(PSEUDO_QUERY_KINDS)}, "
                                 f"not '{config.pretrain_kind}'")


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------


def pairs_from_split(dataset: RetrievalDataset, split: str) -> TrainingExamples:
    """(query, relevant document) pairs from a qrels split; queries with no relevant document are skipped."""
    queries, qrels = dataset.split(split)
    anchors, positives = [], []
    for qid in sorted(qrels):
        for did, rel in sorted(qrels[qid].items()):
            if rel > 0:
                anchors.append(queries[qid])
                positives.append(dataset.corpus[did].full_text())
    return TrainingExamples("pairs", {"anchor": anchors, "positive": positives}, source=f"{dataset.source}:{split}")


def load_train_examples(config: TrainArgs, dataset: RetrievalDataset) -> TrainingExamples:
    examples = load_training_examples(config.train_file) if config.train_file else pairs_from_split(
        dataset, config.train_split)
    if len(examples) < MIN_EXAMPLES:
        raise DataError(examples.source, f"only {len(examples)} training examples; at least {MIN_EXAMPLES} are needed")
    return examples


def _binary(scores: list[float]) -> bool:
    return set(scores) <= {0.0, 1.0}


def choose_bi_loss(examples: TrainingExamples, requested: str | None) -> str:
    """The loss follows from the data's shape unless named; a named loss (a known one: ``check_train_config``)
    must fit the data."""
    if requested is None:
        if examples.kind == "scored":
            return "online-contrastive" if _binary(examples.columns["score"]) else "cosent"
        return "mnrl"
    if examples.kind == "scored" and requested in _PAIR_LOSSES:
        raise StagewiseError(f"loss '{requested}' needs (query, positive) data; {examples.source} has scored pairs")
    if examples.kind != "scored" and requested not in _PAIR_LOSSES:
        raise StagewiseError(f"loss '{requested}' needs scored pairs (text1, text2, score); "
                             f"{examples.source} has {examples.kind}")
    if requested in ("contrastive", "online-contrastive") and not _binary(examples.columns["score"]):
        raise StagewiseError(f"loss '{requested}' needs 0/1 labels; {examples.source} has graded scores (try cosent)")
    return requested


def _positives_by_anchor(examples: TrainingExamples) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a, p in zip(examples.columns["anchor"], examples.columns["positive"]):
        out[a].add(p)
    return out


def mine_from_first_stage(
    examples: TrainingExamples,
    first_stage,
    corpus_texts: dict[str, str],
    depth: int,
    hard: int,
    random_count: int,
    seed: int,
    range_min: int = 0,
) -> dict[str, list[tuple[str, int]]]:
    """Per query: its positives (label 1), up to ``hard`` non-positives from the first stage's ranks
    ``range_min..depth`` and ``random_count`` random non-positives (label 0). Works with any first stage."""
    rng = random.Random(seed)
    positives = _positives_by_anchor(examples)
    anchors = list(positives)
    all_texts = list(corpus_texts.values())
    from stagewise.retrievers import retrieve_once

    with span("mine", first_stage.name, len(anchors), "queries"):
        rankings = retrieve_once(first_stage, anchors, depth, f"mining negatives with {first_stage.name}")
    groups: dict[str, list[tuple[str, int]]] = {}
    for anchor, ranking in zip(anchors, rankings):
        pos = positives[anchor]
        candidates = [corpus_texts[d] for d, _ in ranking[range_min:depth] if corpus_texts[d] not in pos]
        negatives = candidates[:hard]
        for _ in range(random_count * 10):
            if len(negatives) >= len(candidates[:hard]) + random_count:
                break
            text = rng.choice(all_texts)
            if text not in pos and text not in negatives:
                negatives.append(text)
        groups[anchor] = [(p, 1) for p in sorted(pos)] + [(n, 0) for n in negatives]
    return groups


# --------------------------------------------------------------------------------------------
# Dev evaluators: the core's IR metrics, inside the trainers' evaluation loop
# --------------------------------------------------------------------------------------------


def dev_corpus_subset(dataset: RetrievalDataset, qrels: dict, size: int, seed: int) -> dict[str, str]:
    """All judged documents plus a fixed random sample of the rest: cheap to re-encode at every evaluation."""
    judged = {d for docs in qrels.values() for d in docs}
    others = sorted(set(dataset.corpus) - judged)
    random.Random(seed).shuffle(others)
    keep = sorted(judged) + others[: max(0, size - len(judged))]
    return {d: dataset.corpus[d].full_text() for d in keep}


def _dev_evaluator(rank: Callable, qrels: dict, recall_cutoffs: tuple = (), on_metrics: Callable | None = None):
    """A sentence-transformers evaluator whose numbers are the core's: ``rank(model)`` gives rankings (and
    extra metrics), pytrec_eval scores them; nDCG@10 is the metric the trainer keeps the best checkpoint by."""
    from sentence_transformers.base.evaluation import BaseEvaluator

    class DevEvaluator(BaseEvaluator):
        def __init__(self):
            super().__init__()
            self.primary_metric = "ndcg@10"
            self.name = "dev"

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            with span("dev-eval", "dev split", 1, "evaluations"):
                rankings, extra = rank(model)
            metrics = {**compute_metrics(qrels, run_from_rankings(rankings), recall_cutoffs)[0], **extra}
            if on_metrics:
                on_metrics({"epoch": epoch, "steps": steps, **{f"dev_{k}": v for k, v in metrics.items()}})
            return self.prefix_name_to_metrics(metrics, self.name)

    return DevEvaluator()


def make_retrieval_evaluator(queries: dict[str, str], corpus: dict[str, str], qrels: dict,
                             on_metrics: Callable[[dict], None] | None = None, batch_size: int = 32):
    """Exact dense retrieval over ``corpus`` with the model being trained."""

    def rank(model):
        ids, qids = list(corpus), list(queries)
        texts = [corpus[d] for d in ids]
        encoder = _batch_copy(model, "bi-encoder", spread_sample(texts))
        with span("encode", "dev corpus sample (model in training)", len(ids), "docs"):
            docs = encoder.encode_document(texts, batch_size=batch_size, convert_to_numpy=True,
                                           normalize_embeddings=True, show_progress_bar=False)
        q = model.encode_query([queries[x] for x in qids], batch_size=batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
        top = np.argsort(-inner_products(q, docs), axis=1)[:, :100]
        return {qid: [ids[i] for i in row] for qid, row in zip(qids, top)}, {}

    return _dev_evaluator(rank, qrels, (), on_metrics)


def rerank_with(model, queries: dict[str, str], candidates: dict[str, list[str]], texts: dict[str, str],
                depth: int, batch_size: int = 64) -> tuple[dict[str, list[str]], list[np.ndarray]]:
    """Rerank each query's first-stage candidates (top ``depth``) with a CrossEncoder; return rankings and scores.

    Every query's pairs go through one ``predict``, which batches them by length (little padding), on the model's
    bf16 copy where the batch precision in use chose it."""
    pairs = [(queries[qid], texts[d]) for qid, ranked in candidates.items() for d in ranked[:depth]]
    scorer = _batch_copy(model, "cross-encoder", *pair_sample(pairs))
    flat = np.asarray(scorer.predict(pairs, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True),
                      dtype=np.float32).reshape(-1)
    rankings, all_scores, start = {}, [], 0
    for qid, ranked in candidates.items():
        top = ranked[:depth]
        scores = flat[start:start + len(top)]
        start += len(top)
        order = np.argsort(-scores, kind="stable")
        rankings[qid] = [top[i] for i in order] + ranked[depth:]
        all_scores.append(scores)
    return rankings, all_scores


def _batch_copy(model, kind: str, sample: list, groups: Sequence[int] = ()):
    """The model in training, or a bf16 copy of it for a dev evaluation where the batch precision in use chose bf16
    (measured at its first evaluation; copied anew each time, since its weights change)."""
    policy = batch_precision.current()
    if policy is None or not batch_precision.transformer_model(model):
        return model
    return policy.batch_model(None, "the model in training", kind, model, sample, groups)


def make_rerank_evaluator(queries, candidates, texts, qrels, depth, on_metrics=None):
    """Reranking of the first stage's own dev candidates (never injected positives)."""

    def rank(model):
        with span("score", "dev candidates (model in training)", len(candidates) * depth, "pairs"):
            rankings, scores = rerank_with(model, queries, candidates, texts, depth)
        return rankings, {"score_std": float(np.mean([s.std() for s in scores]))}

    return _dev_evaluator(rank, qrels, (depth,), on_metrics)


def detect_collapse(scores: list[np.ndarray], reranked_ndcg: float, first_stage_ndcg: float,
                    min_std: float = 0.02) -> dict:
    """The known failure of rerankers trained on hard negatives, checked on dev.

    ``collapsed``: near-constant scores: the mean per-query standard deviation of the (sigmoid, 0..1) scores
    is under ``min_std`` (a healthy reranker spreads a query's candidates by ~0.1 or more).
    ``no_gain``: reranking is no better than the first stage's own order (unless that order is already perfect).
    """
    spread = float(np.mean([s.std() for s in scores])) if scores else 0.0
    collapsed = spread < min_std
    no_gain = reranked_ndcg <= first_stage_ndcg and first_stage_ndcg < 1.0
    reasons = []
    if collapsed:
        reasons.append(f"near-constant scores (mean per-query std {spread:.2e} < {min_std:g})")
    if no_gain:
        reasons.append(f"dev nDCG@10 {reranked_ndcg:.4f} is no better than the first stage's {first_stage_ndcg:.4f}")
    return {"collapsed": collapsed, "no_gain": no_gain, "reasons": reasons, "mean_score_std": spread,
            "reranked_ndcg@10": reranked_ndcg, "first_stage_ndcg@10": first_stage_ndcg}


def health_warning(health: dict) -> str | None:
    """What a reranker's dev health says, in one line: a collapse is a failure; reranking alone below the first
    stage is not one yet (fused with the first stage's scores it may still add, which ``select`` measures)."""
    if health["collapsed"]:
        return "the reranker did not learn to rerank: " + "; ".join(health["reasons"])
    if health["no_gain"]:
        return ("reranking alone does not beat the first stage (" + "; ".join(health["reasons"])
                + "); fused with the first stage it may still add")
    return None


# --------------------------------------------------------------------------------------------
# Shared trainer wiring
# --------------------------------------------------------------------------------------------


def _progress_with_loss():
    """The trainer's progress on our rich bar (steps, rate, ETA, the latest loss) instead of its tqdm bars and
    printed dicts; every logged loss also goes to the run's ``metrics.jsonl``. Instantiated as ``cls(run, phase)``."""
    from transformers import TrainerCallback

    from stagewise.progress import progress_bar

    class LossProgressCallback(TrainerCallback):
        def __init__(self, run: RunDir | None = None, phase: str = "train"):
            self.run, self.phase = run, phase
            self.bar, self.task = None, None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and self.bar is None:
                self.bar = progress_bar()
                self.bar.start()
                self.task = self.bar.add_task(f"{self.phase}: steps", total=state.max_steps,
                                              completed=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            if self.bar is not None:
                self.bar.update(self.task, description=f"{self.phase}: steps (loss {logs['loss']:.4f})")
            if self.run is not None:
                extra = {"learning_rate": logs["learning_rate"]} if "learning_rate" in logs else {}
                self.run.log_metrics({"loss": logs["loss"], **extra}, phase=self.phase, epoch=state.epoch,
                                     steps=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self) -> None:
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return LossProgressCallback


def _training_arguments(cls, config: TrainArgs, run: RunDir, has_dev: bool, extra: dict,
                        checkpoints: str = "checkpoints"):
    import torch

    strategy = "steps" if config.eval_steps else "epoch"
    args = dict(
        output_dir=str(run.path / checkpoints),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=5e-5 if config.learning_rate is None else config.learning_rate,  # 0 freezes, as asked
        warmup_ratio=config.warmup_ratio,
        seed=config.seed,
        data_seed=config.seed,
        # a fraction: the trainer logs every ceil(fraction × max steps), so every step of a run shorter than that
        logging_steps=config.logging_steps or 1 / LOSS_POINTS,
        disable_tqdm=True,  # our bar instead (_progress_with_loss)
        save_strategy=strategy,
        save_total_limit=2,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=config.bf16,
        use_cpu=config.bf16 and not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU unless told
        **extra,
    )
    if config.eval_steps:
        args.update(eval_steps=config.eval_steps, save_steps=config.eval_steps)
    if has_dev:
        args.update(eval_strategy=strategy, load_best_model_at_end=True, metric_for_best_model="eval_dev_ndcg@10",
                    greater_is_better=True)
    return cls(**args)


def _time_limit(seconds: float):
    """Stop training once ``seconds`` have passed, evaluating and saving first so the best checkpoint is kept."""
    from transformers import TrainerCallback

    class TimeLimitCallback(TrainerCallback):
        stopped_at_step: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > seconds and not control.should_training_stop:
                self.stopped_at_step = state.global_step
                control.should_training_stop = True
                if args.eval_strategy == "steps":  # per epoch, the epoch's end (which comes next) evaluates and saves
                    control.should_evaluate = control.should_save = True

    return TimeLimitCallback()


def _fit(trainer_cls, model, args, train_dataset, loss, evaluator, config: TrainArgs, run: RunDir, resume: bool,
         phase: str = "train", name: str = "model"):
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    callbacks = []
    if evaluator is not None and config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    limit = _time_limit(config.max_seconds) if config.max_seconds else None
    if limit:
        callbacks.append(limit)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_dataset, loss=loss, evaluator=evaluator,
                          callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # what disable_tqdm puts in its place: logs printed as dicts
    progress = _progress_with_loss()(run, phase)
    trainer.add_callback(progress)
    checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"))
    with span("pretrain" if phase == "pretrain" else "train", name, unit="examples") as timed:
        try:
            trainer.train(resume_from_checkpoint=bool(resume and checkpoints) or None)
        finally:  # an error or Ctrl-C never leaves the bar drawing
            progress.close()
        # examples trained on (a bi-encoder's example is a tuple of texts, a cross-encoder's one pair)
        timed.items = min(trainer.state.global_step * args.per_device_train_batch_size,
                          len(train_dataset) * args.num_train_epochs)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "stopped_at_time_limit": bool(limit and limit.stopped_at_step is not None),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_dev_ndcg@10": trainer.state.best_metric,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "loss_history": [(h["step"], h["loss"]) for h in history],
    }


def _to_hf(columns: dict):
    from datasets import Dataset

    return Dataset.from_dict(columns)


def _load_examples(run: RunDir, name: str) -> dict | None:
    """Training examples (mined negatives included) are kept in the run: a resumed run trains on the same ones."""
    path = run.path / name
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# Bi-encoder
# --------------------------------------------------------------------------------------------


def _bi_loss(name: str, model, spec: ModelSpec, config: BiTrainConfig):
    from sentence_transformers.sentence_transformer import losses

    if name == "mnrl":
        return losses.MultipleNegativesRankingLoss(model)
    if name == "cached-mnrl":
        return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=8)
    if name == "gist":
        return losses.GISTEmbedLoss(model, guide=load_bi_encoder(spec, max_seq_length=config.max_seq_length))
    if name == "triplet":
        return losses.TripletLoss(model)
    if name == "contrastive":
        return losses.ContrastiveLoss(model)
    if name == "online-contrastive":
        return losses.OnlineContrastiveLoss(model)
    if name == "cosent":
        return losses.CoSENTLoss(model)
    return losses.MarginMSELoss(model)


def _bi_train_columns(config: BiTrainConfig, examples: TrainingExamples, loss: str, dataset: RetrievalDataset,
                      spec: ModelSpec) -> tuple[dict, dict]:
    """The training columns in sentence-transformers order, with mined negatives where asked; and mining stats."""
    columns = dict(examples.columns)
    stats: dict = {"examples": len(examples), "kind": examples.kind}
    wants_negatives = loss in ("triplet", "margin-mse") or (config.hard_negatives != "none" and loss in _PAIR_LOSSES)
    if examples.kind == "pairs" and wants_negatives:
        if config.hard_negatives == "none":
            raise StagewiseError(f"loss '{loss}' needs negatives: the data has none and --hard-negatives is none")
        num = 1 if loss in ("triplet", "margin-mse") else config.num_negatives
        corpus = {d: doc.full_text() for d, doc in dataset.corpus.items()}
        if config.hard_negatives == "bm25":
            from stagewise.retrievers import BM25Retriever

            bm25 = BM25Retriever()
            bm25.index(dataset.corpus)
            groups = mine_from_first_stage(examples, bm25, corpus, config.range_max, num, 0, config.seed,
                                           range_min=config.range_min)
            columns = _tuples_from_groups(examples, groups, num)
        else:
            columns = _mine_with_model(config, examples, spec, list(corpus.values()), num)
        stats.update(mined_from=config.hard_negatives, examples_with_negatives=len(columns["anchor"]))
        if not columns["anchor"]:
            raise StagewiseError("hard-negative mining kept no example: loosen --range-min/--range-max/--relative-margin")
    if loss == "margin-mse":
        columns = _teacher_margins(config, columns)
    if loss == "triplet":
        columns = {k: columns[k] for k in ("anchor", "positive", "negative_1")}
    return columns, stats


def _tuples_from_groups(examples: TrainingExamples, groups: dict, num: int) -> dict:
    out: dict[str, list] = {"anchor": [], "positive": [], **{f"negative_{i}": [] for i in range(1, num + 1)}}
    for a, p in zip(examples.columns["anchor"], examples.columns["positive"]):
        negatives = [t for t, label in groups[a] if label == 0]
        if len(negatives) < num:
            continue
        out["anchor"].append(a)
        out["positive"].append(p)
        for i in range(num):
            out[f"negative_{i + 1}"].append(negatives[i])
    return out


def _mine_with_model(config: BiTrainConfig, examples: TrainingExamples, spec: ModelSpec, corpus: list[str],
                     num: int) -> dict:
    """sentence-transformers' ``mine_hard_negatives`` with the base model, its corpus embeddings taken from the
    embedding cache (the zero-shot evaluation has usually just made them) and its output in our style."""
    from sentence_transformers.util import hard_negatives, mine_hard_negatives

    from stagewise.models import load_cross_encoder
    from stagewise.progress import tqdm_off
    from stagewise.retrievers import DenseRetriever

    retriever = DenseRetriever(spec, batch_size=config.batch_size, max_seq_length=config.max_seq_length)
    model = _MiningModel(retriever)
    cross = load_cross_encoder(config.negative_filter) if config.negative_filter else None
    with span("mine", spec.name, len(examples), "queries"), tqdm_off(hard_negatives):
        mined = mine_hard_negatives(
            _to_hf({"anchor": examples.columns["anchor"], "positive": examples.columns["positive"]}), model,
            corpus=corpus, cross_encoder=cross, range_min=config.range_min, range_max=config.range_max,
            relative_margin=config.relative_margin, num_negatives=num, sampling_strategy="top",
            output_format="n-tuple", batch_size=config.batch_size, verbose=False,
        )
    return {name: list(mined[name]) for name in mined.column_names}


class _MiningModel:
    """The base model as ``mine_hard_negatives`` sees it: its ``encode_document`` answers from the embedding cache
    (through the retriever: one encoding per model and corpus, in bf16 where chosen), its ``encode_query`` shows our
    bar (it asks for sentence-transformers' tqdm bar and takes no option to turn it off); the rest is the model's."""

    def __init__(self, retriever):
        self._retriever = retriever

    def __getattr__(self, name):
        return getattr(self._retriever.model, name)

    def encode_document(self, texts, *args, **kwargs):
        embeddings = self._retriever.embed_corpus(list(texts)).embeddings
        if kwargs.get("normalize_embeddings"):  # a dot-product model's cache entry is not normalised
            embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        return embeddings

    def encode_query(self, texts, *args, **kwargs):
        kwargs["show_progress_bar"] = False
        encode = self._retriever.model.encode_query
        with span("encode", "mining: queries", len(texts), "queries"):
            return map_chunks(lambda chunk: encode(chunk, *args, **kwargs), texts, "mining: encode queries",
                              chunk_size=8 * self._retriever.batch_size)


def _teacher_margins(config: BiTrainConfig, columns: dict) -> dict:
    """MarginMSE labels: the teacher cross-encoder's score(query, positive) - score(query, negative)."""
    from stagewise.models import load_cross_encoder

    if not config.teacher:
        raise StagewiseError("loss 'margin-mse' distils a cross-encoder: pass --teacher MODEL")
    teacher = load_cross_encoder(config.teacher)

    def score(pairs):
        return np.asarray(teacher.predict(pairs, show_progress_bar=False, convert_to_numpy=True)).reshape(-1)

    pos = map_chunks(score, list(zip(columns["anchor"], columns["positive"])), "teacher: score positives")
    neg = map_chunks(score, list(zip(columns["anchor"], columns["negative_1"])), "teacher: score negatives")
    return {"anchor": columns["anchor"], "positive": columns["positive"], "negative": columns["negative_1"],
            "label": [float(p - n) for p, n in zip(pos, neg)]}


def _check_bi_model(spec: ModelSpec) -> None:
    if model_kind(spec.path) == "cross-encoder":
        raise StagewiseError(f"'{spec.spec}' is a cross-encoder; train bi needs a bi-encoder or a base encoder")


def train_bi(config: BiTrainConfig, out: str | Path, resume: bool = False) -> dict:
    """Fine-tune a bi-encoder; return the run's result (dev metrics before and after, on the full corpus)."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    check_train_config(config)
    seed_everything(config.seed)
    dataset = load_dataset(config.data)
    examples = load_train_examples(config, dataset)
    dev = dataset.split(config.dev_split) if config.dev_split else None
    loss_name = choose_bi_loss(examples, config.loss)
    # input errors that would otherwise surface only after the run directory exists (and then block a rerun)
    if loss_name == "margin-mse" and not config.teacher:
        raise StagewiseError("loss 'margin-mse' distils a cross-encoder: pass --teacher MODEL")
    if examples.kind == "pairs" and loss_name in ("triplet", "margin-mse") and config.hard_negatives == "none":
        raise StagewiseError(f"loss '{loss_name}' needs negatives: the data has none and --hard-negatives is none")
    spec = resolve_model(config.model)
    _check_bi_model(spec)
    if config.learning_rate is None and not has_transformer(spec.path):
        # an embedding table's loss surface is much flatter than a pretrained encoder's (sentence-transformers'
        # recipes use 5e-2..2e-1); on the default dataset, 5 epochs: 0.237 -> 0.257 nDCG@10 at 5e-2, 0.284 at 0.2
        config = replace(config, learning_rate=0.2)
    for extra in (config.teacher, config.negative_filter):
        if extra:
            resolve_model(extra)  # a wrong path fails now, not after mining
    with RunDir(out, {"command": "train-bi", **asdict(config), "loss": loss_name,
                      "model_fingerprint": spec.fingerprint, "dataset_fingerprint": dataset.fingerprint()},
                resume=resume) as run, library_bars_off(), recording() as timings:
        columns = _load_examples(run, "train_data.json") if resume else None
        stats = {}
        if columns is None:
            columns, stats = _bi_train_columns(config, examples, loss_name, dataset, spec)
            run.write_json("train_data.json", columns)
        model = load_bi_encoder(spec, max_seq_length=config.max_seq_length)
        evaluator = None
        if dev:
            queries, qrels = dev
            evaluator = make_retrieval_evaluator(
                queries, dev_corpus_subset(dataset, qrels, config.dev_corpus_size, config.seed), qrels,
                run.log_metrics, batch_size=config.batch_size)
        sampler = BatchSamplers.NO_DUPLICATES if loss_name in ("mnrl", "cached-mnrl", "gist") else BatchSamplers.BATCH_SAMPLER
        args = _training_arguments(SentenceTransformerTrainingArguments, config, run, evaluator is not None,
                                   {"batch_sampler": sampler})
        fit = _fit(SentenceTransformerTrainer, model, args, _to_hf(columns), _bi_loss(loss_name, model, spec, config),
                   evaluator, config, run, resume, name=spec.name)
        model_dir = run.path / "model"
        model.save(str(model_dir))  # with sentence-transformers' generated model card (README.md)
        result = {"model": str(model_dir), "loss": loss_name, "train": {**stats, **fit}}
        if dev and config.compare_base:
            result["dev"] = _before_after_bi(dataset, config, spec, model_dir)
        result["time"] = timings.breakdown()
        run.finish(result)
    return result


def _before_after_bi(dataset: RetrievalDataset, config: BiTrainConfig, spec: ModelSpec, model_dir: Path) -> dict:
    """Zero-shot base and fine-tuned model on the dev split's full corpus (embeddings cached by content)."""
    from stagewise.evaluation import evaluate
    from stagewise.retrievers import DenseRetriever

    before = DenseRetriever(spec, max_seq_length=config.max_seq_length)
    after = DenseRetriever(str(model_dir), max_seq_length=config.max_seq_length)
    after.name = "fine-tuned"
    results = evaluate(dataset, config.dev_split, [before, after])
    return {r.name if r.name == "fine-tuned" else "base": r.metrics for r in results}


# --------------------------------------------------------------------------------------------
# Cross-encoder
# --------------------------------------------------------------------------------------------


def resolve_cross_init(config: CrossTrainConfig) -> tuple[ModelSpec, str | None]:
    """The starting checkpoint for each initialisation strategy, and the warning it deserves, if any."""
    if config.init == "base":
        spec = resolve_model(config.model)
    else:
        if not config.bi_run:
            raise StagewiseError(f"--init {config.init} needs --bi-run: the train-bi run directory to start from")
        bi_config = _read_bi_run(config.bi_run)
        spec = resolve_model(bi_config["model"] if config.init == "same-as-bi" else str(Path(config.bi_run) / "model"))
    check_cross_encoder(spec)  # a static embedding model fails inside sentence-transformers, after the run began
    warning = None
    if model_kind(spec.path) == "bi-encoder":
        warning = (f"the cross-encoder starts from a bi-encoder ('{spec.spec}'): sentence-transformers keeps its "
                   "transformer weights, silently drops its pooling/normalisation modules and adds a fresh scoring "
                   "head; its contrastive training did not teach it to read query and document together, so this "
                   "start is usually worse than a plain base encoder")
        warnings.warn(warning, stacklevel=2)
    return spec, warning


def _read_bi_run(path: str) -> dict:
    config = Path(path) / "config.json"
    if not config.is_file() or not (Path(path) / "model").is_dir():
        raise StagewiseError(f"{path}: not a finished train-bi run (needs config.json and model/)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise StagewiseError(f"{config}: not a readable run config ({e})") from None
    if not isinstance(data, dict) or data.get("command") != "train-bi":
        raise StagewiseError(f"{config}: not a train-bi run (command is "
                             f"{data.get('command') if isinstance(data, dict) else None!r})")
    return data


def sample_queries(examples: TrainingExamples, count: int, seed: int) -> TrainingExamples:
    """The examples of a fixed random sample of ``count`` queries (all of them where there are no more)."""
    key = "anchor" if "anchor" in examples.columns else "text1"
    queries = sorted(set(examples.columns[key]))
    if count >= len(queries):
        return examples
    keep = set(random.Random(seed).sample(queries, count))
    rows = [i for i, q in enumerate(examples.columns[key]) if q in keep]
    return TrainingExamples(examples.kind, {k: [v[i] for i in rows] for k, v in examples.columns.items()},
                            f"{examples.source} ({count} of {len(queries)} queries)")


def _dev_sample(ids: list[str], count: int | None, seed: int) -> list[str]:
    """A fixed random sample of ``count`` dev query ids, in order (all of them without a count)."""
    if not count or count >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, count))


def _cross_columns(loss: str, groups: dict[str, list[tuple[str, int]]]) -> dict:
    """Mined groups in the shape each cross-encoder loss reads."""
    if loss in ("listnet", "lambda"):
        return {"query": list(groups), "docs": [[t for t, _ in g] for g in groups.values()],
                "labels": [[float(label) for _, label in g] for g in groups.values()]}
    if loss == "cross-entropy":
        width = min(sum(1 for _, label in g if label == 0) for g in groups.values())
        out: dict[str, list] = {"query": [], "positive": [], **{f"negative_{i}": [] for i in range(1, width + 1)}}
        for q, g in groups.items():
            negatives = [t for t, label in g if label == 0][:width]
            for p in (t for t, label in g if label == 1):
                out["query"].append(q)
                out["positive"].append(p)
                for i, n in enumerate(negatives, start=1):
                    out[f"negative_{i}"].append(n)
        return out
    rows = [(q, t, float(label)) for q, g in groups.items() for t, label in g]
    return {"query": [r[0] for r in rows], "document": [r[1] for r in rows], "label": [r[2] for r in rows]}


def _cross_loss(name: str, model, columns: dict, pos_weight: float | None = None):
    import torch
    from sentence_transformers.cross_encoder import losses

    if name == "bce":
        if pos_weight is None:
            labels = columns["label"]
            positives = max(1.0, sum(labels))
            pos_weight = (len(labels) - positives) / positives
        return losses.BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(float(pos_weight)))
    if name == "mse":
        return losses.MSELoss(model)
    if name == "cross-entropy":
        return losses.MultipleNegativesRankingLoss(model)
    if name == "listnet":
        return losses.ListNetLoss(model)
    return losses.LambdaLoss(model)


#: The sequence lengths ``select`` chooses among for a cross-encoder (tokens of query and document together).
MAX_LENGTHS = (128, 192, 256)


def fit_max_length(model: str, dataset: RetrievalDataset, split: str, sample: int = 300, seed: int = 0) -> dict:
    """The shortest of :data:`MAX_LENGTHS` that holds at least half of the split's (query, relevant document) pairs
    whole, by the model's own tokenizer (the longest where none does): a shorter sequence costs less to train and
    to score, and loses nothing where the documents fit (measured: 128 tokens on the default dataset, whose median
    pair is 102 tokens, reranks as well as 256; on SciFact, median 339, 128 and 192 lose 0.007 to 0.010 nDCG@10
    fused). Documents keep their title first, so a cut takes the end of the text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model).path))
    queries, qrels = dataset.split(split)
    pairs = [(queries[q], dataset.corpus[d].full_text()) for q in sorted(qrels) for d, rel in sorted(qrels[q].items())
             if rel > 0]
    pairs = random.Random(seed).sample(pairs, min(sample, len(pairs))) if pairs else [("", "")]
    lengths = sorted(len(tokenizer(q, d, truncation=False, verbose=False)["input_ids"]) for q, d in pairs)
    median = lengths[len(lengths) // 2]
    chosen = next((n for n in MAX_LENGTHS if n >= median), MAX_LENGTHS[-1])
    return {"max_length": chosen, "median_tokens": median, "pairs": len(pairs),
            "whole_at_max_length": sum(n <= chosen for n in lengths) / len(lengths)}


def pretraining_queries(config: CrossTrainConfig, dataset: RetrievalDataset) -> list:
    """The pseudo-queries ``train_cross`` pre-trains on (none is ever an evaluation query: every split other than
    the training one is excluded); cheap, so callers can check a corpus gives enough before any training."""
    if not config.pretrain_queries:
        return []
    exclude = [t for split in dataset.splits if split != config.train_split for t in dataset.split(split)[0].values()]
    return make_pseudo_queries(dataset.corpus, config.pretrain_queries, config.pretrain_kind, config.seed, exclude)


def _pseudo_queries(config: CrossTrainConfig, dataset: RetrievalDataset) -> list:
    """The pre-training queries, made before any run directory exists so that a corpus without enough is refused
    first."""
    made = pretraining_queries(config, dataset)
    if config.pretrain_queries and len(made) < MIN_EXAMPLES:
        raise DataError(dataset.source or dataset.name, f"only {len(made)} documents give a pseudo-query of kind "
                        f"'{config.pretrain_kind}'; pre-training needs at least {MIN_EXAMPLES} (or --pretrain-queries 0)")
    return made


def _pretrain_cross(config: CrossTrainConfig, run: RunDir, spec: ModelSpec, first_stage, dataset: RetrievalDataset,
                    loss_name: str, queries: list, resume: bool) -> dict:
    """The recipe's first step: the corpus's own pseudo-queries, with negatives mined from the first stage that
    will be deployed; the model lands in ``pretrained/`` and fine-tuning on the labelled pairs starts from it."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments

    from stagewise.models import load_cross_encoder

    done = run.path / "pretrain.json"
    if resume and done.is_file() and (run.path / "pretrained").is_dir():
        return json.loads(done.read_text())
    started = time.perf_counter()
    columns = _load_examples(run, "pretrain_data.json") if resume else None
    stats = None
    if columns is None:
        groups, stats = mine_pseudo_negatives(queries, first_stage, dataset.corpus, config.hard_negatives,
                                              config.random_negatives, config.pretrain_skip,
                                              max(30, config.pretrain_skip + 3 * config.hard_negatives), config.seed)
        if len(groups) < MIN_EXAMPLES:
            record = {"skipped": f"only {len(groups)} of {len(queries)} pseudo-queries kept negatives after "
                      f"the false-negative filter (at least {MIN_EXAMPLES} are needed)", "mining": stats}
            warnings.warn("pre-training skipped: " + record["skipped"], stacklevel=2)
            return record
        run.write_json("pretrain_queries.json", [q.to_dict() for q in queries if q.query in groups])
        columns = _cross_columns(loss_name, groups)
        run.write_json("pretrain_data.json", columns)
    model = load_cross_encoder(spec, max_length=config.max_length, warn_untrained=False)
    phase = replace(config, epochs=config.pretrain_epochs, max_seconds=config.pretrain_max_seconds, eval_steps=None,
                    early_stopping_patience=None)
    args = _training_arguments(CrossEncoderTrainingArguments, phase, run, False, {}, checkpoints="pretrain-checkpoints")
    loss = _cross_loss(loss_name, model, columns, config.pos_weight)
    fit = _fit(CrossEncoderTrainer, model, args, _to_hf(columns), loss, None, phase, run, resume, phase="pretrain",
               name=spec.name)
    model.save_pretrained(str(run.path / "pretrained"))
    kinds = [q.kind for q in queries]
    record = {"queries": len(queries), "kinds": {k: kinds.count(k) for k in sorted(set(kinds))}, "mining": stats,
              "examples": len(columns[next(iter(columns))]), "seconds": round(time.perf_counter() - started, 1), **fit}
    run.write_json("pretrain.json", record)
    return record


def train_cross(config: CrossTrainConfig, out: str | Path, resume: bool = False) -> dict:
    """Fine-tune a cross-encoder on the first stage's own mistakes; detect and report a collapsed reranker."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments

    from stagewise.models import load_cross_encoder

    from stagewise.retrievers import build_first_stage, retrieve_once

    check_train_config(config)
    seed_everything(config.seed)
    dataset = load_dataset(config.data)
    examples = load_train_examples(config, dataset)
    dev = dataset.split(config.dev_split) if config.dev_split else None
    loss_name = config.loss or ("mse" if examples.kind == "scored" else "bce")
    if examples.kind == "scored" and loss_name != "mse" and loss_name != "bce":
        raise StagewiseError(f"loss '{loss_name}' needs (query, positive) data to mine lists from; "
                             f"{examples.source} has scored pairs")
    if loss_name == "bce" and examples.kind == "scored" and not all(0.0 <= x <= 1.0 for x in examples.columns["score"]):
        raise StagewiseError(f"loss 'bce' needs scores in [0, 1]; {examples.source} has others (use --loss mse)")
    spec, init_warning = resolve_cross_init(config)
    if config.max_train_queries:
        examples = sample_queries(examples, config.max_train_queries, config.seed)
    pseudo = _pseudo_queries(config, dataset)
    first_stage_spec = config.first_stage or (str(Path(config.bi_run) / "model") if config.bi_run else "bm25")
    first_stage = build_first_stage(first_stage_spec) if examples.kind != "scored" or dev else None
    texts = {d: doc.full_text() for d, doc in dataset.corpus.items()}
    with RunDir(out, {"command": "train-cross", **asdict(config), "loss": loss_name, "first_stage": first_stage_spec,
                      "init_model": spec.spec, "init_fingerprint": spec.fingerprint, "init_warning": init_warning,
                      "dataset_fingerprint": dataset.fingerprint()}, resume=resume) as run, library_bars_off(), \
            recording() as timings:
        if first_stage is not None:
            first_stage.index(dataset.corpus)
        columns = _load_examples(run, "train_data.json") if resume else None
        if columns is None:
            if examples.kind == "scored":
                columns = {"query": examples.columns["text1"], "document": examples.columns["text2"],
                           "label": [float(s) for s in examples.columns["score"]]}
            else:
                groups = mine_from_first_stage(examples, first_stage, texts, config.depth, config.hard_negatives,
                                               config.random_negatives, config.seed, range_min=config.skip_top)
                columns = _cross_columns(loss_name, groups)
            run.write_json("train_data.json", columns)
        pretrain = None
        if pseudo:
            pretrain = _pretrain_cross(config, run, spec, first_stage, dataset, loss_name, pseudo, resume)
            if pretrain.get("skipped") is None:
                spec = resolve_model(str(run.path / "pretrained"))
        model = load_cross_encoder(spec, max_length=config.max_length, warn_untrained=False)
        evaluator, candidates = None, None
        if dev:
            queries, qrels = dev
            ids = sorted(queries)
            rankings = retrieve_once(first_stage, [queries[q] for q in ids], max(100, config.depth))
            candidates = {q: [d for d, _ in ranking] for q, ranking in zip(ids, rankings)}
            sample = _dev_sample(ids, config.dev_sample, config.seed)  # during training; every query at the end
            evaluator = make_rerank_evaluator({q: queries[q] for q in sample}, {q: candidates[q] for q in sample},
                                              texts, {q: qrels[q] for q in sample}, config.depth, run.log_metrics)
        args = _training_arguments(CrossEncoderTrainingArguments, config, run, evaluator is not None, {})
        loss = _cross_loss(loss_name, model, columns, config.pos_weight)
        fit = _fit(CrossEncoderTrainer, model, args, _to_hf(columns), loss, evaluator, config, run, resume,
                   name=spec.name)
        model_dir = run.path / "model"
        model.save_pretrained(str(model_dir))
        result = {"model": str(model_dir), "loss": loss_name, "init": config.init, "init_model": spec.spec,
                  "init_warning": init_warning, "first_stage": first_stage_spec, "depth": config.depth,
                  "train": {"examples": len(columns[next(iter(columns))]), **fit}, "pretrain": pretrain}
        if dev:
            queries, qrels = dev
            first_metrics, _ = compute_metrics(qrels, run_from_rankings(candidates), (config.depth,))
            with span("dev-eval", "dev split (best checkpoint, collapse check)", 1, "evaluations"):
                rankings, scores = rerank_with(model, queries, candidates, texts, config.depth)
            reranked_metrics, _ = compute_metrics(qrels, run_from_rankings(rankings), (config.depth,))
            health = detect_collapse(scores, reranked_metrics["ndcg@10"], first_metrics["ndcg@10"])
            result["dev"] = {"first_stage": first_metrics, "reranked": reranked_metrics, "health": health}
            if warning := health_warning(health):
                warnings.warn(warning, stacklevel=2)
        result["time"] = timings.breakdown()
        run.finish(result)
    return result
