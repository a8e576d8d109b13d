"""The verdict: the recommended pipeline among every measured option, and the numbers that explain it.

An option is a reranker at a depth, reranking alone or fused with the first stage. It must fit the latency budget
and gain enough, significantly (paired test), to be recommended; otherwise the first stage stays alone, and the
verdict says why: in numbers where a reranker was measured, and as "not evaluated" (with what it would need) where
none was. Never "not worth it" for what was not measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stagewise.selection.config import SelectConfig


def _latency(row: dict, metric: str) -> float:
    lat = row["latency"]
    return (lat.get("total") or lat["first_stage"])[metric]


def pareto_front(rows: list[dict]) -> None:
    """Mark ``pareto``: no other row is at least as good on both nDCG@10 and latency and better on one."""
    for r in rows:
        r["pareto"] = not any(
            o is not r and o["ndcg@10"] >= r["ndcg@10"] and o["latency_ms"] <= r["latency_ms"]
            and (o["ndcg@10"] > r["ndcg@10"] or o["latency_ms"] < r["latency_ms"]) for o in rows)


def _mode(row: dict) -> str:
    return row.get("mode") or "rerank"  # a depth record stored before fusion existed reranks


def _collapsed(reranker: dict) -> bool:
    return bool((reranker.get("health") or {}).get("collapsed"))


def _how(reranker: dict, row: dict) -> str:
    """The summary's words for an option: reranked by X at depth 20, fused with the first stage at weight 0.40."""
    how = f"reranked by {reranker['name']} at depth {row['depth']}"
    if _mode(row) == "fusion":
        f = row["fusion"]
        how += (f", fused with the first stage at weight {f['weight']:.2f}"
                + ("" if f["normalization"] == "minmax" else f" ({f['normalization']})"))
    return how


