"""fedbreast: shared/data."""
