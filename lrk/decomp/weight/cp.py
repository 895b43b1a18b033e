"""``decomp=cp``: CP-decomposed convolutions and tensorized Linear layers (tensor_methods_lecture, "CPD as a
depthwise convolution"; CP-ALS, lecture Algorithm 1).

The layers it builds, and how they compute, are documented in :mod:`lrk.layers.cp`; this module is
the method: targets, ranks, validation.

Ranks: ``rank`` = R; ``ratio`` = the R whose R (sum of mode sizes) (+ bias) is nearest to the target;
``energy`` = the largest of the per-mode energy ranks (every unfolding of a rank-R CP tensor has rank
<= R, so this is the smallest R that could keep phi of each unfolding's energy: a lower bound, not a
guarantee). The valid range of ``rank`` is [1, prod(dims) / max(dims)], the generic upper bound of the
CP rank (CP rank may exceed min(dims)).

Default targets: every k x k Conv2d (k > 1, groups=1) except the stem, and every Linear except the head.
ALS runs at most ``n_iter_max`` sweeps (25) from an SVD initialisation.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_int, is_number
from lrk.decomp.base import register_method
from lrk.decomp.rank.policy import RankProblem, Ranks
from lrk.decomp.weight.base import WeightMethod
from lrk.decomp.weight.svd import conv_support_error
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer, describe
from lrk.layers.cp import CPConv2d, CPLinear
from lrk.linalg.cp import cp_params, cp_rank_bound
from lrk.linalg.tt import balanced_factors
from lrk.linalg.tucker import mode_singular_values


def _check_factors(name: str, value: Any, size: int, key: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v >= 1 for v in value)):
        raise LrkConfigError(
            f"decomp.{key}={value!r} is invalid: it must be a list of positive integers or null"
        )
    if math.prod(value) != size:
        raise LrkConfigError(
            f"decomp.{key}={list(value)} is invalid for layer '{name}': the factors must multiply to {size}"
        )
    return tuple(value)


def cp_problem(name: str, module: nn.Module, dims: tuple[int, ...], tensor: torch.Tensor) -> RankProblem:
    bias_n = module.bias.numel() if module.bias is not None else 0
    bound = cp_rank_bound(dims)
    return RankProblem(
        layer=name,
        description=describe(module),
        limits=(bound,),
        scalar_limit=bound,
        from_scalar=lambda r: (r,),
        params=lambda ranks: cp_params(dims, ranks[0]) + bias_n,
        dense_params=module.weight.numel() + bias_n,
        spectra=lambda: [mode_singular_values(tensor, m) for m in range(tensor.ndim)],
        from_energy=lambda ranks: (max(ranks),),
        notes={"kind": "cp" if isinstance(module, nn.Conv2d) else "cp_linear", "dims": dims},
    )


@register_method("cp")
class CPMethod(WeightMethod):
    """CP by ALS: k x k convolutions -> pointwise, depthwise, pointwise; Linear -> CP of the tensorized weight."""

    supported = "Conv2d with groups=1 (3-way CP: pointwise, depthwise, pointwise) and Linear (CP of the tensorized weight)"
    extra_keys: ClassVar[dict[str, Any]] = {
        "n_iter_max": 25,
        "tol": 1e-5,
        "linear_modes": 2,
        "out_factors": None,
        "in_factors": None,
    }
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": None,
        "exact_reason": (
            "no setting reproduces a k x k kernel (a 3-way S x C x k^2 tensor) or a tensorized Linear: the CP rank "
            "of a generic tensor exceeds every mode size and ALS only converges locally (rank=energy=1.0 keeps the "
            "largest mode rank, not the CP rank)"
        ),
        "lossy": {"rank": 1, "n_iter_max": 5},
        "invalid": [{"rank": 10**9}, {"rank": 2, "n_iter_max": 0}, {"rank": 2, "linear_modes": 0}],
    }

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        n_iter, tol, modes = self.cfg["n_iter_max"], self.cfg["tol"], self.cfg["linear_modes"]
        if not (is_int(n_iter) and n_iter >= 1):
            raise LrkConfigError(
                f"decomp.n_iter_max={n_iter!r} is invalid: it must be an integer >= 1 (ALS sweeps)"
            )
        if not (is_number(tol) and tol >= 0):
            raise LrkConfigError(f"decomp.tol={tol!r} is invalid: it must be a number >= 0")
        if not (is_int(modes) and modes >= 1):
            raise LrkConfigError(f"decomp.linear_modes={modes!r} is invalid: it must be an integer >= 1")
        self.n_iter_max, self.tol, self.linear_modes = n_iter, float(tol), modes

    def support_error(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        return conv_support_error(module)

    def is_default_target(self, name: str, module: nn.Module, facts: dict[str, Any]) -> bool:
        if name in facts["heads"] or name in facts["stems"]:
            return False
        return isinstance(module, nn.Linear) or module.kernel_size != (1, 1)

    def _linear_shapes(self, name: str, linear: nn.Linear) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_shape = _check_factors(name, self.cfg["out_factors"], linear.out_features, "out_factors")
        in_shape = _check_factors(name, self.cfg["in_factors"], linear.in_features, "in_factors")
        out_shape = out_shape or balanced_factors(linear.out_features, self.linear_modes)
        in_shape = in_shape or balanced_factors(linear.in_features, self.linear_modes)
        return out_shape, in_shape

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        w = module.weight.detach()
        if isinstance(module, nn.Linear):
            out_shape, in_shape = self._linear_shapes(name, module)
            tensor = w.reshape(*out_shape, *in_shape)
            problem = cp_problem(name, module, tuple(tensor.shape), tensor)
            problem.notes["shapes"] = (out_shape, in_shape)
            return problem
        tensor = w.reshape(w.shape[0], w.shape[1], -1)
        return cp_problem(name, module, tuple(tensor.shape), tensor)

    def build_layer(
        self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem
    ) -> FactorizedLayer:
        if isinstance(module, nn.Linear):
            out_shape, in_shape = problem.notes["shapes"]
            return CPLinear.from_linear(module, ranks[0], out_shape, in_shape, self.n_iter_max, self.tol)
        return CPConv2d.from_conv(module, ranks[0], self.n_iter_max, self.tol)
