"""A run directory: what every command that computes something leaves behind, the same way.

``config.json`` (resolved inputs, seed, data and model fingerprints, versions), ``metrics.jsonl`` (one
line per evaluation or logged training loss), ``result.json`` (the outcome and wall time), ``log.txt``, and
whatever the command produces (models, runs, per-query results). A run can be resumed only with the same config.

Until :meth:`RunDir.finish`, the folder also holds ``.unfinished.json`` (the command and the process writing it): a
run that failed or was killed never blocks its own command. A command that can resume is resumed (``--resume``);
one that cannot (``eval``) replaces its own unfinished folder when run again. A folder still being written by a
live process is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from stagewise.errors import StagewiseError

# Settings that may differ between an interrupted run and its resumption.
_RESUMABLE_KEYS = {"resume", "created", "max_seconds", "time_budget_min"}
UNFINISHED = ".unfinished.json"
# What RunDir itself writes: all that a replaced unfinished run loses in a folder it did not create.
_OWN_FILES = ("config.json", "result.json", "metrics.jsonl", "log.txt")


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


def _process() -> dict:
    """This process, as ``.unfinished.json`` records it: host, pid and (on Linux) start time, so a pid reused by
    another process after a kill is not mistaken for the run."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(writer: dict) -> bool:
    """Whether the process that wrote an unfinished run still runs (on another host: assumed so; in this process:
    no, the run ended with an error)."""
    if writer.get("host") not in (None, socket.gethostname()):
        return True
    pid = writer.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        pass
    return writer.get("start") is None or _start_time(pid) in (None, writer["start"])


class RunDir:
    def __init__(self, path: str | Path, config: dict, resume: bool = False, resumable: bool = True):
        """``resumable`` False: the command cannot resume (eval), so a rerun replaces its own unfinished run."""
        self.path = Path(path)
        self.started = time.perf_counter()
        config = {**config, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "versions": versions()}
        saved = self.path / "config.json"
        writer = self._writer()
        if writer is not None and _alive(writer):
            raise StagewiseError(f"{self.path}: a run is being written there (pid {writer.get('pid')} on "
                                 f"{writer.get('host')}): wait for it, or choose another --out")
        # whether this run made the folder (a replacement may then remove all of it); a killed run may have left it
        created = not self.path.exists() or bool(writer and writer.get("created"))
        if saved.is_file():
            try:
                previous = json.loads(saved.read_text())
            except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
                raise StagewiseError(f"{saved}: not a readable run config ({e})") from None
            if not isinstance(previous, dict):
                raise StagewiseError(f"{saved}: not a run config (expected a JSON object)")
            if not resume and not resumable and writer is not None and previous.get("command") == config.get("command"):
                self._clear(writer)  # its own unfinished run: replaced, as nothing can resume it
            elif not resume:
                raise StagewiseError(f"{self.path} already holds a run: pass --resume to continue it, or another --out"
                                     if resumable else f"{self.path} already holds a run: choose another --out")
            else:
                changed = sorted(k for k in set(previous) | set(config)
                                 if k not in _RESUMABLE_KEYS | {"versions"} and previous.get(k) != config.get(k))
                if changed:
                    raise StagewiseError(f"{saved}: cannot resume with a different config (changed: "
                                         f"{', '.join(changed)})")
                config = previous
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
            raise StagewiseError(f"{self.path}: cannot create the run directory ({why})") from None
        self.config = config
        # before config.json: a run killed at any point after this is known to be unfinished
        self.write_json(UNFINISHED, {"command": config.get("command"), **_process(), "created": created})
        if not saved.is_file():
            self.write_json("config.json", config)
        self._handler = logging.FileHandler(self.path / "log.txt")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(self._handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        logging.getLogger("stagewise").setLevel(logging.INFO)

    def _writer(self) -> dict | None:
        """Who left this run unfinished (``.unfinished.json``), or None: finished, or written before the marker."""
        try:
            writer = json.loads((self.path / UNFINISHED).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError):  # unreadable: unfinished, by a writer unknown (never seen as alive)
            return {}
        return writer if isinstance(writer, dict) else {}

    def _clear(self, writer: dict) -> None:
        """Remove an unfinished run: the whole folder where that run created it, else only RunDir's own files (the
        command's outputs are written again)."""
        try:
            if writer.get("created"):
                shutil.rmtree(self.path)
                return
            for name in _OWN_FILES + (UNFINISHED,):
                (self.path / name).unlink(missing_ok=True)
        except OSError as e:
            raise StagewiseError(f"{self.path}: cannot replace the unfinished run there ({e.strerror or e})") from None

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
        """Write ``result.json`` (with the wall time), mark the run finished and stop logging into it."""
        path = self.write_json("result.json", {**result, "wall_seconds": self.wall_seconds})
        (self.path / UNFINISHED).unlink(missing_ok=True)
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
