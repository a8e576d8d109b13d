"""Training: fine-tuning both stages on sentence-transformers' trainers, and pseudo-queries from the corpus.

* ``config``: both trainings' settings (``BiTrainConfig``, ``CrossTrainConfig``), their ranges and choices, checked.
* ``examples``: what a run learns from: pairs from a split or a file, and negatives mined from a first stage.
* ``evaluators``: dev evaluation in and after training (the core's metrics), reranking, the collapse check.
* ``fit``: the plumbing both share: one trainer run with our progress bar, a time limit, resuming.
* ``bi``: ``train_bi``, a bi-encoder's losses and hard-negative mining.
* ``cross``: ``train_cross``, a cross-encoder's start, losses, sequence length and pre-training on pseudo-queries.
* ``pseudo_queries``: training pairs made from the corpus itself, and their negatives.

Our part is choosing and wiring; losses, mining, trainers and model cards are sentence-transformers'.
"""
