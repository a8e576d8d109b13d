"""Benchmark: why a cross-encoder trained here lost to its own first stage, and which changes fix it.

    python benchmarks/scifact_reranker_recipe.py --first-stage runs/sf-bi/model [--data DIR] [--only NAME ...]
        [--ablation] [--out benchmarks/results/scifact_reranker_recipe]

Each variant is one ``train_cross`` run of ``bert-tiny`` on SciFact train (negatives mined from ``--first-stage``,
the fine-tuned bi-encoder that is deployed), chosen on dev. Per variant: nDCG@10 of its pure reranking of the
first stage's top 20 on **train** queries (can it fit its own training set?) and on **dev**, the dev nDCG@10 of
the fusion chosen on dev, the mean per-query spread of its scores (collapse) and the training time. Finished
variants are kept (``runs/``, ignored by git) and not redone; the table and the CPU's model and flags land in
``--out``. ``--ablation`` then measures the ablation table (current recipe, + pre-training, + fusion, + both) as
``select`` would, and each fusion row's gain once more with its weight chosen on the other half of dev.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from stagewise.data.loaders import load_dataset
from stagewise.evaluation.metrics import compute_metrics, run_from_rankings
from stagewise.models.specs import load_cross_encoder
from stagewise.rundir import cpu, versions
from stagewise.search.fusion import choose_fusion
from stagewise.search.retrievers import build_first_stage
from stagewise.training.config import CrossTrainConfig
from stagewise.training.cross import train_cross
from stagewise.training.evaluators import rerank_with

HERE = Path(__file__).resolve().parent
DEPTH = 20
CURRENT = {"epochs": 3, "learning_rate": 1e-4, "hard_negatives": 7, "random_negatives": 2, "max_length": 256,
           "warmup_ratio": 0.1}
# The current recipe at its own budget (3 epochs), then one change at a time at a 1-epoch budget (so that each
# costs a few minutes on 2 cores), then what helped, combined.
ONE_EPOCH = {"epochs": 1}
VARIANTS = {
    "current": {},
    "current, 1 epoch": ONE_EPOCH,
    "random negatives only": {**ONE_EPOCH, "hard_negatives": 0, "random_negatives": 9},
    "lr 1e-3": {**ONE_EPOCH, "learning_rate": 1e-3},
    "lr 3e-4": {**ONE_EPOCH, "learning_rate": 3e-4},
    "pos_weight 1": {**ONE_EPOCH, "pos_weight": 1.0},
    "skip top 3 (false negatives)": {**ONE_EPOCH, "skip_top": 3},
    "listwise cross-entropy": {**ONE_EPOCH, "loss": "cross-entropy"},
    "max_length 512": {**ONE_EPOCH, "max_length": 512},
    "current + pre-training": {"pretrain_queries": 2000},
    "lr 3e-4 + pre-training": {"pretrain_queries": 2000, "learning_rate": 3e-4},
}


def _train_sample(dataset, first_stage, sample: int = 200):
    """A fixed sample of the training queries, their qrels and the first stage's top 20 for each."""
    queries, qrels = dataset.split("train")
    keep = sorted(queries)[:sample]
    queries, qrels = {q: queries[q] for q in keep}, {q: qrels[q] for q in keep}
    candidates = {q: [d for d, _ in r] for q, r in zip(queries, first_stage.retrieve(list(queries.values()), DEPTH))}
    return queries, qrels, candidates


def first_stage_train_ndcg(dataset, first_stage) -> float:
    """The first stage's own nDCG@10 on the training sample: what a reranker that fits must exceed there."""
    _, qrels, candidates = _train_sample(dataset, first_stage)
    return compute_metrics(qrels, run_from_rankings(candidates))[0]["ndcg@10"]


def train_fit(model_dir: str, max_length: int, dataset, first_stage) -> float:
    """nDCG@10 of the trained model reranking the top 20 of (a fixed sample of) its own training queries."""
    queries, qrels, candidates = _train_sample(dataset, first_stage)
    texts = {d: doc.full_text() for d, doc in dataset.corpus.items()}
    model = load_cross_encoder(model_dir, max_length=max_length, warn_untrained=False)
    rankings, _ = rerank_with(model, queries, candidates, texts, DEPTH)
    return compute_metrics(qrels, run_from_rankings(rankings))[0]["ndcg@10"]


