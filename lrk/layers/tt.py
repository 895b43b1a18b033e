"""Linear layers (and 1x1 convolutions) as Tensor-Train matrices (tensor_methods_lecture
"Tensor Train"; TT-SVD by TensorLy ``tensor_train_matrix``).

The layers; the method that chooses their ranks and targets is :mod:`lrk.decomp.weight.tt`.

``out`` and ``in`` are each split into ``cores`` balanced factors (or ``out_factors`` / ``in_factors``
given); core k is ``r_(k-1) x o_k x i_k x r_k``. The forward contracts the cores with the input one at a
time (:func:`lrk.linalg.tt.tt_matvec`), never forming the dense matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrk.layers.base import (
    FactorizedLayer,
    Ranks,
    _image_shape,
    _rows,
    check_rank,
    dense_conv,
    dense_linear,
    describe,
    expect_module,
)
from lrk.linalg.tt import (
    balanced_factors,
    tt_matrix,
    tt_matvec,
    tt_max_ranks,
    tt_params,
    tt_to_matrix,
)


def _tt_setup(
    who: str,
    out_n: int,
    in_n: int,
    ranks: int | Sequence[int],
    out_shape: Sequence[int] | None,
    in_shape: Sequence[int] | None,
    cores: int,
) -> tuple[tuple[int, ...], tuple[int, ...], Ranks]:
    """The factor shapes (given, or ``cores`` balanced factors each, as ``decomp=tt`` does) and the bond
    ranks: an int r is every bond at min(r, bond maximum), r in [1, largest maximum]; a sequence gives
    each bond, each in [1, its maximum]."""
    d = len(out_shape or in_shape or ()) or cores
    out_shape = tuple(out_shape or balanced_factors(out_n, d))
    in_shape = tuple(in_shape or balanced_factors(in_n, d))
    if len(out_shape) != len(in_shape) or math.prod(out_shape) != out_n or math.prod(in_shape) != in_n:
        raise ValueError(
            f"{who}: out_shape={out_shape} and in_shape={in_shape} must have one factor per core each and "
            f"multiply to ({out_n}, {in_n})"
        )
    limits = tt_max_ranks(out_shape, in_shape)
    if isinstance(ranks, int):
        check_rank(ranks, 1, max(limits), who)
        return out_shape, in_shape, tuple(min(ranks, m) for m in limits)
    ranks = tuple(ranks)
    if len(ranks) != len(limits):
        raise ValueError(f"{who}: ranks={list(ranks)} is invalid: there are {len(limits)} bonds")
    for k, (r, m) in enumerate(zip(ranks, limits, strict=True)):
        check_rank(r, 1, m, who, f"rank of bond {k + 1}")
    return out_shape, in_shape, ranks


def _tt_flops(cores: Sequence[torch.Tensor], rows: int) -> int:
    """2 N sum_k (prod_{j<k} o_j) r_(k-1) o_k i_k r_k (prod_{j>k} i_j): the contractions of
    :func:`lrk.linalg.tt.tt_matvec`, one per core."""
    shapes = [tuple(c.shape) for c in cores]
    total = 0
    for k, (r0, o, i, r1) in enumerate(shapes):
        before = math.prod(s[1] for s in shapes[:k])
        after = math.prod(s[2] for s in shapes[k + 1 :])
        total += 2 * rows * before * r0 * o * i * r1 * after
    return total


class TTLinear(FactorizedLayer):
    """``y = x W^T + b`` with W a TT-matrix of cores ``r_(k-1) x o_k x i_k x r_k`` (a ParameterList).

    Protocol: ``from_dense(linear, ranks, out_shape=None, in_shape=None, cores=3)``: ranks an int (every
    bond, capped at its maximum) or one per bond (:func:`_tt_setup`); ``factors()`` is ``{"cores.0", ..}``;
    ``fold()`` is the dense ``nn.Linear`` only (the TT contraction of all cores).
    """

    def __init__(self, out_shape, in_shape, ranks: Ranks, bias: bool = True, **factory: Any) -> None:
        super().__init__()
        self.out_shape, self.in_shape, self.ranks = tuple(out_shape), tuple(in_shape), tuple(ranks)
        self.out_features, self.in_features = math.prod(out_shape), math.prod(in_shape)
        full = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            [
                nn.Parameter(torch.zeros(full[k], o, i, full[k + 1], **factory))
                for k, (o, i) in enumerate(zip(out_shape, in_shape, strict=True))
            ]
        )
        self.bias = nn.Parameter(torch.zeros(self.out_features, **factory)) if bias else None

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, out_shape, in_shape, ranks: Ranks
    ) -> TTLinear:
        layer = cls(out_shape, in_shape, ranks, bias is not None, device=weight.device, dtype=weight.dtype)
        for p, core in zip(
            layer.cores,
            tt_matrix(weight.reshape(weight.shape[0], -1), out_shape, in_shape, list(ranks)),
            strict=True,
        ):
            p.data.copy_(core)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, ranks: Ranks, out_shape=None, in_shape=None, cores: int = 3
    ) -> TTLinear:
        out_shape = tuple(out_shape or balanced_factors(linear.out_features, cores))
        in_shape = tuple(in_shape or balanced_factors(linear.in_features, cores))
        return cls.from_weight(linear.weight, linear.bias, out_shape, in_shape, ranks)

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        ranks: int | Sequence[int],
        out_shape: Sequence[int] | None = None,
        in_shape: Sequence[int] | None = None,
        cores: int = 3,
    ) -> TTLinear:
        """:meth:`from_weight` of an ``nn.Linear`` after checking the shapes and ranks."""
        expect_module(module, nn.Linear, cls.__name__)
        who = f"{cls.__name__}.from_dense({describe(module)})"
        out_shape, in_shape, bonds = _tt_setup(
            who, module.out_features, module.in_features, ranks, out_shape, in_shape, cores
        )
        return cls.from_weight(module.weight, module.bias, out_shape, in_shape, bonds)

    @staticmethod
    def param_count(out_shape, in_shape, ranks: Ranks, bias: bool = True) -> int:
        return tt_params(out_shape, in_shape, list(ranks)) + (math.prod(out_shape) if bias else 0)

    def flops(self, input_shape: Sequence[int]) -> int:
        """The core-by-core contractions (:func:`_tt_flops`) for N = prod(input_shape[:-1]) rows."""
        return _tt_flops(list(self.cores), _rows(input_shape, self.in_features, type(self).__name__))

    def dense_weight(self) -> torch.Tensor:
        return tt_to_matrix(list(self.cores))

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def factors(self) -> dict[str, nn.Parameter]:
        return {f"cores.{k}": p for k, p in enumerate(self.cores)}

    def dense_module(self) -> nn.Module:
        return dense_linear(self.dense_weight(), self.dense_bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = tt_matvec(list(self.cores), x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class TTConv1x1(TTLinear):
    """A 1x1 convolution (padding 0, any stride) as a TT-matrix applied to every pixel.

    Protocol as :class:`TTLinear`: ``from_dense(conv, ranks, out_shape=None, in_shape=None, cores=3)`` for
    a 1x1 ``nn.Conv2d`` with groups=1 and padding 0; ``fold()`` is the dense 1x1 ``nn.Conv2d`` (stride kept).
    """

    def __init__(
        self, out_shape, in_shape, ranks: Ranks, bias: bool = True, stride=(1, 1), **factory: Any
    ) -> None:
        super().__init__(out_shape, in_shape, ranks, bias, **factory)
        self.stride = tuple(stride)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: Ranks, out_shape, in_shape) -> TTConv1x1:
        w = conv.weight
        layer = cls(
            out_shape, in_shape, ranks, conv.bias is not None, conv.stride, device=w.device, dtype=w.dtype
        )
        cores = tt_matrix(w.reshape(w.shape[0], -1), out_shape, in_shape, list(ranks))
        for p, core in zip(layer.cores, cores, strict=True):
            p.data.copy_(core)
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        ranks: int | Sequence[int],
        out_shape: Sequence[int] | None = None,
        in_shape: Sequence[int] | None = None,
        cores: int = 3,
    ) -> TTConv1x1:
        """:meth:`from_conv` of a 1x1 ``nn.Conv2d`` (groups=1, padding 0) after checking shapes and ranks."""
        expect_module(module, nn.Conv2d, cls.__name__)
        who = f"{cls.__name__}.from_dense({describe(module)})"
        if module.kernel_size != (1, 1) or module.groups != 1 or module.padding not in ((0, 0), "valid"):
            raise ValueError(f"{who}: only 1x1 convolutions with groups=1 and padding=0 are supported")
        out_shape, in_shape, bonds = _tt_setup(
            who, module.out_channels, module.in_channels, ranks, out_shape, in_shape, cores
        )
        return cls.from_conv(module, bonds, out_shape, in_shape)

    def flops(self, input_shape: Sequence[int]) -> int:
        """:meth:`TTLinear.flops` for the B ceil(H / s) ceil(W / s) pixels the strided 1x1 conv reads."""
        batch, h, w = _image_shape(input_shape, self.in_features, type(self).__name__)
        pixels = batch * (-(-h // self.stride[0])) * (-(-w // self.stride[1]))
        return _tt_flops(list(self.cores), pixels)

    def dense_weight(self) -> torch.Tensor:
        return super().dense_weight()[:, :, None, None]

    def dense_module(self) -> nn.Module:
        return dense_conv(self.dense_weight(), self.dense_bias(), stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        y = super().forward(x.movedim(1, -1))
        return y.movedim(-1, 1)
