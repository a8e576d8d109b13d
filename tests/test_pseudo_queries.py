"""Pseudo-queries from the corpus: deterministic, the query's text never stays in its positive, negatives by id
below the source document, and a cross-encoder pre-trained on them before its fine-tuning."""

from __future__ import annotations

import json

import pytest

from conftest import write_beir
from stagewise.data.loaders import Document
from stagewise.errors import DataError, StagewiseError
from stagewise.training.pseudo_queries import make_pseudo_queries, mine_pseudo_negatives, pseudo_query, split_sentences

TOPICS = ["volcanoes", "glaciers", "violins", "owls", "bridges", "trains", "gardens", "rivers", "deserts", "bees",
          "comets", "corals"]


def _doc(i: int, topic: str) -> Document:
    sentences = [f"The study of {topic} began in the year {1800 + i} with careful field notes.",
                 f"Researchers measured how {topic} change across seasons and regions.",
                 f"Later work linked {topic} to climate, soil and human activity in model {i}.",
                 f"Open questions about {topic} remain for the next generation of scientists."]
    return Document(f"d{i}", f"What we know about {topic} today", " ".join(sentences))


CORPUS = {d.id: d for d in (_doc(i, t) for i, t in enumerate(TOPICS))}


@pytest.mark.parametrize("kind", ["auto", "title", "sentence"])
def test_the_query_text_never_stays_in_its_positive(kind):
    made = make_pseudo_queries(CORPUS, 10, kind, seed=3)
    assert len(made) == 10 and len({q.doc_id for q in made}) == 10
    for q in made:
        assert q.query and q.query not in q.positive
        assert q.kind == ("sentence" if kind == "sentence" else "title")
        if q.kind == "title":  # the positive is the text alone, and all of it
            assert q.positive == CORPUS[q.doc_id].text
        else:  # the document less exactly that sentence
            sentences = split_sentences(CORPUS[q.doc_id].text)
            assert q.query in sentences and len(split_sentences(q.positive.removeprefix(CORPUS[q.doc_id].title))) == 3


def test_pseudo_queries_are_deterministic_for_a_seed():
    a = make_pseudo_queries(CORPUS, 6, "sentence", seed=7)
    assert a == make_pseudo_queries(dict(reversed(CORPUS.items())), 6, "sentence", seed=7)  # corpus order is irrelevant
    b = make_pseudo_queries(CORPUS, 6, "sentence", seed=8)
    assert [q.doc_id for q in a] != [q.doc_id for q in b] or [q.query for q in a] != [q.query for q in b]


def test_auto_falls_back_to_a_sentence_when_the_title_is_no_query():
    doc = Document("x", "json.dumps", CORPUS["d0"].text)
    assert pseudo_query(doc, "auto", 0).kind == "sentence"
    assert pseudo_query(doc, "title", 0) is None
    assert pseudo_query(Document("y", "A short one", "Too short to split."), "auto", 0) is None


def test_evaluation_queries_and_shared_titles_are_never_pseudo_queries():
    corpus = dict(CORPUS)
    corpus["dup"] = Document("dup", CORPUS["d1"].title, CORPUS["d2"].text)  # a second document with d1's title
    made = make_pseudo_queries(corpus, 100, "title", exclude=[CORPUS["d0"].title.upper()])
    titles = [q.query for q in made]
    assert CORPUS["d0"].title not in titles and len(titles) == len(set(titles)) == len(corpus) - 2


def test_bad_settings_are_refused():
    with pytest.raises(StagewiseError, match="kind must be one of"):
        make_pseudo_queries(CORPUS, 3, "summary")
    with pytest.raises(StagewiseError, match="0 or more"):
        make_pseudo_queries(CORPUS, -1)


class FixedStage:
    """A first stage whose ranking is given: d0, d1, … in order, for every query."""

    name = "fixed"

    def __init__(self, order):
        self.order = order

    def retrieve(self, queries, k):
        return [[(d, 1.0 / (i + 1)) for i, d in enumerate(self.order[:k])] for _ in queries]