def truncation(dataset, first_stage, model: str) -> dict:
    """How much of the dev top-20 pairs a 256-token cross-encoder cuts off: tokens per (query, document) pair."""
    queries, _ = dataset.split("dev")
    tokenizer = load_cross_encoder(model, warn_untrained=False).tokenizer
    lengths = [len(tokenizer(queries[q], dataset.corpus[d].full_text())["input_ids"])
               for q, ranking in zip(queries, first_stage.retrieve(list(queries.values()), DEPTH)) for d, _ in ranking]
    return {"pairs": len(lengths), "median_tokens": float(np.median(lengths)),
            "over_256": float(np.mean(np.asarray(lengths) > 256)), "over_512": float(np.mean(np.asarray(lengths) > 512))}


def dev_candidates(model_dir: str, max_length: int, dataset, first_stage, depth: int):
    """Dev qrels, the first stage's top 100 per query, its top ``depth`` scored by the reranker (fusion's input)
    and the first-stage order below the depth."""
    queries, qrels = dataset.split("dev")
    retrieved = dict(zip(queries, first_stage.retrieve(list(queries.values()), 100)))
    model = load_cross_encoder(model_dir, max_length=max_length, warn_untrained=False)
    candidates, below = {}, {}
    for q, ranking in retrieved.items():
        top = ranking[:depth]
        scores = np.asarray(model.predict([(queries[q], dataset.corpus[d].full_text()) for d, _ in top],
                                          batch_size=64, show_progress_bar=False)).reshape(-1)
        candidates[q] = [(d, s, float(r)) for (d, s), r in zip(top, scores)]
        below[q] = [d for d, _ in ranking[depth:]]
    return qrels, retrieved, candidates, below


def dev_fusion(model_dir: str, max_length: int, dataset, first_stage) -> dict:
    """The first stage alone, pure reranking and the fusion chosen on dev, on the dev top 20."""
    qrels, retrieved, candidates, below = dev_candidates(model_dir, max_length, dataset, first_stage, DEPTH)
    first = compute_metrics(qrels, run_from_rankings({q: [d for d, _ in r] for q, r in retrieved.items()}))[0]
    fusion, table = choose_fusion(qrels, candidates, DEPTH, below)
    pure = next(row for row in table if row["weight"] == 1.0)
    best = max(table, key=lambda row: row["ndcg@10"])
    return {"first_stage": first["ndcg@10"], "rerank": pure["ndcg@10"], "fused": best["ndcg@10"],
            "fusion": fusion.config()}


# The ablation: (row, training variant, mode); each row's best depth within the latency budget is reported.
ABLATION = [
    ("current recipe", "current", "rerank"),
    ("+ corpus pre-training", "current + pre-training", "rerank"),
    ("+ fusion", "current", "fusion"),
    ("+ both", "current + pre-training", "fusion"),
    ("lr 3e-4 + pre-training", "lr 3e-4 + pre-training", "rerank"),
    ("lr 3e-4 + pre-training + fusion", "lr 3e-4 + pre-training", "fusion"),
]
DEPTHS = [5, 10, 20, 50]
LATENCY_BUDGET_MS = 500