def verdict(config: SelectConfig, chosen: dict, rerankers: list[dict]) -> dict:
    """The recommended pipeline and the numbers that explain it.

    Every reranker at every depth is an option twice over: reranking alone, and fused with the first stage. An
    option must fit the latency budget and add at least ``min_gain`` nDCG@10 with p < ``alpha``; otherwise the
    first stage alone. At equal quality the faster option wins, then pure reranking (the simpler). A collapsed
    reranker never reranks alone (its order says nothing), but its fusion may be recommended under the same
    rules: fusion is judged by its own measured gain, and where the reranker's scores carry nothing the weight
    chosen falls to 0, which gains nothing.
    """
    metric, budget = config.latency_metric, config.latency_budget_ms
    first_ndcg = chosen["metrics"]["ndcg@10"]
    options = []
    for r in rerankers:
        for d in r["depths"]:
            d["within_budget"] = budget is None or _latency(d, metric) <= budget
            if d["within_budget"]:
                options.append((r, d))
    eligible = [(r, d) for r, d in options if not _collapsed(r) or _mode(d) == "fusion"]
    best = max(eligible or options, default=None,  # a collapsed reranker alone is only shown when nothing else fits
               key=lambda x: (round(x[1]["metrics"]["ndcg@10"], 4), -_latency(x[1], metric), _mode(x[1]) == "rerank"))
    out: dict = {"first_stage": chosen["name"], "first_stage_ndcg@10": first_ndcg,
                 "first_stage_latency_ms": _latency(chosen, metric), "reranker": None, "depth": None, "mode": None,
                 "fusion": None, "reranker_worth_it": False, "name": chosen["name"], "ndcg@10": first_ndcg,
                 "latency_ms": _latency(chosen, metric)}
    summary = []
    if best is not None:
        r, d = best
        c, fused, collapsed = d["comparison"], _mode(d) == "fusion", _collapsed(r)
        out.update(best_reranked=d["name"], best_mode=_mode(d), gain=c["mean_diff"], ci95=c["ci95"],
                   p_value=c["p_value"], wins=c["wins"], losses=c["losses"], ties=c["ties"],
                   recall_ceiling=d["recall_ceiling"])
        worth = (c["mean_diff"] >= config.min_gain and c["p_value"] < config.alpha and (fused or not collapsed))
        out["reranker_status"] = "worth it" if worth else "not worth it"
        if worth:
            out.update(reranker=r["name"], depth=d["depth"], mode=_mode(d), fusion=d.get("fusion") if fused else None,
                       reranker_worth_it=True, name=d["name"], **{"ndcg@10": d["metrics"]["ndcg@10"]},
                       latency_ms=_latency(d, metric))
        out.update(_depth_curve(r, first_ndcg, _mode(d)))
        detail = (f"(95% CI {c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}, paired t-test p = {c['p_value']:.3g}; "
                  f"better on {c['wins']} queries, worse on {c['losses']})")
        if worth:
            summary.append(f"Recommended: {chosen['name']}, {_how(r, d)} (dev nDCG@10 {d['metrics']['ndcg@10']:.3f}, "
                           f"{metric[:3]} {_latency(d, metric):.0f} ms per query).")
            summary.append(f"{'Fusion' if fused else 'Reranking'} adds {c['mean_diff']:+.3f} nDCG@10 {detail} over "
                           "the first stage alone.")
            if fused:
                summary.append(_alone_note(r, d, first_ndcg, collapsed) + "The fusion weight was chosen on these "
                               "same dev queries, so this gain is optimistic: a test split confirms it (test_split).")
        else:
            why = ("its scores collapsed" if collapsed and not fused else "fused, its best weight on dev is 0: it "
                   "adds nothing to the first stage's order" if fused and d["fusion"]["weight"] == 0 else
                   "reranking lowers nDCG@10" if c["mean_diff"] < 0 else
                   f"the gain is below the {config.min_gain:g} minimum"
                   if c["mean_diff"] < config.min_gain else f"the gain is not significant (p ≥ {config.alpha:g})")
            summary.append(f"Recommended: {chosen['name']} alone (dev nDCG@10 {first_ndcg:.3f}, {metric[:3]} "
                           f"{_latency(chosen, metric):.0f} ms per query). The reranker is not worth it: {why}.")
            alone = _alone_note(r, d, first_ndcg, collapsed) if fused else ""
            summary.append((f"The best reranked pipeline within budget, {d['name']}, changes nDCG@10 by "
                            f"{c['mean_diff']:+.3f} {detail}. " + alone).strip())
        if d["recall_ceiling"] is not None:
            summary.append(f"At depth {d['depth']} the first stage retrieves {d['recall_ceiling']:.0%} of the "
                           "relevant documents: the ceiling for reranking.")
        if out.get("depth_90pct") is not None:
            summary.append(f"Depth {out['depth_90pct']} reaches 90% of {r['name']}'s peak gain"
                           + (" when fused" if fused else "")
                           + f" ({out['peak_gain']:+.3f} at depth {out['peak_depth']})"
                           + ("; the gain then declines deeper." if out["peaks_and_declines"] else "."))
    elif any(r["depths"] for r in rerankers):
        out["reranker_status"] = "over the latency budget"
        summary.append(f"Recommended: {chosen['name']} alone (dev nDCG@10 {first_ndcg:.3f}, {metric[:3]} "
                       f"{_latency(chosen, metric):.0f} ms per query): no reranker fits the latency budget.")
    else:  # nothing measured: nothing may be called not worth it
        why = [f"{r['name']}: {r['note']}" for r in rerankers if r.get("note")]
        out.update(reranker_worth_it=None, reranker_status="not evaluated", not_evaluated=why)
        summary.append(f"Recommended: {chosen['name']} alone (dev nDCG@10 {first_ndcg:.3f}, {metric[:3]} "
                       f"{_latency(chosen, metric):.0f} ms per query): no reranker was evaluated.")
        summary.append("Whether reranking is worth it on this data is not known: "
                       + ("; ".join(why) if why else "no cross-encoder start was configured" if not rerankers
                          else "no cross-encoder start could be trained") + ".")
    if out.get("reranker_status") != "not evaluated":  # the starts the budget could not afford, and what they need
        summary += [f"{r['name']} was {r['note']}." for r in rerankers
                    if r.get("status") == "skipped" and "--time-budget" in (r.get("note") or "")]
    out["init_costs"] = _init_costs(rerankers)
    for cost in out["init_costs"]:
        if cost["vs_best_other"] is not None:
            summary.append(f"The {cost['init']} start ({cost['label']}) reached {cost['best_ndcg@10']:.3f} nDCG@10, "
                           f"{cost['vs_best_other']:+.3f} against the best other start"
                           + (f" ({cost['train_seconds']:.0f} s of training)" if cost["train_seconds"] else "")
                           + (", and its scores collapsed." if cost["collapsed"] else "."))
        if cost.get("vs_same_recipe") is not None and cost["init"] == "from-finetuned-bi":
            summary.append(f"On the same shortened recipe ({'; '.join(cost['cuts'])}), the fine-tuned bi-encoder as a "
                           f"start scored {cost['vs_same_recipe']:+.3f} nDCG@10 against its base.")
    out["summary"] = summary
    return out


