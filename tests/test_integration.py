"""The real minilm-l6 on a small SciFact slice: our dense stage matches plain sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

from stagewise import DenseRetriever, compute_metrics, load_beir
from stagewise.evaluation.runs import run_from_rankings


@pytest.fixture(scope="module")
def scifact_slice(request):
    from conftest import SHARED

    path = SHARED / "scifact"
    if not (path / "corpus.jsonl").is_file():
        pytest.skip("../shared/datasets/scifact is absent")
    dataset = load_beir(path)
    queries, qrels = dataset.split("dev")
    qids = sorted(qrels)[:12]
    relevant = {d for q in qids for d in qrels[q]}
    distractors = [d for d in sorted(dataset.corpus) if d not in relevant][:60]
    corpus = {d: dataset.corpus[d] for d in sorted(relevant | set(distractors))}
    return corpus, {q: queries[q] for q in qids}, {q: qrels[q] for q in qids}


def test_minilm_matches_plain_sentence_transformers(scifact_slice):
    from sentence_transformers import util

    corpus, queries, qrels = scifact_slice
    dense = DenseRetriever("minilm-l6", show_progress=False)
    dense.index(corpus)
    ours = dense.retrieve(list(queries.values()), k=10)

    ids = list(corpus)
    doc_emb = dense.model.encode([d.full_text() for d in corpus.values()], convert_to_tensor=True)
    query_emb = dense.model.encode(list(queries.values()), convert_to_tensor=True)
    theirs = util.semantic_search(query_emb, doc_emb, top_k=10)
    for mine, reference in zip(ours, theirs):
        assert [d for d, _ in mine] == [ids[h["corpus_id"]] for h in reference]
        np.testing.assert_allclose([s for _, s in mine], [h["score"] for h in reference], atol=1e-4)

    metrics, _ = compute_metrics(qrels, run_from_rankings({q: [d for d, _ in r] for q, r in zip(queries, ours)}))
    assert metrics["recall@10"] > 0.8  # a real model finds the relevant abstracts among 60 distractors
