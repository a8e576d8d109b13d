"""What a training run is asked for: both trainings' settings, each number's range and each name's choices.

``check_train_config`` refuses a bad setting before any work starts, naming it as a settings file and the command
line spell it; ``train bi``, ``train cross`` and ``select`` (its ``bi_training`` and ``cross_training``) all check
through it, and the training commands' options take their bounds from :data:`RANGES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.errors import StagewiseError
from stagewise.limits import (
    MAX_BATCH,
    MAX_CANDIDATES,
    MAX_COUNT,
    MAX_EPOCHS,
    MAX_LEARNING_RATE,
    MAX_PATIENCE,
    MAX_SECONDS,
    MAX_TOKENS,
    MAX_WEIGHT,
)
from stagewise.training.pseudo_queries import KINDS as PSEUDO_QUERY_KINDS

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
#: options take their bounds from here (``stagewise.cli.options._train_range``).
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
