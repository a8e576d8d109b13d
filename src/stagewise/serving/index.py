"""A persistent, updatable search index: a pipeline's first stage built over a corpus, stored on disk.

Layout (one folder)::

    INDEX/
      CURRENT          "v000003 <sha256 of its manifest>": the version readers load
      .lock            held by writers (build, add, delete), never by readers
      v000003/         one complete, immutable version
        manifest.json  format, model identities, index options, counts, sha256 of every file
        pipeline.yaml  the pipeline (first stage, reranker, depth, fusion), models named relative to it
        models/        copies of local models (hard links between versions), so the folder is deployable
        docs.jsonl     the documents, in BEIR corpus format
        first_stage/   the first stage's files (vectors, HNSW graph, quantised codes, BM25 matrices)
      v000002/         the previous version, kept until the next commit

Every write builds a new version in a temporary folder, renames it into place, then switches ``CURRENT``
by atomic rename: a build or update killed at any point leaves the previous version loading and answering.
Loading checks the manifest against ``CURRENT``, every file against its checksum and every model against its
fingerprint, and refuses a mismatch with an error that says which file or model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from stagewise.data.dataset import is_blank
from stagewise.data.loaders import Document, load_corpus, load_dataset
from stagewise.errors import StagewiseError
from stagewise.models.backends import Backend, fingerprints
from stagewise.search.pipeline import Hit, Pipeline, Query, StageTimings
from stagewise.search.rerankers import require_trained
from stagewise.search.retrievers import build_first_stage
from stagewise.search.vector_index import VectorIndexConfig

FORMAT = "stagewise-index"
FORMAT_VERSION = 1
_VERSION_RE = re.compile(r"^v(\d{6})$")


class InvalidIndexError(StagewiseError):
    """An index folder is missing, corrupted, or does not match the models it was built with."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def is_index(path: str | Path) -> bool:
    return (Path(path) / "CURRENT").is_file()


