"""The rank policy shared by every decomposition, and the rank selection strategies.

design.md "The decomposition contract": exactly one of ``rank`` (an integer), ``ratio`` (the fraction of
the layer's parameters to keep) or ``energy`` (phi in (0, 1]: the smallest r with
sum_{i<=r} s_i^2 >= phi sum_i s_i^2, SDRM Eqs. 2-3), plus ``rank_multiple`` (round up) and ``min_rank``.

Following MUSCO, the strategies are separate, swappable objects (:class:`FixedRank`, :class:`RatioRank`,
:class:`EnergyRank`). A method describes one layer as a :class:`RankProblem` (how many ranks it has, their
limits, its closed-form parameter count, its spectra) and asks the policy's selector for the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lrk.checks import is_fraction, is_int
from lrk.errors import LrkConfigError
from lrk.layers.base import Ranks
from lrk.linalg.rank import energy_rank

POLICY_KEYS = ("rank", "ratio", "energy")


@dataclass
class RankProblem:
    """What a method tells a rank selector about one layer (or one TRAWL group of layers).

    ``limits``: largest meaningful value of each rank. ``scalar_limit``: the valid range of an integer
    ``rank`` is [1, scalar_limit]. ``from_scalar`` maps the integer to the rank tuple (e.g. Tucker's R1 ->
    (R2, R1) along R2 = beta R1). ``params`` is the closed-form parameter count of a rank tuple and
    ``dense_params`` the dense layer's. ``spectra`` returns one spectrum per entry of the energy rule and
    ``from_energy`` turns the per-spectrum ranks into the rank tuple (identity by default).
    ``ratio_guess`` optionally gives a closed-form real scalar rank for a ratio (Tucker: Eq. 7).
    """

    layer: str
    description: str
    limits: Ranks
    scalar_limit: int
    from_scalar: Callable[[int], Ranks]
    params: Callable[[Ranks], int]
    dense_params: int
    spectra: Callable[[], list[torch.Tensor]] | None = None
    from_energy: Callable[[list[int]], Ranks] | None = None
    ratio_guess: Callable[[float], float] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def clamp(self, ranks: Sequence[int]) -> Ranks:
        return tuple(max(1, min(int(r), m)) for r, m in zip(ranks, self.limits, strict=True))


class RankSelector(Protocol):
    """A rank selection strategy (MUSCO convention): one layer's problem -> its ranks."""

    def select(self, problem: RankProblem) -> Ranks: ...


@dataclass(frozen=True)
class FixedRank:
    """``rank=r``: the same integer for every layer, checked against each layer's valid range."""

    rank: int

    def check(self, problem: RankProblem) -> None:
        if not 1 <= self.rank <= problem.scalar_limit:
            raise LrkConfigError(
                f"decomp.rank={self.rank} is invalid for layer '{problem.layer}' ({problem.description}): "
                f"it must be an integer in [1, {problem.scalar_limit}]"
            )

    def select(self, problem: RankProblem) -> Ranks:
        self.check(problem)
        return problem.clamp(problem.from_scalar(self.rank))


@dataclass(frozen=True)
class RatioRank:
    """``ratio=f``: the scalar rank whose closed-form parameter count is nearest to f x the dense layer's.

    The parameter count grows with the scalar rank, so a bisection finds the two neighbours of the target;
    a closed-form guess (Tucker: accelerating_lrd_paper Eq. 7) narrows the search to its neighbourhood.
    """

    ratio: float

    def select(self, problem: RankProblem) -> Ranks:
        target = self.ratio * problem.dense_params

        def cost(r: int) -> float:
            return abs(problem.params(problem.clamp(problem.from_scalar(r))) - target)

        hi = problem.scalar_limit
        if problem.ratio_guess is not None:
            guess = problem.ratio_guess(self.ratio)
            if math.isfinite(guess) and 1 <= guess <= hi:
                window = range(max(1, math.floor(guess) - 2), min(hi, math.ceil(guess) + 2) + 1)
                return problem.clamp(problem.from_scalar(min(window, key=cost)))
        lo = 1  # largest r with params(r) <= target, by bisection
        if problem.params(problem.clamp(problem.from_scalar(1))) > target:
            return problem.clamp(problem.from_scalar(1))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if problem.params(problem.clamp(problem.from_scalar(mid))) <= target:
                lo = mid
            else:
                hi = mid - 1
        best = min((lo, min(lo + 1, problem.scalar_limit)), key=cost)
        return problem.clamp(problem.from_scalar(best))