def ablation(dataset, first_stage, runs: dict[str, dict], rows=ABLATION) -> list[dict]:
    """Each row as ``select`` would measure it: every depth scored once, latency measured end to end, the best
    depth within the budget, compared query by query with the first stage alone."""
    from stagewise.evaluation.runs import compare, evaluate, evaluate_depths
    from stagewise.search.pipeline import Pipeline
    from stagewise.search.rerankers import CrossEncoderReranker

    first = evaluate(dataset, "dev", [first_stage], recall_cutoffs=DEPTHS)[0]
    measured: dict[str, list] = {}
    out = []
    for row, variant, mode in rows:
        if variant not in measured:
            reranker = CrossEncoderReranker(runs[variant]["model"], max_length=runs[variant]["max_length"])
            reranker.name = variant
            pipeline = Pipeline(first_stage, reranker).index(dataset.corpus)
            measured[variant] = evaluate_depths(dataset, "dev", first, pipeline, DEPTHS, latency_queries=20)
        options = [r for r in measured[variant] if r.mode == mode
                   and r.latency["total"]["p95_ms"] <= LATENCY_BUDGET_MS]
        best = max(options, key=lambda r: r.metrics["ndcg@10"])
        c = compare(first, best)
        out.append({"row": row, "variant": variant, "mode": mode, "depth": best.depth, "fusion": best.fusion,
                    "ndcg@10": best.metrics["ndcg@10"], "first_stage_ndcg@10": first.metrics["ndcg@10"],
                    "gain": c.mean_diff, "ci95": c.ci95, "p_value": c.p_value, "wins": c.wins, "losses": c.losses,
                    "p95_ms": best.latency["total"]["p95_ms"], "train_seconds": runs[variant]["train_seconds"]})
    return out


