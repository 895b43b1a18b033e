"""The TRAWL baseline (Luo et al. 2024, cited as [51] by seeds/sdrm_paper.txt section 5.1):
stack same-shaped weights of different layers into one higher-order tensor and decompose it with
Tucker or CP, so that the layers share factors.

The layers; the method that chooses their ranks and targets is :mod:`lrk.decomp.weight.trawl`.

Groups: the target layers are grouped by type and weight shape, e.g. the twelve ``blocks.*.attn.qkv`` of a
ViT form a 12 x 1152 x 384 tensor, the ``blocks.*.mlp.fc1`` another; ResNet's same-shaped 3x3 kernels
(e.g. the four 64x64x3x3 of layer1) a 4 x 64 x 64 x 3 x 3 one. A group of one layer is decomposed alone.

``decomposition: tucker`` (default): Tucker along the channel modes (HOSVD + HOOI, TensorLy
``partial_tucker``): every layer of the group shares ``U_out`` (S x R2) and ``U_in`` (C x R1) and keeps
its own core (R2 x R1 x kh x kw); with ``layer_rank: K < L`` the layer mode is decomposed too, and each
layer's core is a mix (K coefficients) of K shared cores. ``decomposition: cp``: a CP of the stack;
the layers share the output, input (and spatial) factors and keep a vector of R scales each:
``W_l = A diag(lambda * L[l]) B^T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lrk.layers.base import (
    FactorizedLayer,
    Ranks,
    _image_shape,
    _rows,
    as_ranks,
    check_rank,
    conv2d_output_size,
    dense_conv,
    dense_linear,
    describe,
    expect_module,
)
from lrk.linalg.cp import cp_als, cp_rank_bound
from lrk.linalg.tucker import tucker2

DECOMPOSITIONS = ("tucker", "cp")


class TrawlShared(nn.Module):
    """The factors that every layer of a TRAWL group shares.

    Tucker: ``out_factor`` (S x R2), ``in_factor`` (C x R1), optionally ``core_basis`` (K x R2 x R1 x kh x kw).
    CP: ``out_factor`` (S x R), ``in_factor`` (C x R), ``spatial`` (R x kh x kw).
    """

    def __init__(
        self,
        kind: str,
        out_factor: torch.Tensor,
        in_factor: torch.Tensor,
        core_basis: torch.Tensor | None = None,
        spatial: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.out_factor = nn.Parameter(out_factor.detach().clone())
        self.in_factor = nn.Parameter(in_factor.detach().clone())
        self.core_basis = nn.Parameter(core_basis.detach().clone()) if core_basis is not None else None
        self.spatial = nn.Parameter(spatial.detach().clone()) if spatial is not None else None

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class _TrawlLayer(FactorizedLayer):
    """One layer of a group: the shared factors plus its own ``core`` (Tucker), ``coef`` (Tucker with a
    layer rank, or CP scales) and bias."""

    def __init__(
        self,
        shared: TrawlShared,
        ranks: Ranks,
        core: torch.Tensor | None,
        coef: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.ranks = tuple(ranks)
        self.shared = shared
        self.core = nn.Parameter(core.detach().clone()) if core is not None else None
        self.coef = nn.Parameter(coef.detach().clone()) if coef is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def layer_core(self) -> torch.Tensor:
        """Tucker: this layer's core (R2 x R1 x kh x kw)."""
        if self.core is not None:
            return self.core
        return torch.einsum("k,k...->...", self.coef, self.shared.core_basis)

    def spatial(self) -> torch.Tensor:
        """CP: the shared spatial factor (R x kh x kw), all ones (R x 1 x 1) for Linear and 1x1 groups."""
        s = self.shared
        return s.spatial if s.spatial is not None else torch.ones_like(self.coef)[:, None, None]

    def dense_weight(self) -> torch.Tensor:
        s = self.shared
        if s.kind == "tucker":
            return torch.einsum("sa,abhw,cb->schw", s.out_factor, self.layer_core(), s.in_factor)
        return torch.einsum("sr,r,cr,rhw->schw", s.out_factor, self.coef, s.in_factor, self.spatial())

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def factors(self) -> dict[str, nn.Parameter]:
        """The group's shared factors (``"shared.out_factor"``, ``"shared.in_factor"``, ``"shared.core_basis"``
        or ``"shared.spatial"`` where present) and this layer's ``"core"`` / ``"coef"``; not the bias."""
        named = {f"shared.{k}": p for k, p in self.shared.named_parameters()}
        own = {"core": self.core, "coef": self.coef}
        return named | {k: p for k, p in own.items() if p is not None}

    def _middle_flops(self, pixels: int, kernel: int) -> int:
        """FLOPs between the two shared factors: the core product (Tucker), forming the core from the basis
        (Tucker with a layer rank: 2 K R2 R1 kh kw, once per forward); for CP, nothing on a Linear (an
        elementwise scale) and the depthwise conv on a conv (2 pixels R kh kw)."""
        s = self.shared
        r_out, r_in = s.out_factor.shape[1], s.in_factor.shape[1]
        if s.kind == "tucker":
            basis = 0 if self.core is not None else 2 * s.core_basis.numel()
            return basis + 2 * pixels * r_out * r_in * kernel
        return 0 if isinstance(self, TrawlLinear) else 2 * pixels * r_out * kernel

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        ranks: int | Sequence[int],
        decomposition: str = "tucker",
        n_iter_max: int | None = None,
        tol: float = 1e-5,
    ) -> _TrawlLayer:
        """A group of one layer (:func:`build_group` of ``[module]``): ``ranks = (R2, R1)`` (or one int) for
        ``decomposition="tucker"``, R (or (R,)) for ``"cp"``."""
        kind = nn.Linear if cls is TrawlLinear else nn.Conv2d
        expect_module(module, kind, cls.__name__)
        return build_group([module], ranks, decomposition, n_iter_max=n_iter_max, tol=tol)[0]


