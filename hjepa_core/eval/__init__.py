"""Evaluation of frozen encoders: cached features, linear probe, kNN, baselines, reports, comparison."""

from hjepa_core.eval.features import (
    EvalError,
    FeatureCache,
    LoadedEncoder,
    extract_features,
    load_encoder,
    open_source,
    pool_tokens,
)
from hjepa_core.eval.knn import knn_evaluate, knn_scores
from hjepa_core.eval.metrics import classification_metrics
from hjepa_core.eval.probe import ProbeResult, ProbeSettings, linear_probe
from hjepa_core.eval.report import EvalSettings, evaluate

__all__ = [
    "EvalError",
    "EvalSettings",
    "FeatureCache",
    "LoadedEncoder",
    "ProbeResult",
    "ProbeSettings",
    "classification_metrics",
    "evaluate",
    "extract_features",
    "knn_evaluate",
    "knn_scores",
    "linear_probe",
    "load_encoder",
    "open_source",
    "pool_tokens",
]
