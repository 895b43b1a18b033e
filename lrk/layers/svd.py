"""SVD-factorized Linear and Conv2d (accelerating_lrd_paper Eqs. 1-3): two layers in -> r -> out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lrk.layers.base import FactorizedLayer, conv_like
from lrk.linalg.svd import svd_factors, svd_params


def _copy_bias(target: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        target.bias.data.copy_(bias.detach())


class SVDLinear(FactorizedLayer):
    """``Linear(in, out)`` as ``w1(w0(x))``: ``w0 = Linear(in, r, bias=False)`` holds sqrt(S') V'^T and
    ``w1 = Linear(r, out)`` holds U' sqrt(S') and the dense bias (Eq. 3)."""

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

    @staticmethod
    def param_count(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
        return svd_params(out_features, in_features, rank, bias)

    @staticmethod
    def flops(batch: int, in_features: int, out_features: int, rank: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of the two matrix products for ``batch`` rows."""
        return 2 * batch * rank * (in_features + out_features)

    def dense_weight(self) -> torch.Tensor:
        return self.w1.weight @ self.w0.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(self.w0(x))


class SVDConv2d(FactorizedLayer):
    """``Conv2d(C, S, k)`` as a ``k x k`` conv C -> r (stride/padding/dilation kept, no bias) followed by a
    1x1 conv r -> S with the bias: the SVD of the ``S x (C k k)`` matricized kernel (Eqs. 1-3)."""

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

    @staticmethod
    def param_count(in_channels: int, out_channels: int, kernel: int, rank: int, bias: bool = True) -> int:
        """r (C k + S) (+ S); ``kernel`` is kh kw."""
        return rank * (in_channels * kernel + out_channels) + (out_channels if bias else 0)

    def dense_weight(self) -> torch.Tensor:
        w0 = self.w0.weight
        return (self.w1.weight.flatten(1) @ w0.flatten(1)).reshape(self.w1.weight.shape[0], *w0.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(self.w0(x))