@dataclass(frozen=True)
class EnergyRank:
    """``energy=phi``: per spectrum, the smallest r with sum_{i<=r} s_i^2 >= phi sum s_i^2 (SDRM Eqs. 2-3)."""

    energy: float

    def select(self, problem: RankProblem) -> Ranks:
        if problem.spectra is None:
            raise LrkConfigError(
                f"decomp.energy is not supported for layer '{problem.layer}' ({problem.description})"
            )
        ranks = [energy_rank(s, self.energy) for s in problem.spectra()]
        combined = problem.from_energy(ranks) if problem.from_energy is not None else tuple(ranks)
        return problem.clamp(combined)


@dataclass(frozen=True)
class RankPolicy:
    """One of rank / ratio / energy, with ``rank_multiple`` (round up) and ``min_rank`` applied after."""

    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    rank_multiple: int = 1
    min_rank: int = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RankPolicy:
        """Validate the policy keys of a decomp config node.

        ``default_ratio`` (set in conf/decomp/*.yaml) is used only when none of rank, ratio, energy is set,
        so that ``decomp.energy=0.9`` on the command line needs no ``decomp.ratio=null``.
        """
        values = {k: cfg.get(k) for k in POLICY_KEYS}
        chosen = {k: v for k, v in values.items() if v is not None}
        label = {k: k for k in POLICY_KEYS}
        if not chosen and cfg.get("default_ratio") is not None:
            chosen, label["ratio"] = {"ratio": cfg.get("default_ratio")}, "default_ratio"
        if len(chosen) != 1:
            given = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "none of them"
            raise LrkConfigError(
                f"decomp rank policy sets {given}: set exactly one of decomp.rank (an integer >= 1), "
                "decomp.ratio (a fraction in (0, 1]) or decomp.energy (a fraction in (0, 1])"
            )
        ((key, value),) = chosen.items()
        if key == "rank" and not (is_int(value) and value >= 1):
            raise LrkConfigError(f"decomp.rank={value} is invalid: it must be an integer >= 1")
        if key in ("ratio", "energy") and not is_fraction(value):
            raise LrkConfigError(f"decomp.{label[key]}={value} is invalid: it must be a number in (0, 1]")
        multiple = cfg.get("rank_multiple", 1)
        if multiple is None:
            multiple = 1
        if not (is_int(multiple) and multiple >= 1):
            raise LrkConfigError(f"decomp.rank_multiple={multiple} is invalid: it must be an integer >= 1")
        min_rank = cfg.get("min_rank", 1)
        if min_rank is None:
            min_rank = 1
        if not (is_int(min_rank) and min_rank >= 1):
            raise LrkConfigError(f"decomp.min_rank={min_rank} is invalid: it must be an integer >= 1")
        value = int(value) if key == "rank" else float(value)
        return cls(**{key: value}, rank_multiple=multiple, min_rank=min_rank)

    @property
    def kind(self) -> str:
        return "rank" if self.rank is not None else "ratio" if self.ratio is not None else "energy"

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    def selector(self) -> RankSelector:
        if self.rank is not None:
            return FixedRank(self.rank)
        if self.ratio is not None:
            return RatioRank(self.ratio)
        return EnergyRank(float(self.energy))

    def finalize(self, ranks: Sequence[int], problem: RankProblem) -> Ranks:
        """Round each rank up to a multiple of ``rank_multiple``, raise it to ``min_rank``, and cap it at
        the layer's limit (a layer smaller than ``min_rank`` keeps its full rank)."""
        out = []
        for r, limit in zip(ranks, problem.limits, strict=True):
            r = max(int(r), self.min_rank)
            r = math.ceil(r / self.rank_multiple) * self.rank_multiple
            out.append(max(1, min(r, limit)))
        return tuple(out)

    def select(self, problem: RankProblem, selector: RankSelector | None = None) -> Ranks:
        """Ranks of one layer: the selector (this policy's, or a swapped-in one), then :meth:`finalize`."""
        chosen = (selector or self.selector()).select(problem)
        return self.finalize(chosen, problem)
