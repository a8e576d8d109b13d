"""``select`` (choose a pipeline stage by stage, then show its verdict and an example) and ``export`` (a model for
ONNX Runtime or OpenVINO, one of select's backend candidates). Not ``select.py``: run as a script, this folder would
come first on sys.path and hide the standard library's ``select``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from stagewise.cli.main import app, results_console, user_errors
from stagewise.cli.options import ENGINE_OPTION, PATH, RAY_ADDRESS_OPTION, TEXT_PATH, THREADS_OPTION, _above, _between
from stagewise.limits import MAX_CANDIDATES, MAX_COUNT, MAX_SECONDS
from stagewise.models import batch_precision
from stagewise.progress import console, printable
from stagewise.rundir import RunDir
from stagewise.scale import engine


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
    from stagewise.data.loaders import load_dataset
    from stagewise.search.pipeline import Pipeline
    from stagewise.selection.config import load_select_config
    from stagewise.selection.strategy import select

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
    from stagewise.models.backends import Backend
    from stagewise.models.export import Tolerance, export_model, load_calibration

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
