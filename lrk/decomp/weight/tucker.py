"""``decomp=tucker``: vanilla LRD of accelerating_lrd_paper (Fig. 1): a ``k x k`` convolution (k > 1) becomes
1x1 (C -> R1), core ``k x k`` (R1 -> R2), 1x1 (R2 -> S) by Tucker-2 (Eqs. 4-6; HOSVD refined by HOOI,
TensorLy ``partial_tucker``); Linear and 1x1 convolutions are "treated the same as 1x1 conv layers": SVD
(Eqs. 1-3), as in ``decomp=svd``.

Ranks: ``rank=r`` gives R1 = r and R2 = round(beta r); ``ratio`` starts from Eq. 7 (R2 = beta R1) and
takes the nearest integer pair. For ``ratio``, beta is a preference, not a constraint: where one rank is
capped (R1 <= C, R2 <= S) the pair on the beta line cannot reach the target, and the other rank is solved
with the capped one fixed (lrk.decomp.rank.policy, ``RankPolicy.choose``). E.g. the ResNet-50 stem
(64 <- 3, 7x7, 9,408 parameters) at ratio 0.5: R1 <= 3 and R2 = beta R1 = 3 keep 642 (0.068); with R1 = 3
fixed, R2 = 22 keeps 4,651 (0.494). A layer no pair brings within ``ratio_tolerance`` stays dense (report
kind ``dense (ratio unreachable)``, with a warning). ``energy`` applies the energy rule to each channel-mode unfolding
(R2 from the output mode, R1 from the input mode). ``beta`` defaults to 1 (the paper's example:
[512, 512, 3, 3] at 2x -> R1 = R2 = 309); ``beta: null`` means S / C.

Default targets: every Conv2d (groups=1) except the stem, and every Linear except the classifier head.

``n_iter_max`` (default 0: the truncated HOSVD) adds HOOI sweeps (TensorLy). They are slow on CPU:
TensorLy's HOOI takes the SVD of wide unfoldings, and ResNet-18 with 10 sweeps took 540 s (shared
2-core machine) against seconds for the HOSVD.

``branches=N`` (default 1 = vanilla): branched Tucker (Sec. 2.4, Eqs. 8-20, Fig. 4) for the k x k convolutions,
:class:`~lrk.layers.branched_tucker.BranchedTuckerConv2d` (the core a ``groups=N`` conv with 1/N of vanilla
Tucker's core parameters at the same ranks, Eq. 20); Linear and 1x1 layers are SVD as before. The k x k
ranks (R2, R1) are totals and multiples of N (Eqs. 10-11): a ``rank`` that N does not divide is refused in
the constructor (naming the nearest multiples); ``ratio`` / ``energy`` ranks are rounded up to multiples of
lcm(rank_multiple, N) and the rank problem counts the branched layer (C R1 + R1 R2 k^2 / N + R2 S), so a
``ratio`` is met within ``ratio_tolerance`` with the larger ranks branching allows. A layer with fewer than N
input or output channels cannot branch: a config error names it (skip it, or lower N). ``branch_sweeps``
(default 0 = the paper's split of one Tucker-2) refines the branches as a block-term decomposition
(lrk.linalg.tucker.branched_tucker2).

``weighting`` (data-aware SVD, ``decomp=svd``) supports only ``none`` here; anything else is a config error that
names decomp=svd. Not for want of a formula: the input-channel mode could be whitened by the channel second
moment, but the output error of a k x k conv depends on the *patch* second moment (C k^2 x C k^2), which is not
a Kronecker product of a channel and a spatial factor, so a channel-mode whitening loses SVD-LLM's optimality
guarantee, and HOSVD truncation is not optimal even unweighted; a weighted Tucker-2 needs its own (measured)
study. FWSVD's row weights would apply soundly to the output mode; that is left for a later change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from torch import nn

from lrk.checks import is_int, is_number
from lrk.decomp.base import register_method
from lrk.decomp.rank.policy import RankPolicy, RankProblem, Ranks
from lrk.decomp.weight.svd import WEIGHTING_KEYS, SVDMethod
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer, describe
from lrk.layers.branched_tucker import BranchedTuckerConv2d
from lrk.layers.tucker import TuckerConv2d
from lrk.linalg.tucker import (
    branched_tucker2_params,
    mode_singular_values,
    tucker2_params,
    tucker2_rank_eq7,
)


def nearest_multiples(value: int, multiple: int) -> list[int]:
    """The multiples of ``multiple`` (>= ``multiple``) nearest to ``value`` below and above it."""
    low = (value // multiple) * multiple
    return [low, low + multiple] if low >= multiple else [low + multiple]


def tucker_problem(name: str, conv: nn.Conv2d, beta: float | None, branches: int = 1) -> RankProblem:
    """Rank problem of a k x k conv under Tucker-2, or with ``branches`` = N > 1 under branched Tucker
    (Sec. 2.4): the limits are then the largest multiples of N, and ``params`` the branched closed form
    C R1 + R1 R2 k^2 / N + R2 S (Eqs. 18-20), with Eq. 7 solved for it."""
    w = conv.weight.detach()
    s_out, c_in = w.shape[:2]
    k2 = w.shape[2] * w.shape[3]
    bias = conv.bias is not None
    b = float(s_out) / c_in if beta is None else float(beta)
    n = branches
    limits = tuple(
        (m // n) * n for m in (min(s_out, c_in * k2), min(c_in, s_out * k2))
    )  # multiples of N (Eqs. 10-11)
    if min(limits) < 1:
        raise LrkConfigError(
            f"decomp.branches={n} is invalid for layer '{name}' ({describe(conv)}): its ranks are capped at "
            f"R2 <= {min(s_out, c_in * k2)} and R1 <= {min(c_in, s_out * k2)}, fewer than {n} branches; skip "
            f"the layer (decomp.skip) or lower decomp.branches"
        )
    dense = w.numel() + (s_out if bias else 0)

    def from_scalar(r: int) -> Ranks:
        return (max(1, round(b * r)), r)

    if n == 1:
        params = lambda ranks: tucker2_params(s_out, c_in, k2, (ranks[0], ranks[1]), bias)  # noqa: E731
        kind = "tucker2"
    else:
        params = lambda ranks: branched_tucker2_params(  # noqa: E731
            s_out, c_in, k2, (ranks[0], ranks[1]), n, bias
        )
        kind = "branched_tucker2"
    scalar_limit = min(c_in, max(1, int(s_out / b + 1e-9)))  # R1 <= C and R2 = beta R1 <= S
    return RankProblem(
        layer=name,
        description=describe(conv),
        limits=limits,
        scalar_limit=max(n, (scalar_limit // n) * n),
        from_scalar=from_scalar,
        params=params,
        dense_params=dense,
        spectra=lambda: [mode_singular_values(w, 0), mode_singular_values(w, 1)],
        ratio_guess=lambda ratio: tucker2_rank_eq7(s_out, c_in, k2, 1.0 / ratio, b, n),
        notes={"kind": kind, "branches": n} if n > 1 else {"kind": kind},
        rank_names=("R2", "R1"),
    )


def is_spatial(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


@register_method("tucker")
class TuckerMethod(SVDMethod):
    """Tucker-2 for k x k convolutions, SVD for Linear and 1x1 convolutions (the paper's vanilla LRD): SVDMethod's
    targets, with the k x k convolutions decomposed by Tucker-2 instead of a matricized SVD."""

    supported = "Conv2d with groups=1 (Tucker-2 for k x k, SVD for 1x1) and Linear (SVD)"
    factor_roles: ClassVar[tuple[str, ...]] = ("first", "core", "last")  # Tucker-2 + SVD (lrk.decomp.freeze)
    extra_keys: ClassVar[dict[str, Any]] = {
        "beta": 1.0,
        "n_iter_max": 0,
        "branches": 1,
        "branch_sweeps": 0,
        **WEIGHTING_KEYS,
    }
    weightings: ClassVar[tuple[str, ...]] = ("none",)  # module docstring: why not activation / asvd / fisher
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"energy": 1.0},
        "lossy": {"rank": 1},
        "invalid": [
            {"rank": 10_000},
            {"rank": 2, "beta": 0},
            {"rank": 2, "n_iter_max": -1},
            {"rank": 2, "skip": ["no_such_layer"]},
            {"rank": 3, "branches": 2},
            {"rank": 2, "branches": 0},
            {"rank": 2, "weighting": "activation"},
        ],
    }

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        beta = self.cfg["beta"]
        if beta is not None and not (is_number(beta) and beta > 0):
            raise LrkConfigError(
                f"decomp.beta={beta!r} is invalid: it must be a positive number (R2 / R1) or null (S / C)"
            )
        self.beta = None if beta is None else float(beta)
        n_iter = self.cfg["n_iter_max"]
        if not (is_int(n_iter) and n_iter >= 0):
            raise LrkConfigError(
                f"decomp.n_iter_max={n_iter!r} is invalid: it must be an integer >= 0 (0 = HOSVD)"
            )
        self.n_iter_max = n_iter
        self.branches, self.branch_sweeps, self.branch_policy = self._branch_keys()

    def _branch_keys(self) -> tuple[int, int, RankPolicy]:
        """``branches`` (N >= 1), ``branch_sweeps`` (>= 0), and the policy of the k x k layers: ranks rounded
        up to multiples of lcm(rank_multiple, N); a ``rank`` that N does not divide is refused here."""
        n, sweeps = self.cfg["branches"], self.cfg["branch_sweeps"]
        if not (is_int(n) and n >= 1):
            raise LrkConfigError(
                f"decomp.branches={n!r} is invalid: it must be an integer >= 1 (1 = vanilla Tucker, N = the "
                "Tucker core split into N branches, accelerating_lrd_paper Sec. 2.4)"
            )
        if not (is_int(sweeps) and sweeps >= 0):
            raise LrkConfigError(
                f"decomp.branch_sweeps={sweeps!r} is invalid: it must be an integer >= 0 (0 = the paper's split)"
            )
        rank = self.policy.rank
        if n > 1 and rank is not None and rank % n:
            valid = " or ".join(str(v) for v in nearest_multiples(rank, n))
            raise LrkConfigError(
                f"decomp.rank={rank} is invalid with decomp.branches={n}: the ranks of the k x k convolutions "
                f"must be multiples of {n} (accelerating_lrd_paper Eqs. 10-11); the nearest valid ranks are {valid}"
            )
        multiple = math.lcm(self.policy.rank_multiple, n)
        return n, sweeps, dataclasses.replace(self.policy, rank_multiple=multiple)

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        if is_spatial(module):
            return tucker_problem(name, module, self.beta, self.branches)
        return super().problem(name, module)

    def policy_for(self, module: nn.Module) -> RankPolicy:
        """The branched policy (ranks multiples of N) for k x k convs when ``branches > 1``; else the method's."""
        if self.branches == 1 or not is_spatial(module):
            return self.policy
        return self.branch_policy

    def build_layer(
        self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem
    ) -> FactorizedLayer:
        if is_spatial(module) and self.branches > 1:
            return BranchedTuckerConv2d.from_conv(
                module,
                (ranks[0], ranks[1]),
                self.branches,
                n_iter_max=self.n_iter_max,
                sweeps=self.branch_sweeps,
            )
        if is_spatial(module):
            return TuckerConv2d.from_conv(module, (ranks[0], ranks[1]), n_iter_max=self.n_iter_max)
        return super().build_layer(name, module, ranks, problem)
