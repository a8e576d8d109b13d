"""What ``select`` compares and under which budgets: defaults, presets, a YAML file and explicit settings, each
checked (types, ranges, and the nested training settings with the training commands' own checks) before any work."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from stagewise.errors import StagewiseError
from stagewise.limits import MAX_CANDIDATES, MAX_COUNT, MAX_SECONDS
from stagewise.models import batch_precision
from stagewise.models.specs import installed_aliases
from stagewise.selection.backend_stage import parse_backend
from stagewise.training.config import INIT_STRATEGIES, BiTrainConfig, CrossTrainConfig, check_train_config

LATENCY_METRICS = ("p50_ms", "p95_ms", "mean_ms")


def _installed(*aliases: str) -> list[str]:
    """The default candidates: those of ``aliases`` installed here."""
    present = set(installed_aliases())
    return [a for a in aliases if a in present]


#: every backend candidate; the time budget and measured throughput decide how far each one is measured
BACKEND_CANDIDATES = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8")

#: select's cross-encoder recipe unless told otherwise: pre-trained on pseudo-queries from the corpus, then fine-tuned
CROSS_TRAINING = {"epochs": 3, "learning_rate": 1e-4, "hard_negatives": 7, "random_negatives": 2,
                  "pretrain_queries": 2000}  # max_length: fitted to the data (training.fit_max_length)


@dataclass
class SelectConfig:
    """What ``select`` compares and under which budgets; a YAML file, a preset, or both (the file wins)."""

    data: str = "default"
    train_split: str = "train"
    dev_split: str = "dev"
    bm25: bool = True
    bi_encoders: list[str] = field(default_factory=lambda: _installed("minilm-l6", "static-64", "mpnet-base"))
    finetune_top: int = 2  # fine-tune the N best zero-shot bi-encoders
    hybrid: bool = True  # BM25 fused with the best dense first stage
    cross_encoders: list[str] = field(default_factory=lambda: _installed("bert-tiny", "minilm-l6"))
    init_strategies: list[str] = field(default_factory=lambda: list(INIT_STRATEGIES))
    depths: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100])
    bi_training: dict = field(default_factory=dict)  # BiTrainConfig fields, e.g. {epochs: 1}
    cross_training: dict = field(default_factory=lambda: dict(CROSS_TRAINING))  # CrossTrainConfig fields
    latency_budget_ms: float | None = None  # per query, on this machine
    latency_metric: str = "p95_ms"
    time_budget_min: float | None = None  # wall clock for the whole selection
    min_gain: float = 0.005  # a reranker must add at least this much nDCG@10 …
    alpha: float = 0.05  # … with a paired t-test p-value under this
    latency_queries: int = 20  # queries timed end to end at each rerank depth
    max_dev_queries: int | None = None
    fusion: bool = True  # also consider each reranker fused with the first stage (weight chosen on dev)
    test_split: str | None = None  # confirm the chosen pipeline once on this split (never used to choose)
    # stage 3: what runs each chosen stage (labels: torch, torch-bf16, onnx[-int8], openvino[-int8|-bf16])
    backends: list[str] = field(default_factory=lambda: list(BACKEND_CANDIDATES))
    backend_max_loss: float = 0.01  # relative nDCG@10 a faster backend may lose against PyTorch float32
    # select's own batch work (corpus encoding, mining, scoring at every depth, dev evaluations): auto measures
    # float32 against bf16 per model on this CPU and keeps bf16 where it is faster and agrees (batch_precision.py)
    batch_precision: str = "auto"
    # training in bf16 mixed precision: auto measures a few steps both ways per model, and uses bf16 where it is
    # clearly faster (on CPUs with AMX or AVX-512 BF16); float32 never, bfloat16 always
    train_precision: str = "auto"
    seed: int = 42


PRESETS: dict[str, dict] = {
    # ~10 minutes on a 2-core CPU on the embedded default dataset
    "quick": {
        "bi_encoders": ["minilm-l6", "static-64"], "finetune_top": 1, "cross_encoders": ["bert-tiny"],
        # from-finetuned-bi (about 30 minutes here, and collapsed in every measured run) is left to the full preset
        "init_strategies": ["base"], "depths": [5, 10, 20, 50],
        "bi_training": {"epochs": 1, "dev_corpus_size": 1000},
        # the full recipe: the time budget's plan cuts it to what fits (and says what it cut)
        "cross_training": dict(CROSS_TRAINING),
        "time_budget_min": 10, "latency_queries": 10,
        # the candidates that won somewhere measured (OpenVINO bf16 both stages with AMX, and OpenVINO float32,
        # which it runs as without bf16, on AVX2; ONNX int8 per query); ONNX float32 never did, OpenVINO int8 lost 1%+
        "backends": ["torch", "torch-bf16", "onnx-int8", "openvino-bf16"],
    },
    "full": {"cross_training": dict(CROSS_TRAINING)},
}


def load_select_config(path: str | Path | None = None, preset: str | None = None, **overrides) -> SelectConfig:
    """Defaults, then the preset, then the YAML file, then explicit overrides (None values are ignored)."""
    if preset is not None and preset not in PRESETS:
        raise StagewiseError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    values: dict = copy.deepcopy(PRESETS.get(preset or "full", {}))
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise StagewiseError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise StagewiseError(f"{path}:{line}: not valid UTF-8 (byte {e.start + 1})") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise StagewiseError(f"{path}:{'' if line is None else line + 1}: invalid YAML ({e.problem})") from None
        if not isinstance(loaded, dict):
            raise StagewiseError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        known = {f.name for f in fields(SelectConfig)}
        for key in loaded:
            if key not in known:
                raise StagewiseError(f"{path}: field '{key}': unknown setting (known: {', '.join(sorted(known))})")
        _merge(values, loaded)
    _merge(values, {k: v for k, v in overrides.items() if v is not None})
    config = SelectConfig(**values)
    _check_config(config, path)
    return config


def _merge(values: dict, new: dict) -> None:
    """Later settings win; the training dicts are merged key by key (a file's epochs keeps a preset's lr)."""
    for key, value in new.items():
        if key in ("bi_training", "cross_training") and isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value


_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float), "None": (type(None),), "list": (list,),
          "dict": (dict,)}


def _fits(value, annotation: str) -> bool:
    """Whether a YAML value fits a dataclass field's annotation (a string: ``float | None``, ``list[str]``); a bool
    is no number and a number no bool."""
    for option in (a.strip() for a in annotation.split("|")):
        base, _, inner = option.partition("[")
        kinds = _TYPES.get(base)
        if kinds is None:
            return True  # not a type this checks
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            continue
        if base == "list" and inner and not all(_fits(v, inner.rstrip("]")) for v in value):
            continue
        return True
    return False


#: Each number's range: (lowest, whether the lowest itself is excluded, highest); None values are not checked.
#: Finite throughout: an infinite budget or a p-value threshold above 1 is a mistake, not a setting.
_RANGES = {"finetune_top": (0, False, MAX_CANDIDATES), "latency_budget_ms": (0, True, MAX_SECONDS * 1000),
           "time_budget_min": (0, True, MAX_SECONDS / 60), "alpha": (0, True, 1),
           "latency_queries": (1, False, MAX_COUNT), "max_dev_queries": (1, False, MAX_COUNT),
           "seed": (0, False, 2**32 - 1)}


def _check_config(config: SelectConfig, path) -> None:
    where = f"{path}: " if path else ""
    for f in fields(SelectConfig):
        value, kind = getattr(config, f.name), {"list": list, "dict": dict}.get(str(f.type).split("[")[0])
        if kind and not isinstance(value, kind):
            raise StagewiseError(f"{where}field '{f.name}': a {kind.__name__} is needed, got {value!r}")
        if not _fits(value, str(f.type)):
            raise StagewiseError(f"{where}field '{f.name}': expected {f.type}, got {value!r}")
    for name, (low, strict, high) in _RANGES.items():
        value = getattr(config, name)
        if value is not None and (not (value > low if strict else value >= low)  # NaN fails every comparison
                                  or not value <= high):
            rule = f"greater than {low:g}" if strict else f"at least {low:g}"
            raise StagewiseError(f"{where}field '{name}': must be {rule} and at most {high:g}, got {value!r}")
    if not math.isfinite(config.min_gain):
        raise StagewiseError(f"{where}field 'min_gain': must be a finite number, got {config.min_gain!r}")
    if not config.depths or any(type(d) is not int or not 1 <= d <= MAX_CANDIDATES for d in config.depths):
        raise StagewiseError(f"{where}field 'depths': integers from 1 to {MAX_CANDIDATES} are needed, "
                             f"got {config.depths}")
    config.depths = sorted(set(config.depths))
    if config.latency_metric not in LATENCY_METRICS:
        raise StagewiseError(f"{where}field 'latency_metric': one of {', '.join(LATENCY_METRICS)}, "
                             f"not '{config.latency_metric}'")
    for s in config.init_strategies:
        if s not in INIT_STRATEGIES:
            raise StagewiseError(f"{where}field 'init_strategies': '{s}' is not one of {', '.join(INIT_STRATEGIES)}")
    for name, cls in (("bi_training", BiTrainConfig), ("cross_training", CrossTrainConfig)):
        unknown = set(getattr(config, name)) - {f.name for f in fields(cls)}
        if unknown:
            raise StagewiseError(f"{where}field '{name}': unknown training settings {sorted(unknown)}")
        annotations = {f.name: str(f.type) for f in fields(cls)}
        for key, value in getattr(config, name).items():
            if not _fits(value, annotations[key]):
                raise StagewiseError(f"{where}field '{name}': setting '{key}': expected {annotations[key]}, "
                                     f"got {value!r}")
        try:  # ranges too: a bad epochs or batch size must not surface only when its training starts
            check_train_config(cls(**getattr(config, name)))
        except StagewiseError as e:
            raise StagewiseError(f"{where}field '{name}': {e}") from None
    if not config.bm25 and not config.bi_encoders:
        raise StagewiseError(f"{where}no first stage to select from: enable bm25 or name bi_encoders")
    if not config.backends:
        raise StagewiseError(f"{where}field 'backends': at least one backend is needed ([torch] keeps PyTorch)")
    for label in config.backends:
        try:
            parse_backend(label)
        except StagewiseError as e:
            raise StagewiseError(f"{where}{e}") from None
    if not 0 <= config.backend_max_loss < 1:
        raise StagewiseError(f"{where}field 'backend_max_loss': a fraction between 0 and 1, "
                             f"got {config.backend_max_loss!r}")
    for name in ("batch_precision", "train_precision"):
        if getattr(config, name) not in batch_precision.MODES:
            raise StagewiseError(f"{where}field '{name}': one of {', '.join(batch_precision.MODES)}, "
                                 f"not {getattr(config, name)!r}")
    if not isinstance(config.fusion, bool):
        raise StagewiseError(f"{where}field 'fusion': true or false, not {config.fusion!r}")
    if config.test_split is not None and (not isinstance(config.test_split, str) or config.test_split in (
            config.dev_split, config.train_split)):
        raise StagewiseError(f"{where}field 'test_split': a split other than the train and dev splits is needed "
                             f"(it confirms the choice on queries that took no part in it), not {config.test_split!r}")
