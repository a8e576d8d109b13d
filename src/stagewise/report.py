"""The selection report: what was measured, what is recommended and why, in a form a person can read and keep.

A selection run ends with a dict (see ``tests/fixtures/selection_example.json`` for its shape). This module
turns it into one self-contained ``report.html`` (inline CSS, plots inlined as SVG: it opens offline and can
be mailed or archived as a single file), the same content as ``report.md`` with the plots next to it as SVG
files, and the input itself as ``selection.json``. Both documents are rendered from one document model
(sections of paragraphs, lists, tables and figures), so the HTML and the Markdown never disagree.
Every file is written atomically, so an interrupted run never leaves half a report.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

logger = logging.getLogger(__name__)

NA = "—"
PLOTS = ("quality_vs_latency", "quality_vs_depth", "per_query")
_STATUS_CLASSES = {"ok": "ok", "shortened": "warn", "skipped": "muted", "failed": "bad", "error": "bad"}
_COLOURS = {"first_stage": "#2563eb", "pipeline": "#ea580c", "out": "#b8bcc4", "chosen": "#dc2626",
            "win": "#16a34a", "loss": "#dc2626", "front": "#374151"}

# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Document model, shared by the HTML and the Markdown
# --------------------------------------------------------------------------------------------


@dataclass
class Para:
    text: str
    strong: bool = False


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    highlight: set[int] = field(default_factory=set)  # chosen rows
    key_value: bool = False  # two columns, a label and its value


@dataclass
class Figure:
    key: str  # one of PLOTS
    alt: str


Block = Union[Para, Items, Table, Figure]


@dataclass
class Section:
    title: str
    blocks: list[Block]
    css: str = ""


def _kv(rows: list[tuple[str, str]]) -> Table:
    return Table(["", ""], [[k, v] for k, v in rows], key_value=True)


def _kv_dict(d: Any, formats: dict[str, Callable[[Any], str]] | None = None) -> Table:
    """A key-value table of every entry of ``d``, formatted by ``formats[key]`` (which then also names the unit,
    so the label drops it) or as plain text."""
    formats = formats or {}
    d = d if isinstance(d, dict) else {}
    return _kv([(_key_label(k) if k not in formats else _key_label(k).split(" (")[0], formats.get(k, _text)(v))
                for k, v in d.items()])


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


def _mode_text(row: Any) -> str:
    """How a pipeline orders its reranked candidates: "rerank" (the reranker alone) or "fused, weight 0.40"."""
    if not isinstance(row, dict) or (row.get("mode") or "rerank") == "rerank":
        return "rerank"
    f = row.get("fusion") or {}
    text = f"fused, weight {_fmt(f.get('weight'), '.2f')}"
    extras = [x for x in (f.get("normalization"), f.get("first_stage") and f"first-stage {f['first_stage']}")
              if x and x not in ("minmax", "first-stage score")]
    return text + (f" ({', '.join(extras)})" if extras else "")


def _verdict_section(sel: dict) -> Section:
    verdict = sel.get("verdict") or {}
    blocks: list[Block] = []
    worth_it = verdict.get("reranker_worth_it")
    first = verdict.get("first_stage") or _get(sel, "first_stage", "chosen")
    status = verdict.get("reranker_status") or ("not worth it" if worth_it is False else None)
    if not verdict.get("reranker") or worth_it is False:
        why = {"not worth it": "reranking is not worth it on this data",
               "over the latency budget": "no reranker fits the latency budget",
               "not evaluated": "reranking was not evaluated, so whether it is worth it is not known"}
        blocks.append(Para(f"The first stage alone is recommended ({first or NA}): "
                           f"{why.get(status, 'no reranker was evaluated')}.", strong=True))
    summary = verdict.get("summary") or []
    if summary:
        blocks.append(Items([str(s) for s in summary]))
    elif not blocks:
        blocks.append(Para("No verdict was recorded."))
    return Section("Verdict", blocks, css="verdict" + ("" if worth_it is not False else " first-stage-only"))


def _recommended_section(sel: dict) -> Section:
    verdict = sel.get("verdict") or {}
    lat = _latency_label(_latency_metric(sel))
    worth_it = verdict.get("reranker_worth_it")
    reranker = verdict.get("reranker")
    if reranker and worth_it is not False:
        reranker_text = str(reranker)
    elif reranker:
        reranker_text = f"none (best measured: {reranker}, not worth it)"
    elif verdict.get("reranker_status") == "not evaluated":
        reranker_text = "none: no reranker was evaluated (see the verdict for what it would need)"
    else:
        reranker_text = "none: the first stage alone"
    gain = NA
    if _num(verdict.get("gain")) is not None:
        gain = f"{signed(verdict['gain'])} (95% CI {_ci(verdict.get('ci95'))}, p = {_p_value(verdict.get('p_value'))})"
    counts = [verdict.get(k) for k in ("wins", "losses", "ties")]
    rows = [
        ("System", _text(verdict.get("name"))),
        ("First stage", f"{_text(verdict.get('first_stage'))} (nDCG@10 {f3(_first_stage_ndcg(sel))}, "
                        f"{lat} {ms(verdict.get('first_stage_latency_ms'))} ms)"),
        ("Reranker", reranker_text),
        ("Rerank depth", _text(verdict.get("depth"))),
        ("Mode", NA if not reranker or worth_it is False else "reranking alone" if not verdict.get("fusion")
         else _mode_text(verdict) + " (the reranker's share of the final score)"),
        ("nDCG@10", f3(verdict.get("ndcg@10"))),
        (f"Latency per query ({lat})", _fmt(verdict.get("latency_ms"), ".1f", " ms")),
    ]
    # the reranking numbers describe the recommended reranker, or else the best one measured (not recommended)
    best = "" if verdict.get("reranker") and worth_it is not False else (
        f" (best reranked: {verdict['best_reranked']})" if verdict.get("best_reranked") else "")
    if gain != NA:
        rows += [
            (f"Gain over the first stage{best}", gain),
            ("Queries improved / hurt / tied", NA if None in counts else " / ".join(str(c) for c in counts)),
            ("Recall ceiling at that depth", f3(verdict.get("recall_ceiling"))),
        ]
    rows += [
        ("Why this first stage", _text(_get(sel, "first_stage", "reason"))),
        ("Pipeline config", _text(sel.get("pipeline_yaml"))),
    ]
    return Section("Recommended pipeline", [_kv(rows)])


def _first_stage_table(sel: dict) -> Table:
    headers = ["Name", "Status", "nDCG@10", "MRR@10", "Recall@10", "Recall@100", "p50 ms", "p95 ms",
               "Docs/s", "Index MB", "Train s", "In budget", "Note"]
    chosen = _get(sel, "first_stage", "chosen")
    rows, highlight = [], set()
    for i, c in enumerate(_get(sel, "first_stage", "candidates", default=[])):
        m, lat = c.get("metrics") or {}, _get(c, "latency", "first_stage", default={})
        rows.append([_text(c.get("name")), _text(c.get("status")), f3(m.get("ndcg@10")),
                     f3(m.get("mrr@10")), f3(m.get("recall@10")), f3(m.get("recall@100")), ms(lat.get("p50_ms")),
                     ms(lat.get("p95_ms")), _count(c.get("docs_per_second")), _mb(c.get("index_bytes")),
                     _fmt(c.get("train_seconds"), ".1f"), _yes_no(c.get("within_budget")), c.get("note") or ""])
        if chosen is not None and c.get("name") == chosen:
            highlight.add(i)
    return Table(headers, rows, numeric=set(range(2, 11)), highlight=highlight)


def _health(h: Any) -> str:
    if not isinstance(h, dict):
        return NA
    flags = [label for key, label in (("collapsed", "collapsed"), ("no_gain", "no gain")) if h.get(key)]
    text = ", ".join(flags) or "ok"
    if h.get("reasons"):
        text += ": " + "; ".join(str(r) for r in h["reasons"])
    elif _num(h.get("mean_score_std")) is not None:
        text += f" (score std {h['mean_score_std']:.3g})"
    return text


def _pretraining(reranker: dict) -> str:
    """What the corpus pre-training did for this reranker: its pseudo-queries and time, or why there was none."""
    pre = reranker.get("pretrain") or {}
    if pre.get("skipped"):
        return pre["skipped"]
    if not pre.get("queries"):
        return "none"
    kinds = ", ".join(f"{n} {kind}" for kind, n in (pre.get("kinds") or {}).items())
    return f"{pre['queries']} pseudo-queries ({kinds}), {_fmt(pre.get('seconds'), '.0f')} s"


def _reranker_tables(sel: dict) -> tuple[Table, Table]:
    """One row per reranker candidate, and one per reranker x depth."""
    verdict = sel.get("verdict") or {}
    metric = _latency_metric(sel)
    cands = Table(["Reranker", "Start", "Init", "Pre-training", "Status", "Train s", "Health", "Note"], [],
                  numeric={5})
    depths = Table(["Reranker", "Depth", "nDCG@10", "Gain", "95% CI", "p", "Wins / losses", "Recall ceiling",
                    "Rerank p50 ms", "Rerank p95 ms", f"Total {_latency_label(metric)} ms", "In budget", "Mode"], [],
                   numeric=set(range(1, 11)))
    for r in sel.get("rerankers") or []:
        if verdict.get("reranker") and r.get("name") == verdict.get("reranker"):
            cands.highlight.add(len(cands.rows))
        cands.rows.append([_text(r.get("name")), _text(r.get("label")), _text(r.get("init")), _pretraining(r),
                           _text(r.get("status")), _fmt(r.get("train_seconds"), ".1f"), _health(r.get("health")),
                           r.get("note") or ""])
        for d in r.get("depths") or []:
            comp, lat = d.get("comparison") or {}, d.get("latency") or {}
            if verdict.get("name") and d.get("name") == verdict.get("name"):
                depths.highlight.add(len(depths.rows))
            wl = [comp.get("wins"), comp.get("losses")]
            depths.rows.append([
                _text(r.get("name")), _text(d.get("depth")), f3(_get(d, "metrics", "ndcg@10")),
                signed(comp.get("mean_diff")), _ci(comp.get("ci95")), _p_value(comp.get("p_value")),
                NA if None in wl else f"{wl[0]} / {wl[1]}", f3(d.get("recall_ceiling")),
                ms(_get(lat, "rerank", "p50_ms")), ms(_get(lat, "rerank", "p95_ms")), ms(_get(lat, "total", metric)),
                _yes_no(d.get("within_budget")), _mode_text(d)])
    return cands, depths


def _confirmation_section(sel: dict) -> Section | None:
    """The chosen pipeline on the held-out split: measured once, after the choice, and never used to make it."""
    conf = sel.get("confirmation")
    if not isinstance(conf, dict):
        return None
    c = conf.get("comparison") or {}
    blocks: list[Block] = [Para(f"The chosen pipeline and its first stage alone, evaluated once on the held-out "
                                f"{_text(conf.get('split'))} split after the choice was made. These queries were "
                                "never used to choose: unlike the dev gain (the pipeline and its fusion weight were "
                                "chosen on dev), this estimate is not optimistic.")]
    lat = _latency_label(_latency_metric(sel))
    rows = [("Queries", _text(conf.get("queries"))),
            ("First stage alone", f"{_text(conf.get('first_stage'))}: nDCG@10 {f3(conf.get('first_stage_ndcg@10'))}, "
                                  f"{lat} {ms(conf.get('first_stage_latency_ms'))} ms"),
            ("Chosen pipeline", f"{_text(conf.get('pipeline'))}: nDCG@10 {f3(conf.get('pipeline_ndcg@10'))}, "
                                f"{lat} {ms(conf.get('pipeline_latency_ms'))} ms")]
    if c:
        rows += [("Gain over the first stage", f"{signed(c.get('mean_diff'))} (95% CI {_ci(c.get('ci95'))}, "
                                               f"p = {_p_value(c.get('p_value'))})"),
                 ("Queries improved / hurt / tied", " / ".join(_text(c.get(k)) for k in ("wins", "losses", "ties")))]
    else:
        rows.append(("Gain over the first stage", "none: the chosen pipeline is the first stage alone"))
    return Section(f"Confirmation on {_text(conf.get('split'))} (held out)", blocks + [_kv(rows)])


def _backends_section(sel: dict) -> Section:
    """Stage 3: every backend candidate for each chosen stage and use, against PyTorch float32 timed in the same
    interleaved rounds."""
    backends = sel.get("backends") or {}
    blocks: list[Block] = [Para(
        "Each chosen stage on each backend: exported (its equivalence to PyTorch float32 checked on held-out texts), "
        "then timed in interleaved rounds against PyTorch float32 for batch work (items/s on a sample of the corpus) "
        "and for per-query work (one query, or one request's pairs, at a time); speed-ups are medians of per-round "
        "ratios, with their range. Candidates faster in either use are measured on a fixed sample of dev queries. "
        f"Recommended per use: the fastest within a {(_num(backends.get('max_loss')) or 0):.0%} relative nDCG@10 "
        "loss, then confirmed on the whole dev split. Which backend is fastest depends on the CPU (see Machine).")]
    rows, chosen = [], set()
    for stage, stage_rows in (backends.get("stages") or {}).items():
        for r in stage_rows:
            eq = r.get("equivalence") or {}
            agreement = (f"cos ≥ {eq['min_cosine']:.4f}" if "min_cosine" in eq else
                         f"ρ {eq['spearman']:.4f}" if "spearman" in eq else NA)
            if r.get("recommended"):
                chosen.add(len(rows))
            b, q = r.get("batch") or {}, r.get("query") or {}
            rows.append([stage.replace("_", " "), _text(r.get("backend")), _text(r.get("status")),
                         _speedup(b), _speedup(q), ms(q.get("p50_ms")), ms(q.get("p95_ms")), f3(r.get("ndcg@10")),
                         _fmt(100 * r["relative_change"], "+.2f", "%") if r.get("relative_change") is not None else NA,
                         agreement, ", ".join(r.get("recommended") or []) or "", _text(r.get("note"))
                         if r.get("note") else ""])
    if rows:
        blocks.append(Table(["Stage", "Backend", "Status", "Batch vs torch", "Per query vs torch", "p50 ms", "p95 ms",
                             "nDCG@10 (sample)", "Change", "Equivalence", "Recommended for", "Note"], rows,
                            numeric={5, 6, 7, 8}, highlight=chosen))
    blocks += [Para(line) for line in backends.get("summary") or []] or [Para("No backend candidates were measured.")]
    return Section("Stage 3: backends", blocks)


def _speedup(measured: dict) -> str:
    """``2.31× (2.10–2.45)``: the median of per-round ratios to PyTorch float32, and their range."""
    if measured.get("speedup") is None:
        return NA
    low, high = measured.get("speedup_range") or (measured["speedup"], measured["speedup"])
    return f"{measured['speedup']:.2f}× ({low:.2f}–{high:.2f})"


def _init_costs_table(sel: dict) -> Table:
    rows = [[_text(c.get("init")), _text(c.get("label")), _text(c.get("status")), f3(c.get("best_ndcg@10")),
             signed(c.get("vs_best_other")), signed(c.get("vs_same_recipe")), "; ".join(c.get("cuts") or []) or "none",
             _fmt(c.get("train_seconds"), ".1f")]
            for c in _get(sel, "verdict", "init_costs", default=[])]
    return Table(["Init", "Start", "Status", "Best nDCG@10", "vs best other start", "vs the other shared start, same "
                  "recipe", "Recipe cut", "Train s"], rows, numeric={3, 4, 5, 7})


def _skipped_table(sel: dict) -> Table:
    """The run's ``skipped`` list, plus every candidate whose status is not ok and is not already listed."""
    rows = [[_text(s.get("what")), "skipped", _text(s.get("why"))] for s in sel.get("skipped") or []]
    listed = [(str(s.get("what") or ""), s.get("why")) for s in sel.get("skipped") or []]
    cands = list(_get(sel, "first_stage", "candidates", default=[])) + list(sel.get("rerankers") or [])
    for c in cands:
        status, name = c.get("status") or "ok", str(c.get("name") or "")
        if status == "ok" or any(what.startswith(name) or (why and why == c.get("note")) for what, why in listed):
            continue
        rows.append([name or NA, str(status), c.get("note") or NA])
    return Table(["What", "Status", "Why"], rows)


