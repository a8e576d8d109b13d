"""Data: the in-memory dataset, its loaders (BEIR, training examples) and the embedded default dataset."""
