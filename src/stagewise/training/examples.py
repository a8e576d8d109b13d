"""What a training run learns from: (query, positive) pairs from a split or a file, a fixed sample of their
queries, and negatives mined from a first stage (any first stage: both trainings mine with it).
"""

from __future__ import annotations

import random
from collections import defaultdict

from stagewise.data.loaders import RetrievalDataset, TrainingExamples, load_training_examples
from stagewise.errors import DataError
from stagewise.timing import span
from stagewise.training.config import MIN_EXAMPLES, TrainArgs


def pairs_from_split(dataset: RetrievalDataset, split: str) -> TrainingExamples:
    """(query, relevant document) pairs from a qrels split; queries with no relevant document are skipped."""
    queries, qrels = dataset.split(split)
    anchors, positives = [], []
    for qid in sorted(qrels):
        for did, rel in sorted(qrels[qid].items()):
            if rel > 0:
                anchors.append(queries[qid])
                positives.append(dataset.corpus[did].full_text())
    return TrainingExamples("pairs", {"anchor": anchors, "positive": positives}, source=f"{dataset.source}:{split}")


def load_train_examples(config: TrainArgs, dataset: RetrievalDataset) -> TrainingExamples:
    examples = load_training_examples(config.train_file) if config.train_file else pairs_from_split(
        dataset, config.train_split)
    if len(examples) < MIN_EXAMPLES:
        raise DataError(examples.source, f"only {len(examples)} training examples; at least {MIN_EXAMPLES} are needed")
    return examples


def sample_queries(examples: TrainingExamples, count: int, seed: int) -> TrainingExamples:
    """The examples of a fixed random sample of ``count`` queries (all of them where there are no more)."""
    key = "anchor" if "anchor" in examples.columns else "text1"
    queries = sorted(set(examples.columns[key]))
    if count >= len(queries):
        return examples
    keep = set(random.Random(seed).sample(queries, count))
    rows = [i for i, q in enumerate(examples.columns[key]) if q in keep]
    return TrainingExamples(examples.kind, {k: [v[i] for i in rows] for k, v in examples.columns.items()},
                            f"{examples.source} ({count} of {len(queries)} queries)")


def _positives_by_anchor(examples: TrainingExamples) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a, p in zip(examples.columns["anchor"], examples.columns["positive"]):
        out[a].add(p)
    return out


def mine_from_first_stage(
    examples: TrainingExamples,
    first_stage,
    corpus_texts: dict[str, str],
    depth: int,
    hard: int,
    random_count: int,
    seed: int,
    range_min: int = 0,
) -> dict[str, list[tuple[str, int]]]:
    """Per query: its positives (label 1), up to ``hard`` non-positives from the first stage's ranks
    ``range_min..depth`` and ``random_count`` random non-positives (label 0). Works with any first stage."""
    rng = random.Random(seed)
    positives = _positives_by_anchor(examples)
    anchors = list(positives)
    all_texts = list(corpus_texts.values())
    from stagewise.search.retrievers import retrieve_once

    with span("mine", first_stage.name, len(anchors), "queries"):
        rankings = retrieve_once(first_stage, anchors, depth, f"mining negatives with {first_stage.name}")
    groups: dict[str, list[tuple[str, int]]] = {}
    for anchor, ranking in zip(anchors, rankings):
        pos = positives[anchor]
        candidates = [corpus_texts[d] for d, _ in ranking[range_min:depth] if corpus_texts[d] not in pos]
        negatives = candidates[:hard]
        for _ in range(random_count * 10):
            if len(negatives) >= len(candidates[:hard]) + random_count:
                break
            text = rng.choice(all_texts)
            if text not in pos and text not in negatives:
                negatives.append(text)
        groups[anchor] = [(p, 1) for p in sorted(pos)] + [(n, 0) for n in negatives]
    return groups
