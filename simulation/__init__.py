"""fedbreast: simulation."""