def _time_section(sel: dict) -> Section:
    """The plan (each step's share and recipe), where the time went (per kind of work, with rates) and each
    step's estimate against what it cost, and what each model's batch work ran in."""
    blocks: list[Block] = []
    plan = _get(sel, "budget", "plan") or {}
    if plan.get("steps"):
        blocks.append(Para(f"The plan, made before any fine-tuning for the {_seconds(plan.get('remaining_s'))} "
                           "then left: each step's full recipe, its shortest, the share it got and the cuts that fit "
                           f"it. Every step's full recipe would need --time-budget "
                           f"{plan.get('full_recipes_budget_min')}."))
        blocks.append(Table(["Step", "Full recipe", "Shortest", "Share", "Recipe", "Cuts"], [
            [_text(r.get("step")), _seconds(r.get("full_s")), _seconds(r.get("shortest_s")), _seconds(r.get("share_s")),
             _seconds(r.get("recipe_s")) if r.get("runs") else "left out",
             "; ".join(r.get("cuts") or []) or (r.get("reason") or "none")] for r in plan["steps"]],
            numeric={1, 2, 3, 4}))
    time = sel.get("time") or {}
    kinds = time.get("by_kind") or {}
    if kinds:
        blocks.append(Para(f"Where the {_seconds(time.get('wall_seconds'))} of this session went, by kind of work "
                           "(each kind's own time: a dev evaluation inside a training counts as evaluation); "
                           f"{_seconds(time.get('other_seconds'))} went to loading models and data, BM25 and the "
                           "report."))
        blocks.append(Table(["Work", "Seconds", "Share", "Processed", "Rate"], [
            [kind, _fmt(k.get("seconds"), ".0f"), _fmt(k.get("share"), ".0%"),
             f"{_count(k.get('items'))} {k.get('unit', '')}".strip() if k.get("items") else NA,
             f"{_fmt(k.get('rate'), ',.1f')} {k.get('unit', '')}/s" if k.get("rate") else NA]
            for kind, k in kinds.items()], numeric={1, 2, 3, 4}))
    spans = sorted((r for r in time.get("spans") or [] if (_num(r.get("seconds")) or 0) >= 1),
                   key=lambda r: -r["seconds"])
    if spans:
        blocks.append(Table(["Step", "Work", "On", "Seconds", "Processed", "Rate"], [
            [_text(r.get("step")), _text(r.get("kind")), _text(r.get("what")), _fmt(r.get("seconds"), ".1f"),
             f"{_count(r.get('items'))} {r.get('unit', '')}".strip() if r.get("items") else NA,
             f"{_fmt(r.get('rate'), ',.1f')} {r.get('unit', '')}/s" if r.get("rate") else NA]
            for r in spans[:20]], numeric={3, 4, 5}))
    estimates = time.get("estimates") or []
    if estimates:
        blocks.append(Table(["Step", "Estimated", "Share", "Took", "Took / estimated"], [
            [_text(e.get("step")), _seconds(e.get("estimated_s")), _seconds(e.get("share_s")), _seconds(e.get("actual_s")),
             _fmt(e.get("actual_over_estimate"), ".2f")] for e in estimates], numeric={1, 2, 3, 4}))
    precision = _get(sel, "batch_precision", "models") or {}
    if precision:
        blocks.append(Para("Batch work (corpus encoding, scoring at every depth, dev evaluations) ran in the precision "
                           "measured fastest and exact enough for each model on this CPU; per-query latencies are "
                           "float32's (stage 3 measures the other backends)."))
        blocks.append(Table(["Model", "Batch precision", "Why"], [
            [_text(c.get("model") or key), _text(c.get("dtype")), _text(c.get("reason"))]
            for key, c in precision.items()]))
    return Section("Where the time went", blocks or [Para("No time budget was set and no timings were recorded.")])


