"""The report's content: a selection dict turned into sections (see ``blocks``), ready for either renderer.

Every section builder reads the selection dict defensively (missing keys, nulls), so a partial run still gets a
report that says what is missing instead of failing.
"""

from __future__ import annotations

from typing import Any, Callable

from stagewise.selection.report.blocks import Block, Figure, Items, Para, Section, Table
from stagewise.selection.report.formatting import (
    NA,
    _ci,
    _count,
    _first_stage_ndcg,
    _fmt,
    _get,
    _key_label,
    _latency_label,
    _latency_metric,
    _mb,
    _num,
    _p_value,
    _seconds,
    _text,
    _yes_no,
    f3,
    metric_label,
    ms,
    signed,
)


def _kv(rows: list[tuple[str, str]]) -> Table:
    return Table(["", ""], [[k, v] for k, v in rows], key_value=True)


def _kv_dict(d: Any, formats: dict[str, Callable[[Any], str]] | None = None) -> Table:
    """A key-value table of every entry of ``d``, formatted by ``formats[key]`` (which then also names the unit,
    so the label drops it) or as plain text."""
    formats = formats or {}
    d = d if isinstance(d, dict) else {}
    return _kv([(_key_label(k) if k not in formats else _key_label(k).split(" (")[0], formats.get(k, _text)(v))
                for k, v in d.items()])


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
