"""SVD training's layers (seeds/svd_training_abstract.txt, Yang et al. 2020): a Linear / Conv2d kept as its SVD
``U diag(s) V^T`` with U, s and V trained directly, and the two-factor layers it is pruned to.

The abstract: "SVD training first decomposes each layer into the form of its full-rank SVD, then performs training
directly on the decomposed weights [...] Singular value pruning is applied at the end". Its matricizations of a
``S x C x kh x kw`` kernel (option ``decomposition``):

- ``channel``: ``W`` as ``S x (C kh kw)``; ``V^T`` is a ``kh x kw`` conv C -> r (stride, padding, dilation kept),
  ``s`` scales its r channels, ``U`` is a 1x1 conv r -> S with the bias (the layout of :class:`SVDConv2d`);
- ``spatial``: ``W`` as ``(S kw) x (C kh)``, entry ``[(s, j), (c, i)] = W[s, c, i, j]``; ``V^T`` is a ``kh x 1``
  conv C -> r (vertical stride/padding/dilation), ``U`` a ``1 x kw`` conv r -> S (horizontal ones, the bias):
  the spatial-wise form the paper takes from Jaderberg et al. 2014 / Tai et al. 2016.

Every layer here exposes ``svd_factors() -> (U, s, V)`` (U: m x r, s: r, V: n x r, tensors in the autograd graph):
the duck-typed protocol the regularisers of :mod:`lrk.lit.regularizers` find the layers by (``lrk.lit`` imports no
``lrk.layers``, tests/test_architecture.py).

Pruning (:meth:`SVDTrainLinear.prune` / :meth:`SVDTrainConv2d.prune`) keeps the ``rank`` triplets of largest |s_i|
(trained singular values are neither sorted nor positive) and returns the two-factor layer: ``sqrt(|s|)`` split onto
both factors (as :mod:`lrk.layers.svd` does, accelerating_lrd_paper Eq. 3), the sign of ``s`` on the U side, so that
the result's weight is exactly ``U_K diag(s_K) V_K^T``. Linear -> :class:`SVDLinear`, channel -> :class:`SVDConv2d`,
spatial -> :class:`SpatialSVDConv2d` (defined here: lrk.layers.svd has no spatial two-factor layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrk.layers.base import (
    FactorizedLayer,
    _conv_flops,
    _pair,
    _rows,
    as_ranks,
    check_rank,
    conv_like,
    dense_conv_like,
    dense_linear,
    describe,
    expect_module,
)
from lrk.layers.svd import SVDConv2d, SVDLinear
from lrk.linalg.svd import thin_svd

DECOMPOSITIONS = ("channel", "spatial")


def _split(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sign(s) sqrt|s|``, ``sqrt|s|``): the U-side and V-side scales whose product is ``s``."""
    root = s.abs().sqrt()
    sign = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
    return sign * root, root


def _check_conv(module: nn.Module, who: str) -> None:
    expect_module(module, nn.Conv2d, who)
    if module.groups != 1:
        raise ValueError(f"{who} needs groups=1, got groups={module.groups}")