class Index:
    """A loaded index: the pipeline with its first stage attached to the stored corpus, ready to search."""

    def __init__(self, path: Path, version: str, manifest: dict, pipeline: Pipeline):
        self.path, self.version, self.manifest, self.pipeline = path, version, manifest, pipeline

    @property
    def corpus(self) -> dict[str, Document]:
        return self.pipeline.corpus

    def __len__(self) -> int:
        return len(self.corpus)

    # ---- building and loading ----------------------------------------------------------------

    @classmethod
    def build(cls, pipeline: Pipeline | str | Path, corpus: dict[str, Document] | str | Path, path: str | Path,
              vectors: VectorIndexConfig | None = None, replace: bool = False,
              allow_untrained_reranker: bool = False) -> "Index":
        """Encode ``corpus`` with ``pipeline``'s first stage and store it at ``path`` as a new index.

        An existing index is only replaced with ``replace=True``; until the new version is committed it keeps
        answering, and a build that fails or is killed leaves it untouched. A reranker without a trained head is
        refused unless ``allow_untrained_reranker``.
        """
        path = Path(path)
        if is_index(path) and not replace:
            raise InvalidIndexError(f"{path}: already an index (rebuild it with --replace, or use 'index add')")
        if path.exists() and not is_index(path) and (
                not path.is_dir() or any(not _leftover(p.name) for p in path.iterdir())):
            raise InvalidIndexError(f"{path}: exists and is not an index; choose an empty or new folder")
        if not isinstance(pipeline, Pipeline):
            pipeline = Pipeline.load(pipeline)
        require_trained(pipeline.reranker, allow_untrained_reranker, f"index build {path}")
        corpus = _documents(corpus)
        if not corpus:
            raise InvalidIndexError(f"{path}: the corpus is empty: nothing to index")
        created = _outermost_missing(path)  # what this build creates, and removes again if it fails
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
            raise InvalidIndexError(f"{path}: cannot create the index folder ({why})") from None
        vectors = vectors or VectorIndexConfig()
        if vectors.kind == "milvus" and not vectors.uri:  # Milvus Lite in a file beside the versions
            vectors = dataclasses.replace(vectors, uri=str(path.resolve() / "milvus.db"))
        _set_vectors(pipeline.first_stage, vectors)
        earlier = {id(getattr(stage, "vectors", None)) for stage in _model_stages(pipeline)}
        try:
            pipeline.index(corpus)
            with _writer_lock(path):
                _commit(path, pipeline, corpus, parent=current_version(path) if is_index(path) else None)
        except BaseException:  # a Milvus collection made by this build would otherwise outlive it
            for stage in _model_stages(pipeline):
                made = getattr(stage, "vectors", None)
                if id(made) not in earlier and hasattr(made, "drop"):
                    made.drop()
            if created is not None:  # no half-built folder (and no stale .lock) where there was none
                shutil.rmtree(created, ignore_errors=True)
            raise
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path, pipeline: Pipeline | str | Path | None = None, verify: bool = True,
             backend: Backend | None = None, threads: int | None = None) -> "Index":
        """Load the current version; ``pipeline`` swaps in another reranker/depth/fusion over the same first stage.

        ``backend`` runs the models on another backend than the one they were built with: an export of the same
        model passes the fingerprint check (its equivalence was checked when it was exported)."""
        path = Path(path)
        version, manifest = _read_manifest(path, verify)
        folder = path / version
        stored = Pipeline.load(folder / "pipeline.yaml", backend=backend, threads=threads)
        _check_models(stored, manifest, folder)
        if pipeline is not None:
            other = pipeline if isinstance(pipeline, Pipeline) else Pipeline.load(pipeline, backend=backend,
                                                                                    threads=threads)
            _check_same_first_stage(other, stored, path)
            other.first_stage = stored.first_stage
            stored = other
        corpus = load_corpus(folder / "docs.jsonl", invisible_ok=True)
        if len(corpus) != manifest["documents"]:
            raise InvalidIndexError(
                f"{folder / 'docs.jsonl'}: {len(corpus)} documents, manifest says {manifest['documents']}")
        stored.first_stage.load_index(folder / "first_stage", corpus)
        stored.corpus = corpus
        return cls(path, version, manifest, stored)

    # ---- updates -----------------------------------------------------------------------------

    def add(self, documents: dict[str, Document] | Iterable[Document] | str | Path, upsert: bool = False) -> "Index":
        """Add documents (encoding only them); existing ids are refused unless ``upsert`` replaces them."""
        documents = _documents(documents)
        existing = [d for d in documents if d in self.corpus]
        if existing and not upsert:
            raise InvalidIndexError(f"{len(existing)} document id(s) already in the index, e.g. '{existing[0]}' "
                                    "(use --upsert to replace them)")
        return self._update(existing, list(documents.values()))

    def delete(self, ids: Iterable[str], missing_ok: bool = False) -> "Index":
        ids = list(dict.fromkeys(ids))
        missing = [i for i in ids if i not in self.corpus]
        if missing and not missing_ok:
            raise InvalidIndexError(f"{len(missing)} document id(s) not in the index, e.g. '{missing[0]}'")
        return self._update([i for i in ids if i in self.corpus], [])

    def _update(self, removed: list[str], added: list[Document]) -> "Index":
        with _writer_lock(self.path):
            if current_version(self.path) != self.version:
                raise InvalidIndexError(f"{self.path}: changed since it was loaded (now {current_version(self.path)}, "
                                        f"loaded {self.version}); load it again and retry")
            gone = set(removed)
            if not gone and not added:
                return self
            if len(gone) == len(self.corpus) and not added:
                raise InvalidIndexError(f"{self.path}: deleting every document would leave an empty index")
            rows = np.array([i for i, d in enumerate(self.corpus) if d in gone], dtype=np.int64)
            corpus = {d: doc for d, doc in self.corpus.items() if d not in gone} | {d.id: d for d in added}
            replaced = len(gone & {d.id for d in added})
            change = {"added": len(added) - replaced, "replaced": replaced, "deleted": len(gone) - replaced}
            try:
                self.pipeline.first_stage.update_index(corpus, rows, added)
                self.pipeline.corpus = corpus
                self.version = _commit(self.path, self.pipeline, corpus, self.version, change)
            except BaseException:  # the stored index is untouched; bring this object back in line with it
                reranker, depth, fusion = self.pipeline.reranker, self.pipeline.depth, self.pipeline.fusion
                self.__dict__.update(Index.load(self.path, verify=False).__dict__)
                self.pipeline.reranker, self.pipeline.depth, self.pipeline.fusion = reranker, depth, fusion
                raise
        self.manifest = _read_manifest(self.path, verify=False)[1]
        return self

    # ---- searching ---------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, depth: int | None = None, rerank: bool = True) -> list[Hit]:
        return self.pipeline.search(query, k, depth, rerank)

    def search_many(self, queries: list[Query], cancelled=None) -> tuple[list[list[Hit]], StageTimings]:
        return self.pipeline.search_many(queries, cancelled)

    def describe(self) -> dict:
        """What the index holds, for ``/stats`` and ``index info``."""
        m = self.manifest
        models = self.path / self.version / "models"
        return {"path": str(self.path), "version": self.version, "created": m["created"], "documents": len(self),
                "first_stage": self.pipeline.first_stage.name, "vectors": m["vectors"],
                "reranker": self.pipeline.reranker.name if self.pipeline.reranker else None,
                "depth": self.pipeline.depth,
                "fusion": self.pipeline.fusion.config() if self.pipeline.reranker else None,
                "disk_bytes": sum(f["bytes"] for f in m["files"].values()),
                "model_disk_bytes": sum(f.stat().st_size for f in models.rglob("*") if f.is_file()),
                "memory_bytes": self.pipeline.first_stage.index_bytes(), "models": m["models"]}


