"""One progress-bar style for every long step: count, rate, elapsed and ETA (rich); and terminal-safe text."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

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


def map_chunks(fn: Callable[[list], Any], items: Sequence, description: str, chunk_size: int = 256) -> np.ndarray:
    """``fn`` over consecutive chunks of ``items`` on one of our bars (items done, rate, ETA); the chunks' results
    (arrays with one row per item) concatenated in order.

    For sentence-transformers' ``encode`` and ``predict``, called with ``show_progress_bar=False``: long work then
    shows our style only, never a tqdm "Batches" bar in the middle of it."""
    items = list(items)
    if not items:
        return np.asarray(fn(items))
    size = max(1, chunk_size)
    parts = []
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(items))
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            parts.append(np.asarray(fn(chunk)))
            bar.advance(task, len(chunk))
    return np.concatenate(parts)


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """transformers' own tqdm bars (loading and writing model shards) off while our bars show the long work."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
