"""The rank policy shared by every decomposition, and the rank selection strategies.

design.md "The decomposition contract": exactly one of ``rank`` (an integer), ``ratio`` (the fraction of
the layer's parameters to keep) or ``energy`` (phi in (0, 1]: the smallest r with
sum_{i<=r} s_i^2 >= phi sum_i s_i^2, SDRM Eqs. 2-3), plus ``rank_multiple`` (round up) and ``min_rank``.

A requested ``ratio`` is a per-layer contract (design.md: "a ratio a layer cannot reach is reported per layer,
never silently missed"): :meth:`RankPolicy.choose` returns ranks whose parameter count, after the
``rank_multiple`` / ``min_rank`` rounding, lies within ``ratio_tolerance`` (relative, default 0.1: the
achieved fraction within +-10 % of the requested one, e.g. [0.45, 0.55] for ratio 0.5) of the target, or
says that the layer cannot reach it (the method then leaves the layer dense and warns). The search, in
order of preference, stops at the first step that meets the tolerance:

1. the selector's ranks, rounded (what ``select`` returns; unchanged behaviour wherever it meets the target);
2. the point of the method's scalar rank curve (e.g. Tucker's R2 = beta R1) nearest to the target *after*
   rounding (rounding up may overshoot where rounding down would not);
3. one rank solved with the others held fixed (at the curve's values, then at their limits): e.g. Tucker on
   a stem with C = 3 input channels caps R1 at 3, and R2 = beta R1 cannot grow; R2 is then solved with R1 = 3.
   The curve (beta) is a preference, not a constraint, once one rank is capped;
4. for two ranks, every value of the first with the second solved (the best achievable pair).

Each step searches only values that the rounding can produce (multiples of ``rank_multiple`` >= ``min_rank``,
or the layer's limit). ``rank`` and ``energy`` policies are not checked (they ask for ranks, not sizes).

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

from lrk.checks import is_fraction, is_int, is_number
from lrk.errors import LrkConfigError
from lrk.layers.base import Ranks
from lrk.linalg.rank import energy_rank

POLICY_KEYS = ("rank", "ratio", "energy")
#: default of ``ratio_tolerance``: the achieved fraction may differ from the requested one by 10 % (relative)
DEFAULT_RATIO_TOLERANCE = 0.1


@dataclass
class RankProblem:
    """What a method tells a rank selector about one layer (or one TRAWL group of layers).

    ``limits``: largest meaningful value of each rank. ``scalar_limit``: the valid range of an integer
    ``rank`` is [1, scalar_limit]. ``from_scalar`` maps the integer to the rank tuple (e.g. Tucker's R1 ->
    (R2, R1) along R2 = beta R1). ``params`` is the closed-form parameter count of a rank tuple and
    ``dense_params`` the dense layer's. ``spectra`` returns one spectrum per entry of the energy rule and
    ``from_energy`` turns the per-spectrum ranks into the rank tuple (identity by default).
    ``ratio_guess`` optionally gives a closed-form real scalar rank for a ratio (Tucker: Eq. 7).
    ``rank_names`` names the ranks in messages. Every problem's ``params`` is nondecreasing in each rank
    (:meth:`RankPolicy.choose` bisects along one rank at a time).
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
    rank_names: tuple[str, ...] | None = None

    def rank_name(self, j: int) -> str:
        """The name of rank ``j`` in messages (``rank_names``, e.g. Tucker's ("R2", "R1"); else ``r<j>``)."""
        return self.rank_names[j] if self.rank_names else f"r{j}"

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
class RankChoice:
    """The ranks :meth:`RankPolicy.choose` picked for one layer.

    ``params`` / ``achieved``: closed-form parameter count of ``ranks`` and its fraction of the dense layer's;
    ``reachable``: False when no rank choice meets the requested ratio within the tolerance (``ranks`` are
    then the best achievable ones, and the method leaves the layer dense); ``note``: how the ranks were found
    when it was not the plain rule (None otherwise).
    """

    ranks: Ranks
    params: int
    achieved: float
    reachable: bool = True
    note: str | None = None


