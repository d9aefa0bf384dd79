"""fedbreast: server."""