def test_negatives_come_by_id_from_below_the_source_document():
    order = [f"d{i}" for i in range(len(TOPICS))]
    source = pseudo_query(CORPUS["d3"], "title", 0)  # ranked 4th: d0..d2 rank above it
    groups, stats = mine_pseudo_negatives([source], FixedStage(order), CORPUS, hard=3, random_count=0, skip=2)
    (positive, label), *negatives = groups[source.query]
    assert positive == source.positive and label == 1
    assert [t for t, _ in negatives] == [CORPUS[d].text for d in ("d4", "d5", "d6")]  # titles left out, like the positive
    assert all(lab == 0 for _, lab in negatives) and stats["dropped_above_source"] == 3


def test_a_query_whose_source_is_not_retrieved_is_dropped():
    order = [f"d{i}" for i in range(len(TOPICS))]
    source = pseudo_query(CORPUS["d9"], "sentence", 0)
    groups, stats = mine_pseudo_negatives([source], FixedStage(order), CORPUS, hard=3, random_count=1, depth=5)
    assert groups == {} and stats["dropped_source_not_retrieved"] == 1


def test_random_negatives_are_never_retrieved_documents():
    order = [f"d{i}" for i in range(5)]
    source = pseudo_query(CORPUS["d0"], "sentence", 0)
    groups, _ = mine_pseudo_negatives([source], FixedStage(order), CORPUS, hard=1, random_count=3, skip=1, depth=5)
    shown = [t for t, label in groups[source.query] if label == 0]
    retrieved = {CORPUS[d].full_text() for d in order}
    assert shown[0] == CORPUS["d1"].full_text() and len(shown) == 4 and not set(shown[1:]) & retrieved


# ---- pre-training inside train_cross ------------------------------------------------------------------------


@pytest.fixture
def topical(tmp_path):
    corpus = [{"_id": d.id, "title": d.title, "text": d.text} for d in CORPUS.values()]
    queries = [{"_id": f"q{i}", "text": f"how do {t} change across seasons"} for i, t in enumerate(TOPICS)]
    qrels = {"train": [(f"q{i}", f"d{i}", 1) for i in range(8)], "dev": [(f"q{i}", f"d{i}", 1) for i in range(8, 12)]}
    return write_beir(tmp_path / "topical", corpus, queries, qrels)


def test_train_cross_pretrains_on_pseudo_queries_then_fine_tunes(topical, tiny_cross_encoder, tmp_path):
    from stagewise.training.config import CrossTrainConfig
    from stagewise.training.cross import train_cross

    config = CrossTrainConfig(data=str(topical), model=str(tiny_cross_encoder), batch_size=4, epochs=1,
                              learning_rate=1e-3, max_length=64, depth=5, hard_negatives=2, random_negatives=1,
                              early_stopping_patience=None, pretrain_queries=10, pretrain_kind="sentence",
                              pretrain_skip=1)
    out = tmp_path / "run"
    result = train_cross(config, out)
    pretrain = result["pretrain"]
    assert pretrain["steps"] > 0 and pretrain["kinds"] == {"sentence": 10} and (out / "pretrained").is_dir()
    recorded = json.loads((out / "pretrain_data.json").read_text())
    queries = json.loads((out / "pretrain_queries.json").read_text())
    assert set(recorded["query"]) == {q["query"] for q in queries}
    for q in queries:  # the exact examples: the positive is the source less the query, labelled 1
        rows = [(d, lab) for qq, d, lab in zip(recorded["query"], recorded["document"], recorded["label"])
                if qq == q["query"]]
        assert (q["positive"], 1.0) in rows and all(q["query"] not in d for d, _ in rows)
    assert result["train"]["steps"] > 0 and (out / "model").is_dir()


def test_too_few_pseudo_queries_is_refused_before_the_run_directory(topical, tiny_cross_encoder, tmp_path):
    from stagewise.training.config import CrossTrainConfig
    from stagewise.training.cross import train_cross

    short = write_beir(tmp_path / "short", [{"_id": f"d{i}", "title": "x", "text": "One short line."} for i in range(9)],
                       [{"_id": f"q{i}", "text": "line"} for i in range(9)],
                       {"train": [(f"q{i}", f"d{i}", 1) for i in range(9)]})
    out = tmp_path / "run"
    with pytest.raises(DataError, match="pseudo-query"):
        train_cross(CrossTrainConfig(data=str(short), model=str(tiny_cross_encoder), dev_split=None,
                                     pretrain_queries=5), out)
    assert not out.exists()
