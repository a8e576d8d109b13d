"""Fine-tune a bi-encoder (``train_bi``), contrastive by default (MultipleNegativesRankingLoss).

The loss follows from the data's shape unless named; hard negatives are mined by sentence-transformers'
``mine_hard_negatives`` from the base model (its corpus embeddings from the embedding cache), or by BM25. The run
is a :class:`RunDir` and can resume; at the end the base and the fine-tuned model meet on the full dev corpus.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from stagewise.data.loaders import RetrievalDataset, TrainingExamples, load_dataset
from stagewise.errors import StagewiseError
from stagewise.models.specs import ModelSpec, has_transformer, load_bi_encoder, model_kind, resolve_model
from stagewise.progress import library_bars_off, map_chunks
from stagewise.rundir import RunDir, seed_everything
from stagewise.timing import recording, span
from stagewise.training.config import BiTrainConfig, check_train_config
from stagewise.training.evaluators import dev_corpus_subset, make_retrieval_evaluator
from stagewise.training.examples import load_train_examples, mine_from_first_stage
from stagewise.training.fit import fit_trainer, load_saved_examples, to_hf_dataset, training_arguments

_PAIR_LOSSES = {"mnrl", "cached-mnrl", "gist", "triplet", "margin-mse"}


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
            from stagewise.search.retrievers import BM25Retriever

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

    from stagewise.models.specs import load_cross_encoder
    from stagewise.progress import tqdm_off
    from stagewise.search.retrievers import DenseRetriever

    retriever = DenseRetriever(spec, batch_size=config.batch_size, max_seq_length=config.max_seq_length)
    model = _MiningModel(retriever)
    cross = load_cross_encoder(config.negative_filter) if config.negative_filter else None
    with span("mine", spec.name, len(examples), "queries"), tqdm_off(hard_negatives):
        mined = mine_hard_negatives(
            to_hf_dataset({"anchor": examples.columns["anchor"], "positive": examples.columns["positive"]}), model,
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
    from stagewise.models.specs import load_cross_encoder

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
        columns = load_saved_examples(run, "train_data.json") if resume else None
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
        args = training_arguments(SentenceTransformerTrainingArguments, config, run, evaluator is not None,
                                   {"batch_sampler": sampler})
        fit = fit_trainer(SentenceTransformerTrainer, model, args, to_hf_dataset(columns), _bi_loss(loss_name, model, spec, config),
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
    from stagewise.evaluation.runs import evaluate
    from stagewise.search.retrievers import DenseRetriever

    before = DenseRetriever(spec, max_seq_length=config.max_seq_length)
    after = DenseRetriever(str(model_dir), max_seq_length=config.max_seq_length)
    after.name = "fine-tuned"
    results = evaluate(dataset, config.dev_split, [before, after])
    return {r.name if r.name == "fine-tuned" else "base": r.metrics for r in results}
