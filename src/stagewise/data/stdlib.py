"""The embedded default retrieval dataset: Python standard-library docstrings.

Every installation has it, offline, with nothing to download, and its text was written by people
outside this project, so a model cannot have been tuned to it by us.

How it is made
---------------
The ``.py`` sources of the running interpreter's standard library are *parsed* with :mod:`ast`
(never imported: importing ``antigravity`` opens a browser, ``this`` prints a poem, others touch
the platform). One *API* is a public module-level function, a public class, or a public method
of a public class.

* **Query** — the docstring's one-line summary (its first paragraph, whitespace-normalised),
  e.g. ``"Serialize obj to a JSON formatted str."``
* **Relevant document** — that API: id and title are its qualified name (``json.dumps``,
  ``collections.OrderedDict.move_to_end``); the text is its signature rendered from the ast
  followed by the *rest* of the docstring, so the summary itself is never in the document and the
  model has to match a description to an explanation, not copy text.

Pairs that would be trivial or ambiguous are not queries: summaries under 4 or over 40 words,
fewer than 12 words of remaining documentation, summaries shared by several APIs (``ntpath`` and
``posixpath`` say the same things), boilerplate (``"See ..."``, ``"Same as ..."``,
``"Deprecated ..."``, ``"Return self ..."``) and documents that repeat the summary verbatim.
Other documented APIs with at least 15 words of text stay in the corpus as realistic distractors,
up to a fixed corpus size (a MiniLM bi-encoder encodes the whole corpus on a small CPU).

Queries are split 60/20/20 into ``train``/``dev``/``test`` by a stable hash of the qualified name,
so the split is the same on every machine and run. Each query has exactly one relevant document.

The content follows the Python version (the standard library changes between releases), so the
built dataset is cached as JSON per Python version and builder version.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stagewise.cache import cache_dir
from stagewise.data.dataset import Document, RetrievalDataset
from stagewise.errors import DataError

#: Bump whenever the output of the builder changes: it is part of the cache key.
BUILDER_VERSION = 1

NAME = "stdlib"
SOURCE = "embedded:stdlib"

#: Corpus size cap: keeps encoding the corpus with MiniLM on a 2-core CPU to a minute or so.
CORPUS_SIZE = 2000
#: Query cap, so that a future, better-documented stdlib cannot crowd out every distractor.
MAX_QUERIES = 1600

MIN_SUMMARY_WORDS = 4
MAX_SUMMARY_WORDS = 40
#: Remaining documentation a query's document needs: with less, only the title can match.
MIN_QUERY_TEXT_WORDS = 12
#: Remaining documentation a distractor needs to be worth encoding.
MIN_DISTRACTOR_TEXT_WORDS = 15
MAX_TEXT_CHARS = 1200

#: Split boundaries on a hash bucket in [0, 100): 60% train, 20% dev, 20% test.
SPLITS = (("train", 60), ("dev", 80), ("test", 100))

#: Folders that are not the documented library: tests, IDLE, Tk, bundled wheels, deprecated 2to3.
SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "distutils",
        "__pycache__",
    }
)

#: Summaries that point elsewhere or say nothing about what the API does.
_BOILERPLATE = re.compile(
    r"^(see\b|same as\b|deprecated\b|this (function|method|class) is deprecated|return self\b|"
    r"alias (for|of)\b|equivalent to\b|obsolete\b|undocumented\b|for internal use\b|"
    r"not implemented\b|override\b|overrides\b|placeholder\b|todo\b|xxx\b)",
    re.IGNORECASE,
)

#: Summaries that are code rather than prose: doctest sessions and ``args -> result`` signatures.
_SIGNATURE_LIKE = re.compile(r">>>|(^|\s)->(\s|$)|^\w+\(\w+\)\s")
#: A word of prose: letters, optionally followed by punctuation (not ``[first``, ``f(x)``, ``--opt``).
_PROSE_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[.,;:!?]?")

_PROPERTY_DECORATORS = frozenset({"property", "cached_property", "abstractproperty"})


@dataclass(frozen=True)
class Api:
    """One documented public API found in the standard library source."""

    qualname: str
    signature: str
    summary: str
    rest: str


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _truncate(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Cut at a word boundary so that no document ends in half a word."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    return text[: cut if cut > 0 else limit].rstrip()


def _strip_signature_lines(paragraph: str, name: str) -> str:
    """Drop hand-written signature lines (``name(args[, more]) -> result``) from a paragraph's start.

    A signature may span lines, so brackets are matched; the rest of the line holding the closing
    bracket (``-> result``) goes with it.
    """
    text = paragraph.lstrip()
    opening = re.compile(rf"{re.escape(name)}\s*\(")
    while (match := opening.match(text)) is not None:
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(text[i], 0)
            i += 1
        end = text.find("\n", i)
        text = "" if end < 0 else text[end + 1 :].lstrip()
        if text.startswith("->"):  # the result on a line of its own
            end = text.find("\n")
            text = "" if end < 0 else text[end + 1 :].lstrip()
    return text


def _split_docstring(doc: str, name: str) -> tuple[str, str]:
    """(summary, rest): the first paragraph and everything after it, both whitespace-normalised.

    Old-style docstrings open with hand-written signatures (``reduce(function, iterable[,
    initial]) -> value``); those are dropped, since the document renders the real signature and
    the description that follows them is the actual summary.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    while paragraphs:
        first = _strip_signature_lines(paragraphs[0], name)
        if first.strip():
            paragraphs[0] = first
            break
        paragraphs.pop(0)
    if not paragraphs:
        return "", ""
    return _normalise(paragraphs[0]), _normalise(" ".join(paragraphs[1:]))


