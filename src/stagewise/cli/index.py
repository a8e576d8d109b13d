"""The persistent index from the command line: ``index build / add / delete / info``, and ``search`` over one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from stagewise.cli.main import app, index_app, results_console, user_errors
from stagewise.cli.options import (
    ALLOW_UNTRAINED_OPTION,
    BACKEND_OPTION,
    DTYPE_OPTION,
    ENGINE_OPTION,
    PATH,
    QUANTIZE_OPTION,
    RAY_ADDRESS_OPTION,
    TEXT_PATH,
    THREADS_OPTION,
    _vector_range,
    backend_option,
)
from stagewise.errors import StagewiseError
from stagewise.limits import MAX_CANDIDATES
from stagewise.progress import printable
from stagewise.scale import engine


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
    from stagewise.search.vector_index import VectorIndexConfig
    from stagewise.serving.index import Index, load_corpus_spec, load_pipeline_spec

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
    from stagewise.serving.index import Index

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
    from stagewise.data.loaders import text_lines
    from stagewise.serving.index import Index

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
    from stagewise.serving.index import Index

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
    from stagewise.serving.index import Index

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