def _budget_table(sel: dict) -> Table:
    budget = {k: v for k, v in (sel.get("budget") or {}).items() if k != "plan"}
    used, total = _num(budget.get("used_s")), _num(budget.get("time_budget_s"))
    share = f", {used / total:.0%} of the budget" if used is not None and total else ""
    lat = _latency_label(budget.get("latency_metric") or _latency_metric(sel))
    formats = {"time_budget_s": _seconds, "used_s": lambda v: _seconds(v) + share,
               "latency_budget_ms": lambda v: f"{v:g} ms at {lat} per query" if _num(v) is not None else "none"}
    budget.setdefault("latency_budget_ms", None)
    if sel.get("wall_seconds") is not None:
        budget["wall_seconds"] = sel["wall_seconds"]
        formats["wall_seconds"] = _seconds
    return _kv_dict(budget, formats)


def build_document(sel: dict, plots: dict[str, str | None]) -> list[Section]:
    """The report's sections; ``plots`` maps each of PLOTS to its SVG, or None where there is nothing to plot."""
    lat = _latency_label(_latency_metric(sel))
    cands, depths = _reranker_tables(sel)
    fs_reason = _get(sel, "first_stage", "reason")

    def figure(key: str, alt: str, missing: str) -> Block:
        return Figure(key, alt) if plots.get(key) else Para(missing)

    per_query = sel.get("per_query") or {}
    stage2: list[Block] = [Para("Cross-encoders rerank the chosen first stage's top candidates, alone (mode "
                                "rerank) or fused with the first stage's scores at the weight chosen on dev (mode "
                                "fused; weight 1 would be reranking alone, 0 the first stage's order). "
                                "Gains are paired differences in nDCG@10 over the first stage alone on the "
                                "same queries.")]
    if not cands.rows:
        stage2.append(Para("No reranker candidates were measured."))
    elif not depths.rows:
        stage2 += [cands, Para("No reranker was measured at any depth, so there is no depth curve.")]
    else:
        stage2 += [cands, depths, figure("quality_vs_depth", "nDCG@10 against rerank depth",
                                         "No reranker has an nDCG@10 at any depth, so there is no depth curve.")]
    if per_query:
        stage2.append(Para(f"Per query: {metric_label(per_query.get('metric') or 'ndcg@10')} of "
                           f"{_text(per_query.get('b'))} minus that of {_text(per_query.get('a'))}, one bar per "
                           "query; green where it is better, red where it is worse."))
    stage2.append(figure("per_query", "per-query differences", "No per-query comparison was recorded."))
    init_costs = _init_costs_table(sel)
    skipped = _skipped_table(sel)
    confirmation = _confirmation_section(sel)
    return [
        _verdict_section(sel),
        _recommended_section(sel),
        *([confirmation] if confirmation else []),
        Section("Quality against latency", [
            Para(f"Every system measured: nDCG@10 against {lat} latency per query (log scale). The line is the "
                 "Pareto front" + ("; greyed points exceed the latency budget."
                                   if _get(sel, "budget", "latency_budget_ms") is not None else ".")),
            figure("quality_vs_latency", "nDCG@10 against latency", "No system has both a latency and nDCG@10."),
        ]),
        Section("Stage 1: first-stage candidates", ([Para(f"Chosen: {fs_reason}.")] if fs_reason else [])
                + [_first_stage_table(sel)]),
        Section("Stage 2: rerankers", stage2),
        _backends_section(sel),
        Section("Cross-encoder initialisation", [
            Para("What each way of initialising the cross-encoder cost against the best other start.")]
            + ([init_costs] if init_costs.rows else [Para("No initialisation costs were recorded.")])),
        Section("Skipped or shortened", [skipped] if skipped.rows else [Para("Nothing was skipped or shortened.")]),
        _time_section(sel),
        Section("Budgets", [_budget_table(sel)], css="third"),
        Section("Dataset", [_kv_dict(sel.get("dataset"), {"documents": _count, "train_queries": _count,
                                                          "dev_queries": _count})], css="third"),
        Section("Machine", [_kv_dict(sel.get("machine"), {"gpu": lambda v: _text(v) if v else "none"})],
                css="third"),
        Section("Configuration", [_kv_dict(sel.get("config"))]),
    ]


