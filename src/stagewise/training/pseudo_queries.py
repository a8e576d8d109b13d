"""Training pairs from the corpus itself, so a reranker does not learn from a few hundred labelled queries alone.

A cross-encoder pre-trained on pseudo-queries has already learned to read a query against a document before it
sees a single label. Two kinds of pseudo-query, both deterministic for a seed:

* ``title``: the document's title is the query and its text, without the title, is the positive. Every document
  of such an example (positive and negatives) is shown without its title, so that "no title" cannot be learned
  as the sign of a positive.
* ``sentence`` (inverse cloze task): one sentence of the text is the query, and the positive is the document with
  that sentence removed, so the answer is never a copy of the question.

``auto`` takes the title where it reads like a query (at least ``MIN_TITLE_WORDS`` words) and a sentence
otherwise (code identifiers, short names).

Negatives come from the first stage that will be deployed, matched by document id (never by text, so the source
document is never its own negative), from below the top ``skip`` ranks. Likely false negatives are filtered: a
candidate the first stage ranks *above* the source document is a better answer by that stage's own judgement and
is never used, and a query whose source the first stage does not retrieve at all is dropped as too ambiguous.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass
from typing import Sequence

from stagewise.data.loaders import Document
from stagewise.errors import StagewiseError
from stagewise.timing import span

KINDS = ("auto", "title", "sentence")
MIN_TITLE_WORDS = 3
MIN_SENTENCE_WORDS = 5
MIN_REST_WORDS = 12  # what is left of the positive once the query is taken out

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


@dataclass(frozen=True)
class PseudoQuery:
    doc_id: str
    query: str
    positive: str  # the source document, with the query's text removed
    kind: str  # title | sentence

    def to_dict(self) -> dict:
        return asdict(self)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def pseudo_query(doc: Document, kind: str, seed: int) -> PseudoQuery | None:
    """The pseudo-query of one document, or None when it has none of that kind worth asking."""
    if kind in ("auto", "title") and len(doc.title.split()) >= MIN_TITLE_WORDS and len(doc.text.split()) >= MIN_REST_WORDS:
        return PseudoQuery(doc.id, doc.title.strip(), doc.text.strip(), "title")
    if kind == "title":
        return None
    sentences = split_sentences(doc.text)
    usable = [i for i, s in enumerate(sentences) if len(s.split()) >= MIN_SENTENCE_WORDS]
    if len(sentences) < 2 or not usable:
        return None
    # the same document gets the same sentence for a seed, whatever else is in the corpus
    pick = usable[int(hashlib.sha256(f"{seed}:{doc.id}".encode()).hexdigest(), 16) % len(usable)]
    rest = " ".join(s for i, s in enumerate(sentences) if i != pick)
    if len(rest.split()) < MIN_REST_WORDS:
        return None
    positive = f"{doc.title} {rest}".strip() if doc.title else rest
    return PseudoQuery(doc.id, sentences[pick], positive, "sentence")


def make_pseudo_queries(corpus: dict[str, Document], count: int, kind: str = "auto", seed: int = 42,
                        exclude: Sequence[str] = ()) -> list[PseudoQuery]:
    """Up to ``count`` pseudo-queries from distinct documents, chosen by ``seed``; ``exclude`` holds query texts
    that must not appear (the evaluation split's queries: a pseudo-query must never be a dev or test query)."""
    if kind not in KINDS:
        raise StagewiseError(f"pseudo-query kind must be one of {', '.join(KINDS)}, not '{kind}'")
    if count < 0:
        raise StagewiseError(f"the number of pseudo-queries must be 0 or more, got {count}")
    banned = {q.strip().lower() for q in exclude}
    ids = sorted(corpus)
    random.Random(seed).shuffle(ids)
    out, seen = [], set()
    for doc_id in ids:
        if len(out) >= count:
            break
        pq = pseudo_query(corpus[doc_id], kind, seed)
        if pq is None or pq.query.lower() in seen or pq.query.lower() in banned:
            continue  # a title shared by several documents has no single answer
        seen.add(pq.query.lower())
        out.append(pq)
    return out


def _shown(doc: Document, kind: str) -> str:
    """How a negative is shown beside a positive of this kind: as the positive is (title queries: no title)."""
    return doc.text.strip() if kind == "title" else doc.full_text()


def mine_pseudo_negatives(queries: Sequence[PseudoQuery], first_stage, corpus: dict[str, Document], hard: int = 5,
                          random_count: int = 2, skip: int = 2, depth: int = 30, seed: int = 42
                          ) -> tuple[dict[str, list[tuple[str, int]]], dict]:
    """Per pseudo-query: its positive (label 1), up to ``hard`` first-stage negatives and ``random_count`` random
    ones (label 0), in the shape ``train_cross`` reads; and counts of what the false-negative filter dropped."""
    rng = random.Random(seed)
    ids = sorted(corpus)
    from stagewise.search.retrievers import retrieve_once

    with span("mine", f"pseudo-queries with {first_stage.name}", len(queries), "queries"):
        rankings = retrieve_once(first_stage, [q.query for q in queries], depth,
                                 f"mining pseudo-query negatives with {first_stage.name}")
    groups: dict[str, list[tuple[str, int]]] = {}
    stats = {"queries": len(queries), "dropped_source_not_retrieved": 0, "dropped_above_source": 0, "kept": 0}
    for pq, ranking in zip(queries, rankings):
        ranked = [d for d, _ in ranking]
        if pq.doc_id not in ranked:
            stats["dropped_source_not_retrieved"] += 1
            continue
        source_rank = ranked.index(pq.doc_id)
        above = {d for d in ranked[:source_rank]}
        stats["dropped_above_source"] += len(above)
        shown_source = _shown(corpus[pq.doc_id], pq.kind)
        candidates = [d for d in ranked[skip:] if d != pq.doc_id and d not in above
                      and _shown(corpus[d], pq.kind) != shown_source]
        negatives = candidates[:hard]
        pool = set(ranked)
        for _ in range(random_count * 10):
            if len(negatives) >= len(candidates[:hard]) + random_count:
                break
            d = rng.choice(ids)
            if d not in pool and d not in negatives:
                negatives.append(d)
        if not negatives:
            continue
        groups[pq.query] = [(pq.positive, 1)] + [(_shown(corpus[d], pq.kind), 0) for d in negatives]
        stats["kept"] += 1
    return groups, stats
