"""``serve``: an index over HTTP. It calls ``service.serve`` at run time, so that tests can replace it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stagewise.cli.main import app, user_errors
from stagewise.cli.options import (
    ALLOW_UNTRAINED_OPTION,
    BACKEND_OPTION,
    DTYPE_OPTION,
    PATH,
    QUANTIZE_OPTION,
    THREADS_OPTION,
    backend_option,
)
from stagewise.progress import console


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
    from stagewise.serving.index import Index
    from stagewise.serving.live_index import LiveIndex
    from stagewise.serving.service import ServiceSettings, check_listen, is_loopback, serve

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
