"""Branched Tucker-2 Conv2d (accelerating_lrd_paper Sec. 2.4, Eqs. 8-20, Figs. 4-5): the Tucker core split
into N parallel branches, computed as one grouped convolution.

Tucker-2 with total ranks r1 (input) and r2 (output), both multiples of N (Eqs. 10-11), is rewritten as a sum of
N branches ``W = sum_j X_j x_R1 U_j x_R2 V_j`` (Eq. 17), each a Tucker-2 with ranks R1 = r1 / N, R2 = r2 / N. Fig. 4
implements the N branches as three layers: the N first 1x1 convolutions C -> R1 side by side are one 1x1 C -> r1,
the N cores R1 -> R2 are one ``groups=N`` convolution r1 -> r2, and the sum of the N last 1x1 convolutions
R2 -> S is one 1x1 r2 -> S. The core then holds ``N (R1 R2 k^2) = r1 r2 k^2 / N`` parameters (Eqs. 18-20):
1/N of vanilla Tucker's core at the same ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lrk.layers.base import (
    as_ranks,
    check_rank,
    describe,
    expect_module,
)
from lrk.layers.svd import _copy_bias
from lrk.layers.tucker import TuckerConv2d
from lrk.linalg.tucker import (
    block_diagonal,
    branched_core_params,
    branched_tucker2,
    branched_tucker2_params,
    check_branches,
)


class BranchedTuckerConv2d(TuckerConv2d):
    """``first`` 1x1 C -> r1 (``[U_1 ... U_N]^T``), ``core`` k x k r1 -> r2 with ``groups=N`` (branch j's core
    ``X_j`` maps input channels j R1 .. (j+1) R1 - 1 to output channels j R2 .. (j+1) R2 - 1; stride, padding,
    dilation of the dense conv), ``last`` 1x1 r2 -> S (``[V_1 ... V_N]``, with the dense bias).

    Protocol: ``from_dense(conv, ranks, branches=2, n_iter_max=0, sweeps=0)`` with ``ranks = (r2, r1)``, the
    *total* ranks as in :class:`~lrk.layers.tucker.TuckerConv2d` (or one int for both), each a multiple of
    ``branches`` (Eqs. 10-11), r2 in [1, min(S, C kh kw)] and r1 in [1, min(C, S kh kw)]; per branch the ranks
    are r2 / N and r1 / N. ``factors()`` is ``{"first", "core", "last"}``.

    The weights come from the dense kernel, no training (Sec. 2.4: "we can also calculate the weights in each
    branch from the original weights"), by :func:`lrk.linalg.tucker.branched_tucker2`: the Tucker-2 at
    (r2, r1) (HOSVD + ``n_iter_max`` HOOI sweeps), its factors split into N consecutive groups of columns and
    its core into the diagonal blocks (Eqs. 12-17). Where lrk reads the paper differently: Eqs. 12-17 present
    the split as exact, but Eq. 16 keeps only the diagonal blocks ``X_j`` of the core, so the blocks of X that
    pair one branch's input factors with another's output factors are dropped; with N > 1 the layer is
    therefore lossy even at full rank, and at equal ranks it is a coarser approximation than vanilla Tucker
    (with 1/N of its core parameters). ``sweeps > 0`` (not in the paper) refines the N branches as a
    block-term decomposition (block-coordinate HOOI on the residual, never increasing the error).
    ``branches=1`` builds exactly :class:`~lrk.layers.tucker.TuckerConv2d`'s weights.

    ``fold(keep=...)`` as Tucker's, with the block-diagonal core (:func:`~lrk.linalg.tucker.block_diagonal`):
    ``"last"`` an :class:`~lrk.layers.svd.SVDConv2d` of rank r2 (k x k C -> r2, 1x1 r2 -> S), ``"first"``
    ``nn.Sequential(1x1 C -> r1, k x k r1 -> S)``, ``None`` the dense conv (merging a branch's factors
    destroys the grouping: a folded layer is not grouped).
    """

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, int], branches: int) -> None:
        check_branches(tuple(ranks), branches, type(self).__name__)
        super().__init__(conv, ranks, groups=branches)
        self.branches = branches

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ranks: tuple[int, int],
        branches: int = 2,
        n_iter_max: int = 0,
        sweeps: int = 0,
    ) -> BranchedTuckerConv2d:
        """The N-branch Tucker-2 of ``conv``'s kernel at total ``ranks = (r2, r1)`` (class docstring)."""
        if conv.groups != 1:
            raise ValueError(f"{cls.__name__} needs groups=1, got groups={conv.groups}")
        layer = cls(conv, ranks, branches)
        t = branched_tucker2(conv.weight, ranks, branches, n_iter_max=n_iter_max, sweeps=sweeps)
        layer.first.weight.data.copy_(t.in_factor.T[:, :, None, None])
        layer.core.weight.data.copy_(t.core)
        layer.last.weight.data.copy_(t.out_factor[:, :, None, None])
        _copy_bias(layer.last, conv.bias)
        return layer

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        ranks: int | Sequence[int],
        branches: int = 2,
        n_iter_max: int = 0,
        sweeps: int = 0,
    ) -> BranchedTuckerConv2d:
        """:meth:`from_conv` of an ``nn.Conv2d`` (groups=1) after checking ``ranks = (r2, r1)`` and ``branches``."""
        expect_module(module, nn.Conv2d, cls.__name__)
        if module.groups != 1:
            raise ValueError(f"{cls.__name__} needs groups=1, got groups={module.groups}")
        r_out, r_in = as_ranks(ranks, 2, cls.__name__)
        s_out, c_in, *kernel = module.weight.shape
        k2 = kernel[0] * kernel[1]
        who = f"{cls.__name__}.from_dense({describe(module)})"
        check_rank(r_out, 1, min(s_out, c_in * k2), who, "R2 (output rank)")
        check_rank(r_in, 1, min(c_in, s_out * k2), who, "R1 (input rank)")
        check_branches((r_out, r_in), branches, who)
        return cls.from_conv(module, (r_out, r_in), branches, n_iter_max=n_iter_max, sweeps=sweeps)

    @staticmethod
    def param_count(
        in_channels: int,
        out_channels: int,
        kernel: int,
        ranks: tuple[int, int],
        branches: int,
        bias: bool = True,
    ) -> int:
        """Closed form: C r1 + r1 r2 k / N + r2 S (+ S); ``kernel`` = kh kw (Eqs. 18-20 for the core)."""
        return branched_tucker2_params(out_channels, in_channels, kernel, ranks, branches, bias)

    @staticmethod
    def core_param_count(ranks: tuple[int, int], kernel: int, branches: int) -> int:
        """Closed form of the core, Eqs. 18-19: N (r1 / N)(r2 / N) k = r1 r2 k / N (Eq. 20)."""
        return branched_core_params(ranks, kernel, branches)

    def full_core(self) -> torch.Tensor:
        """The core as the (r2, r1, kh, kw) block-diagonal kernel of a vanilla Tucker layer (Fig. 4)."""
        return block_diagonal(self.core.weight, self.branches)

    def extra_repr(self) -> str:
        return f"ranks={tuple(self.ranks)}, branches={self.branches}"
