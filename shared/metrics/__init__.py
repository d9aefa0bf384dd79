"""fedbreast: shared/metrics.

Per-site classification metrics with bootstrap CIs, DeLong's paired AUC test,
privacy-preserving pooled ROC/AUC from score histograms, and the server-side
aggregation helpers.
"""

from .aggregate import DEFAULT_MAX_KEYS, DEFAULT_SUM_KEYS, max_aggregate, weighted_mean
from .bootstrap import BOOTSTRAP_METRICS, bootstrap_ci, delong_test, delong_variance
from .classification import (
    BINARY_METRIC_KEYS,
    CONFUSION_METRIC_KEYS,
    binary_metrics,
    confusion_counts,
    metrics_from_confusion,
    operating_threshold,
)
from .histogram import (
    DEFAULT_BINS,
    add_laplace_noise,
    auc_binning_bound,
    coarsen,
    default_bin_edges,
    pool_histograms,
    pooled_auc_from_histograms,
    pooled_roc_from_histograms,
    score_histogram,
    sum_histograms,
)
from .operating_point import common_bins, federated_operating_point, metrics_at_edge, youden_edge

__all__ = [
    "BINARY_METRIC_KEYS",
    "BOOTSTRAP_METRICS",
    "CONFUSION_METRIC_KEYS",
    "DEFAULT_BINS",
    "DEFAULT_MAX_KEYS",
    "DEFAULT_SUM_KEYS",
    "add_laplace_noise",
    "auc_binning_bound",
    "binary_metrics",
    "bootstrap_ci",
    "coarsen",
    "common_bins",
    "confusion_counts",
    "default_bin_edges",
    "operating_threshold",
    "delong_test",
    "delong_variance",
    "federated_operating_point",
    "max_aggregate",
    "metrics_at_edge",
    "metrics_from_confusion",
    "pool_histograms",
    "pooled_auc_from_histograms",
    "pooled_roc_from_histograms",
    "score_histogram",
    "sum_histograms",
    "weighted_mean",
    "youden_edge",
]
