"""Warming a bi-encoder's per-query path for every query length a service is likely to see.

OpenVINO's CPU plugin and oneDNN's bf16 kernels are planned per input shape: the first query of a token length
never seen before takes about twice as long as the next one of that length (measured on MiniLM, OpenVINO bf16:
p50 6.9 ms against 3.6 ms). One query's input has one shape per token length, so a warm service encodes one
text of each length 1..``QUERY_TOKENS`` at load instead of charging its first users for it; timings of
per-query work warm up the same way, so that they measure what such a service sees.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

QUERY_TOKENS = 64  # query lengths warmed, in tokens (without special tokens): longer queries are rare
_WORDS = ("the", "a", "of", "x", "1", ".")  # a common word is one token in almost every vocabulary
_FILLER = "warm up the query path of a search service once for every length it is likely to see "


def token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """How many tokens each text is, as ``tokenizer`` (a Hugging Face tokenizer) counts them without special
    tokens and without truncation."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]]


def length_texts(tokenizer, n: int = QUERY_TOKENS) -> dict[int, str]:
    """A text of each token length 1..``n`` as ``tokenizer`` counts them, keyed by its length.

    A common word repeated hits every length where the word is one token and repeats do not merge (checked, not
    assumed); lengths it misses are taken from character prefixes of a filler sentence, which step by about one
    token a character. A length no prefix hits (a tokenizer that never makes it) is left out."""
    if n < 1:
        return {}
    found: dict[int, str] = {}
    for word in _WORDS:
        texts = [" ".join([word] * k) for k in range(1, n + 1)]
        for count, text in zip(token_counts(tokenizer, texts), texts):
            found.setdefault(count, text)
        if all(k in found for k in range(1, n + 1)):
            break
    missing = [k for k in range(1, n + 1) if k not in found]
    if missing:
        filler = _FILLER * (max(missing) // len(_FILLER.split()) + 1)  # a word is at least one token
        prefixes = [p for p in (filler[:i].strip() for i in range(1, len(filler) + 1)) if p]
        for count, text in zip(token_counts(tokenizer, prefixes), prefixes):
            if count in missing:
                found.setdefault(count, text)
    return {k: found[k] for k in range(1, n + 1) if k in found}


def query_lengths(model, n: int = QUERY_TOKENS) -> int:
    """How many query lengths to warm for a sentence-transformers ``model``: ``n``, or fewer where it reads fewer
    tokens (a longer query is truncated to the same shape); 0 for a model without a transformer (static embeddings
    are lookups: no kernel depends on the length)."""
    from stagewise.models.batch_precision import transformer_model

    if not transformer_model(model) or getattr(model, "tokenizer", None) is None:
        return 0
    limit = model.max_seq_length
    return min(n, limit) if isinstance(limit, int) and limit > 0 else n


def query_texts(model, n: int = QUERY_TOKENS) -> list[str]:
    """One text of each token length 1..``n`` for a sentence-transformers ``model`` (none for a model without a
    transformer), shortest first."""
    lengths = query_lengths(model, n)
    return list(length_texts(model.tokenizer, lengths).values()) if lengths else []


def warm_queries(encode: Callable[[list[str]], object], texts: Sequence[str]) -> float:
    """``encode([text])`` once for each text, as one query is encoded; returns the seconds it took."""
    start = time.perf_counter()
    for text in texts:
        encode([text])
    return time.perf_counter() - start