def cross_validated_fusion(model_dir: str, max_length: int, dataset, first_stage, depth: int, folds: int = 2,
                           seed: int = 0) -> dict:
    """An honest estimate of a fusion's gain where no test split exists: the weight is chosen on one half of dev
    and applied to the other half, both ways; the per-query results of the held-out halves are compared with the
    first stage alone."""
    import random

    from stagewise.evaluation.runs import compare_per_query
    from stagewise.search.fusion import Fusion, fused_rankings

    qrels, _, candidates, below = dev_candidates(model_dir, max_length, dataset, first_stage, depth)
    qids = sorted(qrels)
    random.Random(seed).shuffle(qids)
    fused_pq, first_pq, weights = {}, {}, []
    for k in range(folds):
        held = set(qids[k::folds])
        tune = {q: candidates[q] for q in qids if q not in held}
        fusion, _ = choose_fusion({q: qrels[q] for q in tune}, tune, depth, below)
        weights.append(fusion.config())
        test = {q: candidates[q] for q in held}
        test_qrels = {q: qrels[q] for q in held}
        fused_pq.update(compute_metrics(test_qrels, run_from_rankings(fused_rankings(test, fusion, depth, below)))[1])
        first_pq.update(compute_metrics(test_qrels, run_from_rankings(
            fused_rankings(test, Fusion(0.0), depth, below)))[1])
    c = compare_per_query("first stage", first_pq, "fused", fused_pq)
    return {"depth": depth, "folds": folds, "weights": weights, "ndcg@10": c.mean_b, "gain": c.mean_diff,
            "ci95": c.ci95, "p_value": c.p_value}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parents[1] / "shared" / "datasets" / "scifact"))
    parser.add_argument("--first-stage", required=True, help="the fine-tuned bi-encoder (a model directory)")
    parser.add_argument("--model", default="bert-tiny")
    parser.add_argument("--out", default="benchmarks/results/scifact_reranker_recipe")
    parser.add_argument("--runs", default="runs/reranker_recipe")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--extra", help="a JSON object of more variants: name -> settings")
    parser.add_argument("--ablation", action="store_true",
                        help="measure the ablation table (needs its variants; kept and reused when not given)")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        print(f"SciFact not found at {args.data}; pass --data", file=sys.stderr)
        return 1
    variants = dict(VARIANTS)
    if args.extra:
        variants.update(json.loads(args.extra))
    names = args.only or list(variants)
    dataset = load_dataset(args.data)
    first_stage = build_first_stage(args.first_stage)
    first_stage.index(dataset.corpus)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text())["variants"] if results_path.is_file() else {}
    for name in names:
        settings = {**CURRENT, **variants[name]}
        if name in results and results[name]["settings"] == settings:
            continue  # measured already
        run_dir = Path(args.runs) / "".join(c if c.isalnum() else "-" for c in name)
        started = time.perf_counter()
        trained = train_cross(CrossTrainConfig(model=args.model, data=args.data, first_stage=args.first_stage,
                                               depth=DEPTH, **settings), run_dir,
                              resume=(run_dir / "config.json").is_file() and not (run_dir / "result.json").is_file()
                              ) if not (run_dir / "result.json").is_file() else json.loads(
            (run_dir / "result.json").read_text())
        seconds = trained.get("wall_seconds") or round(time.perf_counter() - started, 1)
        row = {"settings": settings, "train_seconds": seconds, "model": trained["model"],
               "max_length": settings["max_length"], "pretrain": trained.get("pretrain"),
               "train_ndcg@10": train_fit(trained["model"], settings["max_length"], dataset, first_stage),
               "score_std": trained["dev"]["health"]["mean_score_std"],
               **dev_fusion(trained["model"], settings["max_length"], dataset, first_stage)}
        if results_path.is_file():  # another process may have added variants meanwhile
            results = {**json.loads(results_path.read_text())["variants"], **results}
        results[name] = row
        print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'settings'})}", flush=True)
        results_path.write_text(json.dumps({"environment": {"cpu": cpu(), **versions()}, "depth": DEPTH, "variants": results},
                                           indent=1))
    first_train = first_stage_train_ndcg(dataset, first_stage)
    cut = truncation(dataset, first_stage, args.model)
    lines = [f"First stage alone on the same training queries: nDCG@10 {first_train:.3f}. Dev top-{DEPTH} pairs: "
             f"median {cut['median_tokens']:.0f} tokens, {cut['over_256']:.0%} longer than 256, "
             f"{cut['over_512']:.0%} longer than 512.", "",
             "| variant | train nDCG@10 (fit) | dev rerank@20 | dev fused@20 (weight) | dev first stage | "
             "score spread | training s |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['train_ndcg@10']:.3f} | {r['rerank']:.3f} | {r['fused']:.3f} "
                     f"({r['fusion']['weight']:.2f}) | {r['first_stage']:.3f} | {r['score_std']:.3f} | "
                     f"{r['train_seconds']:.0f} |")
    stored = json.loads(results_path.read_text()).get("ablation") if results_path.is_file() else None
    rows = ablation(dataset, first_stage, results) if args.ablation else stored  # measured once, then kept
    if rows:
        lines += ["", "| pipeline | nDCG@10 | vs first stage alone (95% CI), p | depth | p95 ms | training s |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            if r["mode"] == "fusion" and "cross_validated" not in r:  # a dev gain chosen on dev: estimate it on halves
                v = results[r["variant"]]
                r["cross_validated"] = cross_validated_fusion(v["model"], v["max_length"], dataset, first_stage,
                                                              r["depth"])
            mode = "rerank" if r["mode"] == "rerank" else f"fusion w={r['fusion']['weight']:.2f} {r['fusion']['normalization']}"
            lines.append(f"| {r['row']} ({mode}) | {r['ndcg@10']:.4f} | {r['gain']:+.4f} ({r['ci95'][0]:+.3f} to "
                         f"{r['ci95'][1]:+.3f}), p = {r['p_value']:.2g} | {r['depth']} | {r['p95_ms']:.0f} | "
                         f"{r['train_seconds']:.0f} |")
        lines += ["", "Fusion rows with the weight chosen on one half of dev and applied to the other (2-fold, "
                  "held-out halves pooled):", ""]
        for r in rows:
            cv = r.get("cross_validated")
            if cv:
                lines.append(f"- {r['row']} at depth {cv['depth']}: nDCG@10 {cv['ndcg@10']:.4f}, {cv['gain']:+.4f} "
                             f"({cv['ci95'][0]:+.3f} to {cv['ci95'][1]:+.3f}), p = {cv['p_value']:.2g}; weights "
                             + ", ".join(f"{w['weight']:.2f} {w['normalization']}" for w in cv["weights"]))
        results_path.write_text(json.dumps({"environment": {"cpu": cpu(), **versions()}, "depth": DEPTH,
                                            "variants": results, "ablation": rows}, indent=1))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
