"""One progress-bar style for every long step: count, rate, elapsed and ETA (rich); and terminal-safe text."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: wide enough that tables are not truncated
    console.width = 160


#: What a terminal would act on rather than show: C0/C1 controls (ESC starts colour, title and hyperlink
#: sequences), DEL, and the bidirectional overrides that reorder what is displayed.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match) -> str:
    char = match.group()
    if char in "\t\n\r":
        return " "
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """User or document text as the terminal may show it: tabs and line breaks become spaces, every other control
    character is made visible (``\\x1b``), so a document cannot recolour, retitle or rewrite the terminal. For
    tables, lines and error messages; never for ``--json`` output, which keeps the text as it is."""
    return _CONTROL.sub(_visible, str(text))


class _Rate(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f}/s" if speed else "?/s", style="progress.data.speed")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), _Rate(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False,
    )


def pair_length(pair: tuple[str, str]) -> int:
    """A (query, document) pair's length in characters: what sorts pairs into batches of similar length."""
    return len(pair[0]) + len(pair[1])


def map_chunks(fn: Callable[[list], Any], items: Sequence, description: str, chunk_size: int = 256,
               length: Callable[[Any], int] | None = None) -> np.ndarray:
    """``fn`` over consecutive chunks of ``items`` on one of our bars (items done, rate, ETA); the chunks' results
    (arrays with one row per item) concatenated in the items' order.

    For sentence-transformers' ``encode`` and ``predict``, called with ``show_progress_bar=False``: long work then
    shows our style only, never a tqdm "Batches" bar in the middle of it. With ``length``, the items go through
    longest first, so that each chunk (and each batch sentence-transformers makes of it, sorted within the chunk)
    holds texts of similar length and carries little padding; the rows come back in the original order."""
    items = list(items)
    if not items:
        return np.asarray(fn(items))
    order = np.argsort([-length(x) for x in items], kind="stable") if length else np.arange(len(items))
    size = max(1, chunk_size)
    parts = []
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(items))
        for start in range(0, len(items), size):
            chunk = [items[i] for i in order[start:start + size]]
            parts.append(np.asarray(fn(chunk)))
            bar.advance(task, len(chunk))
    rows = np.concatenate(parts)
    if length is None:
        return rows
    out = np.empty_like(rows)
    out[order] = rows
    return out


@contextlib.contextmanager
def tqdm_off(*modules) -> Iterator[None]:
    """The tqdm bars that ``modules`` draw (by their module-level ``tqdm`` / ``trange``) off inside this block: for
    library steps that take no option to silence them."""
    import functools

    saved = [(m, name, getattr(m, name)) for m in modules for name in ("tqdm", "trange") if hasattr(m, name)]
    for module, name, original in saved:
        setattr(module, name, functools.partial(original, disable=True))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """transformers' own tqdm bars (loading and writing model shards) and sentence-transformers' "Computing widget
    examples" (its model card, when a trainer starts) off while our bars show the long work."""
    from sentence_transformers.base import model_card
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tqdm_off(model_card):
            yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def warnings_on_console() -> Iterator[None]:
    """Python warnings inside this block shown as one of our lines ("warning: …", escaped, no source line) and
    logged to the run's log, instead of Python's two-line form with the file and line that raised them."""
    from rich.markup import escape

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        console.print(f"  [yellow]warning[/]: {escape(printable(message))}", highlight=False)
        logging.getLogger("stagewise").warning("%s", message)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
