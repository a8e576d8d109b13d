"""Search: first stages, vector indexes, the reranker, fusion of both stages' scores, and the pipeline."""
