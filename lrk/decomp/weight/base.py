"""Base of the weight methods: Linear/Conv layers replaced by factorized layers (lrk.layers) at ranks chosen by the
shared rank policy (lrk.decomp.rank).

A requested ``ratio`` is met per layer or the layer stays dense, and says so (design.md "The decomposition
contract"): the ranks come from :meth:`RankPolicy.choose <lrk.decomp.rank.policy.RankPolicy.choose>` (the
plain rule, then better rank choices where it misses); a layer no choice brings within ``ratio_tolerance``
(common key of every weight method, default 0.1 = within +-10 % of the requested fraction, relative) is not
decomposed: its report row has kind ``dense (ratio unreachable)``, null ranks, ``params_after ==
params_before`` and the reason in ``note``, and one :class:`RatioUnreachableWarning` (also logged) names the
layer, the requested ratio and the best achievable one. The achieved fraction is checked again on the built
module (``params_after / params_before`` of its row, counted from the modules); a built layer that misses the
tolerance is put back dense the same way. ``rank`` and ``energy`` policies are not checked.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_int
from lrk.decomp.base import Built, DecompMethod
from lrk.decomp.rank.policy import (
    DEFAULT_RATIO_TOLERANCE,
    FixedRank,
    RankChoice,
    RankPolicy,
    RankProblem,
    Ranks,
)
from lrk.decomp.report import DENSE_KIND
from lrk.decomp.targets import WEIGHT_LAYERS, TargetSelector
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer
from lrk.measure import count_params

log = logging.getLogger(__name__)

CLASSIFIER_NAMES = ("head", "head_dist", "fc", "classifier")

#: config keys every weight method has besides the common ones of lrk.decomp.base
WEIGHT_KEYS: dict[str, Any] = {"ratio_tolerance": DEFAULT_RATIO_TOLERANCE}


class RatioUnreachableWarning(UserWarning):
    """A layer left dense: no rank choice meets the requested ``ratio`` within ``ratio_tolerance``."""


def model_facts(model: nn.Module) -> dict[str, Any]:
    """Model facts the default targets need: the stem (first Conv2d), the classifier head(s), and the layers
    inside factorized layers (never decomposed again)."""
    modules = list(model.named_modules())
    stem = next((n for n, m in modules if isinstance(m, nn.Conv2d)), None)
    linears = [n for n, m in modules if isinstance(m, nn.Linear)]
    heads = {n for n in CLASSIFIER_NAMES if n in dict(modules)}
    if linears:
        heads.add(linears[-1])
    inside_factorized = set()
    for n, m in modules:
        if isinstance(m, FactorizedLayer):
            inside_factorized.update(c for c, _ in m.named_modules(prefix=n) if c != n)
    return {"stem": stem, "heads": heads, "inside_factorized": inside_factorized}


class WeightMethod(DecompMethod):
    """A weight decomposition. Subclasses implement :meth:`support_error`, :meth:`is_default_target`,
    :meth:`problem` and :meth:`build_layer` (or override :meth:`build` for grouped methods such as TRAWL).

    The calibration batches reach :meth:`prepare` like every method's; the data-free methods of today do not
    read them. :data:`WEIGHT_KEYS` (``ratio_tolerance``) are added to every subclass's ``extra_keys``.
    """

    extra_keys: ClassVar[dict[str, Any]] = dict(WEIGHT_KEYS)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.extra_keys = {**WEIGHT_KEYS, **cls.extra_keys}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        calib = self.cfg["calibration_batches"]
        if calib is not None and not (is_int(calib) and calib >= 0):
            raise LrkConfigError(
                f"decomp.calibration_batches={calib!r} is invalid: it must be an integer >= 0"
            )
        self.policy: RankPolicy = RankPolicy.from_config(self.cfg)

    # --- hooks -----------------------------------------------------------------------------------------
    def support_error(self, name: str, module: nn.Module) -> str | None:
        """Why ``module`` cannot be decomposed by this method (None when it can)."""
        raise NotImplementedError

    def is_default_target(self, name: str, module: nn.Module, facts: dict[str, Any]) -> bool:
        """Whether ``module`` is decomposed when ``targets`` is null (``facts``: :func:`model_facts`)."""
        return name not in facts["heads"] and name != facts["stem"]

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        """The rank problem of one layer (cheap: spectra are computed lazily)."""
        raise NotImplementedError

    def build_layer(
        self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem
    ) -> FactorizedLayer:
        """The factorized replacement of ``module`` at ``ranks``."""
        raise NotImplementedError

    # --- the contract ----------------------------------------------------------------------------------
    def selector(self, model: nn.Module) -> TargetSelector:
        facts = model_facts(model)
        inside = facts["inside_factorized"]
        return TargetSelector(
            method=self.name,
            kinds=WEIGHT_LAYERS,
            label="Linear/Conv layers",
            supported=self.supported,
            is_default=lambda n, m: n not in inside and self.is_default_target(n, m, facts),
            support_error=self.support_error,
        )

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, nn.Module]], batches: list[Any]
    ) -> dict[str, Any]:
        """The rank problem of every target; explicit ranks are checked here, before any maths runs."""
        selector = self.policy.selector()
        problems = {name: self.problem(name, module) for name, module in targets}
        if isinstance(selector, FixedRank):
            for problem in problems.values():
                selector.check(problem)
        return {"selector": selector, "problems": problems, "rows": {}}

    def build_module(self, name: str, module: nn.Module, context: dict[str, Any]) -> nn.Module:
        """The factorized layer at the policy's ranks, or ``module`` itself (left dense, with a warning) when
        the requested ratio is unreachable, before or (counted from the built module) after building."""
        problem = context["problems"][name]
        with torch.no_grad():
            start = time.perf_counter()
            choice = self.policy.choose(problem, context["selector"])
            if not choice.reachable:
                problem.notes.pop("usv", None)
                context["rows"][name] = self.dense_row(
                    name, module, choice, time.perf_counter() - start, problem
                )
                return module
            new = self.build_layer(name, module, choice.ranks, problem)
            new.train(module.training)
            seconds = time.perf_counter() - start
        problem.notes.pop("usv", None)  # free the cached SVD
        row = self.row(name, module, new, choice.ranks, seconds, problem)
        row["note"] = choice.note
        built = row["params_after"] / row["params_before"]
        if not self.policy.within(built):  # the closed form and the module disagree: trust the module
            context["rows"][name] = self.dense_row(name, module, choice, seconds, problem, built=built)
            return module
        context["rows"][name] = row
        return new

    def dense_row(
        self,
        name: str,
        module: nn.Module,
        choice: RankChoice,
        seconds: float,
        problem: RankProblem,
        built: float | None = None,
    ) -> dict[str, Any]:
        """The row of a layer left dense (kind ``dense (ratio unreachable)``), and its warning.

        ``built``: the fraction the built module had, when the closed form promised the target but the module
        missed it (``choice`` then holds the closed form's ranks)."""
        low, high = self.policy.tolerance_range()
        achieved = choice.achieved if built is None else built
        how = "best achievable" if built is None else "the built module has"
        note = (
            f"ratio {self.policy.ratio:g} unreachable within ratio_tolerance={self.policy.ratio_tolerance:g} "
            f"([{low:.3f}, {high:.3f}] of the layer): {how} {achieved:.4f} (ranks {list(choice.ranks)}); "
            "left dense"
        )
        message = f"decomp={self.name}: layer '{name}' ({problem.description}) left dense: {note}"
        log.warning(message)
        warnings.warn(message, RatioUnreachableWarning, stacklevel=2)
        params = count_params(module)
        return {
            "name": name,
            "kind": DENSE_KIND,
            "shape": list(module.weight.shape),
            "rank": None,
            "ranks": None,
            "params_before": params,
            "params_after": params,
            "rel_error": 0.0,
            "energy": 1.0,
            "seconds": seconds,
            "note": note,
        }

    def finish(
        self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]
    ) -> list[dict[str, Any]]:
        return [context["rows"][name] for name, _, _ in built]

    def row(
        self,
        name: str,
        module: nn.Module,
        new: FactorizedLayer,
        ranks: Ranks,
        seconds: float,
        problem: RankProblem,
    ) -> dict[str, Any]:
        """One report row: ranks, parameters counted from the modules, error of the rebuilt weight."""
        dense = module.weight.detach()
        with torch.no_grad():
            rebuilt = new.dense_weight().detach().to(dense.dtype).reshape(dense.shape)
            norm = float(dense.double().norm())
            rel = float((rebuilt.double() - dense.double()).norm()) / norm if norm > 0 else 0.0
        return {
            "name": name,
            "kind": problem.notes.get("kind", self.name),
            "shape": list(dense.shape),
            "rank": float(sum(ranks) / len(ranks)),
            "ranks": list(ranks),
            "params_before": count_params(module),
            "params_after": count_params(new),
            "rel_error": rel,
            "energy": max(0.0, 1.0 - rel * rel),
            "seconds": seconds,
            "note": None,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stage={self.stage!r}, policy={self.policy}, targets={self.targets}, skip={self.skip})"
