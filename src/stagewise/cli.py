"""The ``stagewise`` command: a thin layer over the Python API. User errors print one line and exit 2."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stagewise import batch_precision, engine
from stagewise.errors import StagewiseError
from stagewise.limits import (MAX_BATCH, MAX_CANDIDATES, MAX_COUNT, MAX_LEARNING_RATE, MAX_SECONDS, MAX_THREADS,
                              MAX_TOKENS)
from stagewise.progress import console, printable, warnings_on_console
from stagewise.rundir import RunDir, seed_everything

UsageError = typer.BadParameter.__base__  # click's, whether typer vendors click (0.2x) or uses the package


def _print_error(message: str) -> None:
    """Every user mistake, whoever caught it, as one red line on stderr (control characters made visible)."""
    console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)


class _OneLineUsageErrors(typer.core.TyperGroup):
    """click's usage errors (a bad option value, an unknown option or command) as one ``error:`` line with exit
    code 2, like every other user mistake, instead of a usage block and a boxed panel."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise self._one_line(e) from None

    @classmethod
    def _one_line(cls, e) -> Exception:
        if type(e).__name__ == "NoArgsIsHelpError":  # `stagewise` alone: the help, as click shows it
            return e
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _print_error(e.format_message() + hint)
        return typer.Exit(EXIT_USER_ERROR)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=_OneLineUsageErrors, help="Measure and choose two-stage neural search on your own data.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")
train_app = typer.Typer(no_args_is_help=True, help="Fine-tune a bi-encoder or a cross-encoder.")
app.add_typer(train_app, name="train")
index_app = typer.Typer(no_args_is_help=True, help="Build and update a persistent search index.")
app.add_typer(index_app, name="index")

EXIT_USER_ERROR = 2
ENGINE_OPTION = typer.Option("local", "--engine", help="Where corpus encoding and large scoring jobs run: local | ray.")
RAY_ADDRESS_OPTION = typer.Option(None, "--ray-address", help="Ray cluster to join (e.g. auto, ray://head:10001); "
                                                               "default: a local Ray.")


BACKEND_OPTION = typer.Option(None, "--backend", help="What runs the models: torch | onnx | openvino (default: "
                                                     "torch, or an exported folder's own). Measure which is fastest "
                                                     "here: `stagewise select` does.")
QUANTIZE_OPTION = typer.Option(None, "--quantize", help="none | int8 (onnx: dynamic; openvino: needs an export "
                                                       "calibrated with `stagewise export --calibration`).")
DTYPE_OPTION = typer.Option(None, "--dtype", help="float32 | bfloat16 (torch, or openvino's inference precision).")
THREADS_OPTION = typer.Option(None, "--threads", min=1, max=MAX_THREADS,
                              help="Intra-op threads for every backend (default: OMP_NUM_THREADS, else all cores).")
#: Seeds: what numpy, random and torch all accept.
SEED_RANGE = {"min": 0, "max": 2**32 - 1}
#: Results (hits, metrics tables, a verdict, what an index holds) go to stdout, so that they can be piped or saved;
#: progress, warnings and errors stay on stderr (``console``).
results_console = Console()
if not results_console.is_terminal:  # pipes and files: wide enough that tables are not truncated
    results_console.width = 160


def _nonblank(convert):
    """A path option's or argument's parser: an empty (or blank) value is refused, naming it; ``Path("")`` is the
    working directory, where ``eval --out ""`` wrote its whole run."""

    def parse(value: str):
        if not value.strip():
            raise typer.BadParameter("an empty path: name a file or folder")
        return convert(value)

    return parse


PATH = _nonblank(Path)  # every Path option and argument: parser=PATH
TEXT_PATH = _nonblank(str)  # options that take a path as text (a corpus, a calibration file, a run folder)


def _above(low: float, high: float):
    """A float option in (low, high]: click's ranges are inclusive and let NaN (and, unbounded, infinity) through."""

    def check(value):
        if value is not None and not low < value <= high:
            raise typer.BadParameter(f"must be greater than {low:g} and at most {high:g}, got {value:g}")
        return value

    return check


def _between(low: float, high: float):
    """A float option in [low, high] (NaN refused)."""

    def check(value):
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"must be between {low:g} and {high:g}, got {value:g}")
        return value

    return check


