"""fedbreast: shared."""
