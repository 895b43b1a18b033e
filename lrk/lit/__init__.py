"""Lightning side of lrk: the classifier module and the measurement callbacks."""

from lrk.lit.callbacks import InferenceBenchmark, ModelStats, PeakMemory, PhaseTimer, count_parameters
from lrk.lit.module import LitClassifier, LossTerm

__all__ = [
    "InferenceBenchmark",
    "LitClassifier",
    "LossTerm",
    "ModelStats",
    "PeakMemory",
    "PhaseTimer",
    "count_parameters",
]
