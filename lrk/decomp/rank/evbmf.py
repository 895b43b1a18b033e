"""``decomp.rank_selector: evbmf``: ranks from EVBMF (lrk.linalg.evbmf) with MUSCO's weakening factor, instead of
the rank policy's rank / ratio / energy (tensor_methods_lecture, MUSCO; Nakajima et al. 2013).

Keys (:data:`RANK_SELECTOR_KEYS`, every weight method): ``rank_selector: policy | evbmf`` (default ``policy``: the
shared rank / ratio / energy policy) and ``evbmf_weakening`` (w in [0, 1], default 0.5: rank = ceil(R - w (R -
R_EVBMF)); 1 = the EVBMF rank). With ``evbmf`` none of rank / ratio / energy may be set (``default_ratio`` is
ignored); ``rank_multiple`` and ``min_rank`` still round the ranks.

Each spectrum of a layer's rank problem is the spectrum of one unfolding of its weight: ``decomp=svd`` the
matricized weight S x (C k k); ``decomp=tucker`` (Tucker-2 of a k x k conv) the output mode (S x C k k, R2) and
the input mode (C x S k k, R1), EVBMF per mode unfolding as MUSCO does. A layer whose unfolding is smaller than
2 x 2 is refused (:class:`LrkConfigError` naming the layer and the shape).

An already-compressed layer (multi-stage compression folds a factorized layer back to its dense weight, of exact
rank R < min(L, M)) is re-estimated on its compact core: EVBMF of the R x R matrix with the R non-zero singular
values, and the weakening is relative to R (MUSCO re-decomposes the factors of the previous step, Eq. 1.7 of
the lecture, instead of the full L x M matrix, whose zero tail would make the estimated noise vanish and every
component survive). R is the numerical rank: the singular values above s_1 max(L, M) eps of the weight's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lrk.checks import is_number
from lrk.decomp.rank.policy import POLICY_KEYS, RankPolicy, RankProblem, Ranks, RankSelector
from lrk.errors import LrkConfigError
from lrk.linalg.evbmf import evbmf_spectrum, weakened_rank

RANK_SELECTOR_KEYS: dict[str, Any] = {"rank_selector": "policy", "evbmf_weakening": 0.5}
SELECTORS = ("policy", "evbmf")
#: methods whose rank problems' spectra are the mode unfoldings of the weight
EVBMF_METHODS = ("svd", "tucker")


def unfolding_shape(weight: torch.Tensor, mode: int) -> tuple[int, int]:
    """(rows, columns) of the mode-``mode`` unfolding of a weight (mode 0 of a Linear: out x in)."""
    return int(weight.shape[mode]), int(weight.numel() // weight.shape[mode])


def numerical_rank(values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """The number of singular values above s_1 max(L, M) eps(dtype) (numpy's matrix_rank tolerance)."""
    if values.numel() == 0 or float(values[0]) <= 0:
        return 0
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return int((values > float(values[0]) * max(shape) * eps).sum())


def spectrum_rank(values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, weakening: float) -> int:
    """The weakened EVBMF rank of one unfolding (module docstring: the compact core of a rank-deficient one)."""
    values = values.detach().double().flatten().sort(descending=True).values
    full = min(shape)
    rank = numerical_rank(values, shape, dtype)
    if 2 <= rank < full:
        estimated = evbmf_spectrum(values[:rank], (rank, rank)).rank
        return weakened_rank(estimated, rank, weakening)
    estimated = evbmf_spectrum(values, shape).rank
    return weakened_rank(estimated, full, weakening)


@dataclass
class EVBMFRank:
    """The rank selector of ``rank_selector: evbmf`` (a :class:`~lrk.decomp.rank.policy.RankSelector`); bind it
    to the targets (:meth:`for_targets`) so that it knows each layer's weight."""

    weakening: float
    modules: dict[str, nn.Module] = field(default_factory=dict)

    def for_targets(self, targets: list[tuple[str, nn.Module]]) -> EVBMFRank:
        return EVBMFRank(self.weakening, dict(targets))

    def shapes(self, problem: RankProblem) -> list[tuple[int, int]]:
        """The unfolding shape of each of the layer's ranks; :class:`LrkConfigError` for one smaller than 2 x 2
        (cheap: no spectrum is computed, so a schedule can check every target before training)."""
        module = self.modules.get(problem.layer)
        if module is None or problem.spectra is None:
            raise LrkConfigError(
                f"decomp.rank_selector=evbmf is not supported for layer '{problem.layer}' ({problem.description})"
            )
        weight = module.weight.detach()
        shapes = [unfolding_shape(weight, mode) for mode in range(len(problem.limits))]
        for mode, shape in enumerate(shapes):
            if min(shape) < 2:
                raise LrkConfigError(
                    f"decomp.rank_selector=evbmf is invalid for layer '{problem.layer}' ({problem.description}): "
                    f"its mode-{mode} unfolding has shape {list(shape)}, EVBMF needs at least 2 x 2; skip the "
                    "layer (decomp.skip) or use rank_selector=policy"
                )
        return shapes

    def select(self, problem: RankProblem) -> Ranks:
        shapes = self.shapes(problem)
        dtype = self.modules[problem.layer].weight.dtype
        spectra = problem.spectra() if problem.spectra is not None else []
        ranks = [
            spectrum_rank(values, shape, dtype, self.weakening)
            for values, shape in zip(spectra, shapes, strict=True)
        ]
        combined = problem.from_energy(ranks) if problem.from_energy is not None else tuple(ranks)
        return problem.clamp(combined)


def rank_selection(cfg: Mapping[str, Any], method: str) -> tuple[RankPolicy, EVBMFRank | None]:
    """The policy and (``rank_selector: evbmf``) the EVBMF selector of a weight method's config; raises
    :class:`LrkConfigError` for a bad ``rank_selector`` / ``evbmf_weakening``, or a policy key set beside evbmf."""
    choice = cfg.get("rank_selector", "policy")
    if choice is None:
        choice = "policy"
    if choice not in SELECTORS:
        raise LrkConfigError(
            f"decomp.rank_selector={choice!r} is invalid: it must be one of {list(SELECTORS)}"
        )
    if choice == "policy":
        return RankPolicy.from_config(cfg), None
    weakening = cfg.get("evbmf_weakening", RANK_SELECTOR_KEYS["evbmf_weakening"])
    if not (is_number(weakening) and 0.0 <= weakening <= 1.0):
        raise LrkConfigError(
            f"decomp.evbmf_weakening={weakening!r} is invalid: it must be a number in [0, 1] (1 = the EVBMF rank, "
            "0 = no compression)"
        )
    if method not in EVBMF_METHODS:
        raise LrkConfigError(
            f"decomp.rank_selector=evbmf is invalid for decomp={method}: it is supported by {list(EVBMF_METHODS)}"
        )
    given = {k: cfg.get(k) for k in POLICY_KEYS if cfg.get(k) is not None}
    if given:
        raise LrkConfigError(
            f"decomp.rank_selector=evbmf chooses the ranks itself: unset {', '.join(f'decomp.{k}' for k in given)}"
        )
    # the policy keeps rank_multiple / min_rank (finalize) and asks for no ratio check (ratio is None)
    carrier = RankPolicy.from_config(
        {**cfg, "energy": 1.0, "ratio": None, "rank": None, "default_ratio": None}
    )
    return replace(carrier, energy=None), EVBMFRank(float(weakening))


def bound_selector(
    selector: EVBMFRank | None, policy: RankPolicy, targets: list[tuple[str, nn.Module]]
) -> RankSelector:
    """The selector a weight method's ``prepare`` uses: the EVBMF one bound to the targets, or the policy's."""
    return selector.for_targets(targets) if selector is not None else policy.selector()
