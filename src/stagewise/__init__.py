"""Stagewise: measure and choose two-stage neural search (bi-encoder retrieval + cross-encoder reranking).

The public API, in the order of the flow: data → models → first stage, reranker and pipeline → evaluation →
selection → index. Each name lives in the subpackage that its concept belongs to (see the API reference).
"""

from stagewise.cache import EmbeddingCache
from stagewise.data.dataset import Document, RetrievalDataset
from stagewise.data.loaders import TrainingExamples, describe, load_beir, load_dataset, load_training_examples
from stagewise.errors import DataError, ModelError, StagewiseError
from stagewise.evaluation.metrics import compute_metrics
from stagewise.evaluation.runs import SystemResult, compare, evaluate, evaluate_pipeline, save_results
from stagewise.models.specs import ModelSpec, load_bi_encoder, load_cross_encoder, resolve_model
from stagewise.search.pipeline import Hit, Pipeline, Query
from stagewise.search.rerankers import CrossEncoderReranker
from stagewise.search.retrievers import BM25Retriever, DenseRetriever, HybridRetriever, build_first_stage
from stagewise.search.vector_index import VectorIndexConfig
from stagewise.selection.config import SelectConfig, load_select_config
from stagewise.selection.strategy import select
from stagewise.serving.index import Index

__version__ = "0.1.0"

__all__ = [
    "BM25Retriever", "CrossEncoderReranker", "DataError", "DenseRetriever", "Document", "EmbeddingCache", "Hit",
    "HybridRetriever", "Index", "ModelError", "ModelSpec", "Pipeline", "Query", "RetrievalDataset", "SelectConfig",
    "StagewiseError", "SystemResult", "TrainingExamples", "VectorIndexConfig", "build_first_stage", "compare",
    "compute_metrics", "describe", "evaluate", "evaluate_pipeline", "load_beir", "load_bi_encoder",
    "load_cross_encoder", "load_dataset", "load_select_config", "load_training_examples", "resolve_model",
    "save_results", "select",
]