def load_pipeline_spec(spec: str | Path, backend: Backend | None = None, threads: int | None = None) -> Pipeline:
    """A ``pipeline.yaml``, a folder holding one (a ``select`` run), or a first stage (``bm25``, a model, ``a+b``)."""
    path = Path(spec)
    if path.is_dir() and (path / "pipeline.yaml").is_file():
        path = path / "pipeline.yaml"
    if path.is_file():
        return Pipeline.load(path, backend=backend, threads=threads)
    if str(spec).endswith((".yaml", ".yml")):
        raise StagewiseError(f"{spec}: pipeline file not found")
    return Pipeline(build_first_stage(str(spec), backend=backend, threads=threads))


def _documents(documents: dict[str, Document] | Iterable[Document] | str | Path) -> dict[str, Document]:
    """Documents to index, from a corpus file or the Python API; a blank one (no text and no title, or invisible
    characters alone) is refused by either, as the file loader refuses it: nothing in it can be searched for."""
    if isinstance(documents, (str, Path)):
        return load_corpus(documents)
    documents = documents if isinstance(documents, dict) else {d.id: d for d in documents}
    blank = next((d for d in documents.values() if is_blank(d.text) and is_blank(d.title)), None)
    if blank is not None:
        raise InvalidIndexError(f"document '{blank.id}': empty (no text and no title, or invisible characters alone)")
    return documents


def load_corpus_spec(spec: str | Path) -> dict[str, Document]:
    """A ``corpus.jsonl`` file, a BEIR folder, or ``default`` (the embedded dataset)."""
    path = Path(spec)
    if path.is_dir() and (path / "corpus.jsonl").is_file():
        path = path / "corpus.jsonl"
    if path.is_file():
        return load_corpus(path)
    return load_dataset(str(spec)).corpus


# ---- the on-disk protocol ----------------------------------------------------------------------


