"""A cross-encoder's inputs from cached document tokens: each document is tokenized once, not once per pair.

A reranker reads the same documents again and again: the candidates of every request, every depth and backend
that stages 2 and 3 compare, every evaluation round. ``CrossEncoder.predict`` tokenizes each (query, document)
pair whole, and on a fast backend that costs as much as the model itself: for bert-tiny on OpenVINO bf16,
tokenizing 320 SciFact pairs took 0.14 s of 0.34 s. :class:`PairTokens` keeps each document's token ids (least
recently used first out, bounded in tokens) and assembles the inputs the tokenizer would make from them: its
special-token template and its ``longest_first`` truncation. That assembly is checked at load against the model's
own ``preprocess`` on probe pairs that truncate either side; a tokenizer it does not reproduce exactly keeps
sentence-transformers' own path. Scores then come from the model's own forward pass and activation, as in
``CrossEncoder.predict``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

MAX_CACHED_TOKENS = 1 << 24  # 64 MiB of int32 ids: SciFact's 5,183 abstracts at 256 tokens take 1.3 M
_TENSORS = ("input_ids", "token_type_ids", "attention_mask")


@dataclass(frozen=True)
class _Template:
    """Where the special tokens go around a pair, and the token type of each part (from one probe encoding)."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    types: tuple[int, int, int, int, int]  # prefix, first text, middle, second text, suffix
    pad_id: int
    keys: tuple[str, ...]  # the tensors the model reads, in preprocess's order
    extras: tuple[tuple[str, object], ...]  # preprocess's other fields (sentence-transformers' ``modality``)

    @property
    def specials(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def truncated_lengths(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """How many tokens of each text a pair keeps: the Hugging Face tokenizers' ``longest_first`` rule (the
    shorter text is kept whole where the longer can give way; else each gets half, the longer the odd token)."""
    if n1 + n2 <= budget:
        return n1, n2
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    return (n2, n1) if swap else (n1, n2)


class PairTokens:
    """Scores (query, document) pairs with ``model`` from cached document tokens (see the module's docstring).

    One instance serves every copy of the same reranker (its per-query backend, its bf16 batch copy): they share
    the tokenizer and the maximum length, so they share the cache."""

    def __init__(self, model, max_tokens: int = MAX_CACHED_TOKENS):
        self.tokenizer, self.max_length = model.tokenizer, model.max_length
        self.max_tokens = max_tokens
        self._docs: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._cached_tokens = 0
        self._lock = threading.Lock()
        self.template = _checked_template(model, self)
        self.clear()  # the probes' documents

    def clear(self) -> None:
        """Forget every cached document (a benchmark's first pass; memory back)."""
        with self._lock:
            self._docs.clear()
            self._cached_tokens = 0

    @property
    def exact(self) -> bool:
        """Whether pairs are assembled from cached tokens (else sentence-transformers' own path scores them)."""
        return self.template is not None

    def predict(self, model, pairs: Sequence[tuple[str, str]], batch_size: int) -> np.ndarray:
        """One score per pair, as ``model.predict(pairs, batch_size=batch_size)`` gives it."""
        if not self.exact or model.max_length != self.max_length or not pairs:
            return np.asarray(model.predict(list(pairs), batch_size=batch_size, show_progress_bar=False,
                                            convert_to_numpy=True), dtype=np.float32).reshape(-1)
        rows = self.rows(pairs)
        order = np.argsort([-len(r[0]) for r in rows], kind="stable")  # like lengths share a batch: less padding
        out = np.zeros(len(rows), dtype=np.float32)
        if model.training:
            model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                out[chosen] = _scores(model, self.features([rows[i] for i in chosen]))
        return out

    def rows(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each pair's token ids and token types, special tokens in place and truncated as the tokenizer does."""
        t = self.template
        budget = self.max_length - t.specials
        with self._lock:  # one tokenizer call at a time: a fast tokenizer's settings are shared state
            queries = dict(zip(*self._tokenize(list({q: None for q, _ in pairs}))))
            docs = self._cached([d for _, d in pairs])
        rows = []
        for (q, d) in pairs:
            (a, na), (b, nb) = queries[q], docs[d]
            n1, n2 = truncated_lengths(na, nb, budget)
            parts = (t.prefix, a[:n1], t.middle, b[:n2], t.suffix)
            ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
            types = np.repeat(np.asarray(t.types, dtype=np.int64), [len(p) for p in parts])
            rows.append((ids, types))
        return rows

    def features(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        """The padded tensors ``preprocess`` would give for these rows (right padding)."""
        t = self.template
        width = max(len(ids) for ids, _ in rows)
        ids = np.full((len(rows), width), t.pad_id, dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, (row, row_types) in enumerate(rows):
            ids[i, :len(row)], types[i, :len(row)], mask[i, :len(row)] = row, row_types, 1
        tensors = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
        return {**{k: torch.from_numpy(tensors[k]) for k in t.keys}, **dict(t.extras)}

    def _cached(self, texts: list[str]) -> dict[str, tuple[np.ndarray, int]]:
        """Each document's ids (at most ``max_length`` kept) and full length, tokenizing only the ones not cached
        (the caller holds the lock)."""
        found = {}
        for text in texts:
            if text in self._docs and text not in found:
                self._docs.move_to_end(text)
                found[text] = self._docs[text]
        missing = list({text: None for text in texts if text not in found})
        for text, value in zip(*self._tokenize(missing)):
            found[text] = value
            self._remember(text, value)
        return found

    def _remember(self, text: str, value: tuple[np.ndarray, int]) -> None:
        if len(value[0]) > self.max_tokens:
            return
        self._docs[text] = value
        self._cached_tokens += len(value[0])
        while self._cached_tokens > self.max_tokens:
            _, (old, _) = self._docs.popitem(last=False)
            self._cached_tokens -= len(old)

    def _tokenize(self, texts: list[str]) -> tuple[list[str], list[tuple[np.ndarray, int]]]:
        if not texts:
            return [], []
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return texts, [(np.asarray(ids[:self.max_length], dtype=np.int32), len(ids)) for ids in encoded]


def _scores(model, features: dict) -> np.ndarray:
    """``CrossEncoder.predict``'s steps after tokenizing: forward, float32, activation, one score per pair."""
    device = model.device
    scores = model({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()})["scores"]
    if torch.is_floating_point(scores) and torch.finfo(scores.dtype).bits < 32:
        scores = scores.float()
    if model.activation_fn is not None:
        scores = model.activation_fn(scores)
    return scores.reshape(len(scores), -1)[:, 0].cpu().numpy()


def _probe_pairs(max_length: int) -> list[tuple[str, str]]:
    """Pairs that keep both texts, truncate the second, the first, or both (odd and even overflows)."""
    long = " ".join(["search"] * (max_length + 3))
    longer = " ".join(["rerank"] * (max_length + 4))
    return [("a short query", "a short document about search"), ("", "an empty query"), ("q", long),
            (long, "d"), (long, longer), (longer, long), (long, long), ("hello world", "")]


def _checked_template(model, tokens: PairTokens) -> _Template | None:
    """The pair template read from one probe encoding, kept only if it reproduces ``model.preprocess`` exactly."""
    tokenizer = model.tokenizer
    if (not getattr(tokenizer, "is_fast", False) or not tokens.max_length or model.num_labels != 1
            or getattr(model, "default_prompt_name", None)):  # a default prompt changes every query: not this path
        return None
    try:
        template = _template(model)
        if template is None:
            return None
        tokens.template = template
        probes = _probe_pairs(tokens.max_length)
        ours = tokens.features(tokens.rows(probes))
        theirs = model.preprocess(probes)
    except Exception:  # noqa: BLE001 - a tokenizer this cannot read keeps sentence-transformers' own path
        return None
    same = set(ours) == set(theirs) and all(
        torch.equal(ours[k], theirs[k]) if isinstance(theirs[k], torch.Tensor) else ours[k] == theirs[k]
        for k in theirs)
    return template if same else None


def _template(model) -> _Template | None:
    tokenizer = model.tokenizer
    encoded = tokenizer("first", "second")
    ids, sequence = encoded["input_ids"], encoded.sequence_ids(0)
    types = encoded.get("token_type_ids", [0] * len(ids))
    first = [i for i, s in enumerate(sequence) if s == 0]
    second = [i for i, s in enumerate(sequence) if s == 1]
    if not first or not second:
        return None
    a0, a1, b0, b1 = first[0], first[-1] + 1, second[0], second[-1] + 1
    features = model.preprocess([("first", "second")])
    keys = tuple(k for k, v in features.items() if isinstance(v, torch.Tensor))
    if tokenizer.pad_token_id is None or not set(keys) <= set(_TENSORS) or "input_ids" not in keys:
        return None
    return _Template(tuple(ids[:a0]), tuple(ids[a1:b0]), tuple(ids[b1:]),
                     (_one(types[:a0]), types[a0], _one(types[a1:b0]), types[b0], _one(types[b1:])),
                     tokenizer.pad_token_id, keys,
                     tuple((k, v) for k, v in features.items() if not isinstance(v, torch.Tensor)))


def _one(types: list[int]) -> int:
    """A part's single token type (a part of mixed types is not a template this can assemble)."""
    if len(set(types)) > 1:
        raise ValueError("mixed token types in one part")
    return types[0] if types else 0
