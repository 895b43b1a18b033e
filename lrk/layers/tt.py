"""``decomp=tt``: Linear layers (and 1x1 convolutions) as Tensor-Train matrices (tensor_methods_lecture
"Tensor Train"; TT-SVD by TensorLy ``tensor_train_matrix``).

``out`` and ``in`` are each split into ``cores`` balanced factors (or ``out_factors`` / ``in_factors``
given); core k is ``r_(k-1) x o_k x i_k x r_k``. The forward contracts the cores with the input one at a
time (:func:`lrk.linalg.tt.tt_matvec`), never forming the dense matrix.

Ranks: ``rank=r`` sets every bond to r, capped at each bond's maximum (valid range [1, largest bond
maximum]); ``ratio`` takes the uniform r whose parameter count is nearest to the target; ``energy``
applies the energy rule to each TT unfolding (TT-SVD's error is bounded by the sum of the discarded
energies). ``k x k`` convolutions (k > 1) are not supported.

Default targets: every Linear except the classifier head, and every 1x1 Conv2d (stride any, padding 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lrk.layers.base import (
    FactorizedLayer,
    Ranks,
)
from lrk.linalg.tt import (
    balanced_factors,
    tt_matrix,
    tt_matvec,
    tt_params,
    tt_to_matrix,
)


class TTLinear(FactorizedLayer):
    """``y = x W^T + b`` with W a TT-matrix of cores ``r_(k-1) x o_k x i_k x r_k`` (a ParameterList)."""

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

    @staticmethod
    def param_count(out_shape, in_shape, ranks: Ranks, bias: bool = True) -> int:
        return tt_params(out_shape, in_shape, list(ranks)) + (math.prod(out_shape) if bias else 0)

    def dense_weight(self) -> torch.Tensor:
        return tt_to_matrix(list(self.cores))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = tt_matvec(list(self.cores), x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class TTConv1x1(TTLinear):
    """A 1x1 convolution (padding 0, any stride) as a TT-matrix applied to every pixel."""

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

    def dense_weight(self) -> torch.Tensor:
        return super().dense_weight()[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        y = super().forward(x.movedim(1, -1))
        return y.movedim(-1, 1)