def _spatial_convs(conv: nn.Conv2d, rank: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The vertical ``kh x 1`` conv C -> r (no bias) and the horizontal ``1 x kw`` conv r -> S (with ``conv``'s
    bias) of the spatial matricization: ``conv``'s stride, padding and dilation split by direction, its padding
    mode on both (zero, reflect and circular padding act per direction, so the pair is exact)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, _pair(conv.stride), _pair(conv.dilation)
    if isinstance(conv.padding, str):
        vpad: Any = conv.padding
        hpad: Any = conv.padding
    else:
        ph, pw = _pair(conv.padding)
        vpad, hpad = (ph, 0), (0, pw)
    factory = {"device": conv.weight.device, "dtype": conv.weight.dtype, "padding_mode": conv.padding_mode}
    vertical = nn.Conv2d(conv.in_channels, rank, (kh, 1), (sh, 1), vpad, (dh, 1), bias=False, **factory)
    horizontal = nn.Conv2d(
        rank, conv.out_channels, (1, kw), (1, sw), hpad, (1, dw), bias=conv.bias is not None, **factory
    )
    return vertical, horizontal


def spatial_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The ``(S kw) x (C kh)`` spatial matricization of a ``S x C x kh x kw`` kernel: ``[(s, j), (c, i)]``."""
    s, c, kh, kw = weight.shape
    return weight.permute(0, 3, 1, 2).reshape(s * kw, c * kh)


def _spatial_weight(
    vertical: torch.Tensor, horizontal: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """The dense ``S x C x kh x kw`` kernel of a vertical (r, C, kh, 1) and a horizontal (S, r, 1, kw) factor."""
    v = vertical[..., 0]  # (r, C, kh)
    u = horizontal[:, :, 0, :]  # (S, r, kw)
    if scale is not None:
        u = u * scale[None, :, None]
    return torch.einsum("srj,rci->scij", u, v)


def _two_conv_flops(first: nn.Conv2d, second: nn.Conv2d, input_shape: Sequence[int]) -> int:
    flops, out_shape = _conv_flops(first, input_shape)
    return flops + _conv_flops(second, out_shape)[0]


def _copy_bias(target: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        target.bias.data.copy_(bias.detach())


class SpatialSVDConv2d(FactorizedLayer):
    """``Conv2d(C, S, kh x kw)`` as a vertical ``kh x 1`` conv C -> r followed by a horizontal ``1 x kw`` conv
    r -> S with the bias: the truncated SVD of the ``(S kw) x (C kh)`` spatial matricization (:func:`spatial_matrix`,
    Jaderberg et al. 2014 scheme 2; the two-factor layer SVD training's spatial form is pruned to).

    Protocol: ``from_dense(conv, rank)`` with rank in [1, min(S kw, C kh)] (groups=1; sqrt(S') on both factors,
    Eq. 3 of accelerating_lrd_paper in this matricization); ``factors()`` is ``{"w0", "w1"}`` (vertical,
    horizontal); ``fold()`` gives the dense ``nn.Conv2d`` (no partial merge).
    """

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.ranks = (rank,)
        self.w0, self.w1 = _spatial_convs(conv, rank)

    @classmethod
    def from_dense(cls, module: nn.Module, ranks: int | Sequence[int]) -> SpatialSVDConv2d:
        _check_conv(module, cls.__name__)
        (rank,) = as_ranks(ranks, 1, cls.__name__)
        matrix = spatial_matrix(module.weight.detach())
        check_rank(rank, 1, min(matrix.shape), f"{cls.__name__}.from_dense({describe(module)})")
        u, s, vh = thin_svd(matrix.double())
        layer = cls(module, rank)
        left, right = _split(s[:rank])
        layer.set_factors(u[:, :rank] * left, right[:, None] * vh[:rank])
        _copy_bias(layer.w1, module.bias)
        return layer

    def set_factors(self, first: torch.Tensor, second: torch.Tensor) -> None:
        """Load ``first`` ((S kw) x r, the horizontal factor) and ``second`` (r x (C kh), the vertical one)."""
        out, r, _, kw = self.w1.weight.shape
        _, c, kh, _ = self.w0.weight.shape
        with torch.no_grad():
            self.w1.weight.copy_(first.reshape(out, kw, r).permute(0, 2, 1)[:, :, None, :])
            self.w0.weight.copy_(second.reshape(r, c, kh)[..., None])

    def flops(self, input_shape: Sequence[int]) -> int:
        """2 B r (H' W_in C kh + H' W' S kw) for the vertical conv's output H' x W_in and the final H' x W'."""
        return _two_conv_flops(self.w0, self.w1, input_shape)

    def dense_weight(self) -> torch.Tensor:
        return _spatial_weight(self.w0.weight, self.w1.weight, None)

    def dense_bias(self) -> torch.Tensor | None:
        return self.w1.bias

    def factors(self) -> dict[str, nn.Parameter]:
        return {"w0": self.w0.weight, "w1": self.w1.weight}

    def dense_module(self) -> nn.Conv2d:
        return _dense_of_spatial(self, self.dense_weight(), self.dense_bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(self.w0(x))


def _dense_of_spatial(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """The dense conv of a vertical/horizontal pair: stride, padding and dilation put back together."""
    v, h = layer.w0, layer.w1
    padding: Any = v.padding if isinstance(v.padding, str) else (v.padding[0], h.padding[1])
    geometry = nn.Conv2d(
        v.in_channels,
        h.out_channels,
        tuple(weight.shape[2:]),
        stride=(v.stride[0], h.stride[1]),
        padding=padding,
        dilation=(v.dilation[0], h.dilation[1]),
        padding_mode=v.padding_mode,
        device="meta",
    )
    return dense_conv_like(geometry, weight, bias)


class _SVDTrainBase(FactorizedLayer):
    """Shared parts of the trainable SVD-form layers: ``w0`` holds V^T, ``s`` the singular values, ``w1`` U (and
    the bias); ``forward(x) = w1(s * w0(x))``."""

    w0: nn.Module
    w1: nn.Module
    s: nn.Parameter

    def svd_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """(U: m x r, s: r, V: n x r), views of the parameters (gradients flow through them)."""
        raise NotImplementedError

    def factors(self) -> dict[str, nn.Parameter]:
        return {"w0": self.w0.weight, "s": self.s, "w1": self.w1.weight}

    def dense_bias(self) -> torch.Tensor | None:
        return self.w1.bias

    def order(self) -> torch.Tensor:
        """Indices of the singular values by decreasing |s_i| (the order pruning keeps them in)."""
        return torch.argsort(self.s.detach().abs(), descending=True, stable=True)

    def spectrum(self) -> torch.Tensor:
        """|s| sorted in decreasing order (what the energy rule of pruning reads)."""
        return self.s.detach().abs()[self.order()]

    def kept(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_K, s_K, V_K) of the ``rank`` largest |s_i|, detached."""
        check_rank(rank, 1, self.ranks[0], f"{type(self).__name__}.prune")
        idx = self.order()[:rank]
        u, s, v = (t.detach() for t in self.svd_factors())
        return u[:, idx], s[idx], v[:, idx]

    def prune(self, rank: int) -> FactorizedLayer:  # pragma: no cover - abstract
        """The two-factor layer keeping the ``rank`` largest |s_i|."""
        raise NotImplementedError

    def fold(self, keep: str | None = None) -> nn.Module:
        """``keep=None``: the dense module; ``keep="svd"``: the two-factor layer at the current rank
        (:meth:`prune` at ``self.ranks``, ``s`` split as sqrt onto both factors)."""
        if keep == "svd":
            with torch.no_grad():
                return self.prune(self.ranks[0]).train(self.training)
        if keep is not None:
            raise ValueError(
                f"{type(self).__name__}.fold(keep={keep!r}) is invalid: it must be None (the dense module) or "
                "'svd' (the two-factor layer)"
            )
        return super().fold()


class SVDTrainLinear(_SVDTrainBase):
    """``Linear(in, out)`` as ``U diag(s) V^T``: ``w0 = Linear(in, r, bias=False)`` holds V^T, ``s`` (r,) the
    singular values, ``w1 = Linear(r, out)`` holds U and the dense bias.

    Protocol: ``from_dense(linear, rank=None)`` (None = full rank min(in, out); the thin SVD of the weight, so the
    layer equals the dense one at full rank); ``factors()`` is ``{"w0", "s", "w1"}``; ``fold()`` the dense
    ``nn.Linear``, ``fold("svd")`` the :class:`SVDLinear` at the current rank; ``prune(r)`` the :class:`SVDLinear`
    of the r largest |s_i|.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory: Any
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.ranks = in_features, out_features, (rank,)
        self.w0 = nn.Linear(in_features, rank, bias=False, **factory)
        self.s = nn.Parameter(torch.ones(rank, **factory))
        self.w1 = nn.Linear(rank, out_features, bias=bias, **factory)

    @classmethod
    def from_dense(cls, module: nn.Module, ranks: int | Sequence[int] | None = None) -> SVDTrainLinear:
        expect_module(module, nn.Linear, cls.__name__)
        limit = min(module.in_features, module.out_features)
        (rank,) = as_ranks(limit if ranks is None else ranks, 1, cls.__name__)
        check_rank(rank, 1, limit, f"{cls.__name__}.from_dense({describe(module)})")
        w = module.weight
        layer = cls(
            module.in_features,
            module.out_features,
            rank,
            module.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        u, s, vh = thin_svd(w.detach().double())
        with torch.no_grad():
            layer.w1.weight.copy_(u[:, :rank])
            layer.s.copy_(s[:rank])
            layer.w0.weight.copy_(vh[:rank])
        _copy_bias(layer.w1, module.bias)
        return layer

    def svd_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1.weight, self.s, self.w0.weight.T

    def dense_weight(self) -> torch.Tensor:
        return (self.w1.weight * self.s) @ self.w0.weight

    def dense_module(self) -> nn.Linear:
        return dense_linear(self.dense_weight(), self.dense_bias())

    def flops(self, input_shape: Sequence[int]) -> int:
        """2 N r (in + out) for N rows (the scaling by s and the bias not counted)."""
        return (
            2
            * _rows(input_shape, self.in_features, type(self).__name__)
            * self.ranks[0]
            * (self.in_features + self.out_features)
        )

    def prune(self, rank: int) -> SVDLinear:
        u, s, v = self.kept(rank)
        left, right = _split(s.double())
        out = SVDLinear(
            self.in_features,
            self.out_features,
            rank,
            self.w1.bias is not None,
            device=u.device,
            dtype=u.dtype,
        )
        with torch.no_grad():
            out.w1.weight.copy_(u.double() * left)
            out.w0.weight.copy_(right[:, None] * v.double().T)
        _copy_bias(out.w1, self.w1.bias)
        return out.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(self.w0(x) * self.s)


class SVDTrainConv2d(_SVDTrainBase):
    """``Conv2d(C, S, k)`` as ``U diag(s) V^T`` of its ``channel`` or ``spatial`` matricization (module docstring).

    ``channel``: ``w0`` a ``kh x kw`` conv C -> r (V^T), ``w1`` a 1x1 conv r -> S (U, bias); rank <= min(S, C kh kw).
    ``spatial``: ``w0`` a ``kh x 1`` conv C -> r (V^T), ``w1`` a ``1 x kw`` conv r -> S (U, bias);
    rank <= min(S kw, C kh).

    Protocol: ``from_dense(conv, rank=None, decomposition="channel")`` (None = full rank; the thin SVD, so the layer
    equals the dense one at full rank); ``factors()`` is ``{"w0", "s", "w1"}``; ``fold()`` the dense ``nn.Conv2d``,
    ``fold("svd")`` the two-factor layer (:class:`SVDConv2d` / :class:`SpatialSVDConv2d`) at the current rank;
    ``prune(r)`` the two-factor layer of the r largest |s_i|.
    """

    def __init__(self, conv: nn.Conv2d, rank: int, decomposition: str = "channel") -> None:
        super().__init__()
        if decomposition not in DECOMPOSITIONS:
            raise ValueError(
                f"{type(self).__name__}: decomposition={decomposition!r} is invalid: it must be one of "
                f"{list(DECOMPOSITIONS)}"
            )
        self.ranks, self.decomposition = (rank,), decomposition
        w = conv.weight
        factory = {"device": w.device, "dtype": w.dtype}
        if decomposition == "channel":
            self.w0 = conv_like(conv, conv.in_channels, rank)
            self.w1 = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)
        else:
            self.w0, self.w1 = _spatial_convs(conv, rank)
        self.s = nn.Parameter(torch.ones(rank, **factory))

    @staticmethod
    def matrix(weight: torch.Tensor, decomposition: str) -> torch.Tensor:
        """The matricized kernel: ``S x (C kh kw)`` (channel) or ``(S kw) x (C kh)`` (spatial)."""
        return weight.reshape(weight.shape[0], -1) if decomposition == "channel" else spatial_matrix(weight)

    @classmethod
    def from_dense(
        cls, module: nn.Module, ranks: int | Sequence[int] | None = None, decomposition: str = "channel"
    ) -> SVDTrainConv2d:
        _check_conv(module, cls.__name__)
        if decomposition not in DECOMPOSITIONS:
            raise ValueError(
                f"{cls.__name__}: decomposition={decomposition!r} is invalid: it must be one of {list(DECOMPOSITIONS)}"
            )
        matrix = cls.matrix(module.weight.detach(), decomposition)
        limit = min(matrix.shape)
        (rank,) = as_ranks(limit if ranks is None else ranks, 1, cls.__name__)
        check_rank(rank, 1, limit, f"{cls.__name__}.from_dense({describe(module)}, {decomposition})")
        layer = cls(module, rank, decomposition)
        u, s, vh = thin_svd(matrix.double())
        layer.set_factors(u[:, :rank], s[:rank], vh[:rank])
        _copy_bias(layer.w1, module.bias)
        return layer

    def set_factors(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """Load U (m x r), s (r,) and V^T (r x n) of the matricized kernel."""
        r = self.ranks[0]
        with torch.no_grad():
            self.s.copy_(s)
            if self.decomposition == "channel":
                self.w1.weight.copy_(u.reshape(self.w1.weight.shape))
                self.w0.weight.copy_(vh.reshape(self.w0.weight.shape))
            else:
                out, _, _, kw = self.w1.weight.shape
                _, c, kh, _ = self.w0.weight.shape
                self.w1.weight.copy_(u.reshape(out, kw, r).permute(0, 2, 1)[:, :, None, :])
                self.w0.weight.copy_(vh.reshape(r, c, kh)[..., None])

    def svd_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.ranks[0]
        if self.decomposition == "channel":
            return self.w1.weight.reshape(-1, r), self.s, self.w0.weight.reshape(r, -1).T
        u = self.w1.weight[:, :, 0, :].permute(0, 2, 1).reshape(-1, r)  # rows (s, j)
        return u, self.s, self.w0.weight[..., 0].reshape(r, -1).T  # V rows (c, i)

    def dense_weight(self) -> torch.Tensor:
        if self.decomposition == "spatial":
            return _spatial_weight(self.w0.weight, self.w1.weight, self.s)
        w0 = self.w0.weight
        u = self.w1.weight.flatten(1) * self.s
        return (u @ w0.flatten(1)).reshape(u.shape[0], *w0.shape[1:])

    def dense_module(self) -> nn.Conv2d:
        if self.decomposition == "spatial":
            return _dense_of_spatial(self, self.dense_weight(), self.dense_bias())
        return dense_conv_like(self.w0, self.dense_weight(), self.dense_bias())

    def flops(self, input_shape: Sequence[int]) -> int:
        """FLOPs of the two convolutions (the scaling by s and the bias not counted)."""
        return _two_conv_flops(self.w0, self.w1, input_shape)

    def prune(self, rank: int) -> SVDConv2d | SpatialSVDConv2d:
        u, s, v = self.kept(rank)
        left, right = _split(s.double())
        first, second = u.double() * left, right[:, None] * v.double().T
        dense = self.dense_module()  # geometry (and bias) of the layer this one stands for
        if self.decomposition == "spatial":
            out: SVDConv2d | SpatialSVDConv2d = SpatialSVDConv2d(dense, rank)
            out.set_factors(first, second)
        else:
            out = SVDConv2d(dense, rank)
            with torch.no_grad():
                out.w1.weight.copy_(first.reshape(out.w1.weight.shape))
                out.w0.weight.copy_(second.reshape(out.w0.weight.shape))
        _copy_bias(out.w1, self.w1.bias)
        return out.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(self.w0(x) * self.s[:, None, None])

    def extra_repr(self) -> str:
        return f"ranks={tuple(self.ranks)}, decomposition={self.decomposition!r}"
