"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class StagewiseError(Exception):
    """Base class for every error caused by the user's input or environment."""


class DataError(StagewiseError):
    """A data file is malformed; carries the file, line and field so the user can go straight there."""

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ModelError(StagewiseError):
    """A model spec cannot be resolved or loaded (missing package, offline hub id, wrong model kind)."""


class Unavailable(StagewiseError):
    """A store the index searches through (a Milvus server) is not answering now: the same call may work later.

    The message is for clients, so it names no internal address; the service answers it with 503."""
