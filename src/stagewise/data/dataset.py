"""The in-memory dataset: documents, queries and relevance judgements.

Shared by the file loaders (:mod:`stagewise.data.loaders`) and the builder of the embedded dataset
(:mod:`stagewise.data.stdlib`); it imports neither, so neither imports the other for it.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

from stagewise.errors import DataError


def is_blank(text: str) -> bool:
    """Nothing to search for: only whitespace, separators, control or invisible format characters (zero-width
    spaces, BOM). Every entry point (Python API, CLI, service, data files) refuses such a query or document alike."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text)


@dataclass(frozen=True)
class Document:
    """One corpus entry: its id, title (may be empty) and text."""

    id: str
    title: str
    text: str

    def full_text(self) -> str:
        """What a model reads: title and text joined, the BEIR / sentence-transformers convention."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


@dataclass
class RetrievalDataset:
    """A corpus, queries and relevance judgements (qrels) per split.

    ``qrels[split][query_id][doc_id] = relevance`` (an int; > 0 means relevant).
    """

    name: str
    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]]
    source: str = ""

    @property
    def splits(self) -> list[str]:
        return sorted(self.qrels)

    def split(self, name: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
        """The queries judged in ``name`` and their qrels; a clear error for a missing or empty split."""
        if name not in self.qrels:
            available = ", ".join(self.splits) or "none"
            raise DataError(self.source or self.name, f"no split '{name}' (available: {available})", field="split")
        qrels = self.qrels[name]
        queries = {qid: self.queries[qid] for qid in qrels}
        if not queries:
            raise DataError(self.source or self.name, f"split '{name}' has no queries", field="split")
        return queries, qrels

    def fingerprint(self) -> str:
        """Content hash of corpus, queries and qrels: identical data gives an identical fingerprint."""
        h = hashlib.sha256()
        for doc in self.corpus.values():
            h.update(f"{doc.id}\x1f{doc.title}\x1f{doc.text}\x1e".encode())
        for qid, text in self.queries.items():
            h.update(f"{qid}\x1f{text}\x1e".encode())
        for split in self.splits:
            for qid, docs in self.qrels[split].items():
                for did, rel in docs.items():
                    h.update(f"{split}\x1f{qid}\x1f{did}\x1f{rel}\x1e".encode())
        return h.hexdigest()[:16]
