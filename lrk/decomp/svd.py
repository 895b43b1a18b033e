"""``decomp=svd``: a Linear (or a convolution, matricized) becomes two layers (accelerating_lrd_paper Eqs. 1-3).

``W = U S V^T ~= W_a W_b`` with ``W_a = U' sqrt(S')`` and ``W_b = sqrt(S') V'^T`` (Eq. 3): the input first
meets ``W_b`` (in -> r), then ``W_a`` (r -> out, with the bias). A ``k x k`` convolution is matricized as
``S x (C k k)``: the first layer is a ``k x k`` conv C -> r (keeping stride, padding, dilation), the second
a 1x1 conv r -> S; for a 1x1 conv this is exactly the paper's "FC and 1x1 conv" case (Fig. 1a).

Default targets: every Linear except the classifier head, and every Conv2d (groups=1) except the stem
(the first Conv2d of the model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lrk.decomp.base import DecompMethod, FactorizedLayer, _describe, conv_like, register_method
from lrk.decomp.rank_policy import RankProblem, Ranks
from lrk.linalg.svd import svd_factors, svd_params, thin_svd


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


def conv_support_error(module: nn.Module) -> str | None:
    """Shared by the conv methods: only plain Conv2d with groups=1."""
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a Linear or Conv2d"
    if module.groups != 1:
        return f"grouped convolutions (groups={module.groups}) are not supported, only groups=1"
    return None


def svd_problem(name: str, module: nn.Module, kind: str = "svd") -> RankProblem:
    """Rank problem of the SVD of a Linear or matricized Conv2d weight (spectrum computed once, lazily)."""
    w = module.weight.detach()
    matrix = w.reshape(w.shape[0], -1)
    out_f, in_f = matrix.shape
    bias = module.bias is not None
    limit = min(out_f, in_f)
    notes: dict[str, Any] = {"kind": kind}

    def spectra() -> list[torch.Tensor]:
        if "usv" not in notes:  # one thin SVD serves the energy rule and the factors
            notes["usv"] = thin_svd(matrix.double())
        return [notes["usv"][1]]

    return RankProblem(
        layer=name,
        description=_describe(module),
        limits=(limit,),
        scalar_limit=limit,
        from_scalar=lambda r: (r,),
        params=lambda ranks: svd_params(out_f, in_f, ranks[0], bias),
        dense_params=out_f * in_f + (out_f if bias else 0),
        spectra=spectra,
        ratio_guess=lambda ratio: (
            (ratio * (out_f * in_f + (out_f if bias else 0)) - (out_f if bias else 0)) / (out_f + in_f)
        ),
        notes=notes,
    )


def build_svd(module: nn.Module, rank: int, usv=None) -> FactorizedLayer:
    if isinstance(module, nn.Linear):
        return SVDLinear.from_linear(module, rank, usv)
    return SVDConv2d.from_conv(module, rank, usv)


@register_method("svd")
class SVDMethod(DecompMethod):
    """Truncated SVD of Linear layers and (matricized) Conv2d kernels, Eqs. 1-3."""

    supported = "Linear and Conv2d with groups=1 (a k x k kernel is matricized as out x (in k k))"

    def support_error(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        return conv_support_error(module)

    def is_default_target(self, name: str, module: nn.Module, context: dict[str, Any]) -> bool:
        return name not in context["heads"] and name != context["stem"]

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        return svd_problem(name, module)

    def build(self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem) -> FactorizedLayer:
        return build_svd(module, ranks[0], problem.notes.get("usv"))
