"""fedbreast: shared/training."""
