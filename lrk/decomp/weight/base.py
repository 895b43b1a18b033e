"""Base of the weight methods: Linear/Conv layers replaced by factorized layers (lrk.layers) at ranks chosen by the
shared rank policy (lrk.decomp.rank)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lrk.checks import is_int
from lrk.decomp.base import Built, DecompMethod
from lrk.decomp.rank.policy import FixedRank, RankPolicy, RankProblem, Ranks
from lrk.decomp.targets import WEIGHT_LAYERS, TargetSelector
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer, own_params

CLASSIFIER_NAMES = ("head", "head_dist", "fc", "classifier")


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
    read them.
    """

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
        problem = context["problems"][name]
        with torch.no_grad():
            start = time.perf_counter()
            ranks = self.policy.select(problem, context["selector"])
            new = self.build_layer(name, module, ranks, problem)
            new.train(module.training)
            seconds = time.perf_counter() - start
        problem.notes.pop("usv", None)  # free the cached SVD
        context["rows"][name] = self.row(name, module, new, ranks, seconds, problem)
        return new

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
            "params_before": own_params(module),
            "params_after": own_params(new),
            "rel_error": rel,
            "energy": max(0.0, 1.0 - rel * rel),
            "seconds": seconds,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stage={self.stage!r}, policy={self.policy}, targets={self.targets}, skip={self.skip})"
