"""``train bi`` and ``train cross``: fine-tuning from the command line, and the summary printed after it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from stagewise.cli.main import train_app, user_errors
from stagewise.cli.options import PATH, SEED_RANGE, TEXT_PATH, _above, _train_range
from stagewise.limits import MAX_LEARNING_RATE, MAX_SECONDS
from stagewise.progress import console, printable
from stagewise.rundir import RunDir

_DATA = typer.Option("default", "--data", help="'default' or a BEIR folder: corpus, train and dev splits.")
_TRAIN_FILE = typer.Option(None, "--train-file", parser=TEXT_PATH,
                           help="JSONL/CSV/TSV pairs, tuples or scored pairs instead of the train split.")
_DEV = typer.Option("dev", "--dev-split", help="Split to evaluate on during and after training ('' for none).")
_OUT = typer.Option(None, "--out", parser=PATH, help="Run directory (default runs/train-<kind>-<time>).")
_RESUME = typer.Option(False, "--resume", help="Continue an interrupted run in --out.")
_BF16 = typer.Option(False, "--bf16", help="Train in bf16 mixed precision: faster only on CPUs with AMX or AVX-512 "
                                           "BF16 (`select` measures it before using it).")


def _loss(value) -> str:
    return "?" if value is None else f"{value:.4g}"


def _print_training(result: dict, run_dir: Path) -> None:
    from stagewise.training.evaluators import health_warning

    pre = result.get("pretrain") or {}
    if pre.get("skipped"):
        console.print(f"pre-training skipped: {pre['skipped']}", highlight=False)
    elif pre:
        console.print(f"pre-trained on {pre['queries']} pseudo-queries ({pre['examples']} pairs) in {pre['steps']} "
                      f"steps; loss {_loss(pre['loss_first'])} → {_loss(pre['loss_last'])}", highlight=False)
    train = result["train"]
    console.print(f"trained {train['steps']} steps; loss {_loss(train['loss_first'])} → {_loss(train['loss_last'])} "
                  f"({len(train.get('loss_history') or [])} values logged)", highlight=False)
    dev = result.get("dev") or {}
    for name, metrics in dev.items():
        if isinstance(metrics, dict) and "ndcg@10" in metrics:
            console.print(f"dev {name}: nDCG@10 {metrics['ndcg@10']:.4f}  Recall@100 {metrics['recall@100']:.3f}",
                          highlight=False)
    health = dev.get("health")
    if health and (warning := health_warning(health)):
        console.print("[bold yellow]warning:[/] " + escape(warning))
    console.print(printable(f"model: {result['model']}") + "\n" + printable(f"run: {run_dir}"), highlight=False,
                  markup=False)


@train_app.command("bi")
@user_errors
def train_bi_command(
    model: str = typer.Option("minilm-l6", "--model", "-m", help="Base: alias, directory or hub id."),
    data: str = _DATA,
    train_split: str = typer.Option("train", "--train-split"),
    train_file: Optional[str] = _TRAIN_FILE,
    dev_split: str = _DEV,
    loss: Optional[str] = typer.Option(None, "--loss", help="mnrl | cached-mnrl | gist | triplet | contrastive | "
                                                            "online-contrastive | cosent | margin-mse (default: from "
                                                            "the data's shape)."),
    hard_negatives: str = typer.Option("model", "--hard-negatives", help="Mine negatives with: model | bm25 | none."),
    num_negatives: int = typer.Option(1, "--num-negatives", **_train_range("num_negatives")),
    range_min: int = typer.Option(10, "--range-min", **_train_range("range_min"),
                                  help="Skip the top N candidates when mining."),
    range_max: int = typer.Option(50, "--range-max", **_train_range("range_max"),
                                  help="Mine among the top N candidates."),
    relative_margin: Optional[float] = typer.Option(0.05, "--relative-margin", **_train_range("relative_margin", True),
                                                    help="A negative must score under (1 - margin) × the positive."),
    negative_filter: Optional[str] = typer.Option(None, "--negative-filter", help="Cross-encoder to drop false "
                                                                                  "negatives when mining."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Cross-encoder teacher for margin-mse."),
    epochs: float = typer.Option(1.0, "--epochs", **_train_range("epochs")),
    batch_size: int = typer.Option(32, "--batch-size", **_train_range("batch_size")),
    learning_rate: Optional[float] = typer.Option(None, "--lr", callback=_above(0, MAX_LEARNING_RATE),
                                                  help="Default 5e-5 (0.2 for a static embedding model)."),
    max_seq_length: int = typer.Option(256, "--max-seq-length", **_train_range("max_seq_length"),
                                       help="Tokens per text (at most what the model takes)."),
    eval_steps: Optional[int] = typer.Option(None, "--eval-steps", **_train_range("eval_steps"),
                                             help="Evaluate and checkpoint every N steps (default: every epoch)."),
    patience: int = typer.Option(2, "--patience", **_train_range("early_stopping_patience"),
                                 help="Early stopping after N evaluations without gain (0: off)."),
    dev_corpus_size: int = typer.Option(2000, "--dev-corpus-size", **_train_range("dev_corpus_size"),
                                        help="Documents in the dev corpus used during training (judged ones + a "
                                             "fixed sample)."),
    bf16: bool = _BF16,
    seed: int = typer.Option(42, "--seed", **SEED_RANGE),
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
):
    """Fine-tune a bi-encoder (contrastive by default, with mined hard negatives)."""
    from stagewise.training.bi import train_bi
    from stagewise.training.config import BiTrainConfig

    config = BiTrainConfig(
        data=data, train_split=train_split, train_file=train_file, dev_split=dev_split or None, loss=loss,
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, eval_steps=eval_steps,
        early_stopping_patience=patience or None, seed=seed, model=model, max_seq_length=max_seq_length,
        hard_negatives=hard_negatives, num_negatives=num_negatives, range_min=range_min, range_max=range_max,
        relative_margin=relative_margin, negative_filter=negative_filter, teacher=teacher,
        dev_corpus_size=dev_corpus_size, bf16=bf16,
    )
    run_dir = out or RunDir.default_path("train-bi")
    _print_training(train_bi(config, run_dir, resume=resume), run_dir)


@train_app.command("cross")
@user_errors
def train_cross_command(
    model: str = typer.Option("bert-tiny", "--model", "-m", help="Base for --init base: alias, directory or hub id."),
    init: str = typer.Option("base", "--init", help="base | same-as-bi | from-finetuned-bi."),
    bi_run: Optional[str] = typer.Option(None, "--bi-run", parser=TEXT_PATH,
                                         help="A train-bi run: its base (same-as-bi), its model (from-finetuned-bi), "
                                              "and the default first stage."),
    data: str = _DATA,
    train_split: str = typer.Option("train", "--train-split"),
    train_file: Optional[str] = _TRAIN_FILE,
    dev_split: str = _DEV,
    first_stage: Optional[str] = typer.Option(None, "--first-stage", help="What mines negatives (default: the bi "
                                                                          "run's model, else bm25)."),
    depth: int = typer.Option(20, "--depth", **_train_range("depth"),
                              help="The rerank depth to train (and evaluate) for."),
    hard_negatives: int = typer.Option(7, "--hard-negatives", **_train_range("hard_negatives"),
                                       help="Negatives per query from the top --depth."),
    random_negatives: int = typer.Option(2, "--random-negatives", **_train_range("random_negatives"),
                                         help="Random negatives per query."),
    skip_top: int = typer.Option(0, "--skip-top", **_train_range("skip_top"),
                                 help="Hard negatives from below the first stage's top N only."),
    pos_weight: Optional[float] = typer.Option(None, "--pos-weight", **_train_range("pos_weight"),
                                               help="bce's weight on positives (default: negatives / positives)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="bce | mse | cross-entropy | listnet | lambda "
                                                            "(default: bce; mse for scored pairs)."),
    epochs: float = typer.Option(1.0, "--epochs", **_train_range("epochs")),
    batch_size: int = typer.Option(16, "--batch-size", **_train_range("batch_size")),
    learning_rate: float = typer.Option(5e-5, "--lr", callback=_above(0, MAX_LEARNING_RATE)),
    max_length: int = typer.Option(256, "--max-length", **_train_range("max_length"),
                                   help="Tokens per query-document pair (at most what the model takes)."),
    pretrain_queries: int = typer.Option(
        0, "--pretrain-queries", **_train_range("pretrain_queries"),
        help="Pre-train on this many pseudo-queries made from the corpus first (0: none)."),
    pretrain_kind: str = typer.Option("auto", "--pretrain-kind",
                                      help="auto | title | sentence (inverse cloze)."),
    pretrain_epochs: float = typer.Option(1.0, "--pretrain-epochs", **_train_range("pretrain_epochs")),
    pretrain_skip: int = typer.Option(2, "--pretrain-skip", **_train_range("pretrain_skip"),
                                      help="Pre-training negatives from below the first stage's top N (and below "
                                           "the source document)."),
    pretrain_minutes: Optional[float] = typer.Option(None, "--pretrain-minutes", callback=_above(0, MAX_SECONDS / 60),
                                                     help="Stop pre-training after this many minutes."),
    max_train_queries: Optional[int] = typer.Option(None, "--max-train-queries", **_train_range("max_train_queries"),
                                                    help="Train on a fixed sample of this many labelled queries."),
    dev_sample: Optional[int] = typer.Option(None, "--dev-sample", **_train_range("dev_sample"),
                                             help="Evaluate on a fixed sample of this many dev queries during "
                                                  "training (all of them at the end)."),
    eval_steps: Optional[int] = typer.Option(None, "--eval-steps", **_train_range("eval_steps")),
    patience: int = typer.Option(2, "--patience", **_train_range("early_stopping_patience")),
    bf16: bool = _BF16,
    seed: int = typer.Option(42, "--seed", **SEED_RANGE),
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
):
    """Fine-tune a cross-encoder on negatives mined from the first stage it will rerank (after pre-training on
    the corpus's own pseudo-queries, with --pretrain-queries)."""
    from stagewise.training.config import CrossTrainConfig
    from stagewise.training.cross import train_cross

    config = CrossTrainConfig(
        data=data, train_split=train_split, train_file=train_file, dev_split=dev_split or None, loss=loss,
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, eval_steps=eval_steps,
        early_stopping_patience=patience or None, seed=seed, model=model, init=init, bi_run=bi_run,
        first_stage=first_stage, depth=depth, hard_negatives=hard_negatives, random_negatives=random_negatives,
        max_length=max_length, skip_top=skip_top, pos_weight=pos_weight, pretrain_queries=pretrain_queries,
        pretrain_kind=pretrain_kind, pretrain_epochs=pretrain_epochs, pretrain_skip=pretrain_skip,
        pretrain_max_seconds=None if pretrain_minutes is None else pretrain_minutes * 60,
        max_train_queries=max_train_queries, dev_sample=dev_sample, bf16=bf16,
    )
    run_dir = out or RunDir.default_path("train-cross")
    _print_training(train_cross(config, run_dir, resume=resume), run_dir)
