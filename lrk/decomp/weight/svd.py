"""``decomp=svd``: a Linear (or a convolution, matricized) becomes two layers (accelerating_lrd_paper Eqs. 1-3).

``W = U S V^T ~= W_a W_b`` with ``W_a = U' sqrt(S')`` and ``W_b = sqrt(S') V'^T`` (Eq. 3): the input first
meets ``W_b`` (in -> r), then ``W_a`` (r -> out, with the bias). A ``k x k`` convolution is matricized as
``S x (C k k)``: the first layer is a ``k x k`` conv C -> r (keeping stride, padding, dilation), the second
a 1x1 conv r -> S; for a 1x1 conv this is exactly the paper's "FC and 1x1 conv" case (Fig. 1a).

Default targets: every Linear except the classifier head, and every Conv2d (groups=1) except the stem
(the first Conv2d of the model).

``weighting`` (data-aware SVD, lrk.linalg.weighted_svd; statistics from the calibration batches,
lrk.decomp.weight.calibration): ``none`` (default: the plain SVD above); ``activation``: SVD-LLM's truncation-aware
whitening (Wang et al. 2024), the SVD of ``W S`` with ``S S^T`` the second moment of the layer's inputs (a conv's
unfolded patches), so the truncation minimises the output error ``||(W - W') X||_F`` on the calibration data;
``asvd``: ASVD (Yuan et al. 2023), columns scaled by ``mean|x_j|^asvd_alpha``; ``fisher``: FWSVD (Hsu et al.
2022), rows weighted by ``sqrt`` of their summed squared per-image gradients of the cross-entropy (on the
calibration labels, or the model's own predictions when the batches carry none). The whitening needs no Cholesky
(which fails on rank-deficient activations) and no inverse: ``W' = U_r U_r^T W`` from the eigenvectors of
``W C W^T`` (lrk.linalg.weighted_svd). ``weighting_eps`` is the whitening's tie-break ridge (relative to the mean
eigenvalue of ``C``: where the data spans fewer directions than the rank, the rest is kept as a plain SVD keeps it)
and the relative floor of ASVD's scales and the Fisher importances (a dead input channel or a row without
gradient keeps an invertible weight). The rank policy is unchanged, but
``energy`` counts the energy of the *weighted* spectrum (the singular values of the weighted matrix); the report
rows gain ``weighting`` and ``weighted_rel_error`` (the relative error in the weighted space, for ``activation``
the relative output error on the calibration data), while ``rel_error`` stays the error of the weight itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_number
from lrk.decomp.base import register_method
from lrk.decomp.rank.policy import RankProblem, Ranks
from lrk.decomp.weight.base import WeightMethod
from lrk.decomp.weight.calibration import statistics_for
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer, describe
from lrk.layers.svd import SVDConv2d, SVDLinear
from lrk.linalg.svd import eckart_young_error, svd_params, thin_svd
from lrk.linalg.weighted_svd import DEFAULT_EPS, Weighting, Whitening, column_scale, row_weight

log = logging.getLogger(__name__)

#: values of ``decomp.weighting`` and what each means (error messages)
WEIGHTINGS = {
    "none": "plain SVD of the weight",
    "activation": "SVD-LLM whitening by the input second moment",
    "asvd": "ASVD column scaling by mean |input|^asvd_alpha",
    "fisher": "FWSVD row weighting by squared gradients",
}
#: the data-aware SVD keys (module docstring)
WEIGHTING_KEYS: dict[str, Any] = {"weighting": "none", "asvd_alpha": 0.5, "weighting_eps": DEFAULT_EPS}


def conv_support_error(module: nn.Module) -> str | None:
    """Shared by the conv methods: only plain Conv2d with groups=1."""
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a Linear or Conv2d"
    if module.groups != 1:
        return f"grouped convolutions (groups={module.groups}) are not supported, only groups=1"
    return None


def svd_problem(
    name: str, module: nn.Module, kind: str = "svd", weighting: Callable[[], Weighting] | None = None
) -> RankProblem:
    """Rank problem of the SVD of a Linear or matricized Conv2d weight (spectrum computed once, lazily).

    ``weighting``: returns the data-aware weighting of the layer (lrk.linalg.weighted_svd: ``Weighting`` or
    ``Whitening``; called lazily, when the spectrum is first needed); the spectrum is then the weighted one
    (``notes["spectrum"]``) and ``notes["usv"]`` the factors that build the weighted-optimal layer."""
    w = module.weight.detach()
    matrix = w.reshape(w.shape[0], -1)
    out_f, in_f = matrix.shape
    bias = module.bias is not None
    limit = min(out_f, in_f)
    notes: dict[str, Any] = {"kind": kind}

    def spectra() -> list[torch.Tensor]:
        if "usv" not in notes:  # one thin SVD serves the energy rule and the factors
            if weighting is None:
                notes["usv"] = thin_svd(matrix.double())
                notes["spectrum"] = notes["usv"][1]
            else:
                notes["usv"], notes["spectrum"] = weighting().decompose(matrix)
        return [notes["spectrum"]]

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
    """Truncated SVD of Linear layers and (matricized) Conv2d kernels, Eqs. 1-3; data-aware with ``weighting``."""

    supported = "Linear and Conv2d with groups=1 (a k x k kernel is matricized as out x (in k k))"
    factor_roles: ClassVar[tuple[str, ...]] = ("first", "last")  # w0, w1 (lrk.decomp.freeze)
    extra_keys: ClassVar[dict[str, Any]] = dict(WEIGHTING_KEYS)
    #: the ``weighting`` values this method supports (TuckerMethod: only none)
    weightings: ClassVar[tuple[str, ...]] = tuple(WEIGHTINGS)
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"energy": 1.0},
        "lossy": {"rank": 1},
        "invalid": [
            {"rank": 2, "ratio": 0.5},
            {"rank": 10_000},
            {"rank": 2, "targets": ["no_such_layer.*"]},
            {"ratio": 0.5, "rank_multiple": 0},
            {"rank": 2, "weighting": "whiten"},
            {"rank": 2, "weighting": "asvd", "asvd_alpha": "half"},
            {"rank": 2, "weighting": "activation", "calibration_batches": 0},
            {"rank": 2, "weighting": "fisher", "weighting_eps": 0},
        ],
    }

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.weighting, self.asvd_alpha, self.weighting_eps = self._weighting_keys()
        self._weightings: dict[str, Weighting | Whitening] = {}

    def _weighting_keys(self) -> tuple[str, float, float]:
        """``weighting`` (one of :attr:`weightings`), ``asvd_alpha`` (>= 0), ``weighting_eps`` (in (0, 1)); a
        data-aware weighting with ``calibration_batches=0`` is refused here, before anything trains."""
        weighting, alpha, eps = (self.cfg[k] for k in WEIGHTING_KEYS)
        if weighting not in self.weightings:
            valid = ", ".join(f"{k} ({WEIGHTINGS[k]})" for k in self.weightings)
            also = (
                ""
                if self.weightings == tuple(WEIGHTINGS)
                else "; decomp=svd supports " + ", ".join(WEIGHTINGS)
            )
            raise LrkConfigError(
                f"decomp.weighting={weighting!r} is invalid for decomp={self.name}: it must be one of {valid}{also}"
            )
        if not (is_number(alpha) and alpha >= 0):
            raise LrkConfigError(
                f"decomp.asvd_alpha={alpha!r} is invalid: it must be a number >= 0 (ASVD's exponent of mean "
                "|input|, default 0.5; 0 = plain SVD)"
            )
        if not (is_number(eps) and 0 < eps < 1):
            raise LrkConfigError(
                f"decomp.weighting_eps={eps!r} is invalid: it must be a number in (0, 1) (the whitening's ridge "
                f"relative to the mean eigenvalue; the floor relative to the largest ASVD scale / Fisher importance, default {DEFAULT_EPS:g})"
            )
        if weighting != "none" and self.cfg["calibration_batches"] == 0:
            raise LrkConfigError(
                f"decomp.weighting={weighting} needs calibration batches, but decomp.calibration_batches=0 gives "
                "none: set it >= 1 (or null = 4), or decomp.weighting=none"
            )
        return weighting, float(alpha), float(eps)

    @property
    def needs_labels(self) -> bool:
        """Whether the calibration batches should carry labels, ``(images, labels)`` pairs: ``fisher`` uses them
        for FWSVD's empirical Fisher (without them, the model's own predictions serve as pseudo-labels)."""
        return self.weighting == "fisher"

    def check_batches(self, batches: list[Any]) -> None:
        if self.weighting != "none" and not batches:
            raise LrkConfigError(
                f"decomp.weighting={self.weighting} needs calibration batches, got none: set "
                "decomp.calibration_batches >= 1 (or null = 4), or decomp.weighting=none"
            )

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, nn.Module]], batches: list[Any]
    ) -> dict[str, Any]:
        """The base checks first (explicit ranks, merge, rank search), then the calibration statistics of the
        SVD-factorized targets (lrk.decomp.weight.calibration) and their weightings."""
        self._weightings = {}
        context = super().prepare(model, targets, batches)
        if self.weighting != "none" and targets:
            start = time.perf_counter()
            stats = statistics_for(self.weighting, model, targets, batches)
            self._weightings = {name: self.make_weighting(stats[name]) for name, _ in targets}
            log.info(
                "decomp=%s weighting=%s: statistics of %d layers from %d calibration batches in %.1f s",
                self.name,
                self.weighting,
                len(targets),
                len(batches),
                time.perf_counter() - start,
            )
        return context

    def make_weighting(self, stat: torch.Tensor) -> Weighting | Whitening:
        """The layer's weighting from its statistic (second moment, mean |input| or row importance)."""
        if self.weighting == "activation":
            return Whitening(stat, self.weighting_eps)
        if self.weighting == "asvd":
            return Weighting.columns(column_scale(stat, self.asvd_alpha, self.weighting_eps))
        return Weighting.rows(row_weight(stat, self.weighting_eps))

    def support_error(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        return conv_support_error(module)

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        if self.weighting == "none":
            return svd_problem(name, module)
        return svd_problem(name, module, weighting=lambda: self._weightings[name])

    def build_layer(
        self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem
    ) -> FactorizedLayer:
        if self.weighting == "none":
            return build_svd(module, ranks[0], problem.notes.get("usv"))
        problem.spectra()  # the weighted decomposition (cached in notes["usv"], notes["spectrum"])
        return build_svd(module, ranks[0], problem.notes["usv"])

    def row(
        self,
        name: str,
        module: nn.Module,
        new: FactorizedLayer,
        ranks: Ranks,
        seconds: float,
        problem: RankProblem,
    ) -> dict[str, Any]:
        """The base row; a weighted layer adds ``weighting`` and ``weighted_rel_error`` (Eckart-Young tail of
        the weighted spectrum at the built rank)."""
        row = super().row(name, module, new, ranks, seconds, problem)
        if self.weighting != "none":
            row["weighting"] = self.weighting
            row["weighted_rel_error"] = eckart_young_error(problem.spectra()[0], ranks[0])
        return row
