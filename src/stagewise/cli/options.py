"""Options, parsers and checks shared by several commands: where work runs, which backend, paths that refuse an
empty value, float ranges that refuse NaN, training's and the vector index's bounds."""

from __future__ import annotations

from pathlib import Path

import typer

from stagewise.limits import MAX_THREADS

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
    from stagewise.training.config import RANGES

    low, open_low, high = RANGES[name]
    if open_low:
        return {"callback": _above(low, high)}
    return {"callback": _between(low, high)} if real else {"min": low, "max": high}


def _vector_range(name: str) -> str:
    """An index option's range for its help; ``VectorIndexConfig`` refuses values outside it, naming the option."""
    from stagewise.search.vector_index import RANGES

    low, high, _ = RANGES[name]
    return f"{low} to {high}"


ALLOW_UNTRAINED_OPTION = typer.Option(False, "--allow-untrained-reranker",
                                      help="Deploy a reranker without a trained scoring head (a base model: its "
                                           "scores mean nothing; for plumbing tests only).")


def backend_option(backend: str | None, quantize: str | None, dtype: str | None):
    """The backend the options ask for, or None when none is given (then each model runs on its own)."""
    from stagewise.models.backends import Backend

    if backend is None and quantize is None and dtype is None:
        return None
    return Backend(backend or "torch", quantize or "none", dtype or "float32")