@contextlib.contextmanager
def _writer_lock(path: Path):
    """One writer at a time per index (an advisory lock, released by the OS if the writer dies)."""
    with open(path / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidIndexError(f"{path}: another build or update is running on this index") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current_version(path: Path) -> str:
    """The version ``CURRENT`` names: what a reader loading ``path`` now gets."""
    try:
        return (path / "CURRENT").read_text().split()[0]
    except (OSError, IndexError):
        raise InvalidIndexError(f"{path}: not an index (no readable CURRENT file)") from None


def _versions(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder ``path.mkdir(parents=True)`` would create, or None when ``path`` exists."""
    if path.exists() or path.is_symlink():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _leftover(name: str) -> bool:
    """What a failed first build may leave behind: the lock, a temporary folder, a version never switched to."""
    return name in (".lock", "milvus.db") or name.startswith((".tmp-v", ".milvus.db")) or bool(_VERSION_RE.match(name))


def _commit(path: Path, pipeline: Pipeline, corpus: dict[str, Document], parent: str | None,
            change: dict | None = None) -> str:
    """Write a complete new version beside the current one, then switch ``CURRENT`` to it atomically."""
    for stale in path.glob(".tmp-v*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    for dead in _versions(path):  # renamed into place, but CURRENT was never switched to it
        if parent is None or dead > parent:
            shutil.rmtree(path / dead)
    numbers = [int(v[1:]) for v in _versions(path)]
    version = f"v{max(numbers, default=0) + 1:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=path))
    try:
        copies = _copy_models(pipeline, tmp / "models", path / parent / "models" if parent else None)
        pipeline.save(tmp / "pipeline.yaml", rename=copies)
        _write_docs(tmp / "docs.jsonl", corpus)
        pipeline.first_stage.save_index(tmp / "first_stage")
        manifest = _manifest(tmp, pipeline, corpus, version, parent, change)
        _atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1))
        for f in tmp.rglob("*"):
            if f.is_file() and "models" not in f.relative_to(tmp).parts[:1]:
                _fsync(f)
        os.rename(tmp, path / version)
        _fsync(path)
        _atomic_write(path / "CURRENT", f"{version} {_sha256(path / version / 'manifest.json')}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pruned = [old for old in _versions(path) if old not in (version, parent)]
    _drop_external(path, pruned, kept=[version, parent])
    for old in pruned:
        shutil.rmtree(path / old, ignore_errors=True)
    return version


def _external_collections(folder: Path) -> set[tuple[str, str]]:
    """The Milvus collections a version's first stage keeps its vectors in."""
    from stagewise.scale.milvus import resolve_uri

    found = set()
    for meta in folder.glob("first_stage/**/vectors.json"):
        info = json.loads(meta.read_text())
        if info.get("collection"):
            found.add((resolve_uri(info["uri"], folder.parent), info["collection"]))
    return found


def _drop_external(path: Path, pruned: list[str], kept: list[str | None]) -> None:
    """Drop the Milvus collections only pruned versions used (a rebuild makes a new one)."""
    still_used = set().union(*(_external_collections(path / v) for v in kept if v))
    for uri, collection in set().union(*(_external_collections(path / v) for v in pruned)) - still_used:
        from stagewise.scale.milvus import client

        client(uri).drop_collection(collection)


def _copy_models(pipeline: Pipeline, target: Path, previous: Path | None) -> dict[str, str]:
    """Copy local models into the version (hard links to the previous version's copy when unchanged).

    Returns {model spec: its copy}. Packaged aliases (``minilm-l6``) stay aliases; their fingerprints are still
    checked on load.
    """
    copies = {}
    for name, spec in _model_folders(pipeline):
        if spec.alias:
            continue
        dest = target / f"{_slug(name)}-{spec.fingerprint}"
        if previous and (previous / dest.name).is_dir():  # our own immutable copy: share its files
            shutil.copytree(previous / dest.name, dest, copy_function=_link_or_copy)
        elif not dest.exists():  # the user's files: a real copy, so rewriting them in place cannot touch the index
            shutil.copytree(spec.path, dest)
        copies[spec.spec] = str(dest)
    return copies


def _model_folders(pipeline: Pipeline) -> list:
    """(name, spec) of every model folder the pipeline loads: each stage's, and its per-query model's."""
    out = []
    for stage in _model_stages(pipeline):
        out.append((stage.name, stage.spec))
        if getattr(stage, "per_query", None):
            out.append((f"{stage.name}-per-query", stage.per_query.spec))
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60] or "model"


def _model_stages(pipeline: Pipeline) -> list:
    """Every stage with a model (dense first stages, the reranker)."""
    out, todo = [], [pipeline.first_stage]
    while todo:
        stage = todo.pop(0)
        todo += getattr(stage, "stages", [])
        if hasattr(stage, "spec"):
            out.append(stage)
    if pipeline.reranker is not None:
        out.append(pipeline.reranker)
    return out


def _write_docs(path: Path, corpus: dict[str, Document]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for doc in corpus.values():
            f.write(json.dumps({"_id": doc.id, "title": doc.title, "text": doc.text}, ensure_ascii=False) + "\n")


def _manifest(folder: Path, pipeline: Pipeline, corpus, version, parent, change) -> dict:
    from stagewise import __version__

    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and rel.parts[0] != "models":
            files[rel.as_posix()] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    vectors = sorted({s.vectors.config.label for s in _model_stages(pipeline) if getattr(s, "vectors", None)})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "stagewise": __version__, "version": version,
        "parent": parent, "change": change or {"built": len(corpus)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "documents": len(corpus), "first_stage": pipeline.first_stage.config(), "vectors": ", ".join(vectors) or None,
        "models": [{"name": s.name, "fingerprint": s.spec.fingerprint} for s in _model_stages(pipeline)],
        "files": files,
    }


def _read_manifest(path: Path, verify: bool) -> tuple[str, dict]:
    if not path.is_dir():
        raise InvalidIndexError(f"{path}: no such index")
    try:
        version, manifest_sha = (path / "CURRENT").read_text().split()
    except (OSError, ValueError):
        raise InvalidIndexError(
            f"{path}: not an index (no readable CURRENT file; build one with 'stagewise index build')") from None
    manifest_path = path / version / "manifest.json"
    if not manifest_path.is_file():
        raise InvalidIndexError(f"{manifest_path}: missing (CURRENT names version {version})")
    if verify and _sha256(manifest_path) != manifest_sha:
        raise InvalidIndexError(f"{manifest_path}: checksum does not match CURRENT: the index is corrupted")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidIndexError(f"{manifest_path}: unreadable ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise InvalidIndexError(f"{manifest_path}: format {manifest.get('format')} v{manifest.get('format_version')}, "
                          f"this stagewise reads {FORMAT} v{FORMAT_VERSION}")
    if verify:
        for rel, info in manifest["files"].items():
            f = path / version / rel
            if not f.is_file():
                raise InvalidIndexError(f"{f}: missing: the index is corrupted")
            if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
                raise InvalidIndexError(f"{f}: checksum mismatch: the index is corrupted (rebuild it)")
    return version, manifest


def _check_models(pipeline: Pipeline, manifest: dict, folder: Path) -> None:
    stages = _model_stages(pipeline)
    if len(stages) != len(manifest["models"]):
        raise InvalidIndexError(f"{folder / 'pipeline.yaml'}: names {len(stages)} models, the manifest "
                                f"{len(manifest['models'])}: the index is corrupted")
    for stage, expected in zip(stages, manifest["models"]):
        if expected["fingerprint"] not in fingerprints(stage.spec):
            raise InvalidIndexError(
                f"{folder}: built with model '{expected['name']}' (fingerprint {expected['fingerprint']}), but "
                f"'{stage.spec.spec}' now has fingerprint {stage.spec.fingerprint}: rebuild the index")


def _check_same_first_stage(other: Pipeline, stored: Pipeline, path: Path) -> None:
    """A pipeline given at load may change the reranker, depth and fusion, never the first stage the vectors
    came from."""
    ours = [s.spec.fingerprint for s in _model_stages(stored) if s is not stored.reranker]
    theirs = [s.spec.fingerprint for s in _model_stages(other) if s is not other.reranker]
    if ours != theirs or other.first_stage.config()["type"] != stored.first_stage.config()["type"]:
        raise InvalidIndexError(
            f"{path}: the pipeline's first stage ({other.first_stage.name}) is not the one this index was built with "
            f"({stored.first_stage.name}): rebuild the index with it")


def _set_vectors(stage, config: VectorIndexConfig) -> None:
    for s in [stage, *getattr(stage, "stages", [])]:
        if hasattr(s, "vector_config"):
            s.vector_config = config
            s._indexed = None