def _summary_key(summary: str) -> str:
    """Comparison form of a summary: case and trailing punctuation do not make it different."""
    return summary.lower().rstrip(" .:;")


def _stable_bucket(salt: str, qualname: str) -> int:
    """A number in [0, 2**64) from sha256: unlike ``hash()``, the same in every process."""
    digest = hashlib.sha256(f"{salt}:{qualname}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


# --------------------------------------------------------------------------------------------
# Finding the source files
# --------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, path) of every public stdlib module, in a deterministic order.

    Sub-folders count only if they are packages (have ``__init__.py``) with identifier names,
    which also drops ``config-3.x-...``, ``lib-dynload`` and ``venv/scripts``.
    """
    found: list[tuple[str, Path]] = []

    def walk(folder: Path, prefix: tuple[str, ...]) -> None:
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError:
            return
        for entry in entries:
            name = entry.name
            if entry.is_dir():
                if name in SKIP_DIRS or name.startswith("_") or not name.isidentifier():
                    continue
                if not (entry / "__init__.py").is_file():
                    continue
                walk(entry, prefix + (name,))
            elif name.endswith(".py") and entry.is_file():
                stem = name[:-3]
                if stem == "__init__":
                    if prefix:
                        found.append((".".join(prefix), entry))
                elif stem.isidentifier() and not stem.startswith("_") and not stem.startswith("test_"):
                    found.append((".".join(prefix + (stem,)), entry))

    walk(root, ())
    return found


# --------------------------------------------------------------------------------------------
# Extracting APIs from a module's ast
# --------------------------------------------------------------------------------------------


def _decorator_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, ast.Attribute):
            names.add(target.attr)
    return names


def _without_first_arg(args: ast.arguments) -> ast.arguments:
    """The arguments of a method without ``self`` / ``cls``: how callers see the signature."""
    args = copy.copy(args)
    if args.posonlyargs:
        args.posonlyargs = args.posonlyargs[1:]
    elif args.args:
        args.args = args.args[1:]
    else:
        return args
    positional = len(args.posonlyargs) + len(args.args)
    if len(args.defaults) > positional:
        args.defaults = args.defaults[len(args.defaults) - positional :]
    return args


def _function_signature(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> str:
    decorators = _decorator_names(node)
    if is_method and decorators & _PROPERTY_DECORATORS:
        return f"property {node.name}"
    args = node.args
    if is_method and "staticmethod" not in decorators:
        args = _without_first_arg(args)
    signature = f"{node.name}({ast.unparse(args)})"
    if node.returns is not None:
        signature += f" -> {ast.unparse(node.returns)}"
    if isinstance(node, ast.AsyncFunctionDef):
        signature = "async " + signature
    return signature


def _class_signature(node: ast.ClassDef) -> str:
    """``Name(constructor args)`` from ``__init__`` when the class defines one, else ``class Name(bases)``."""
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            return f"{node.name}({ast.unparse(_without_first_arg(item.args))})"
    bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
    return f"class {node.name}({', '.join(bases)})" if bases else f"class {node.name}"


def _definitions(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of a scope, looking inside ``if`` / ``try`` blocks, where platform-specific and
    optional APIs (``ftplib.FTP_TLS`` needs ``ssl``) are defined."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _definitions(node.body)
            yield from _definitions(node.orelse)
        elif isinstance(node, ast.Try):
            yield from _definitions(node.body)
            for handler in node.handlers:
                yield from _definitions(handler.body)
            yield from _definitions(node.orelse)
            yield from _definitions(node.finalbody)
        else:
            yield node


def _apis_in(body: list[ast.stmt], prefix: str, in_class: bool, out: dict[str, Api]) -> None:
    """Collect documented public APIs of one scope; classes recurse into their methods."""
    for node in _definitions(body):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_"):
            continue
        qualname = f"{prefix}.{node.name}"
        if isinstance(node, ast.ClassDef):
            signature = _class_signature(node)
        else:
            if "overload" in _decorator_names(node):
                continue
            signature = _function_signature(node, in_class)
        doc = ast.get_docstring(node, clean=True)
        # The first documented definition wins: a property setter or a fallback redefinition
        # must not replace the documented original.
        if doc and doc.strip() and qualname not in out:
            summary, rest = _split_docstring(doc, node.name)
            if summary:
                out[qualname] = Api(qualname, signature, summary, rest)
        if isinstance(node, ast.ClassDef):
            _apis_in(node.body, qualname, True, out)


def collect_apis(root: Path | None = None) -> list[Api]:
    """Every documented public API of the standard library at ``root``, sorted by qualified name."""
    root = stdlib_root() if root is None else Path(root)
    apis: dict[str, Api] = {}
    for module, path in _module_files(root):
        try:
            source = path.read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences etc. in old modules
                tree = ast.parse(source, filename=str(path))
        except Exception:  # noqa: BLE001 - a file this Python cannot parse is simply not in the dataset
            continue
        found: dict[str, Api] = {}
        _apis_in(tree.body, module, False, found)
        for qualname, api in found.items():
            apis.setdefault(qualname, api)
    return [apis[q] for q in sorted(apis)]


# --------------------------------------------------------------------------------------------
# Filtering and assembling
# --------------------------------------------------------------------------------------------


def _document_text(api: Api) -> str:
    return _truncate(f"{api.signature} {api.rest}".strip())


def _is_query(api: Api, text: str, ambiguous: set[str]) -> bool:
    """Whether ``api``'s summary makes a fair query for its document (see the module docstring)."""
    words = api.summary.split()
    if len(words) < MIN_SUMMARY_WORDS or len(words) > MAX_SUMMARY_WORDS:
        return False
    if sum(1 for w in words if _PROSE_WORD.fullmatch(w)) < MIN_SUMMARY_WORDS:
        return False  # command syntax such as pdb's "l(ist) [first [,last] | .]"
    if len(api.rest.split()) < MIN_QUERY_TEXT_WORDS:
        return False
    key = _summary_key(api.summary)
    if key in ambiguous or _BOILERPLATE.match(api.summary) or _SIGNATURE_LIKE.search(api.summary):
        return False
    full = f"{api.qualname} {text}".lower()
    return key not in full


def _split_of(qualname: str) -> str:
    bucket = _stable_bucket("split", qualname) % 100
    return next(name for name, upper in SPLITS if bucket < upper)


def assemble(apis: list[Api]) -> RetrievalDataset:
    """Filter ``apis`` into queries and distractors, cap the sizes and split the queries."""
    counts: dict[str, int] = {}
    for api in apis:
        key = _summary_key(api.summary)
        counts[key] = counts.get(key, 0) + 1
    ambiguous = {key for key, n in counts.items() if n > 1}

    query_apis: list[tuple[Api, str]] = []
    distractors: list[tuple[Api, str]] = []
    for api in apis:
        text = _document_text(api)
        if _is_query(api, text, ambiguous):
            query_apis.append((api, text))
        elif len(api.rest.split()) >= MIN_DISTRACTOR_TEXT_WORDS:
            distractors.append((api, text))

    def keep_order(item: tuple[Api, str]) -> int:
        return _stable_bucket("keep", item[0].qualname)

    if len(query_apis) > MAX_QUERIES:
        query_apis.sort(key=keep_order)
        distractors.extend(query_apis[MAX_QUERIES:])
        query_apis = query_apis[:MAX_QUERIES]
    distractors.sort(key=keep_order)
    distractors = distractors[: max(0, CORPUS_SIZE - len(query_apis))]

    chosen = sorted(query_apis + distractors, key=lambda item: item[0].qualname)
    corpus = {api.qualname: Document(api.qualname, api.qualname, text) for api, text in chosen}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, dict[str, int]]] = {name: {} for name, _ in SPLITS}
    for api, _ in sorted(query_apis, key=lambda item: item[0].qualname):
        qid = f"q:{api.qualname}"
        queries[qid] = api.summary
        qrels[_split_of(api.qualname)][qid] = {api.qualname: 1}
    return RetrievalDataset(NAME, corpus, queries, qrels, source=SOURCE)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _cache_path(root: Path) -> Path:
    """One file per interpreter build: Python version, implementation, stdlib location, builder."""
    where = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    name = f"stdlib-dataset-{sys.implementation.name}{platform.python_version()}-{where}-v{BUILDER_VERSION}.json"
    return cache_dir() / name


