"""The report's plots, drawn with matplotlib on the Agg canvas and returned as SVG markup to inline.

matplotlib is imported inside the functions, so importing the report costs nothing until a plot is drawn. Each
plot returns None where there is nothing to show.
"""

from __future__ import annotations

from stagewise.selection.report.formatting import (
    _ellipsize,
    _first_stage_ndcg,
    _get,
    _latency_label,
    _latency_metric,
    _num,
    metric_label,
    short_name,
)

PLOTS = ("quality_vs_latency", "quality_vs_depth", "per_query")
_COLOURS = {"first_stage": "#2563eb", "pipeline": "#ea580c", "out": "#b8bcc4", "chosen": "#dc2626",
            "win": "#16a34a", "loss": "#dc2626", "front": "#374151"}


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
