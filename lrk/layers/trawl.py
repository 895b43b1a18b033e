"""``decomp=trawl``: the TRAWL baseline (Luo et al. 2024, cited as [51] by seeds/sdrm_paper.txt section 5.1):
stack same-shaped weights of different layers into one higher-order tensor and decompose it with
Tucker or CP, so that the layers share factors.

Groups: the target layers are grouped by type and weight shape, e.g. the twelve ``blocks.*.attn.qkv`` of a
ViT form a 12 x 1152 x 384 tensor, the ``blocks.*.mlp.fc1`` another; ResNet's same-shaped 3x3 kernels
(e.g. the four 64x64x3x3 of layer1) a 4 x 64 x 64 x 3 x 3 one. A group of one layer is decomposed alone.

``decomposition: tucker`` (default): Tucker along the channel modes (HOSVD + HOOI, TensorLy
``partial_tucker``): every layer of the group shares ``U_out`` (S x R2) and ``U_in`` (C x R1) and keeps
its own core (R2 x R1 x kh x kw); with ``layer_rank: K < L`` the layer mode is decomposed too, and each
layer's core is a mix (K coefficients) of K shared cores. ``decomposition: cp``: a CP of the stack;
the layers share the output, input (and spatial) factors and keep a vector of R scales each:
``W_l = A diag(lambda * L[l]) B^T``.

Ranks are chosen per group with the shared policy: ``rank`` (R1 = R2 = rank, or the CP rank), ``ratio``
(of the group's dense parameters), ``energy`` (per channel-mode unfolding of the stack; for CP the
largest of the per-mode energy ranks). Shared parameters are ``nn.Parameter`` objects held by one
:class:`TrawlShared` module that every layer of the group registers, so ``model.parameters()`` counts them
once and fine-tuning updates them for all layers. In the report each layer is charged its own
parameters plus 1/L of the group's shared ones.

Default targets: every Linear except the classifier head and every Conv2d (groups=1) except the stem.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lrk.layers.base import (
    FactorizedLayer,
    Ranks,
)

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

    def dense_weight(self) -> torch.Tensor:
        s = self.shared
        if s.kind == "tucker":
            return torch.einsum("sa,abhw,cb->schw", s.out_factor, self.layer_core(), s.in_factor)
        spatial = s.spatial if s.spatial is not None else torch.ones_like(self.coef)[:, None, None]
        return torch.einsum("sr,r,cr,rhw->schw", s.out_factor, self.coef, s.in_factor, spatial)


class TrawlLinear(_TrawlLayer):
    def dense_weight(self) -> torch.Tensor:
        return super().dense_weight()[:, :, 0, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        t = x @ s.in_factor
        t = t @ self.layer_core()[:, :, 0, 0].T if s.kind == "tucker" else t * self.coef
        return F.linear(t, s.out_factor, self.bias)


class TrawlConv2d(_TrawlLayer):
    def __init__(self, conv: nn.Conv2d, shared: TrawlShared, ranks: Ranks, core, coef) -> None:
        super().__init__(shared, ranks, core, coef, conv.bias)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        t = F.conv2d(x, s.in_factor.T[:, :, None, None])
        if s.kind == "tucker":
            t = F.conv2d(
                t, self.layer_core(), stride=self.stride, padding=self.padding, dilation=self.dilation
            )
        else:
            weight = (s.spatial * self.coef[:, None, None])[:, None]
            t = F.conv2d(
                t, weight, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=t.shape[1]
            )
        return F.conv2d(t, s.out_factor[:, :, None, None], self.bias)
