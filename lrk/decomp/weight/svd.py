"""``decomp=svd``: a Linear (or a convolution, matricized) becomes two layers (accelerating_lrd_paper Eqs. 1-3).

``W = U S V^T ~= W_a W_b`` with ``W_a = U' sqrt(S')`` and ``W_b = sqrt(S') V'^T`` (Eq. 3): the input first
meets ``W_b`` (in -> r), then ``W_a`` (r -> out, with the bias). A ``k x k`` convolution is matricized as
``S x (C k k)``: the first layer is a ``k x k`` conv C -> r (keeping stride, padding, dilation), the second
a 1x1 conv r -> S; for a 1x1 conv this is exactly the paper's "FC and 1x1 conv" case (Fig. 1a).

Default targets: every Linear except the classifier head, and every Conv2d (groups=1) except the stem
(the first Conv2d of the model).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lrk.decomp.base import register_method
from lrk.decomp.rank.policy import RankProblem, Ranks
from lrk.decomp.weight.base import WeightMethod
from lrk.layers.base import FactorizedLayer, describe
from lrk.layers.svd import SVDConv2d, SVDLinear
from lrk.linalg.svd import svd_params, thin_svd


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
        description=describe(module),
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
class SVDMethod(WeightMethod):
    """Truncated SVD of Linear layers and (matricized) Conv2d kernels, Eqs. 1-3."""

    supported = "Linear and Conv2d with groups=1 (a k x k kernel is matricized as out x (in k k))"
    factor_roles: ClassVar[tuple[str, ...]] = ("first", "last")  # w0, w1 (lrk.decomp.freeze)
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"energy": 1.0},
        "lossy": {"rank": 1},
        "invalid": [
            {"rank": 2, "ratio": 0.5},
            {"rank": 10_000},
            {"rank": 2, "targets": ["no_such_layer.*"]},
            {"ratio": 0.5, "rank_multiple": 0},
        ],
    }

    def support_error(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        return conv_support_error(module)

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        return svd_problem(name, module)

    def build_layer(
        self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem
    ) -> FactorizedLayer:
        return build_svd(module, ranks[0], problem.notes.get("usv"))
