"""How the report writes values: numbers, differences, units and labels, a dash for what is missing.

The document, both renderers and the plots share these, so a value reads the same everywhere; with them are the
look-ups into the selection dict that the document and the plots both need (a nested key, the latency metric,
the first stage's own nDCG@10), and the line under the title that both renderers write.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

NA = "—"


def _num(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, null, text, NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _fmt(x: Any, spec: str, suffix: str = "") -> str:
    v = _num(x)
    return NA if v is None else format(v, spec) + suffix


def f3(x: Any) -> str:
    """A quality metric: 0.720."""
    return _fmt(x, ".3f")


def signed(x: Any) -> str:
    """A difference: +0.020 / -0.100."""
    return _fmt(x, "+.3f")


def ms(x: Any) -> str:
    return _fmt(x, ".1f")


def _count(x: Any) -> str:
    v = _num(x)
    return NA if v is None else (f"{v:,.0f}" if v >= 10 else f"{v:.1f}")


def _mb(n_bytes: Any) -> str:
    v = _num(n_bytes)
    return NA if v is None else (f"{v / 1e6:.2f}" if v < 1e7 else f"{v / 1e6:,.1f}")


def _p_value(p: Any) -> str:
    v = _num(p)
    return NA if v is None else ("< 0.001" if v < 0.001 else f"{v:.3f}")


def _ci(ci: Any) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or None in (_num(ci[0]), _num(ci[1])):
        return NA
    return f"{signed(ci[0])} to {signed(ci[1])}"


def _seconds(s: Any) -> str:
    v = _num(s)
    if v is None:
        return NA
    return f"{v:,.1f} s" if v < 120 else f"{v:,.0f} s ({v / 60:.1f} min)"


def _yes_no(x: Any) -> str:
    return NA if x is None else ("yes" if x else "no")


def _text(x: Any) -> str:
    """Any config/dataset value as one line of text."""
    if x is None or x == "":
        return NA
    if isinstance(x, bool):
        return _yes_no(x)
    if isinstance(x, (list, tuple)):
        return ", ".join(_text(v) for v in x) if x else NA
    if isinstance(x, dict):
        return json.dumps(x, default=str)
    return str(x)


def metric_label(key: str) -> str:
    """``ndcg@10`` -> ``nDCG@10``."""
    name, _, k = str(key).partition("@")
    name = {"ndcg": "nDCG", "mrr": "MRR", "recall": "Recall", "map": "MAP", "precision": "P"}.get(name, name)
    return f"{name}@{k}" if k else name


def _latency_label(metric: str) -> str:
    return metric.removesuffix("_ms")


_KEY_LABELS = {"cpus": "CPUs", "cpu": "CPU", "cpu_flags": "CPU flags", "gpu": "GPU", "used_s": "Time used (s)", "wall_seconds": "Wall time (s)"}


def _key_label(key: str) -> str:
    if key in _KEY_LABELS:
        return _KEY_LABELS[key]
    words = str(key).replace("_", " ").replace("-", " ")
    words = re.sub(r" (ms|s|min)$", r" (\1)", words)
    return words[:1].upper() + words[1:]


def short_name(name: Any, limit: int = 30) -> str:
    """A system name short enough for a plot label: the reranker part of a pipeline, abbreviated."""
    text = str(name)
    if " >> " in text:
        text = "+ " + text.split(" >> ", 1)[1]
    return _ellipsize(text.replace("fine-tuned", "ft"), limit)


def _ellipsize(text: Any, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    """``d[k1][k2]...`` or ``default`` where any level is missing or null."""
    for key in keys:
        if not isinstance(d, dict) or d.get(key) is None:
            return default
        d = d[key]
    return d


def _latency_metric(sel: dict) -> str:
    return _get(sel, "budget", "latency_metric") or _get(sel, "config", "latency_metric") or "p95_ms"


def _first_stage_ndcg(sel: dict) -> float | None:
    """The chosen first stage's nDCG@10 alone: from the verdict, else from its candidate row."""
    value = _num(_get(sel, "verdict", "first_stage_ndcg@10"))
    if value is not None:
        return value
    chosen = _get(sel, "verdict", "first_stage") or _get(sel, "first_stage", "chosen")
    for cand in _get(sel, "first_stage", "candidates", default=[]):
        if cand.get("name") == chosen:
            return _num(_get(cand, "metrics", "ndcg@10"))
    return None


def _meta_line(sel: dict) -> str:
    ds = sel.get("dataset") or {}
    parts = [f"dataset {ds['name']}" if ds.get("name") else "",
             f"{_count(ds['documents'])} documents" if ds.get("documents") is not None else "",
             f"{ds['dev_queries']} {ds.get('dev_split') or 'dev'} queries" if ds.get("dev_queries") is not None else "",
             f"created {sel['created']}" if sel.get("created") else "",
             f"took {_seconds(sel['wall_seconds'])}" if sel.get("wall_seconds") is not None else ""]
    return " · ".join(p for p in parts if p)
