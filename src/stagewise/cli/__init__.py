"""The ``stagewise`` command: a thin layer over the Python API (nothing below imports it). Importing the command
modules registers their commands on ``app``, in the order ``stagewise --help`` lists them."""

from stagewise.cli import evaluate, index, selection, serve, train  # noqa: F401  (registers the commands)
from stagewise.cli.main import app

__all__ = ["app"]