def _to_json(dataset: RetrievalDataset) -> dict:
    return {
        "builder_version": BUILDER_VERSION,
        "python": platform.python_version(),
        "fingerprint": dataset.fingerprint(),
        "name": dataset.name,
        "source": dataset.source,
        "corpus": [[d.id, d.title, d.text] for d in dataset.corpus.values()],
        "queries": dataset.queries,
        "qrels": dataset.qrels,
    }


def _from_json(payload: dict) -> RetrievalDataset:
    """Rebuild a dataset from the cache; raise on anything unexpected so the caller rebuilds."""
    if payload["builder_version"] != BUILDER_VERSION or payload["python"] != platform.python_version():
        raise ValueError("stale cache")
    corpus = {doc_id: Document(doc_id, title, text) for doc_id, title, text in payload["corpus"]}
    queries = {str(k): str(v) for k, v in payload["queries"].items()}
    qrels = {
        str(split): {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in split_qrels.items()}
        for split, split_qrels in payload["qrels"].items()
    }
    dataset = RetrievalDataset(str(payload["name"]), corpus, queries, qrels, source=str(payload["source"]))
    if dataset.fingerprint() != payload["fingerprint"]:
        raise ValueError("cache content does not match its fingerprint")
    return dataset


def _read_cache(path: Path) -> RetrievalDataset | None:
    try:
        with path.open("r", encoding="utf-8") as f:
            return _from_json(json.load(f))
    except Exception:  # noqa: BLE001 - missing, truncated, corrupt or stale: rebuild
        return None


def _write_cache(path: Path, dataset: RetrievalDataset) -> None:
    """Write to a temporary file next to ``path`` and rename it: readers never see half a file."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False
        ) as f:
            tmp_name = f.name
            json.dump(_to_json(dataset), f, ensure_ascii=False, separators=(",", ":"))
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError:
        pass  # a read-only home only costs a rebuild next time
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _build_uncached(root: Path) -> RetrievalDataset:
    apis = collect_apis(root)
    dataset = assemble(apis)
    if not dataset.queries:
        raise DataError(
            SOURCE,
            f"no documented Python standard-library source found under {root} "
            "(this Python may ship its standard library compiled only); use a BEIR dataset folder",
        )
    return dataset


def build_stdlib_dataset(*, use_cache: bool = True) -> RetrievalDataset:
    """The default dataset, from the cache when this Python and builder version built it before."""
    root = stdlib_root()
    if not use_cache:
        return _build_uncached(root)
    path = _cache_path(root)
    dataset = _read_cache(path)
    if dataset is None:
        dataset = _build_uncached(root)
        _write_cache(path, dataset)
    return dataset
