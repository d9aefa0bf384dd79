"""fedbreast: shared/models."""
