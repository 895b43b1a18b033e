"""Decomposition methods: config -> targets -> ranks -> layers (design.md "The decomposition contract").

    from lrk.decomp import build_method, METHODS
    method = build_method(cfg.decomp)          # validates the config (LrkConfigError)
    report = method.apply(model, calibration_batches)
    report.rows, report.metrics()

The methods live in ``lrk.decomp.weight`` (Linear/Conv factorizations) and ``lrk.decomp.attention`` (attention
swaps); the modules they build live in ``lrk.layers``. The layer classes are re-exported here so that imports
from before the split keep working.
"""

from lrk.decomp import (  # noqa: F401  (register the methods)
    attention,
    none,
    weight,
)
from lrk.decomp.base import METHODS, DecompMethod, build_method, register_method
from lrk.decomp.rank import EnergyRank, FixedRank, RankPolicy, RankProblem, RankSelector, RatioRank
from lrk.decomp.report import DecompReport
from lrk.layers import (
    CPConv2d,
    CPLinear,
    FactorizedLayer,
    SVDConv2d,
    SVDLinear,
    TrawlConv2d,
    TrawlLinear,
    TrawlShared,
    TTConv1x1,
    TTLinear,
    TuckerConv2d,
)
from lrk.measure import count_params

__all__ = [
    "METHODS",
    "CPConv2d",
    "CPLinear",
    "DecompMethod",
    "DecompReport",
    "EnergyRank",
    "FactorizedLayer",
    "FixedRank",
    "RankPolicy",
    "RankProblem",
    "RankSelector",
    "RatioRank",
    "SVDConv2d",
    "SVDLinear",
    "TTConv1x1",
    "TTLinear",
    "TrawlConv2d",
    "TrawlLinear",
    "TrawlShared",
    "TuckerConv2d",
    "build_method",
    "count_params",
    "register_method",
]
