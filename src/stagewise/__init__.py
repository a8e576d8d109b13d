"""Stagewise: measure and choose two-stage neural search (bi-encoder retrieval + cross-encoder reranking)."""

from stagewise.cache import EmbeddingCache
from stagewise.data import Document, RetrievalDataset, TrainingExamples, describe, load_beir, load_dataset, load_training_examples
from stagewise.errors import DataError, ModelError, StagewiseError
from stagewise.evaluation import SystemResult, compare, compute_metrics, evaluate, evaluate_pipeline, save_results
from stagewise.models import ModelSpec, load_bi_encoder, load_cross_encoder, resolve_model
from stagewise.index import Index
from stagewise.pipeline import Hit, Pipeline, Query
from stagewise.rerankers import CrossEncoderReranker
from stagewise.retrievers import BM25Retriever, DenseRetriever, HybridRetriever, build_first_stage
from stagewise.selection import SelectConfig, load_select_config, select
from stagewise.vector_index import VectorIndexConfig

__version__ = "0.1.0"

__all__ = [
    "BM25Retriever", "CrossEncoderReranker", "DataError", "DenseRetriever", "Document", "EmbeddingCache", "Hit",
    "HybridRetriever", "Index", "ModelError", "ModelSpec", "Pipeline", "Query", "RetrievalDataset", "SelectConfig",
    "StagewiseError", "SystemResult", "VectorIndexConfig",
    "TrainingExamples", "build_first_stage", "compare", "compute_metrics", "describe", "evaluate", "evaluate_pipeline",
    "load_beir",
    "load_bi_encoder", "load_cross_encoder", "load_dataset", "load_select_config", "load_training_examples",
    "resolve_model", "save_results", "select",
]