def _train_range(name: str, real: bool = False) -> dict:
    """A training option's bounds, from the table training itself checks (``training.RANGES``): the command line
    and a ``select`` file's training settings refuse the same values."""
    from stagewise.training import RANGES

    low, open_low, high = RANGES[name]
    if open_low:
        return {"callback": _above(low, high)}
    return {"callback": _between(low, high)} if real else {"min": low, "max": high}


def _vector_range(name: str) -> str:
    """An index option's range for its help; ``VectorIndexConfig`` refuses values outside it, naming the option."""
    from stagewise.vector_index import RANGES

    low, high, _ = RANGES[name]
    return f"{low} to {high}"


ALLOW_UNTRAINED_OPTION = typer.Option(False, "--allow-untrained-reranker",
                                      help="Deploy a reranker without a trained scoring head (a base model: its "
                                           "scores mean nothing; for plumbing tests only).")


def backend_option(backend: str | None, quantize: str | None, dtype: str | None):
    """The backend the options ask for, or None when none is given (then each model runs on its own)."""
    from stagewise.backends import Backend

    if backend is None and quantize is None and dtype is None:
        return None
    return Backend(backend or "torch", quantize or "none", dtype or "float32")


def user_errors(command):
    """Turn a StagewiseError into one red line on stderr and exit code 2: never a traceback for a user's mistake."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings_on_console():
                return command(*args, **kwargs)
        except StagewiseError as e:
            _print_error(str(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/] (a training run continues with --resume)")
            raise typer.Exit(130) from None

    return wrapper


@app.command("models")
@user_errors
def models_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List model aliases: source package, size, parameters, dimensions, installed or how to install."""
    from stagewise.models import model_table

    rows = model_table()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="Model aliases (models shipped in PyPI packages; work offline)")
    for col in ("alias", "package", "params", "dims", "size MB", "installed", "description / install"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["alias"], r["package"], r["params"], str(r["dims"]), str(r["size_mb"]),
                      "[green]yes[/]" if r["installed"] else "[red]no[/]",
                      r["description"] if r["installed"] else f"[yellow]{r['install']}[/]")
    results_console.print(table)
    results_console.print("Any local model directory or Hugging Face id (when online) works too.")