# --------------------------------------------------------------------------------------------
# HTML and Markdown renderers
# --------------------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1f2933; --muted: #6b7280; --line: #e5e7eb; --accent: #2563eb; --hl: #fff7d6; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 32px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
.meta { color: var(--muted); font-size: 13.5px; margin: 0 0 22px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 5px; border-bottom: 1px solid var(--line); }
p { margin: 8px 0; max-width: 860px; }
section.verdict { background: #ecfdf3; border: 1px solid #a7e3c0; border-left: 6px solid #16a34a;
  border-radius: 8px; padding: 4px 22px 12px; }
section.verdict.first-stage-only { background: #fff8eb; border-color: #f5d595; border-left-color: #d97706; }
section.verdict h2 { border: none; margin-top: 12px; margin-bottom: 2px; }
section.verdict p.strong { font-size: 16.5px; max-width: none; }
section.verdict ul { margin: 6px 0 4px; padding-left: 20px; font-size: 15.5px; }
section.verdict li { margin: 4px 0; }
p.strong { font-weight: 600; }
table { border-collapse: collapse; font-size: 12.5px; margin: 10px 0 16px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 7px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: #f3f4f6; font-weight: 600; border-bottom: 2px solid #d1d5db; vertical-align: bottom; }
td.num, th.num { text-align: right; }
td.num { white-space: nowrap; }
td.name { white-space: nowrap; }
td.note { color: var(--muted); min-width: 150px; max-width: 320px; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.chosen td { background: var(--hl); font-weight: 600; }
tr.chosen td:first-child { box-shadow: inset 4px 0 0 #f59e0b; }
table.kv { font-size: 14px; }
table.kv { min-width: 340px; }
table.kv th { font-weight: 500; color: var(--muted); white-space: nowrap; padding-right: 22px; }
section.third { display: inline-block; vertical-align: top; width: 32%; margin-right: 1.3%; }
section.third table.kv { min-width: 0; width: 100%; }
table.kv tr:nth-child(even) { background: none; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.badge.ok { background: #dcfce7; color: #166534; } .badge.warn { background: #fef3c7; color: #92400e; }
.badge.muted { background: #e5e7eb; color: #4b5563; } .badge.bad { background: #fee2e2; color: #991b1b; }
td.no { color: #b91c1c; font-weight: 600; }
figure { margin: 12px 0 20px; }
figure svg { display: block; width: 720px; max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; }
.scroll { overflow-x: auto; }
footer { margin-top: 36px; color: var(--muted); font-size: 12.5px; }
"""


def _html_cell(text: str, header: str, numeric: bool) -> str:
    classes = ["num"] if numeric else ["name"] if header in {"Name", "Reranker"} else []
    body = html.escape(text)
    if header in {"Status"} and text in _STATUS_CLASSES:
        body = f'<span class="badge {_STATUS_CLASSES[text]}">{body}</span>'
    if header == "Note":
        classes.append("note")
    if header == "In budget" and text == "no":
        classes.append("no")
    return f"<td class=\"{' '.join(classes)}\">{body}</td>" if classes else f"<td>{body}</td>"


def _nbsp_unit(header: str) -> str:
    """Keep a one-letter unit on the line of the word before it: "Train s" never breaks into "Train" / "s"."""
    return re.sub(r" s$", "&nbsp;s", header)


def _html_table(t: Table) -> str:
    if t.key_value:
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in t.rows)
        return f'<table class="kv"><tbody>{rows}</tbody></table>'
    head = "".join(f'<th{" class=num" if i in t.numeric else ""}>{_nbsp_unit(html.escape(h))}</th>'
                   for i, h in enumerate(t.headers))
    body = []
    for r, row in enumerate(t.rows):
        cells = "".join(_html_cell(c, t.headers[i], i in t.numeric) for i, c in enumerate(row))
        body.append(f'<tr class="chosen">{cells}</tr>' if r in t.highlight else f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_block(b: Block, plots: dict[str, str | None]) -> str:
    if isinstance(b, Para):
        return f'<p class="strong">{html.escape(b.text)}</p>' if b.strong else f"<p>{html.escape(b.text)}</p>"
    if isinstance(b, Items):
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        return _html_table(b)
    return f'<figure role="img" aria-label="{html.escape(b.alt)}">{plots[b.key]}</figure>'


def render_html(sel: dict, sections: list[Section], plots: dict[str, str | None]) -> str:
    title = html.escape(str(sel.get("title") or "Stagewise model selection"))
    body = "".join(  # no whitespace between sections: "third" ones sit side by side
        f'<section class="{s.css}"><h2>{html.escape(s.title)}</h2>\n'
        + "\n".join(_html_block(b, plots) for b in s.blocks) + "</section>"
        for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
            f"<style>{_CSS}</style></head>\n<body><main>\n<h1>{title}</h1>\n"
            f'<p class="meta">{html.escape(_meta_line(sel))}</p>\n{body}\n'
            f"<footer>Written by stagewise. The input is in selection.json next to this file.</footer>\n"
            f"</main></body></html>\n")


def _meta_line(sel: dict) -> str:
    ds = sel.get("dataset") or {}
    parts = [f"dataset {ds['name']}" if ds.get("name") else "",
             f"{_count(ds['documents'])} documents" if ds.get("documents") is not None else "",
             f"{ds['dev_queries']} {ds.get('dev_split') or 'dev'} queries" if ds.get("dev_queries") is not None else "",
             f"created {sel['created']}" if sel.get("created") else "",
             f"took {_seconds(sel['wall_seconds'])}" if sel.get("wall_seconds") is not None else ""]
    return " · ".join(p for p in parts if p)


def _md_escape(text: str) -> str:
    text = re.sub(r"([\\`*_|\[\]])", r"\\\1", str(text)).replace("<", "&lt;")
    return text.replace("\n", " ")


def _md_block(b: Block, plots: dict[str, str | None]) -> str:
    if isinstance(b, Para):
        return f"**{_md_escape(b.text)}**" if b.strong else _md_escape(b.text)
    if isinstance(b, Items):
        return "\n".join(f"- {_md_escape(i)}" for i in b.items)
    if isinstance(b, Figure):
        return f"![{_md_escape(b.alt)}]({b.key}.svg)"
    if b.key_value:
        return "\n".join(f"- **{_md_escape(k)}:** {_md_escape(v)}" for k, v in b.rows)
    lines = ["| " + " | ".join(_md_escape(h) for h in b.headers) + " |",
             "|" + "|".join("---:" if i in b.numeric else "---" for i in range(len(b.headers))) + "|"]
    for r, row in enumerate(b.rows):
        cells = [_md_escape(c) for c in row]
        if r in b.highlight:
            cells = [f"**{c}**" if c else c for c in cells]
            cells[0] = "▶ " + cells[0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(sel: dict, sections: list[Section], plots: dict[str, str | None]) -> str:
    out = [f"# {_md_escape(sel.get('title') or 'Stagewise model selection')}", "", f"_{_md_escape(_meta_line(sel))}_"]
    for s in sections:
        out += ["", f"## {_md_escape(s.title)}"]
        for b in s.blocks:
            out += ["", _md_block(b, plots)]
    out += ["", "Chosen rows are marked ▶ and in bold. The input is in `selection.json`.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _new_figure(height: float = 4.0):
    """A figure about 720 px wide in a browser (7.5 in at 96 px/in), on the Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(7.5, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _svg(fig) -> str:
    """The figure as SVG markup, without the XML prologue, ready to inline."""
    import io

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "stagewise"}):  # reproducible ids
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _place_labels(ax, labels: list[tuple[float, float, str, dict]]) -> None:
    """Annotate points in order, dropping a label where it would overlap a point, a label already placed, or
    leave the axes."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()  # fix the layout and limits so label extents are final
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    r = 4 * fig.dpi / 72  # a marker's radius, in pixels
    points = ax.transData.transform([(x, y) for x, y, _, _ in labels])
    placed = [Bbox([[px - r, py - r], [px + r, py + r]]) for px, py in points]
    offsets = [((6, 5), "left", "bottom"), ((6, -5), "left", "top"), ((-6, 5), "right", "bottom"),
               ((-6, -5), "right", "top")]
    for x, y, text, style in labels:
        for offset, ha, va in offsets:
            ann = ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", ha=ha, va=va, **style)
            ann.set_in_layout(False)
            ext = ann.get_window_extent(renderer)
            inside = ext.x0 >= box.x0 and ext.x1 <= box.x1 + 10 and ext.y0 >= box.y0 and ext.y1 <= box.y1 + 6
            if inside and not any(ext.overlaps(p) for p in placed):
                placed.append(ext.expanded(1.05, 1.15))
                break
            ann.remove()


def plot_quality_vs_latency(sel: dict) -> str | None:
    """nDCG@10 against latency for every system, with the Pareto front, the budget and the verdict marked."""
    metric = _latency_metric(sel)
    budget = _num(_get(sel, "budget", "latency_budget_ms"))
    chosen = _get(sel, "verdict", "name")
    points = [(max(_num(s.get(metric)), 1e-3), _num(s.get("ndcg@10")), s) for s in sel.get("systems") or []
              if _num(s.get(metric)) is not None and _num(s.get("ndcg@10")) is not None]
    if not points:
        return None
    from matplotlib.ticker import FuncFormatter

    fig, ax = _new_figure(4.8)
    ax.set_xscale("log")
    for stage, marker, label in (("first_stage", "o", "first stage alone"), ("pipeline", "s", "with a reranker")):
        for inside in (True, False):
            pts = [(x, y) for x, y, s in points if (s.get("stage") == "pipeline") == (stage == "pipeline")
                   and (s.get("within_budget") is not False) == inside]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=38, zorder=3, linewidths=0.6, edgecolors="white",
                           color=_COLOURS[stage] if inside else _COLOURS["out"],
                           label=label if inside else f"{label}, over budget")
    front = sorted((x, y) for x, y, s in points if s.get("pareto"))
    if front:
        ax.step(*zip(*front), where="post", color=_COLOURS["front"], linewidth=1.2, alpha=0.7, zorder=2,
                label="Pareto front")
    if budget is not None:
        ax.axvline(budget, color="#6b7280", linestyle="--", linewidth=1.1, label=f"budget {budget:g} ms")
        ax.set_xlim(right=max(ax.get_xlim()[1], budget * 1.6))
    for x, y, s in points:
        if s.get("name") == chosen:
            ax.scatter([x], [y], s=230, facecolors="none", edgecolors=_COLOURS["chosen"], linewidths=2, zorder=4,
                       label="recommended")
    ax.set_xlabel(f"{_latency_label(metric)} latency per query (ms, log scale)")
    ax.set_ylabel("nDCG@10")
    ax.set_title("Quality against latency", loc="left", fontsize=11.5, fontweight="bold")
    ax.margins(x=0.12, y=0.1)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    fig.legend(fontsize=8.5, frameon=False, loc="outside lower center", ncols=3)
    order = sorted(points, key=lambda p: (p[2].get("name") != chosen, not p[2].get("pareto"), -p[1]))
    _place_labels(ax, [(x, y, short_name(s.get("name")),
                        {"fontsize": 9.5, "fontweight": "bold", "color": _COLOURS["chosen"]} if s.get("name") == chosen
                        else {"fontsize": 8, "color": "#374151"}) for x, y, s in order])
    return _svg(fig)


def plot_quality_vs_depth(sel: dict) -> str | None:
    """nDCG@10 against rerank depth, one line per reranker and mode (reranking alone, fused with the first stage),
    with the first stage alone and the recall ceiling."""
    rerankers = [(r, sorted((d for d in r.get("depths") or [] if _num(d.get("depth")) is not None
                             and _num(_get(d, "metrics", "ndcg@10")) is not None), key=lambda d: d["depth"]))
                 for r in sel.get("rerankers") or []]
    rerankers = [(r, ds) for r, ds in rerankers if ds]
    if not rerankers:
        return None
    fig, ax = _new_figure(4.2)
    ax.set_xscale("log")
    ceiling: dict[float, float] = {}
    verdict = sel.get("verdict") or {}
    for r, ds in rerankers:
        colour = None
        for fused in (False, True):  # pure reranking solid, fused with the first stage dashed in the same colour
            line = [d for d in ds if ((d.get("mode") or "rerank") == "fusion") == fused]
            if line:
                colour = ax.plot([d["depth"] for d in line], [d["metrics"]["ndcg@10"] for d in line], color=colour,
                                 marker="D" if fused else "o", linewidth=1.8, markersize=5,
                                 linestyle="--" if fused else "-",
                                 label=short_name(r.get("name"), 30) + (" fused" if fused else ""))[0].get_color()
        for d in ds:
            if _num(d.get("recall_ceiling")) is not None:
                ceiling.setdefault(d["depth"], d["recall_ceiling"])
            if d.get("name") == verdict.get("name"):
                ax.scatter([d["depth"]], [d["metrics"]["ndcg@10"]], s=200, facecolors="none", zorder=4,
                           edgecolors=_COLOURS["chosen"], linewidths=2, label="recommended")
    if ceiling:
        xs = sorted(ceiling)
        ax.plot(xs, [ceiling[x] for x in xs], linestyle=":", color="#6b7280", linewidth=1.6, marker=".",
                label="recall ceiling (first stage recall@depth)")
    first = _first_stage_ndcg(sel)
    if first is not None:
        name = short_name(verdict.get("first_stage") or _get(sel, "first_stage", "chosen") or "first stage", 36)
        ax.axhline(first, color="#111827", linestyle="--", linewidth=1.1, label=f"{name} alone ({first:.3f})")
    depths = sorted({d["depth"] for _, ds in rerankers for d in ds} | set(ceiling))
    ax.set_xticks(depths, [f"{d:g}" for d in depths])
    ax.minorticks_off()
    ax.set_xlabel("rerank depth (candidates passed to the cross-encoder)")
    ax.set_ylabel("nDCG@10  /  recall")
    ax.set_title("Quality against rerank depth", loc="left", fontsize=11.5, fontweight="bold")
    fig.legend(fontsize=8.5, frameon=False, loc="outside lower center", ncols=3)
    return _svg(fig)


def plot_per_query(sel: dict) -> str | None:
    """The per-query differences (b minus a), sorted, wins green and losses red."""
    pq = sel.get("per_query") or {}
    diffs = pq.get("diffs")
    if isinstance(diffs, dict):
        items = [(str(k), _num(v)) for k, v in diffs.items()]
    elif isinstance(diffs, list):
        items = [(str(i), _num(v)) for i, v in enumerate(diffs)]
    else:
        return None
    items = sorted(((k, v) for k, v in items if v is not None), key=lambda kv: -kv[1])
    if not items:
        return None
    fig, ax = _new_figure(3.4)
    values = [v for _, v in items]
    colours = [_COLOURS["win"] if v > 0 else _COLOURS["loss"] if v < 0 else "#9ca3af" for v in values]
    ax.bar(range(len(values)), values, width=0.9 if len(values) <= 60 else 1.0, color=colours, linewidth=0)
    ax.axhline(0, color="#374151", linewidth=0.8)
    wins, losses = sum(v > 0 for v in values), sum(v < 0 for v in values)
    metric = metric_label(pq.get("metric") or "ndcg@10")
    ax.set_title(f"Per-query {metric} difference", loc="left", fontsize=11.5, fontweight="bold", pad=20)
    ax.text(0, 1.03, f"{_ellipsize(pq.get('b'), 60)}  minus  {_ellipsize(pq.get('a'), 40)}", transform=ax.transAxes,
            fontsize=9, color="#374151", va="bottom")
    ax.text(0.99, 0.96, f"{wins} better · {losses} worse · {len(values) - wins - losses} tied", ha="right",
            va="top", transform=ax.transAxes, fontsize=9, color="#374151")
    if len(items) <= 30:
        ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=90, fontsize=7.5)
    else:
        ax.set_xticks([])
    ax.set_xlabel(f"queries, sorted by difference (n = {len(values)})")
    ax.set_ylabel(f"Δ {metric}")
    ax.grid(False, axis="x")
    return _svg(fig)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(selection: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, report.md, selection.json and the plots' SVG files into ``out_dir``.

    Returns the paths written: keys ``html``, ``markdown``, ``json``, and one per plot drawn (see PLOTS;
    a plot with nothing to show is left out, and a stale file of that name is removed).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"quality_vs_latency": plot_quality_vs_latency(selection),
             "quality_vs_depth": plot_quality_vs_depth(selection), "per_query": plot_per_query(selection)}
    paths: dict[str, Path] = {}
    for key, svg in plots.items():
        path = out / f"{key}.svg"
        if svg is None:
            path.unlink(missing_ok=True)
            continue
        _write_atomic(path, svg)
        paths[key] = path
    sections = build_document(selection, plots)
    for key, name, text in (("json", "selection.json", json.dumps(selection, indent=2, default=str) + "\n"),
                            ("markdown", "report.md", render_markdown(selection, sections, plots)),
                            ("html", "report.html", render_html(selection, sections, plots))):
        paths[key] = out / name
        _write_atomic(paths[key], text)
    return paths


def render_screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280,
                      height: int | None = None) -> bool:
    """Screenshot ``html_path`` with headless Chromium. False when no browser is installed or it fails.

    ``height`` defaults to a rough estimate of the page's length (tables, lists and figures), so the
    whole report is captured.
    """
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        return False
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    if height is None:
        text = html_path.read_text(encoding="utf-8")
        svg_px = sum(float(h) * 4 / 3 for h in re.findall(r'<svg[^>]*?height="([\d.]+)pt"', text))
        text = re.sub(r"<svg.*?</svg>", "", text, flags=re.S)
        height = int(400 + svg_px + 40 * text.count("<tr") + 34 * text.count("<li") + 100 * text.count("<h2")
                     + 40 * len(re.findall(r"<p[ >]", text)))
        height = min(max(height, 800), 16000)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [shutil.which(browser), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--force-device-scale-factor=1", f"--window-size={width},{height}",
               f"--screenshot={png_path}", html_path.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.warning("screenshot failed: %s", e)
            return False
    if not png_path.exists() or png_path.stat().st_size == 0:
        logger.warning("screenshot failed (exit %s): %s", proc.returncode, proc.stderr[-500:])
        return False
    return True
