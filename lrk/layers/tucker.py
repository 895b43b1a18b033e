"""Tucker-2 factorized Conv2d (accelerating_lrd_paper Fig. 1, Eqs. 4-6): 1x1 C -> R1, k x k core R1 -> R2, 1x1 R2 -> S."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lrk.layers.base import (
    FactorizedLayer,
    _conv_flops,
    as_ranks,
    check_rank,
    conv_like,
    dense_conv_like,
    describe,
    expect_module,
)
from lrk.layers.svd import _copy_bias, fold_three
from lrk.linalg.tucker import tucker2, tucker2_params


class TuckerConv2d(FactorizedLayer):
    """``first`` 1x1 C -> R1 (U_in^T), ``core`` k x k R1 -> R2 (stride, padding, dilation of the dense conv),
    ``last`` 1x1 R2 -> S (U_out, with the dense bias).

    Protocol: ``from_dense(conv, ranks, n_iter_max=0)`` with ``ranks = (R2, R1)`` (or one int for both),
    R2 in [1, min(S, C kh kw)] and R1 in [1, min(C, S kh kw)] (the ranks of the kernel's unfoldings);
    ``factors()`` is ``{"first", "core", "last"}``. ``fold(keep=...)`` (accelerating_lrd_paper Sec. 2.3):

    - ``keep="last"``: the first 1x1 merged into the core, ``Y = X x_C U`` (Eqs. 5/8, "the result of
      multiplying the first 1x1 conv layer with the core 3x3 conv layer"): two layers, an
      :class:`~lrk.layers.svd.SVDConv2d` of rank R2 (k x k C -> R2, then 1x1 R2 -> S with the bias);
    - ``keep="first"``: the core merged with the last 1x1 (``X x_S V``, Eqs. 6/9):
      ``nn.Sequential(1x1 C -> R1, k x k R1 -> S)``;
    - ``keep=None`` (default): all three, the dense ``nn.Conv2d`` (Eq. 4).
    """

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, int], groups: int = 1) -> None:
        super().__init__()
        r_out, r_in = ranks
        self.ranks = (r_out, r_in)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False, **factory)
        self.core = conv_like(conv, r_in, r_out, groups=groups)
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

    @classmethod
    def from_dense(cls, module: nn.Module, ranks: int | Sequence[int], n_iter_max: int = 0) -> TuckerConv2d:
        """:meth:`from_conv` of an ``nn.Conv2d`` (groups=1) after checking ``ranks = (R2, R1)``."""
        expect_module(module, nn.Conv2d, cls.__name__)
        if module.groups != 1:
            raise ValueError(f"TuckerConv2d needs groups=1, got groups={module.groups}")
        r_out, r_in = as_ranks(ranks, 2, cls.__name__)
        s_out, c_in, *kernel = module.weight.shape
        k2 = kernel[0] * kernel[1]
        who = f"{cls.__name__}.from_dense({describe(module)})"
        check_rank(r_out, 1, min(s_out, c_in * k2), who, "R2 (output rank)")
        check_rank(r_in, 1, min(c_in, s_out * k2), who, "R1 (input rank)")
        return cls.from_conv(module, (r_out, r_in), n_iter_max=n_iter_max)

    @staticmethod
    def param_count(
        in_channels: int, out_channels: int, kernel: int, ranks: tuple[int, int], bias: bool = True
    ) -> int:
        return tucker2_params(out_channels, in_channels, kernel, ranks, bias)

    def flops(self, input_shape: Sequence[int]) -> int:
        """2 B (H W C R1 + H' W' R1 R2 kh kw + H' W' R2 S) for input H x W, output H' x W'."""
        total, shape = 0, tuple(input_shape)
        for conv in (self.first, self.core, self.last):
            flops, shape = _conv_flops(conv, shape)
            total += flops
        return total

    def full_core(self) -> torch.Tensor:
        """The (R2, R1, kh, kw) core kernel (a subclass with a grouped core returns it block-diagonal)."""
        return self.core.weight

    def dense_weight(self) -> torch.Tensor:
        u_in = self.first.weight[:, :, 0, 0]  # (R1, C)
        u_out = self.last.weight[:, :, 0, 0]  # (S, R2)
        return torch.einsum("sa,abhw,bc->schw", u_out, self.full_core(), u_in)

    def dense_bias(self) -> torch.Tensor | None:
        return self.last.bias

    def factors(self) -> dict[str, nn.Parameter]:
        return {"first": self.first.weight, "core": self.core.weight, "last": self.last.weight}

    def dense_module(self) -> nn.Conv2d:
        return dense_conv_like(self.core, self.dense_weight(), self.dense_bias())

    def fold(self, keep: str | None = None) -> nn.Module:
        """Merge layers (class docstring): ``keep=None`` dense; ``"last"`` an SVDConv2d; ``"first"`` 1x1 + k x k."""
        with torch.no_grad():
            core = self.full_core()
        return fold_three(
            self, self.first.weight[:, :, 0, 0], core, self.last.weight[:, :, 0, 0], self.core, keep
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))