@data_app.command("describe")
@user_errors
def describe_command(
    data: str = typer.Argument(..., help="'default' (embedded stdlib dataset) or a BEIR folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Counts and length statistics of a dataset."""
    from stagewise.data import describe, load_dataset

    info = describe(load_dataset(data))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=escape(printable(f"{info['name']} ({info['documents']} documents, {info['queries']} "
                                         f"queries, fingerprint {info['fingerprint']})")))
    for col in ("", "count", "mean words", "median", "p95", "max"):
        table.add_column(col)
    for label, key, count in (("documents", "document_length", info["documents"]),
                              ("queries", "query_length", info["queries"])):
        s = info[key]
        table.add_row(label, str(count), str(s["mean_words"]), str(s["median_words"]), str(s["p95_words"]),
                      str(s["max_words"]))
    results_console.print(table)
    splits = Table(title="splits")
    for col in ("split", "queries", "judgements", "relevant per query"):
        splits.add_column(col)
    for name, s in info["splits"].items():
        splits.add_row(escape(printable(name)), str(s["queries"]), str(s["judgements"]), str(s["relevant_per_query"]))
    results_console.print(splits)


@app.command("eval")
@user_errors
def eval_command(
    data: str = typer.Option("default", "--data", help="'default' (embedded stdlib dataset) or a BEIR folder."),
    split: str = typer.Option("dev", "--split", help="qrels split to evaluate on."),
    first_stage: Optional[List[str]] = typer.Option(
        None, "--first-stage", "-f",
        help="bm25 (default) | model (alias, directory, hub id) | a+b (hybrid, reciprocal rank fusion). Repeatable."),
    reranker: Optional[str] = typer.Option(None, "--reranker", "-r", help="Cross-encoder model to rerank with."),
    depth: Optional[List[int]] = typer.Option(None, "--depth", "-d", min=1, max=MAX_CANDIDATES,
                                              help="Rerank depth (repeatable; default 20)."),
    pipeline_path: Optional[Path] = typer.Option(
        None, "--pipeline", parser=PATH,
        help="Evaluate exactly this pipeline.yaml (or a select run folder holding one) and its first stage alone, "
             "instead of -f/-r/-d."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", min=1, max=MAX_COUNT,
                                              help="Evaluate only the first N queries."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=MAX_BATCH, help="Encoding / scoring batch size."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", min=1, max=MAX_TOKENS,
                                                 help="Override the bi-encoder's (at most what the model takes)."),
    out: Optional[Path] = typer.Option(None, "--out", parser=PATH, help="Run directory (default runs/eval-<time>)."),
    seed: int = typer.Option(0, "--seed", **SEED_RANGE),
    engine_name: str = ENGINE_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    backend_name: Optional[str] = BACKEND_OPTION,
    quantize: Optional[str] = QUANTIZE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    threads: Optional[int] = THREADS_OPTION,
):
    """Evaluate first stages alone and reranked: nDCG@10, MRR@10, Recall@10/100, MAP@100, latency."""
    from stagewise.data import load_dataset
    from stagewise.evaluation import compare, evaluate, evaluate_pipeline, save_results
    from stagewise.pipeline import Pipeline
    from stagewise.rerankers import CrossEncoderReranker
    from stagewise.retrievers import build_first_stage

    if pipeline_path is not None and (first_stage or reranker or depth):
        raise StagewiseError("--pipeline evaluates the pipeline as saved: it cannot be combined with "
                             "-f/--first-stage, -r/--reranker or -d/--depth")
    backend = backend_option(backend_name, quantize, dtype)
    first_stage, depth = first_stage or ["bm25"], depth or [20]
    if any(d < 1 for d in depth):
        raise StagewiseError(f"--depth must be at least 1, got {min(depth)}")
    seed_everything(seed)
    dataset = load_dataset(data)
    dataset.split(split)  # a missing split fails now, before any model loads
    if pipeline_path is not None:
        path = pipeline_path / "pipeline.yaml" if pipeline_path.is_dir() else pipeline_path
        pipeline = Pipeline.load(path, batch_size=batch_size, backend=backend, threads=threads)
        config = {"command": "eval", "data": data, "dataset_fingerprint": dataset.fingerprint(), "split": split,
                  "pipeline": str(path), "pipeline_config": pipeline.config(), "max_queries": max_queries, "seed": seed}
        # an unknown engine fails before the run folder exists; a failed run stops logging into it
        with engine.use(engine_name, ray_address), RunDir(out or RunDir.default_path("eval"), config,
                                                          resumable=False) as run:
            first, final, comparison = evaluate_pipeline(dataset, split, pipeline, max_queries)
        results, comparisons = [first] + ([final] if final else []), [comparison] if comparison else []
    else:
        shared: dict = {}
        stages = [build_first_stage(spec, shared=shared, batch_size=batch_size, max_seq_length=max_seq_length,
                                    backend=backend, threads=threads) for spec in first_stage]
        cross = CrossEncoderReranker(reranker, batch_size=batch_size, backend=backend, threads=threads) \
            if reranker else None
        config = {
            "command": "eval", "data": data, "dataset_fingerprint": dataset.fingerprint(), "split": split,
            "first_stages": [s.config() for s in stages], "reranker": cross.config() if cross else None,
            "depths": depth, "max_queries": max_queries, "seed": seed,
        }
        # the run folder only once every input (the engine too) has been checked
        with engine.use(engine_name, ray_address), RunDir(out or RunDir.default_path("eval"), config,
                                                          resumable=False) as run:
            results = evaluate(dataset, split, stages, cross, depths=depth, max_queries=max_queries)
        comparisons = [compare(next(x for x in results if x.name == r.first_stage), r) for r in results
                       if r.first_stage]
    path = save_results(results, run.path, {**run.config, "wall_seconds": run.wall_seconds}, comparisons)
    run.finish({"results": str(path)})
    results_console.print(results_table(results, f"{dataset.name} / {split}"))
    for c in comparisons:
        console.print(printable(f"{c.b}: nDCG@10 {c.mean_diff:+.4f} vs first stage (95% CI {c.ci95[0]:+.4f}.."
                                f"{c.ci95[1]:+.4f}, p={c.p_value:.3g}; {c.wins} wins / {c.losses} losses / {c.ties} "
                                "ties)"), highlight=False, markup=False)
    console.print(printable(f"results: {path}"), highlight=False, markup=False)


@app.command("compare")
@user_errors
def compare_command(
    a: Path = typer.Argument(..., parser=PATH, help="per_query/<system>.json of system A (from an eval run)."),
    b: Path = typer.Argument(..., parser=PATH, help="per_query/<system>.json of system B."),
    metric: str = typer.Option("ndcg@10", "--metric"),
):
    """Compare two evaluated systems query by query: mean difference, 95% CI, paired p-value, wins/losses."""
    from stagewise.evaluation import compare_per_query, load_per_query

    c = compare_per_query(a.stem, load_per_query(a), b.stem, load_per_query(b), metric)
    results_console.print(printable(f"{c.metric}: {c.a} {c.mean_a:.4f} → {c.b} {c.mean_b:.4f}  diff {c.mean_diff:+.4f} "
                            f"(95% CI {c.ci95[0]:+.4f}..{c.ci95[1]:+.4f}, paired t-test p={c.p_value:.3g}); "
                            f"B wins {c.wins}, loses {c.losses}, ties {c.ties}"), highlight=False, markup=False)


def results_table(results, title: str) -> Table:
    table = Table(title=escape(printable(title)))
    for col in ("system", "nDCG@10", "MRR@10", "R@10", "R@100", "MAP@100", "R@depth", "p50 ms", "p95 ms", "docs/s"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in results:
        m = r.metrics
        lat = r.latency.get("total") or r.latency["first_stage"]
        ceiling = f"{m[f'recall@{r.depth}']:.3f}" if r.depth else ""
        rate = r.encoding.get("docs_per_second")
        rate_text = "" if rate is None else f"{rate:,.0f}" + (" (cached)" if r.encoding.get("from_cache") else "")
        table.add_row(escape(printable(r.name)), f"{m['ndcg@10']:.4f}", f"{m['mrr@10']:.4f}", f"{m['recall@10']:.3f}",
                      f"{m['recall@100']:.3f}", f"{m['map@100']:.4f}", ceiling, f"{lat['p50_ms']:.1f}",
                      f"{lat['p95_ms']:.1f}", rate_text)
    return table


# ---- training ------------------------------------------------------------------------------

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
    from stagewise.training import health_warning

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
    from stagewise.training import BiTrainConfig, train_bi

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
    from stagewise.training import CrossTrainConfig, train_cross

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


# ---- model selection ---------------------------------------------------------------------


@app.command("select")
@user_errors
def select_command(
    data: Optional[str] = typer.Option(None, "--data", help="'default' or a BEIR folder (train and dev splits)."),
    config: Optional[Path] = typer.Option(None, "--config", parser=PATH,
                                          help="select.yaml: candidates per stage, budgets."),
    preset: Optional[str] = typer.Option(None, "--preset", help="quick (about 10 min on 2 CPU cores) | full."),
    bi: Optional[List[str]] = typer.Option(None, "--bi", help="Candidate bi-encoder (repeatable)."),
    cross: Optional[List[str]] = typer.Option(None, "--cross", help="Candidate cross-encoder base (repeatable)."),
    depth: Optional[List[int]] = typer.Option(None, "--depth", "-d", min=1, max=MAX_CANDIDATES,
                                              help="Rerank depth to consider (repeatable)."),
    latency_budget_ms: Optional[float] = typer.Option(None, "--latency-budget-ms",
                                                      callback=_above(0, MAX_SECONDS * 1000),
                                                      help="Per-query latency the pipeline must stay within."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", callback=_above(0, MAX_SECONDS / 60),
                                                help="Minutes for the whole selection."),
    max_dev_queries: Optional[int] = typer.Option(None, "--max-dev-queries", min=1, max=MAX_COUNT),
    test_split: Optional[str] = typer.Option(None, "--test-split", help="Confirm the chosen pipeline once on this "
                                                                        "split (reported, never used to choose)."),
    query: Optional[str] = typer.Option(None, "--query", help="Example query to answer with the chosen pipeline "
                                                              "(default: the first dev query)."),
    out: Optional[Path] = typer.Option(None, "--out", parser=PATH, help="Run directory (default runs/select-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted selection in --out."),
    backends: Optional[List[str]] = typer.Option(None, "--backend", help="A backend candidate for the chosen stages "
                                                                         "(repeatable): torch, torch-bf16, onnx, "
                                                                         "onnx-int8, openvino, openvino-bf16, "
                                                                         "openvino-int8."),
    engine_name: str = ENGINE_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
):
    """Choose a pipeline stage by stage: first stages, rerankers on the chosen one, then backends; report, verdict."""
    from stagewise.data import load_dataset
    from stagewise.pipeline import Pipeline
    from stagewise.selection import load_select_config, select

    settings = load_select_config(config, preset, data=data, bi_encoders=bi or None, cross_encoders=cross or None,
                                  depths=depth or None, latency_budget_ms=latency_budget_ms,
                                  time_budget_min=time_budget, max_dev_queries=max_dev_queries, test_split=test_split,
                                  backends=backends or None)
    run_dir = out or RunDir.default_path("select")
    with engine.use(engine_name, ray_address):
        result = select(settings, run_dir, resume=resume)
    metric = settings.latency_metric
    table = Table(title=f"{result['title']}: every system measured")
    for col in ("system", "nDCG@10", f"{metric[:3]} ms/query", "within budget", "Pareto"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for row in result["systems"]:
        chosen = row["name"] == result["verdict"]["name"]
        table.add_row(("▶ " if chosen else "") + escape(printable(row["name"])), f"{row['ndcg@10']:.4f}",
                      f"{row['latency_ms']:.1f}", "yes" if row["within_budget"] else "[red]no[/]",
                      "✓" if row["pareto"] else "", style="bold" if chosen else None)
    results_console.print(table)
    results_console.print("[bold]Verdict[/]")
    for line in result["verdict"]["summary"]:
        results_console.print(f"  {printable(line)}", highlight=False, markup=False)
    kinds = sorted((result.get("time") or {}).get("by_kind", {}).items(), key=lambda kv: -kv[1]["seconds"])
    if kinds:
        console.print(f"[bold]Time[/]: {result['wall_seconds'] / 60:.1f} min, of which "
                      + ", ".join(f"{kind} {k['seconds'] / 60:.1f}" + (f" ({k['rate']:,.0f} {k['unit']}/s)"
                                                                      if k.get("rate") else "") for kind, k in kinds[:6])
                      + " (the report has the plan, each step's estimate against its cost, and every rate)",
                      highlight=False)
    console.print(printable(f"report: {run_dir / result['report']['html']}") + "\n"
                  + printable(f"pipeline: {run_dir / result['pipeline_yaml']}"), highlight=False, markup=False)
    dataset = load_dataset(settings.data)
    if query is None:
        queries, _ = dataset.split(settings.dev_split)
        query = queries[sorted(queries)[0]]
    with batch_precision.use(settings.batch_precision):  # the corpus embeddings select measured: in its cache
        pipeline = Pipeline.load(run_dir / result["pipeline_yaml"]).index(dataset.corpus)
    console.print(f"[bold]Example[/]: {escape(printable(pipeline.name))} answers {escape(printable(repr(query)))}",
                  highlight=False)
    for hit in pipeline.search(query, k=3):
        rerank = "" if hit.rerank_score is None else f", rerank score {hit.rerank_score:.3f}"
        text = printable((hit.title + ": " if hit.title else "") + hit.text[:90])
        console.print(f"  {hit.rank}. {printable(hit.doc_id)} (first stage rank {hit.first_stage_rank}, score "
                      f"{hit.first_stage_score:.3f}{rerank}) {text}…", highlight=False, markup=False)
    console.print(printable(f"Deploy it: stagewise index build --pipeline {run_dir} --corpus {settings.data} --out "
                            "INDEX, then stagewise serve INDEX"), highlight=False, markup=False)


@app.command("export")
@user_errors
def export_command(
    model: str = typer.Argument(..., help="A bi-encoder or trained cross-encoder: alias, directory, or a train/select "
                                          "run's model folder."),
    backend_name: str = typer.Option(..., "--backend", help="onnx | openvino."),
    quantize: str = typer.Option("none", "--quantize", help="none | int8 (onnx: dynamic, weights per channel; "
                                                           "openvino: static, NNCF calibrated on --calibration)."),
    dtype: str = typer.Option("float32", "--dtype", help="openvino: float32 | bfloat16 inference precision."),
    calibration: Optional[str] = typer.Option(None, "--calibration", parser=TEXT_PATH,
                                              help="Your texts: a dataset ('default', a BEIR folder) or a file with "
                                                   "one text per line. Needed for openvino int8; also the "
                                                   "equivalence sample."),
    out: Path = typer.Option(..., "--out", "-o", parser=PATH, help="New folder for the exported model."),
    min_cosine: float = typer.Option(0.98, "--min-cosine", callback=_between(-1, 1),
                                     help="Refuse a bi-encoder whose worst embedding cosine to PyTorch on the sample "
                                          "is lower."),
    min_correlation: float = typer.Option(0.98, "--min-correlation", callback=_between(-1, 1),
                                          help="Refuse a cross-encoder whose score Spearman correlation is lower."),
    min_top10: float = typer.Option(0.8, "--min-top10", callback=_between(0, 1),
                                    help="Refuse a model whose mean top-10 agreement is lower."),
    force: bool = typer.Option(False, "--force", help="Keep an export past the tolerance (recorded as forced)."),
    threads: Optional[int] = THREADS_OPTION,
):
    """Export a model to ONNX Runtime or OpenVINO (int8 or not); its equivalence to PyTorch is measured and kept."""
    from stagewise.backends import Backend
    from stagewise.export import Tolerance, export_model, load_calibration

    backend = Backend(backend_name, quantize, dtype)
    tolerance = Tolerance(min_cosine, min_correlation, min_top10)
    samples = load_calibration(calibration) if calibration else None
    manifest = export_model(model, backend, out, samples, tolerance, force=force, threads=threads)
    eq = manifest["equivalence"]
    agreement = (f"min cosine {eq['min_cosine']:.4f}" if "min_cosine" in eq else f"score correlation {eq['spearman']:.4f}")
    size = sum(f.stat().st_size for f in (out / manifest["file"]).parent.iterdir()) / 1e6
    console.print(escape(printable(f"exported {manifest['kind']} {model} for {backend.label} → "
                                   f"{out / manifest['file']} ({size:.1f} MB); vs PyTorch on {eq['sample']}: "
                                   f"{agreement}, top-10 agreement {eq['top10_agreement']:.3f}"))
                  + (" [bold yellow](past the tolerance, kept with --force)[/]" if manifest["accepted"] == "forced"
                     else ""), highlight=False)


@index_app.command("build")
@user_errors
def index_build_command(
    pipeline: str = typer.Option(..., "--pipeline", "-p", parser=TEXT_PATH,
                                 help="pipeline.yaml, a select run folder, or a first stage (bm25 | model | a+b)."),
    corpus: str = typer.Option(..., "--corpus", "-c", parser=TEXT_PATH, help="corpus.jsonl, a BEIR folder, or "
                                                                              "'default'."),
    out: Path = typer.Option(..., "--out", "-o", parser=PATH, help="Index folder to create."),
    kind: str = typer.Option("exact", "--kind", help="exact | hnsw (approximate, usearch) | milvus."),
    quantization: str = typer.Option("none", "--quantization", "-q", help="none | int8 | binary."),
    rescore: int = typer.Option(4, "--rescore", help="Quantised/HNSW: rescore this many × k candidates in float32 "
                                                     f"({_vector_range('rescore')})."),
    connectivity: int = typer.Option(16, "--connectivity",
                                     help=f"HNSW edges per node (M; {_vector_range('connectivity')})."),
    ef_construction: int = typer.Option(128, "--ef-construction",
                                        help=f"HNSW build beam width ({_vector_range('expansion_add')})."),
    ef_search: int = typer.Option(64, "--ef-search",
                                  help=f"HNSW query beam width ({_vector_range('expansion_search')})."),
    replace: bool = typer.Option(False, "--replace", help="Rebuild an existing index (it answers until the new one "
                                                          "is committed)."),
    milvus_uri: Optional[str] = typer.Option(None, "--milvus-uri", parser=TEXT_PATH,
                                             help="--kind milvus: a Milvus Lite file or http://host:19530 (default "
                                                  "INDEX/milvus.db)."),
    allow_untrained: bool = ALLOW_UNTRAINED_OPTION,
    engine_name: str = ENGINE_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    backend_name: Optional[str] = BACKEND_OPTION,
    quantize: Optional[str] = QUANTIZE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    threads: Optional[int] = THREADS_OPTION,
):
    """Encode a corpus with the pipeline's first stage and store it as a versioned, checksummed index."""
    from stagewise.index import Index, load_pipeline_spec, load_corpus_spec
    from stagewise.vector_index import VectorIndexConfig

    vectors = VectorIndexConfig(kind, quantization, rescore, connectivity, ef_construction, ef_search, milvus_uri)
    with engine.use(engine_name, ray_address):
        index = Index.build(load_pipeline_spec(pipeline, backend_option(backend_name, quantize, dtype), threads),
                            load_corpus_spec(corpus), out, vectors, replace=replace,
                            allow_untrained_reranker=allow_untrained)
    _print_index(index)


@index_app.command("add")
@user_errors
def index_add_command(
    index_path: Path = typer.Argument(..., metavar="INDEX", parser=PATH),
    documents: Path = typer.Argument(..., parser=PATH, help="Documents to add, in BEIR corpus.jsonl format."),
    upsert: bool = typer.Option(False, "--upsert", help="Replace documents whose id is already indexed."),
    engine_name: str = ENGINE_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    threads: Optional[int] = THREADS_OPTION,
):
    """Add documents without a rebuild: only they are encoded (on the backend the index was built with); the
    previous version answers until the commit."""
    from stagewise.index import Index

    with engine.use(engine_name, ray_address):
        _print_index(Index.load(index_path, threads=threads).add(documents, upsert=upsert))


@index_app.command("delete")
@user_errors
def index_delete_command(
    index_path: Path = typer.Argument(..., metavar="INDEX", parser=PATH),
    ids: Optional[List[str]] = typer.Argument(None, help="Document ids to delete."),
    ids_file: Optional[Path] = typer.Option(None, "--ids-file", parser=PATH,
                                            help="A file with one document id per line."),
    missing_ok: bool = typer.Option(False, "--missing-ok", help="Ignore ids that are not in the index."),
):
    """Delete documents by id without a rebuild."""
    from stagewise.index import Index

    from stagewise.data import text_lines

    wanted = list(ids or [])
    if ids_file:
        if not ids_file.is_file():
            raise StagewiseError(f"{ids_file}: cannot read ({'a folder' if ids_file.is_dir() else 'no such file'})")
        try:  # a line that is not UTF-8 is named by its number
            wanted += [line.strip() for _, line in text_lines(ids_file) if line.strip()]
        except OSError as e:
            raise StagewiseError(f"{ids_file}: cannot read ({e.strerror})") from None
    if not wanted:
        raise StagewiseError("no ids given (pass ids or --ids-file)")
    _print_index(Index.load(index_path).delete(wanted, missing_ok=missing_ok))


@index_app.command("info")
@user_errors
def index_info_command(index_path: Path = typer.Argument(..., metavar="INDEX", parser=PATH),
                       as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """What an index holds: version, documents, models, vector index, size on disk and in memory."""
    from stagewise.index import Index

    index = Index.load(index_path)
    if as_json:
        print(json.dumps({**index.describe(), "manifest": index.manifest}, indent=2))
    else:
        _print_index(index)


def _print_index(index) -> None:
    d = index.describe()
    change = ", ".join(f"{k} {v}" for k, v in index.manifest["change"].items())
    reranker = f"{d['reranker']} @ depth {d['depth']}" if d["reranker"] else "none"
    if d["fusion"] and d["fusion"]["weight"] < 1:
        reranker += f" fused with the first stage (reranker weight {d['fusion']['weight']:.2f})"
    results_console.print(printable(f"index {d['path']} {d['version']} ({change}): {d['documents']:,} documents; first stage "
                            f"{d['first_stage']} ({d['vectors'] or 'lexical'}); reranker {reranker}; "
                            f"{d['disk_bytes'] / 1e6:.1f} MB on disk, {d['memory_bytes'] / 1e6:.1f} MB searched in "
                            "memory"), highlight=False, markup=False)


@app.command("search")
@user_errors
def search_command(
    index_path: Path = typer.Argument(..., metavar="INDEX", parser=PATH),
    query: str = typer.Argument(...),
    k: int = typer.Option(10, "--k", "-k", min=1, max=MAX_CANDIDATES, help="Results to show."),
    depth: Optional[int] = typer.Option(None, "--depth", "-d", min=1, max=MAX_CANDIDATES,
                                        help="Candidates to rerank (default: the pipeline's)."),
    no_rerank: bool = typer.Option(False, "--no-rerank", help="First stage only."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", parser=PATH,
                                            help="Another pipeline.yaml over the same first stage (a different "
                                                 "reranker, depth or fusion)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    backend_name: Optional[str] = BACKEND_OPTION,
    quantize: Optional[str] = QUANTIZE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    threads: Optional[int] = THREADS_OPTION,
):
    """Search an index from the command line: both stages' scores and ranks (and the fused score) for every hit."""
    from stagewise.index import Index

    index = Index.load(index_path, pipeline=pipeline, backend=backend_option(backend_name, quantize, dtype),
                       threads=threads)
    hits = index.search(query, k=k, depth=depth, rerank=not no_rerank)
    if as_json:
        print(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return
    reranked = index.pipeline.reranker is not None and not no_rerank
    table = Table(title=escape(printable(f"{index.pipeline.name if reranked else index.pipeline.first_stage.name}: "
                                         f"{query}")))
    fused = any(h.fused_score is not None for h in hits)  # the column only where a fusion ordered the hits
    for col in ("rank", "moved", "doc", "first stage (rank)", "rerank", *(["fused"] if fused else []), "title / text"):
        table.add_column(col, justify="left" if col in ("doc", "title / text") else "right")
    for h in hits:
        moved = "" if h.rerank_score is None else (f"{h.first_stage_rank - h.rank:+d}" if h.first_stage_rank != h.rank
                                                   else "=")
        fused_cell = ["" if h.fused_score is None else f"{h.fused_score:.4f}"] if fused else []
        table.add_row(str(h.rank), moved, escape(printable(h.doc_id)),
                      f"{h.first_stage_score:.4f} ({h.first_stage_rank})",
                      "" if h.rerank_score is None else f"{h.rerank_score:.4f}", *fused_cell,
                      escape(printable((f"{h.title}: " if h.title else "") + h.text[:100])))
    results_console.print(table)


@app.command("serve")
@user_errors
def serve_command(
    index_path: Path = typer.Argument(..., metavar="INDEX", parser=PATH),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. The service has no authentication: "
                                                         "keep it on loopback or put it behind a proxy."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", parser=PATH,
                                            help="Another pipeline.yaml over the same first stage."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds per request, queueing included; its work stops "
                                                          "when they pass."),
    max_k: int = typer.Option(100, "--max-k"),
    max_depth: int = typer.Option(200, "--max-depth"),
    max_request_pairs: int = typer.Option(2048, "--max-request-pairs", help="Queries × depth: cross-encoder pairs "
                                                                            "one request may cost."),
    max_request_hits: int = typer.Option(1000, "--max-request-hits", help="Queries × k: hits one request may "
                                                                          "return."),
    max_text_chars: int = typer.Option(2000, "--max-text-chars", help="Each hit's title and text are cut to this "
                                                                      "many characters."),
    max_batch: int = typer.Option(32, "--max-batch", help="Queries run through the models together."),
    batch_wait_ms: float = typer.Option(2.0, "--batch-wait-ms", help="How long a batch waits for more requests."),
    reload_interval: float = typer.Option(1.0, "--reload-interval", help="Seconds between checks for a new index "
                                                                         "version (0: never reload)."),
    body_timeout: float = typer.Option(5.0, "--body-timeout", help="Seconds a request's whole body may take to arrive "
                                                                    "(a body shorter than its Content-Length: 408)."),
    allow_untrained: bool = ALLOW_UNTRAINED_OPTION,
    backend_name: Optional[str] = BACKEND_OPTION,
    quantize: Optional[str] = QUANTIZE_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    threads: Optional[int] = THREADS_OPTION,
):
    """Serve an index over HTTP: POST /search, POST /search/batch, GET /health, /stats, /docs, a search page at /.
    A new index version (index add / delete / build --replace) is served as soon as it is loaded."""
    from stagewise.index import Index
    from stagewise.live_index import LiveIndex
    from stagewise.service import ServiceSettings, check_listen, is_loopback, serve

    settings = ServiceSettings(max_k=max_k, max_depth=max_depth, timeout_s=timeout, max_batch=max_batch,
                               batch_wait_ms=batch_wait_ms, max_request_pairs=max_request_pairs,
                               max_request_hits=max_request_hits, max_text_chars=max_text_chars,
                               reload_interval_s=reload_interval, body_timeout_s=body_timeout).validate()
    check_listen(host, port)  # before the models load
    backend = backend_option(backend_name, quantize, dtype)
    index = Index.load(index_path, pipeline=pipeline, backend=backend, threads=threads)
    live = LiveIndex(index, override=index.pipeline if pipeline else None, backend=backend, threads=threads,
                     allow_untrained_reranker=allow_untrained)
    if not is_loopback(host):
        console.print(f"[yellow]warning:[/] binding to {host}: anyone who can reach it can query the index "
                      "(no authentication)", highlight=False)
    console.print(f"serving {index.pipeline.name} over {len(index):,} documents ({index.version}) on "
                  f"http://{host}:{port}/  (API: /docs, /openapi.json; Ctrl-C stops)", highlight=False, markup=False)
    serve(live, host, port, settings)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
