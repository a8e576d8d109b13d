"""The one schema of ``pipeline.yaml``: every key, its type and its bounds, checked before any model loads.

Every reader goes through :func:`read` (``Pipeline.load``, so ``eval --pipeline``, ``index build``, ``search`` and
``serve --pipeline`` and an index's own copy), so a misspelt key, a value out of bounds or a file from a newer
stagewise is refused in one line naming the file, the line and the field: never ignored, never a traceback in
the middle of a search, never an index committed that cannot be loaded. What only the model can tell (its kind,
the longest input it takes) is checked where it loads (:mod:`stagewise.models.specs`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from stagewise.errors import DataError, StagewiseError
from stagewise.limits import MAX_CANDIDATES, MAX_TOKENS  # a model's own, lower limit applies as it loads
from stagewise.models.backends import BACKENDS, DTYPES, QUANTIZATIONS, Backend
from stagewise.search.fusion import FIRST_STAGE_SIGNALS, NORMALIZATIONS

VERSIONS = (1,)  # what Pipeline.config writes: a newer file is refused, not half understood
STOPWORDS = {"en": "english", "en_plus": "english_plus", "de": "german", "nl": "dutch", "fr": "french",
             "es": "spanish", "pt": "portuguese", "it": "italian", "ru": "russian", "sv": "swedish",
             "no": "norwegian", "zh": "chinese", "tr": "turkish", "ko": "korean", "da": "danish"}  # bm25s's lists
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")  # sentence-transformers' similarity functions


# ---- the rules a schema is made of ---------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """A leaf: what it must be (said in the error) and the test."""

    expected: str
    ok: Callable[[object], bool]


@dataclass(frozen=True)
class Mapping:
    """Known keys and their rules; ``then`` checks across keys (returns the key at fault and why, or None)."""

    expected: str
    fields: dict
    required: tuple = ()
    then: Callable[[dict], tuple[str, str] | None] | None = None


@dataclass(frozen=True)
class ListOf:
    expected: str
    item: object
    min_items: int = 0


@dataclass(frozen=True)
class OrNull:
    rule: object


@dataclass(frozen=True)
class Typed:
    """A mapping whose ``type`` picks its schema (filled in after, as a hybrid's stages are first stages too),
    or a string that ``text`` accepts."""

    what: str
    text: Value
    options: dict = field(default_factory=dict)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(low: float, high: float, integer: bool = False, above_low: bool = False) -> Value:
    """A finite number (NaN and infinities fail the comparisons) within bounds."""
    kind = "an integer" if integer else "a number"
    bounds = f"{'more than' if above_low else 'at least'} {low} and at most {high}"
    return Value(f"{kind} of {bounds}", lambda v: (type(v) is int if integer else _real(v))
                 and (v > low if above_low else v >= low) and v <= high)


def one_of(*choices) -> Value:
    return Value(f"one of {', '.join(map(str, choices))}",
                 lambda v: any(type(v) is type(c) and v == c for c in choices))


def first_stage_spec_ok(spec) -> bool:
    """``bm25``, a model or ``a+b``: a non-empty string with nothing empty between '+'."""
    return isinstance(spec, str) and bool(spec.strip()) and all(p.strip() for p in spec.split("+"))


TEXT = Value("a string", lambda v: isinstance(v, str))
MODEL = Value("a model (an alias, a directory or a hub id)", lambda v: isinstance(v, str) and bool(v.strip()))
TOKENS = OrNull(number(1, MAX_TOKENS, integer=True))


def _backend_combination(config: dict) -> tuple[str, str] | None:
    """Each backend key may be fine alone and wrong together (int8 on torch): Backend says which."""
    try:
        Backend.from_config(config, "")
    except StagewiseError as e:
        key = next(k for k in reversed(BACKEND) if k in config)  # only a key given can be at fault
        return key, f"does not go with the other backend settings ({str(e).lstrip(': ')})"
    return None


BACKEND = {"backend": one_of(*BACKENDS), "quantize": one_of(*QUANTIZATIONS), "dtype": one_of(*DTYPES)}
PER_QUERY = Mapping("a mapping with a 'model' (and its backend, quantize, dtype)",
                    {"model": MODEL, "fingerprint": TEXT, **BACKEND}, ("model",), _backend_combination)
MODEL_STAGE = {"name": TEXT, "model": MODEL, "fingerprint": TEXT, **BACKEND, "per_query": OrNull(PER_QUERY)}

FIRST_STAGE = Typed("first-stage", Value("bm25, a model or a+b (nothing empty between '+'), or a stage's mapping "
                                         "with a 'type'", first_stage_spec_ok))
FIRST_STAGE.options.update({
    "bm25": Mapping("a bm25 stage", {
        "type": TEXT, "name": TEXT, "k1": number(0, 100), "b": number(0, 1),
        "stopwords": OrNull(Value(f"one of {', '.join(STOPWORDS)} (or the language's name), or a list of words",
                                  lambda v: v in {*STOPWORDS, *STOPWORDS.values()} if isinstance(v, str)
                                  else isinstance(v, list) and all(isinstance(w, str) for w in v)))}),
    "dense": Mapping("a dense stage with a 'model'", {
        "type": TEXT, **MODEL_STAGE, "similarity": one_of(*SIMILARITIES),
        # a static embedding model saves .inf: it has no limit
        "max_seq_length": OrNull(Value(f"an integer of at least 1 and at most {MAX_TOKENS}, or .inf",
                                       lambda v: v == float("inf") or TOKENS.rule.ok(v)))},
        ("model",), _backend_combination),
    "hybrid": Mapping("a hybrid stage with 'stages'", {
        "type": TEXT, "name": TEXT, "rrf_k": number(0, 1_000_000, above_low=True),
        "fusion_depth": number(1, MAX_CANDIDATES, integer=True),
        "stages": ListOf("a list of at least two first stages", FIRST_STAGE, 2)}, ("stages",)),
})

RERANKER = Mapping("a mapping with a 'model' (or null for none)", {
    "type": one_of("cross-encoder"), **MODEL_STAGE, "max_length": TOKENS}, ("model",), _backend_combination)
FUSION = Mapping("a mapping (weight, normalization, first_stage)", {
    "weight": number(0, 1), "normalization": one_of(*NORMALIZATIONS), "first_stage": one_of(*FIRST_STAGE_SIGNALS)})


def _fusion_needs_a_reranker(config: dict) -> tuple[str, str] | None:
    if not config.get("reranker") and (config.get("fusion") or {}).get("weight", 1) != 1:
        return "fusion", "needs a reranker (this pipeline has none)"
    return None


PIPELINE = Mapping("a pipeline (a mapping with a 'first_stage')", {
    "version": one_of(*VERSIONS), "first_stage": FIRST_STAGE, "reranker": OrNull(RERANKER),
    "depth": number(1, MAX_CANDIDATES, integer=True), "fusion": OrNull(FUSION)}, ("first_stage",), _fusion_needs_a_reranker)


# ---- checking --------------------------------------------------------------------------------------


class _Invalid(Exception):
    """What is wrong (``message``) in the field at ``at`` (a path of keys and list positions); the line is that of
    ``line_at`` where the fault is one key of it (an unknown one, its type), or ``line`` where it has no path."""

    def __init__(self, at: tuple, message: str, line_at: tuple | None = None, line: int | None = None):
        super().__init__(message)
        self.at, self.message, self.line_at, self.line = at, message, line_at, line

    def field(self) -> str | None:
        return None if not self.at else str(self.at[0])


def _below(at: tuple) -> str:
    """``stages[1].k1``: a path under its top-level field."""
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in at[1:]).lstrip(".")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(value, rule, at: tuple) -> None:
    here = f"'{_below(at)}' " if _below(at) else ""
    if isinstance(rule, OrNull):
        if value is not None:
            _check(value, rule.rule, at)
    elif isinstance(rule, Value):
        if not rule.ok(value):
            raise _Invalid(at, f"{here}must be {rule.expected}, got {_show(value)}")
    elif isinstance(rule, ListOf):
        if not isinstance(value, list) or len(value) < rule.min_items:
            raise _Invalid(at, f"{here}must be {rule.expected}, got {_show(value)}")
        for i, item in enumerate(value):
            _check(item, rule.item, at + (i,))
    elif isinstance(rule, Typed):
        if not isinstance(value, dict):
            if not rule.text.ok(value):
                raise _Invalid(at, f"{here}must be {rule.text.expected}, got {_show(value)}")
        elif "type" not in value:
            raise _Invalid(at, f"{here}needs a 'type' ({', '.join(rule.options)})")
        elif not isinstance(value["type"], str) or value["type"] not in rule.options:
            raise _Invalid(at, f"{here + 'has ' if here else ''}unknown {rule.what} type {_show(value['type'])} "
                               f"(expected {', '.join(rule.options)})", line_at=at + ("type",))
        else:
            _check(value, rule.options[value["type"]], at)
    else:
        _check_mapping(value, rule, at, here)


def _check_mapping(value, rule: Mapping, at: tuple, here: str) -> None:
    """Known keys first (``version`` leads, so a newer file is named as such), then unknown, missing, across."""
    if not isinstance(value, dict):
        raise _Invalid(at, f"{here}must be {rule.expected}, got {_show(value)}")
    for key, sub in rule.fields.items():
        if key in value:
            _check(value[key], sub, at + (key,))
    for key in value:
        if key not in rule.fields:
            close = difflib.get_close_matches(str(key), list(rule.fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(rule.fields)}"
            raise _Invalid(at, f"{here}has unknown key {_show(key)} ({hint})" if here else
                           f"unknown key {_show(key)} ({hint})", line_at=at + (key,))
    for key in rule.required:
        if key not in value:
            raise _Invalid(at, f"{here}must be {rule.expected}, but '{key}' is missing")
    problem = rule.then(value) if rule.then else None
    if problem:
        key, message = problem
        raise _Invalid(at + (key,), f"'{_below(at + (key,))}' {message}" if at else message)


def check(value, rule=PIPELINE, name: str | None = None) -> None:
    """Check a value given in code, not read from a file (a whole pipeline's config, or the field ``name``)."""
    try:
        _check(value, rule, (name,) if name else ())
    except _Invalid as e:
        raise StagewiseError(f"field '{e.field()}': {e.message}" if e.at else e.message) from None


def saved_backend(config: dict) -> Backend | None:
    """The backend a stage's saved config names, None where it names none (its model folder decides)."""
    return Backend.from_config(config) if any(k in config for k in BACKEND) else None


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True


def dump(config: dict) -> str:
    """``config`` as YAML that :func:`read` accepts: checked first, and with no aliases even where a value repeats."""
    check(config)
    return yaml.dump(config, Dumper=_NoAliases, sort_keys=False)


# ---- reading a file, with the line of every key -----------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Refuses aliases: no pipeline needs one, and a few nested ones expand a small file past any memory."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Invalid((), "YAML aliases (*name) are not allowed in a pipeline file",
                           line=self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def _plain(node, loader: _Loader, at: tuple, lines: dict) -> object:
    """The node's value as plain Python, noting the line of every key and list item in ``lines``."""
    lines.setdefault(at, node.start_mark.line + 1)
    if not isinstance(node, yaml.ScalarNode) and node.tag not in ("tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"):
        raise _Invalid(at, f"tag {node.tag!r} is not allowed in a pipeline file", line=node.start_mark.line + 1)
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, loader, at + (i,), lines) for i, item in enumerate(node.value)]
    if not isinstance(node, yaml.MappingNode):
        return loader.construct_object(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, (str, int, float)):  # a list, a mapping, null
            raise _Invalid((), "a key must be a name", line=key_node.start_mark.line + 1)
        if key in out:
            raise _Invalid(at, f"key {_show(key)} is given twice (first on line {lines[at + (key,)]})",
                           line=key_node.start_mark.line + 1)
        lines[at + (key,)] = key_node.start_mark.line + 1
        out[key] = _plain(value_node, loader, at + (key,), lines)
    return out


