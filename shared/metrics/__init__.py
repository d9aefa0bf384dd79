"""fedbreast: shared/metrics."""
