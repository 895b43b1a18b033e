"""Weight decompositions: one registry, one rank policy, factorized layers that keep their factors as
parameters (design.md "The decomposition contract").

    from lrk.decomp import build_method, METHODS
    method = build_method(cfg.decomp)          # validates the config (LrkConfigError)
    report = method.apply(model, calibration_batches)
    report.rows, report.metrics()
"""

from lrk.decomp import (  # noqa: F401  (register the methods)
    attn_svd,
    attn_tensor,
    cholesky,
    cp,
    none,
    pca,
    sdrm,
    svd,
    trawl,
    tt,
    tucker,
)
from lrk.decomp.base import METHODS, DecompMethod, FactorizedLayer, build_method, register_method
from lrk.decomp.counting import count_flops, count_params
from lrk.decomp.cp import CPConv2d, CPLinear
from lrk.decomp.rank_policy import EnergyRank, FixedRank, RankPolicy, RankProblem, RankSelector, RatioRank
from lrk.decomp.report import DecompReport
from lrk.decomp.svd import SVDConv2d, SVDLinear
from lrk.decomp.trawl import TrawlConv2d, TrawlLinear, TrawlShared
from lrk.decomp.tt import TTConv1x1, TTLinear
from lrk.decomp.tucker import TuckerConv2d

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
    "count_flops",
    "count_params",
    "register_method",
]
