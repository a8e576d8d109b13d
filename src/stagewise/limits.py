"""The bounds every numeric option and setting is held to: what the code can really serve.

Past them the work fails deep inside a library (``torch.set_num_threads(10**11)`` overflows, an infinite epoch count
cannot become a step count, usearch runs out of memory) or runs for ever; so options and settings are refused at
once, in one line naming them, before any run folder, index or export exists. Each bound is generous: no real use
comes near it.
"""

from __future__ import annotations

#: intra-op threads: more than the largest CPUs have
MAX_THREADS = 1024
#: tokens per input; a model's own limit (its position embeddings, ``models.token_limit``) is usually far lower
MAX_TOKENS = 32768
#: passes over the training data (pre-training included)
MAX_EPOCHS = 1000
#: texts or pairs per batch (encoding, scoring, training)
MAX_BATCH = 4096
#: candidates per query: rerank depths, results (k), mining ranges, negatives per query
MAX_CANDIDATES = 10_000
#: counts of queries, documents and steps (what fits a C int, which is where they end up)
MAX_COUNT = 10**9
#: seconds, for time limits (about three years)
MAX_SECONDS = 10**8
#: a learning rate (static embedding models train at 0.2; past 10 every model diverges)
MAX_LEARNING_RATE = 10
#: a loss weight (bce's positive weight)
MAX_WEIGHT = 10**6
#: evaluations without a gain before training stops early
MAX_PATIENCE = 1000
#: characters of one text a service reads or returns (a query, a hit's title or text)
MAX_TEXT_CHARS = 10**7
