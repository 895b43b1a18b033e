"""CP-decomposed convolutions and tensorized Linear layers (tensor_methods_lecture, "CPD as a
depthwise convolution"; CP-ALS, lecture Algorithm 1).

The layers; the method that chooses their ranks and targets is :mod:`lrk.decomp.weight.cp`.

Convolution: the kernel ``W in R^{S x C x kh x kw}`` is read as the 3-way tensor ``S x C x (kh kw)`` and
``W ~= sum_r A[:, r] o B[:, r] o K[:, r]``; the layer becomes a pointwise conv C -> R (B^T), a depthwise
``kh x kw`` conv on the R channels (K; stride, padding, dilation of the dense conv) and a pointwise conv
R -> S (A, with the bias). The spatial factor is a full ``kh x kw`` depthwise filter (not kx1 then 1xk):
one layer fewer, and it keeps the exactness of the 3-way model. The CP weights lambda are spread evenly
(lambda^(1/3)) over the three factors so that fine-tuning starts balanced.

Linear: ``W in R^{out x in}`` is tensorized as ``o_1 x .. x o_d x i_1 x .. x i_d`` (balanced factors of
out and in, ``linear_modes`` = d each, or ``out_factors`` / ``in_factors``) and CP-decomposed; the
forward contracts the input with the input factors, then expands with the output factors: about
2 N R (in + out) FLOPs, never the dense matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrk.layers.base import (
    FactorizedLayer,
    _conv_flops,
    _rows,
    as_ranks,
    check_rank,
    conv_like,
    dense_conv_like,
    dense_linear,
    describe,
    expect_module,
)
from lrk.layers.svd import _copy_bias, fold_three
from lrk.linalg.cp import cp_als, cp_params, cp_rank_bound
from lrk.linalg.tt import balanced_factors


def khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product (tensor_methods_lecture "Khatri-Rao"): rows ordered (i_1, .., i_d)
    row-major, so ``khatri_rao([A, B])[i * J + j] = A[i] * B[j]``."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


def _balanced_scale(weights: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    root = weights.abs().clamp_min(1e-30) ** (1.0 / len(factors))
    sign = torch.where(weights < 0, -1.0, 1.0).to(weights.dtype)
    scaled = [f * root for f in factors]
    scaled[0] = scaled[0] * sign
    return scaled


class CPConv2d(FactorizedLayer):
    """``pointwise_in`` 1x1 C -> R, ``depthwise`` kh x kw on R channels, ``pointwise_out`` 1x1 R -> S (+ bias).

    Protocol: ``from_dense(conv, rank, n_iter_max=25, tol=1e-5)`` with rank in [1, S C kh kw / max(S, C,
    kh kw)] (the generic CP rank bound); ``factors()`` is ``{"pointwise_in", "depthwise", "pointwise_out"}``.
    ``fold(keep=...)``, the merges of :class:`~lrk.layers.tucker.TuckerConv2d` with the depthwise conv as a
    diagonal core: ``"last"`` merges ``pointwise_in`` into the depthwise conv (an
    :class:`~lrk.layers.svd.SVDConv2d` of rank R), ``"first"`` merges the depthwise conv with
    ``pointwise_out`` (``nn.Sequential(1x1 C -> R, k x k R -> S)``), ``None`` gives the dense conv.
    """

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.ranks = (rank,)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.pointwise_in = nn.Conv2d(conv.in_channels, rank, 1, bias=False, **factory)
        self.depthwise = conv_like(conv, rank, rank, groups=rank)
        self.pointwise_out = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, weights: torch.Tensor, factors: list[torch.Tensor]) -> CPConv2d:
        """Layer from CP factors (A: S x R, B: C x R, K: kh kw x R) and weights of ``conv``'s kernel."""
        a, b, k = _balanced_scale(weights, factors)
        layer = cls(conv, a.shape[1])
        kh, kw = conv.kernel_size
        layer.pointwise_in.weight.data.copy_(b.T[:, :, None, None])
        layer.depthwise.weight.data.copy_(k.T.reshape(-1, 1, kh, kw))
        layer.pointwise_out.weight.data.copy_(a[:, :, None, None])
        _copy_bias(layer.pointwise_out, conv.bias)
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, n_iter_max: int = 25, tol: float = 1e-5) -> CPConv2d:
        w = conv.weight.detach()
        result = cp_als(w.reshape(w.shape[0], w.shape[1], -1), rank, n_iter_max=n_iter_max, tol=tol)
        return cls.from_factors(conv, result.weights, result.factors)

    @classmethod
    def from_dense(
        cls, module: nn.Module, ranks: int | Sequence[int], n_iter_max: int = 25, tol: float = 1e-5
    ) -> CPConv2d:
        """:meth:`from_conv` of an ``nn.Conv2d`` (groups=1) after checking the rank (``ranks`` = R or (R,))."""
        expect_module(module, nn.Conv2d, cls.__name__)
        if module.groups != 1:
            raise ValueError(f"{cls.__name__} needs groups=1, got groups={module.groups}")
        (rank,) = as_ranks(ranks, 1, cls.__name__)
        s_out, c_in, kh, kw = module.weight.shape
        bound = cp_rank_bound((s_out, c_in, kh * kw))
        check_rank(rank, 1, bound, f"{cls.__name__}.from_dense({describe(module)})")
        return cls.from_conv(module, rank, n_iter_max=n_iter_max, tol=tol)

    @staticmethod
    def param_count(in_channels: int, out_channels: int, kernel: int, rank: int, bias: bool = True) -> int:
        """R (C + kh kw + S) (+ S)."""
        return cp_params((out_channels, in_channels, kernel), rank) + (out_channels if bias else 0)

    def flops(self, input_shape: Sequence[int]) -> int:
        """2 B (H W C R + H' W' R kh kw + H' W' R S) for input H x W, output H' x W'."""
        total, shape = 0, tuple(input_shape)
        for conv in (self.pointwise_in, self.depthwise, self.pointwise_out):
            flops, shape = _conv_flops(conv, shape)
            total += flops
        return total

    def dense_bias(self) -> torch.Tensor | None:
        return self.pointwise_out.bias

    def factors(self) -> dict[str, nn.Parameter]:
        return {
            "pointwise_in": self.pointwise_in.weight,
            "depthwise": self.depthwise.weight,
            "pointwise_out": self.pointwise_out.weight,
        }

    def dense_module(self) -> nn.Conv2d:
        return dense_conv_like(self.depthwise, self.dense_weight(), self.dense_bias())

    def fold(self, keep: str | None = None) -> nn.Module:
        """Merge layers (class docstring): ``keep=None`` dense; ``"last"`` an SVDConv2d; ``"first"`` 1x1 + k x k."""
        k = self.depthwise.weight[:, 0]  # (R, kh, kw)
        eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
        spatial = eye[:, :, None, None] * k[:, None]  # the diagonal core (R, R, kh, kw)
        return fold_three(
            self,
            self.pointwise_in.weight[:, :, 0, 0],
            spatial,
            self.pointwise_out.weight[:, :, 0, 0],
            self.depthwise,
            keep,
        )

    def dense_weight(self) -> torch.Tensor:
        a = self.pointwise_out.weight[:, :, 0, 0]  # (S, R)
        b = self.pointwise_in.weight[:, :, 0, 0]  # (R, C)
        k = self.depthwise.weight[:, 0]  # (R, kh, kw)
        return torch.einsum("sr,rc,rhw->schw", a, b, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_out(self.depthwise(self.pointwise_in(x)))


class CPLinear(FactorizedLayer):
    """Linear with a CP-decomposed tensorized weight ``W[(o_1..o_d), (i_1..i_d)] = sum_r prod_k O_k[o_k, r]
    prod_k I_k[i_k, r]``; factors in ``out_factors`` / ``in_factors`` (ParameterLists).

    Protocol: ``from_dense(linear, rank, out_shape=None, in_shape=None, n_iter_max=25, tol=1e-5)`` (shapes
    default to 2 balanced factors each) with rank in [1, prod(dims) / max(dims)]; ``factors()`` is
    ``{"out_factors.0", .., "in_factors.0", ..}``; ``fold()`` is the dense ``nn.Linear`` only.
    """

    def __init__(
        self,
        out_shape: tuple[int, ...],
        in_shape: tuple[int, ...],
        rank: int,
        bias: bool = True,
        **factory: Any,
    ) -> None:
        super().__init__()
        self.out_shape, self.in_shape, self.ranks = tuple(out_shape), tuple(in_shape), (rank,)
        self.in_features, self.out_features = math.prod(in_shape), math.prod(out_shape)
        self.out_factors = nn.ParameterList(
            [nn.Parameter(torch.zeros(o, rank, **factory)) for o in out_shape]
        )
        self.in_factors = nn.ParameterList([nn.Parameter(torch.zeros(i, rank, **factory)) for i in in_shape])
        self.bias = nn.Parameter(torch.zeros(self.out_features, **factory)) if bias else None

    @classmethod
    def from_factors(
        cls, linear: nn.Linear, out_shape, in_shape, weights: torch.Tensor, factors: list[torch.Tensor]
    ) -> CPLinear:
        w = linear.weight
        layer = cls(
            out_shape, in_shape, factors[0].shape[1], linear.bias is not None, device=w.device, dtype=w.dtype
        )
        scaled = _balanced_scale(weights, factors)
        for p, f in zip([*layer.out_factors, *layer.in_factors], scaled, strict=True):
            p.data.copy_(f)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        out_shape=None,
        in_shape=None,
        n_iter_max: int = 25,
        tol: float = 1e-5,
    ) -> CPLinear:
        out_shape = tuple(out_shape or balanced_factors(linear.out_features, 2))
        in_shape = tuple(in_shape or balanced_factors(linear.in_features, 2))
        tensor = linear.weight.detach().reshape(*out_shape, *in_shape)
        result = cp_als(tensor, rank, n_iter_max=n_iter_max, tol=tol)
        return cls.from_factors(linear, out_shape, in_shape, result.weights, result.factors)

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        ranks: int | Sequence[int],
        out_shape: Sequence[int] | None = None,
        in_shape: Sequence[int] | None = None,
        n_iter_max: int = 25,
        tol: float = 1e-5,
    ) -> CPLinear:
        """:meth:`from_linear` of an ``nn.Linear`` after checking the shapes and the rank."""
        expect_module(module, nn.Linear, cls.__name__)
        (rank,) = as_ranks(ranks, 1, cls.__name__)
        who = f"{cls.__name__}.from_dense({describe(module)})"
        out_shape = tuple(out_shape or balanced_factors(module.out_features, 2))
        in_shape = tuple(in_shape or balanced_factors(module.in_features, 2))
        if math.prod(out_shape) != module.out_features or math.prod(in_shape) != module.in_features:
            raise ValueError(
                f"{who}: out_shape={out_shape} x in_shape={in_shape} do not multiply to "
                f"({module.out_features}, {module.in_features})"
            )
        check_rank(rank, 1, cp_rank_bound((*out_shape, *in_shape)), who)
        return cls.from_linear(module, rank, out_shape, in_shape, n_iter_max=n_iter_max, tol=tol)

    @staticmethod
    def param_count(out_shape, in_shape, rank: int, bias: bool = True) -> int:
        return cp_params((*out_shape, *in_shape), rank) + (math.prod(out_shape) if bias else 0)

    def flops(self, input_shape: Sequence[int]) -> int:
        """2 N R (in + out) for N rows: the two GEMMs of :meth:`forward` (the Khatri-Rao products it forms
        per call are elementwise, not counted)."""
        rows = _rows(input_shape, self.in_features, type(self).__name__)
        return 2 * rows * self.ranks[0] * (self.in_features + self.out_features)

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def factors(self) -> dict[str, nn.Parameter]:
        out = {f"out_factors.{k}": p for k, p in enumerate(self.out_factors)}
        return out | {f"in_factors.{k}": p for k, p in enumerate(self.in_factors)}

    def dense_module(self) -> nn.Linear:
        return dense_linear(self.dense_weight(), self.dense_bias())

    def dense_weight(self) -> torch.Tensor:
        letters = "abcdefghijklmnopqrstuvwxy"
        n = len(self.out_shape) + len(self.in_shape)
        spec = ",".join(f"{letters[k]}z" for k in range(n)) + "->" + letters[:n]
        full = torch.einsum(spec, *self.out_factors, *self.in_factors)
        return full.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = (x K_in) K_out^T + b`` with the Khatri-Rao products ``K_in = I_1 (kr) .. (kr) I_d`` (in x R)
        and ``K_out`` (out x R), formed per call for R (in + out) multiply-adds: two GEMMs, 2 N R (in + out)
        FLOPs, and no N x (mode) x R intermediate (a mode-by-mode contraction was 70x slower at N = 3200)."""
        lead = x.shape[:-1]
        t = x.reshape(-1, self.in_features) @ khatri_rao(list(self.in_factors))
        y = torch.nn.functional.linear(t, khatri_rao(list(self.out_factors)), self.bias)
        return y.reshape(*lead, self.out_features)
