"""fedbreast: client."""
