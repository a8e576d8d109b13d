"""A run directory: what every command that computes something leaves behind, the same way.

``config.json`` (resolved inputs, seed, data and model fingerprints, versions), ``metrics.jsonl`` (one
line per evaluation or logged training loss), ``result.json`` (the outcome and wall time), ``log.txt``, and
whatever the command produces (models, runs, per-query results). A run can be resumed only with the same config.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from datetime import datetime, timezone
from pathlib import Path

from stagewise.errors import StagewiseError

# Settings that may differ between an interrupted run and its resumption.
_RESUMABLE_KEYS = {"resume", "created", "max_seconds", "time_budget_min"}


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("stagewise", "sentence-transformers", "transformers", "torch", "onnxruntime", "onnx", "openvino",
                    "nncf"):  # the backends' runtimes, where installed
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


def cpu() -> dict:
    """The CPU's model and its vector-instruction flags: speed figures are only comparable on the same ones."""
    info = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        elif key.strip() == "flags":
            info["flags"] = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma", "sse4", "vnni")))
            break
    return info


class RunDir:
    def __init__(self, path: str | Path, config: dict, resume: bool = False):
        self.path = Path(path)
        self.started = time.perf_counter()
        config = {**config, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "versions": versions()}
        saved = self.path / "config.json"
        if saved.is_file():
            try:
                previous = json.loads(saved.read_text())
            except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
                raise StagewiseError(f"{saved}: not a readable run config ({e})") from None
            if not isinstance(previous, dict):
                raise StagewiseError(f"{saved}: not a run config (expected a JSON object)")
            if not resume:
                raise StagewiseError(f"{self.path} already holds a run: pass --resume to continue it, or another --out")
            changed = sorted(k for k in set(previous) | set(config)
                             if k not in _RESUMABLE_KEYS | {"versions"} and previous.get(k) != config.get(k))
            if changed:
                raise StagewiseError(f"{saved}: cannot resume with a different config (changed: {', '.join(changed)})")
            config = previous
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
            raise StagewiseError(f"{self.path}: cannot create the run directory ({why})") from None
        self.config = config
        if not saved.is_file():
            self.write_json("config.json", config)
        self._handler = logging.FileHandler(self.path / "log.txt")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(self._handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        logging.getLogger("stagewise").setLevel(logging.INFO)

    @classmethod
    def default_path(cls, prefix: str) -> Path:
        return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"

    def write_json(self, name: str, data) -> Path:
        """Write through a temporary file and rename, so a crash never leaves half a file."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(target)
        return target

    def log_metrics(self, metrics: dict, **context) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({**context, **metrics, "time": round(time.perf_counter() - self.started, 2)}) + "\n")

    def metrics_history(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    @property
    def wall_seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def finish(self, result: dict) -> Path:
        """Write ``result.json`` (with the wall time) and stop logging into this run."""
        path = self.write_json("result.json", {**result, "wall_seconds": self.wall_seconds})
        self.close()
        return path

    def close(self) -> None:
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        """Stop logging into this run however the work ended (an error or Ctrl-C included)."""
        self.close()
