"""Compressed layers: ``nn.Module``s only, no config (the methods in ``lrk.decomp`` decide what to build).

Factorized Linear/Conv layers (svd, tucker, cp, tt, the shared-factor TRAWL layers) and, in
``lrk.layers.attention``, the attention modules (dense, sdrm, pca, cholesky, attn_svd, attn_tensor) with their
kernels.
"""

from lrk.layers.base import FactorizedLayer, conv_like
from lrk.layers.branched_tucker import BranchedTuckerConv2d
from lrk.layers.cp import CPConv2d, CPLinear
from lrk.layers.svd import SVDConv2d, SVDLinear
from lrk.layers.trawl import TrawlConv2d, TrawlLinear, TrawlShared
from lrk.layers.tt import TTConv1x1, TTLinear
from lrk.layers.tucker import TuckerConv2d

__all__ = [
    "BranchedTuckerConv2d",
    "CPConv2d",
    "CPLinear",
    "FactorizedLayer",
    "SVDConv2d",
    "SVDLinear",
    "TTConv1x1",
    "TTLinear",
    "TrawlConv2d",
    "TrawlLinear",
    "TrawlShared",
    "TuckerConv2d",
    "conv_like",
]
