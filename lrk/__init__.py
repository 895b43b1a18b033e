"""lrk: low-rank methods for vision models, compared on one grid of dataset x backbone x decomposition."""

__version__ = "0.1.0"