@dataclass(frozen=True)
class RankPolicy:
    """One of rank / ratio / energy, with ``rank_multiple`` (round up) and ``min_rank`` applied after;
    ``ratio_tolerance`` is how far (relative) a layer's achieved fraction may be from ``ratio``."""

    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    rank_multiple: int = 1
    min_rank: int = 1
    ratio_tolerance: float = DEFAULT_RATIO_TOLERANCE

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
        tolerance = cfg.get("ratio_tolerance", DEFAULT_RATIO_TOLERANCE)
        if tolerance is None:
            tolerance = DEFAULT_RATIO_TOLERANCE
        if not (is_number(tolerance) and 0 <= tolerance <= 1):
            raise LrkConfigError(
                f"decomp.ratio_tolerance={tolerance} is invalid: it must be a number in [0, 1] (relative: 0.1 = "
                "each layer keeps within +-10 % of the requested ratio, or stays dense)"
            )
        value = int(value) if key == "rank" else float(value)
        return cls(
            **{key: value}, rank_multiple=multiple, min_rank=min_rank, ratio_tolerance=float(tolerance)
        )

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

    # --- a requested ratio, met per layer ----------------------------------------------------------------
    def within(self, achieved: float) -> bool:
        """Whether a fraction ``achieved`` of the dense layer meets ``ratio`` within ``ratio_tolerance``."""
        if self.ratio is None:
            return True
        return abs(achieved / self.ratio - 1.0) <= self.ratio_tolerance + 1e-12

    def tolerance_range(self) -> tuple[float, float]:
        """The accepted fractions [ratio (1 - tol), ratio (1 + tol)] (only for a ratio policy)."""
        if self.ratio is None:
            raise ValueError("tolerance_range() needs a ratio policy")
        return self.ratio * (1 - self.ratio_tolerance), self.ratio * (1 + self.ratio_tolerance)

    def grid(self, limit: int) -> list[int]:
        """Every value :meth:`finalize` can give a rank of limit ``limit``: the multiples of ``rank_multiple``
        from ``min_rank`` up (below the limit), and the limit itself."""
        first = math.ceil(self.min_rank / self.rank_multiple) * self.rank_multiple
        if first >= limit:
            return [max(1, limit)]
        return [*range(first, limit, self.rank_multiple), limit]

    def choose(self, problem: RankProblem, selector: RankSelector | None = None) -> RankChoice:
        """The ranks of one layer, checked against a requested ratio (module docstring: the search order).

        For ``rank`` / ``energy`` policies this is :meth:`select` (always reachable). For ``ratio``, the
        returned choice meets ``ratio`` within ``ratio_tolerance`` after rounding, or has ``reachable=False``
        and the best achievable ranks. The count is the problem's closed form; the methods check it again on
        the built module.
        """
        ranks = self.select(problem, selector)
        if self.ratio is None:
            params = problem.params(ranks)
            return RankChoice(ranks, params, params / problem.dense_params)
        target = self.ratio * problem.dense_params

        def error(r: Ranks) -> float:
            return abs(problem.params(r) - target)

        def made(r: Ranks, note: str | None, reachable: bool = True) -> RankChoice:
            params = problem.params(r)
            return RankChoice(tuple(r), params, params / problem.dense_params, reachable, note)

        first = made(ranks, None)
        if self.within(first.achieved):
            return first
        tried: list[tuple[Ranks, str]] = [(ranks, "the plain rule")]
        plain = f"the rule gave ranks {list(ranks)} ({first.achieved:.3f} of the layer)"

        # 2. the curve point nearest to the target after rounding
        curve = self._solve(
            problem.scalar_limit, lambda r: self.finalize(problem.from_scalar(r), problem), target, problem
        )
        tried.append((curve, "the curve"))
        if self.within(problem.params(curve) / problem.dense_params):
            return made(curve, f"{plain}; the nearest ranks after rounding are {list(curve)}")

        # 3. one rank solved with the others held fixed (at the curve's values, then at their limits)
        n = len(problem.limits)
        if n > 1:
            steps = []
            for base, where in ((curve, "the rule's values"), (tuple(problem.limits), "their limits")):
                for j in range(n):
                    grid = self.grid(problem.limits[j])

                    def at(i: int, base: Ranks = base, j: int = j, grid: list[int] = grid) -> Ranks:
                        return (*base[:j], grid[i - 1], *base[j + 1 :])

                    steps.append((self._solve(len(grid), at, target, problem), j, where))
            ok = [(r, j, w) for r, j, w in steps if self.within(problem.params(r) / problem.dense_params)]
            if ok:
                r, j, where = min(ok, key=lambda t: error(t[0]))
                capped = [problem.rank_name(i) for i in range(n) if curve[i] >= problem.limits[i]]
                why = f"{', '.join(capped)} at its limit; " if capped else ""
                return made(
                    r,
                    f"{plain}; {why}{problem.rank_name(j)} solved with the other rank(s) at {where}: "
                    f"ranks {list(r)}",
                )
            tried.extend((r, "one rank solved") for r, _, _ in steps)

        # 4. two ranks: every value of the first, the second solved
        if n == 2:
            grid0, grid1 = self.grid(problem.limits[0]), self.grid(problem.limits[1])
            pairs = []
            for v in grid0:
                pairs.append(self._solve(len(grid1), lambda i, v=v: (v, grid1[i - 1]), target, problem))
            best = min(pairs, key=error)
            tried.append((best, "every pair"))
            if self.within(problem.params(best) / problem.dense_params):
                return made(best, f"{plain}; searched every rank pair: ranks {list(best)}")

        best = min((r for r, _ in tried), key=error)
        return made(best, None, reachable=False)

    @staticmethod
    def _solve(count: int, ranks_at: Callable[[int], Ranks], target: float, problem: RankProblem) -> Ranks:
        """Of ``ranks_at(1..count)`` (parameter counts nondecreasing in the index), the ranks whose count is
        nearest to ``target`` (bisection: the last index at or below the target, or the one after it)."""
        count = max(1, count)
        lo, hi = 1, count
        if problem.params(ranks_at(1)) > target:
            return ranks_at(1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if problem.params(ranks_at(mid)) <= target:
                lo = mid
            else:
                hi = mid - 1
        below, above = ranks_at(lo), ranks_at(min(lo + 1, count))
        return min((below, above), key=lambda r: abs(problem.params(r) - target))
