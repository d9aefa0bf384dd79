"""fedbreast: federated breast-lesion classification on Flower."""

__version__ = "0.1.0"