def _alone_note(reranker: dict, row: dict, first_ndcg: float, collapsed: bool) -> str:
    """A fused option against its reranker alone at the same depth (empty where that was not measured)."""
    pure = next((x for x in reranker["depths"] if _mode(x) == "rerank" and x["depth"] == row["depth"]), None)
    if pure is None:
        return ""
    return (f"Reranking alone at depth {row['depth']} reaches {pure['metrics']['ndcg@10']:.3f} "
            f"({pure['metrics']['ndcg@10'] - first_ndcg:+.3f})" + ("; its scores collapsed" if collapsed else "")
            + ". ")


def _depth_curve(reranker: dict, first_ndcg: float, mode: str = "rerank") -> dict:
    gains = [(d["depth"], d["metrics"]["ndcg@10"] - first_ndcg) for d in reranker["depths"] if _mode(d) == mode]
    peak_depth, peak = max(gains, key=lambda x: (x[1], -x[0]))
    if peak <= 0:
        return {"peak_depth": peak_depth, "peak_gain": peak, "depth_90pct": None, "peaks_and_declines": False}
    depth_90 = min(d for d, g in gains if g >= 0.9 * peak)
    return {"peak_depth": peak_depth, "peak_gain": peak, "depth_90pct": depth_90,
            "peaks_and_declines": gains[-1][0] > peak_depth and gains[-1][1] < peak - 1e-3}


def _init_costs(rerankers: list[dict]) -> list[dict]:
    """Each shared-initialisation start (same-as-bi, from-finetuned-bi) against the best other start, reranking
    alone: the cross-encoders themselves, not what fusion with the first stage makes of them."""
    def best(r):
        return max((d["metrics"]["ndcg@10"] for d in r["depths"] if _mode(d) == "rerank"), default=None)

    out = []
    for r in rerankers:
        if r["init"] == "base":
            continue
        others = [best(o) for o in rerankers if o is not r and best(o) is not None]
        mine = best(r)
        # the other shared start, where both ran the same shortened recipe: the comparison that recipe still answers
        twin = next((o for o in rerankers if o is not r and o["init"] not in ("base", r["init"]) and r.get("cuts")
                     and o.get("cuts") == r["cuts"] and best(o) is not None), None)
        out.append({"init": r["init"], "label": r["label"], "status": r["status"], "best_ndcg@10": mine,
                    "vs_best_other": None if mine is None or not others else mine - max(others),
                    "vs_same_recipe": None if mine is None or twin is None else mine - best(twin),
                    "cuts": r.get("cuts") or [], "train_seconds": r.get("train_seconds"), "collapsed": _collapsed(r)})
    return out