@dataclass
class PipelineFile:
    """A checked ``pipeline.yaml``: its config, and where each key is (for errors found later, as a model loads)."""

    path: Path
    config: dict
    lines: dict

    def error(self, at: tuple, message: str, line_at: tuple | None = None, line: int | None = None) -> DataError:
        """The error in the field at ``at``, on the line of ``line_at`` (or of the nearest key above it present)."""
        where = at if line_at is None else line_at
        while where and where not in self.lines:
            where = where[:-1]
        return DataError(self.path, message, line=line or self.lines.get(where), field=str(at[0]) if at else None)


def read(path: str | Path) -> PipelineFile:
    """Read and check a ``pipeline.yaml``; anything wrong is a one-line error naming the file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StagewiseError(f"{path}: cannot read pipeline ({str(e).splitlines()[0]})") from None
    loader, lines = _Loader(text), {}
    file = PipelineFile(path, {}, lines)
    try:
        node = loader.get_single_node()
        file.config = _plain(node, loader, (), lines) if node is not None else None
        _check(file.config, PIPELINE, ())
    except _Invalid as e:
        raise file.error(e.at, e.message, e.line_at, e.line) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DataError(path, f"cannot read pipeline: invalid YAML ({problem})",
                        line=mark.line + 1 if mark else None) from None
    except RecursionError:
        raise DataError(path, "cannot read pipeline: nested too deeply") from None
    finally:
        loader.dispose()
    return file
