"""Tucker-2 factorized Conv2d (accelerating_lrd_paper Fig. 1, Eqs. 4-6): 1x1 C -> R1, k x k core R1 -> R2, 1x1 R2 -> S."""

from __future__ import annotations

import torch
from torch import nn

from lrk.layers.base import FactorizedLayer, conv_like
from lrk.layers.svd import _copy_bias
from lrk.linalg.tucker import tucker2, tucker2_params


class TuckerConv2d(FactorizedLayer):
    """``first`` 1x1 C -> R1 (U_in^T), ``core`` k x k R1 -> R2 (stride, padding, dilation of the dense conv),
    ``last`` 1x1 R2 -> S (U_out, with the dense bias)."""

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, int]) -> None:
        super().__init__()
        r_out, r_in = ranks
        self.ranks = (r_out, r_in)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False, **factory)
        self.core = conv_like(conv, r_in, r_out)
        self.last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None, **factory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int], n_iter_max: int = 0) -> TuckerConv2d:
        """Tucker-2 of ``conv``'s kernel with ``ranks = (R2, R1)`` (output, input)."""
        if conv.groups != 1:
            raise ValueError(f"TuckerConv2d needs groups=1, got groups={conv.groups}")
        layer = cls(conv, ranks)
        core, u_out, u_in = tucker2(conv.weight, ranks, n_iter_max=n_iter_max)
        layer.first.weight.data.copy_(u_in.T[:, :, None, None])
        layer.core.weight.data.copy_(core)
        layer.last.weight.data.copy_(u_out[:, :, None, None])
        _copy_bias(layer.last, conv.bias)
        return layer

    @staticmethod
    def param_count(
        in_channels: int, out_channels: int, kernel: int, ranks: tuple[int, int], bias: bool = True
    ) -> int:
        return tucker2_params(out_channels, in_channels, kernel, ranks, bias)

    def dense_weight(self) -> torch.Tensor:
        u_in = self.first.weight[:, :, 0, 0]  # (R1, C)
        u_out = self.last.weight[:, :, 0, 0]  # (S, R2)
        return torch.einsum("sa,abhw,bc->schw", u_out, self.core.weight, u_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))