class TrawlLinear(_TrawlLayer):
    """A Linear of a TRAWL group: ``x U_in`` then the core (Tucker) or the scales (CP), then ``U_out^T``."""

    def dense_weight(self) -> torch.Tensor:
        return super().dense_weight()[:, :, 0, 0]

    def flops(self, input_shape: Sequence[int]) -> int:
        """2 N (C R1 + R2 S) plus :meth:`_middle_flops` for N = prod(input_shape[:-1]) rows."""
        s = self.shared
        c_in, r_in = s.in_factor.shape
        s_out, r_out = s.out_factor.shape
        rows = _rows(input_shape, c_in, type(self).__name__)
        return 2 * rows * (c_in * r_in + r_out * s_out) + self._middle_flops(rows, 1)

    def dense_module(self) -> nn.Module:
        return dense_linear(self.dense_weight(), self.dense_bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        t = x @ s.in_factor
        t = t @ self.layer_core()[:, :, 0, 0].T if s.kind == "tucker" else t * self.coef
        return F.linear(t, s.out_factor, self.bias)


class TrawlConv2d(_TrawlLayer):
    """A Conv2d of a TRAWL group: 1x1 ``U_in^T``, the k x k core (Tucker; a depthwise conv of the scaled
    spatial factor for CP) with the dense stride/padding/dilation, then 1x1 ``U_out`` with the bias."""

    def __init__(self, conv: nn.Conv2d, shared: TrawlShared, ranks: Ranks, core, coef) -> None:
        super().__init__(shared, ranks, core, coef, conv.bias)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def flops(self, input_shape: Sequence[int]) -> int:
        """2 B (H W C R1 + H' W' R2 S) plus :meth:`_middle_flops` for the H' W' output pixels."""
        s = self.shared
        c_in, r_in = s.in_factor.shape
        s_out, r_out = s.out_factor.shape
        batch, h, w = _image_shape(input_shape, c_in, type(self).__name__)
        if s.kind == "tucker":
            kernel = (self.core if self.core is not None else s.core_basis[0]).shape[2:]
        else:
            kernel = self.spatial().shape[1:]
        oh, ow = conv2d_output_size((h, w), tuple(kernel), self.stride, self.padding, self.dilation)
        out_pixels = batch * oh * ow
        middle = self._middle_flops(out_pixels, math.prod(kernel))
        return 2 * (batch * h * w * c_in * r_in + out_pixels * r_out * s_out) + middle

    def dense_module(self) -> nn.Module:
        return dense_conv(self.dense_weight(), self.dense_bias(), self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        t = F.conv2d(x, s.in_factor.T[:, :, None, None])
        if s.kind == "tucker":
            t = F.conv2d(
                t, self.layer_core(), stride=self.stride, padding=self.padding, dilation=self.dilation
            )
        else:
            weight = (self.spatial() * self.coef[:, None, None])[:, None]
            t = F.conv2d(
                t, weight, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=t.shape[1]
            )
        return F.conv2d(t, s.out_factor[:, :, None, None], self.bias)


def build_group(
    modules: Sequence[nn.Module],
    ranks: int | Sequence[int],
    decomposition: str = "tucker",
    layer_rank: int | None = None,
    n_iter_max: int | None = None,
    tol: float = 1e-5,
) -> list[_TrawlLayer]:
    """TRAWL layers for ``modules`` (all Linear, or all Conv2d with groups=1 and padding_mode 'zeros', of one
    weight shape) sharing the factors of one decomposition of their stacked weights (module docstring).

    ``ranks``: Tucker ``(R2, R1)`` (an int for both), R2 in [1, min(S, L C kh kw)] and R1 in [1, min(C, L S
    kh kw)]; CP ``R`` in [1, prod(dims) / max(dims)] of the stack. ``layer_rank`` (Tucker, in [1, L]): K
    shared cores mixed per layer. ``n_iter_max``: HOOI sweeps (Tucker, default 0 = HOSVD) or ALS sweeps (CP,
    default 25). The same construction as ``decomp=trawl``'s groups.
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(
            f"decomposition={decomposition!r} is invalid: it must be one of {list(DECOMPOSITIONS)}"
        )
    if not modules:
        raise ValueError("build_group needs at least one module")
    first = modules[0]
    who = f"TRAWL group of {len(modules)} x {describe(first)}"
    for m in modules:
        if type(m) is not type(first) or m.weight.shape != first.weight.shape:
            raise ValueError(f"{who}: {describe(m)} does not match (one type and weight shape per group)")
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{who}: only nn.Linear and nn.Conv2d are supported")
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(f"{who}: convolutions need groups=1 and padding_mode='zeros'")
    stack = torch.stack(
        [m.weight.detach().reshape(m.weight.shape[0], m.weight.shape[1], -1) for m in modules]
    )
    n_layers, s_out, c_in, k2 = stack.shape
    kh, kw = (1, 1) if isinstance(first, nn.Linear) else first.kernel_size
    dtype = first.weight.dtype
    cores: list[torch.Tensor | None] = [None] * n_layers
    coefs: list[torch.Tensor | None] = [None] * n_layers
    if decomposition == "tucker":
        r_out, r_in = bonds = as_ranks(ranks, 2, who)
        check_rank(r_out, 1, min(s_out, n_layers * c_in * k2), who, "R2 (output rank)")
        check_rank(r_in, 1, min(c_in, n_layers * s_out * k2), who, "R1 (input rank)")
        if layer_rank is not None:
            check_rank(layer_rank, 1, n_layers, who, "layer_rank")
        core, u_out, u_in = tucker2(stack, bonds, n_iter_max=n_iter_max or 0, tol=tol, modes=(1, 2))
        core = core.reshape(n_layers, r_out, r_in, kh, kw)
        basis = None
        if layer_rank is None or layer_rank == n_layers:
            cores = list(core.to(dtype))
        else:  # Tucker of the layer mode of the core: core_l = sum_k U_L[l, k] basis_k
            layer_core, layer_factor, _ = tucker2(
                core.reshape(n_layers, -1, 1), (layer_rank, 1), n_iter_max=0, modes=(0, 2)
            )
            basis = layer_core.reshape(layer_rank, r_out, r_in, kh, kw).to(dtype)
            coefs = list(layer_factor.to(dtype))
        shared = TrawlShared("tucker", u_out.to(dtype), u_in.to(dtype), core_basis=basis)
    else:
        if layer_rank is not None:
            raise ValueError(f"{who}: layer_rank is for decomposition='tucker' only")
        cp_stack = stack if k2 > 1 else stack[..., 0]
        (rank,) = bonds = as_ranks(ranks, 1, who)
        check_rank(rank, 1, cp_rank_bound(tuple(cp_stack.shape)), who)
        result = cp_als(cp_stack, rank, n_iter_max=25 if n_iter_max is None else n_iter_max, tol=tol)
        factors = result.factors
        scales = factors[0] * result.weights  # (L, R)
        spatial = factors[3].T.reshape(-1, kh, kw).to(dtype) if cp_stack.ndim == 4 else None
        shared = TrawlShared("cp", factors[1].to(dtype), factors[2].to(dtype), spatial=spatial)
        coefs = list(scales.to(dtype))
    shared = shared.to(first.weight.device)
    out: list[_TrawlLayer] = []
    for m, core_l, coef_l in zip(modules, cores, coefs, strict=True):
        if isinstance(m, nn.Linear):
            out.append(TrawlLinear(shared, bonds, core_l, coef_l, m.bias))
        else:
            out.append(TrawlConv2d(m, shared, bonds, core_l, coef_l))
    return [layer.to(first.weight.device) for layer in out]
