"""``decomp=tt``: Linear layers (and 1x1 convolutions) as Tensor-Train matrices (tensor_methods_lecture
"Tensor Train"; TT-SVD by TensorLy ``tensor_train_matrix``).

The layers it builds, and how they compute, are documented in :mod:`lrk.layers.tt`; this module is
the method: targets, ranks, validation.

Ranks: ``rank=r`` sets every bond to r, capped at each bond's maximum (valid range [1, largest bond
maximum]); ``ratio`` takes the uniform r whose parameter count is nearest to the target; ``energy``
applies the energy rule to each TT unfolding (TT-SVD's error is bounded by the sum of the discarded
energies). ``k x k`` convolutions (k > 1) are not supported.

Default targets: every Linear except the classifier head, and every 1x1 Conv2d (stride any, padding 0).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from lrk.checks import is_int
from lrk.decomp.base import register_method
from lrk.decomp.rank.policy import RankProblem, Ranks
from lrk.decomp.weight.base import WeightMethod
from lrk.decomp.weight.cp import _check_factors
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer, describe
from lrk.layers.tt import TTConv1x1, TTLinear
from lrk.linalg.tt import (
    balanced_factors,
    tt_bond_spectra,
    tt_max_ranks,
    tt_params,
)


@register_method("tt")
class TTMethod(WeightMethod):
    """TT-matrix factorization of Linear layers and 1x1 convolutions."""

    supported = "Linear and 1x1 Conv2d (groups=1, padding=0); k x k convolutions are not supported"
    extra_keys: ClassVar[dict[str, Any]] = {"cores": 3, "out_factors": None, "in_factors": None}
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"energy": 1.0},
        "lossy": {"rank": 1},
        "invalid": [{"rank": 2, "cores": 1}, {"rank": 10_000}, {"rank": 2, "out_factors": [5, 5]}],
    }

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        cores = self.cfg["cores"]
        if not (is_int(cores) and cores >= 2):
            raise LrkConfigError(
                f"decomp.cores={cores!r} is invalid: it must be an integer >= 2 (TT cores per layer)"
            )
        self.cores = cores

    def support_error(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        if not isinstance(module, nn.Conv2d):
            return f"{type(module).__name__} is not a Linear or Conv2d"
        if module.kernel_size != (1, 1):
            return f"a {module.kernel_size[0]}x{module.kernel_size[1]} kernel is not a matrix"
        if module.groups != 1 or module.padding not in ((0, 0), "valid"):
            return "only groups=1 and padding=0 are supported"
        return None

    def is_default_target(self, name: str, module: nn.Module, facts: dict[str, Any]) -> bool:
        # TT decomposes ResNet's first convolution too (lrd_2x); a ViT's declared conv stem stays dense
        return name not in facts["heads"] and name not in facts["declared_stems"]

    def shapes(self, name: str, module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_n, in_n = module.weight.shape[0], module.weight[0].numel()
        out_shape = _check_factors(name, self.cfg["out_factors"], out_n, "out_factors")
        in_shape = _check_factors(name, self.cfg["in_factors"], in_n, "in_factors")
        if out_shape and in_shape and len(out_shape) != len(in_shape):
            raise LrkConfigError(
                f"decomp.out_factors={list(out_shape)} and decomp.in_factors={list(in_shape)} are invalid: "
                "they must have the same length (one pair per TT core)"
            )
        d = len(out_shape or in_shape or ()) or self.cores
        return out_shape or balanced_factors(out_n, d), in_shape or balanced_factors(in_n, d)

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        out_shape, in_shape = self.shapes(name, module)
        limits = tuple(tt_max_ranks(out_shape, in_shape))
        bias_n = module.bias.numel() if module.bias is not None else 0
        matrix = module.weight.detach().reshape(module.weight.shape[0], -1)
        return RankProblem(
            layer=name,
            description=f"{describe(module)} as TT {'x'.join(map(str, out_shape))} <- {'x'.join(map(str, in_shape))}",
            limits=limits,
            scalar_limit=max(limits),
            from_scalar=lambda r: tuple(min(r, m) for m in limits),
            params=lambda ranks: tt_params(out_shape, in_shape, list(ranks)) + bias_n,
            dense_params=module.weight.numel() + bias_n,
            spectra=lambda: tt_bond_spectra(matrix, out_shape, in_shape),
            notes={"kind": "tt", "shapes": (out_shape, in_shape)},
        )

    def build_layer(
        self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem
    ) -> FactorizedLayer:
        out_shape, in_shape = problem.notes["shapes"]
        if isinstance(module, nn.Linear):
            return TTLinear.from_weight(module.weight, module.bias, out_shape, in_shape, ranks)
        return TTConv1x1.from_conv(module, ranks, out_shape, in_shape)
