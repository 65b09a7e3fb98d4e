"""Retrieval evaluation: exact chunked metrics."""

from irra_dist.evaluation.metrics import (
    METRIC_COLUMNS,
    RetrievalInputError,
    format_metrics_table,
    retrieval_metrics,
)

__all__ = ["METRIC_COLUMNS", "RetrievalInputError", "format_metrics_table", "retrieval_metrics"]
