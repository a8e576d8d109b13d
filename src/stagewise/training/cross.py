"""Fine-tune a cross-encoder (``train_cross``) on the mistakes it will actually see.

Its negatives are mined from the first stage it will rerank, at the depth it will rerank, plus random ones;
optionally it is pre-trained first on pseudo-queries made from the corpus (``pseudo_queries``), since a few hundred
labelled queries are too few for a start that was never a reranker. The run is a :class:`RunDir` and can resume;
a collapsed reranker is detected on dev and reported. Also here: the start each ``--init`` names, and the sequence
length ``select`` chooses (``fit_max_length``).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from stagewise.data.loaders import RetrievalDataset, load_dataset
from stagewise.errors import DataError, StagewiseError
from stagewise.evaluation.runs import compute_metrics, run_from_rankings
from stagewise.models.specs import ModelSpec, check_cross_encoder, model_kind, resolve_model
from stagewise.progress import library_bars_off
from stagewise.rundir import RunDir, seed_everything
from stagewise.timing import recording, span
from stagewise.training.config import MIN_EXAMPLES, CrossTrainConfig, check_train_config
from stagewise.training.evaluators import detect_collapse, health_warning, make_rerank_evaluator, rerank_with
from stagewise.training.examples import load_train_examples, mine_from_first_stage, sample_queries
from stagewise.training.fit import fit_trainer, load_saved_examples, to_hf_dataset, training_arguments
from stagewise.training.pseudo_queries import make_pseudo_queries, mine_pseudo_negatives


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

    from stagewise.models.specs import load_cross_encoder

    done = run.path / "pretrain.json"
    if resume and done.is_file() and (run.path / "pretrained").is_dir():
        return json.loads(done.read_text())
    started = time.perf_counter()
    columns = load_saved_examples(run, "pretrain_data.json") if resume else None
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
    args = training_arguments(CrossEncoderTrainingArguments, phase, run, False, {}, checkpoints="pretrain-checkpoints")
    loss = _cross_loss(loss_name, model, columns, config.pos_weight)
    fit = fit_trainer(CrossEncoderTrainer, model, args, to_hf_dataset(columns), loss, None, phase, run, resume, phase="pretrain",
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

    from stagewise.models.specs import load_cross_encoder
    from stagewise.search.retrievers import build_first_stage, retrieve_once

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
        columns = load_saved_examples(run, "train_data.json") if resume else None
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
        args = training_arguments(CrossEncoderTrainingArguments, config, run, evaluator is not None, {})
        loss = _cross_loss(loss_name, model, columns, config.pos_weight)
        fit = fit_trainer(CrossEncoderTrainer, model, args, to_hf_dataset(columns), loss, evaluator, config, run, resume,
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
