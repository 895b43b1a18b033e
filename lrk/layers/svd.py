"""SVD-factorized Linear and Conv2d (accelerating_lrd_paper Eqs. 1-3): two layers in -> r -> out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrk.layers.base import (
    ClassFormula,
    FactorizedLayer,
    _conv_flops,
    _rows,
    as_ranks,
    check_rank,
    conv_like,
    dense_conv,
    dense_conv_like,
    dense_linear,
    describe,
    expect_module,
)
from lrk.linalg.svd import svd_factors, svd_params


def _copy_bias(target: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        target.bias.data.copy_(bias.detach())


def _svd_linear_flops(batch: int, in_features: int, out_features: int, rank: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of the two matrix products for ``batch`` rows."""
    return 2 * batch * rank * (in_features + out_features)


class SVDLinear(FactorizedLayer):
    """``Linear(in, out)`` as ``w1(w0(x))``: ``w0 = Linear(in, r, bias=False)`` holds sqrt(S') V'^T and
    ``w1 = Linear(r, out)`` holds U' sqrt(S') and the dense bias (Eq. 3).

    Protocol: ``from_dense(linear, rank, usv=None)`` with rank in [1, min(in, out)]; ``factors()`` is
    ``{"w0", "w1"}``; ``fold()`` multiplies the two factors back (Eq. 3 read backwards, W' = W0 W1): the
    dense ``nn.Linear``, one layer. SVD has no partial merge (its two layers are the minimum short of one).
    ``SVDLinear.flops(batch, in, out, rank)`` on the class is the closed form 2 batch r (in + out);
    ``layer.flops(input_shape)`` on an instance is the protocol's.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory: Any
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.ranks = in_features, out_features, (rank,)
        self.w0 = nn.Linear(in_features, rank, bias=False, **factory)
        self.w1 = nn.Linear(rank, out_features, bias=bias, **factory)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, usv=None) -> SVDLinear:
        """Factorize ``linear`` at ``rank`` by truncated SVD (Eckart-Young optimal)."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        first, second, _ = svd_factors(w, rank, usv)
        layer.w1.weight.data.copy_(first)
        layer.w0.weight.data.copy_(second)
        _copy_bias(layer.w1, linear.bias)
        return layer

    @classmethod
    def from_dense(cls, module: nn.Module, ranks: int | Sequence[int], usv=None) -> SVDLinear:
        """:meth:`from_linear` of an ``nn.Linear``; ``ranks`` = r or (r,), in [1, min(in, out)]."""
        expect_module(module, nn.Linear, cls.__name__)
        (rank,) = as_ranks(ranks, 1, cls.__name__)
        check_rank(
            rank,
            1,
            min(module.in_features, module.out_features),
            f"{cls.__name__}.from_dense({describe(module)})",
        )
        return cls.from_linear(module, rank, usv)

    @staticmethod
    def param_count(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
        return svd_params(out_features, in_features, rank, bias)

    def _flops(self, input_shape: Sequence[int]) -> int:
        """2 N r (in + out) for N = prod(input_shape[:-1]) rows (bias not counted)."""
        rows = _rows(input_shape, self.in_features, type(self).__name__)
        return _svd_linear_flops(rows, self.in_features, self.out_features, self.ranks[0])

    flops = ClassFormula(_svd_linear_flops, _flops)

    def dense_weight(self) -> torch.Tensor:
        return self.w1.weight @ self.w0.weight

    def dense_bias(self) -> torch.Tensor | None:
        return self.w1.bias

    def factors(self) -> dict[str, nn.Parameter]:
        return {"w0": self.w0.weight, "w1": self.w1.weight}

    def dense_module(self) -> nn.Linear:
        return dense_linear(self.dense_weight(), self.dense_bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(self.w0(x))


class SVDConv2d(FactorizedLayer):
    """``Conv2d(C, S, k)`` as a ``k x k`` conv C -> r (stride/padding/dilation kept, no bias) followed by a
    1x1 conv r -> S with the bias: the SVD of the ``S x (C k k)`` matricized kernel (Eqs. 1-3).

    Protocol: ``from_dense(conv, rank, usv=None)`` with rank in [1, min(S, C kh kw)] (groups=1);
    ``factors()`` is ``{"w0", "w1"}``; ``fold()`` merges the 1x1 into the k x k conv (Eq. 3 read backwards):
    the dense ``nn.Conv2d``, one layer (no partial merge).
    """

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.ranks = (rank,)
        w = conv.weight
        factory = {"device": w.device, "dtype": w.dtype}
        self.w0 = conv_like(conv, conv.in_channels, rank)
        self.w1 = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, usv=None) -> SVDConv2d:
        layer = cls(conv, rank)
        w = conv.weight
        first, second, _ = svd_factors(w.reshape(w.shape[0], -1), rank, usv)
        layer.w0.weight.data.copy_(second.reshape(rank, *w.shape[1:]))
        layer.w1.weight.data.copy_(first.reshape(w.shape[0], rank, 1, 1))
        _copy_bias(layer.w1, conv.bias)
        return layer

    @classmethod
    def from_dense(cls, module: nn.Module, ranks: int | Sequence[int], usv=None) -> SVDConv2d:
        """:meth:`from_conv` of an ``nn.Conv2d`` (groups=1); ``ranks`` = r or (r,), in [1, min(S, C kh kw)]."""
        expect_module(module, nn.Conv2d, cls.__name__)
        if module.groups != 1:
            raise ValueError(f"{cls.__name__} needs groups=1, got groups={module.groups}")
        (rank,) = as_ranks(ranks, 1, cls.__name__)
        w = module.weight
        check_rank(rank, 1, min(w.shape[0], w[0].numel()), f"{cls.__name__}.from_dense({describe(module)})")
        return cls.from_conv(module, rank, usv)

    @staticmethod
    def param_count(in_channels: int, out_channels: int, kernel: int, rank: int, bias: bool = True) -> int:
        """r (C k + S) (+ S); ``kernel`` is kh kw."""
        return rank * (in_channels * kernel + out_channels) + (out_channels if bias else 0)

    def flops(self, input_shape: Sequence[int]) -> int:
        """2 B H' W' r (C kh kw + S) for the output size H' x W' (bias not counted)."""
        first, out_shape = _conv_flops(self.w0, input_shape)
        return first + _conv_flops(self.w1, out_shape)[0]

    def dense_weight(self) -> torch.Tensor:
        w0 = self.w0.weight
        return (self.w1.weight.flatten(1) @ w0.flatten(1)).reshape(self.w1.weight.shape[0], *w0.shape[1:])

    def dense_bias(self) -> torch.Tensor | None:
        return self.w1.bias

    def factors(self) -> dict[str, nn.Parameter]:
        return {"w0": self.w0.weight, "w1": self.w1.weight}

    def dense_module(self) -> nn.Conv2d:
        return dense_conv_like(self.w0, self.dense_weight(), self.dense_bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(self.w0(x))


def fold_three(
    layer: FactorizedLayer,
    first: torch.Tensor,
    spatial: torch.Tensor,
    last: torch.Tensor,
    geometry: nn.Conv2d,
    keep: str | None,
) -> nn.Module:
    """Fold a 1x1 -> k x k -> 1x1 convolution (Tucker-2, CP): ``first`` (R1 x C), ``spatial`` the full k x k
    kernel (R2 x R1 x kh x kw; with ``geometry``'s stride/padding/dilation), ``last`` (S x R2).

    ``keep="last"``: the first 1x1 merged into the k x k conv (accelerating_lrd_paper Eqs. 5/8,
    ``Y = X x_C U``): an :class:`SVDConv2d` (k x k C -> R2, 1x1 R2 -> S with the bias).
    ``keep="first"``: the k x k conv merged with the last 1x1: ``nn.Sequential(1x1 C -> R1, k x k R1 -> S)``.
    ``keep=None``: all three, the dense conv.
    """
    if keep not in (None, "first", "last"):
        raise ValueError(
            f"{type(layer).__name__}.fold(keep={keep!r}) is invalid: it must be None, 'first' or 'last'"
        )
    if keep is None:
        return FactorizedLayer.fold(layer)
    bias = layer.dense_bias()
    with torch.no_grad():
        if keep == "last":
            merged = torch.einsum("abhw,bc->achw", spatial, first)  # (R2, C, kh, kw)
            out = SVDConv2d(dense_conv_like(geometry, layer.dense_weight(), bias), merged.shape[0])
            out.w0.weight.copy_(merged)
            out.w1.weight.copy_(last[:, :, None, None])
            if bias is not None:
                out.w1.bias.copy_(bias)
            return out.train(layer.training)
        head = dense_conv(first[:, :, None, None], None)
        tail = dense_conv_like(geometry, torch.einsum("sa,abhw->sbhw", last, spatial), bias)
        return nn.Sequential(head, tail).train(layer.training)
