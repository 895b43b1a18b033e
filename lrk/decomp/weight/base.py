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

``rank_search: latency`` (keys :data:`~lrk.decomp.rank.latency.RANK_SEARCH_KEYS`, lrk.decomp.rank.latency):
from the policy's ranks, accelerating_lrd_paper Algorithm 1 times the layer at lower ranks and the dense layer,
and the layer is built at the rank it picks, or kept dense (kind ``dense (slower decomposed)``); the row gets the
search's columns (``rank_policy``, ``rank_chosen``, ``dense_ms``, ``policy_ms``, ``chosen_ms``,
``latency_curve``, ``search_s``, ``search_timed``), and a searched rank below the policy's is checked against
the upper end of ``ratio_tolerance`` only.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_int
from lrk.decomp.base import Built, DecompMethod, Rows
from lrk.decomp.freeze import freeze_layer, parse_freeze
from lrk.decomp.merge import check_mergeable, merge_model, merged_rows
from lrk.decomp.rank.evbmf import RANK_SELECTOR_KEYS, bound_selector, rank_selection
from lrk.decomp.rank.latency import EMPTY_FIELDS, RANK_SEARCH_KEYS, RankSearch
from lrk.decomp.rank.policy import (
    DEFAULT_RATIO_TOLERANCE,
    FixedRank,
    RankChoice,
    RankPolicy,
    RankProblem,
    Ranks,
)
from lrk.decomp.report import DENSE_KIND, dense_row
from lrk.decomp.targets import WEIGHT_LAYERS, TargetSelector
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer
from lrk.measure import count_params

log = logging.getLogger(__name__)

CLASSIFIER_NAMES = ("head", "head_dist", "fc", "classifier")

#: config keys every weight method has besides the common ones of lrk.decomp.base
WEIGHT_KEYS: dict[str, Any] = {
    "ratio_tolerance": DEFAULT_RATIO_TOLERANCE,
    **RANK_SEARCH_KEYS,
    **RANK_SELECTOR_KEYS,  # rank_selector: policy | evbmf (lrk.decomp.rank.evbmf)
}


#: keys of the weight methods that declare ``factor_roles`` (lrk.decomp.freeze, lrk.decomp.merge)
FREEZE_MERGE_KEYS: dict[str, Any] = {"freeze": "none", "merge": False}


class RatioUnreachableWarning(UserWarning):
    """A layer left dense: no rank choice meets the requested ``ratio`` within ``ratio_tolerance``."""


def model_facts(model: nn.Module) -> dict[str, Any]:
    """Model facts the default targets need: the stem (first Conv2d; ``stems`` adds every module below the model's
    ``stem_names``, ``declared_stems`` only those), the classifier head(s), and the layers
    inside factorized layers (never decomposed again)."""
    modules = list(model.named_modules())
    stem = next((n for n, m in modules if isinstance(m, nn.Conv2d)), None)
    # modules below a name the model declares in ``stem_names`` (the ViT's conv stem ``patch_embed``: several
    # convolutions); ``stems``: those and the first Conv2d
    prefixes = tuple(getattr(model, "stem_names", ()))
    declared = {n for n, _ in modules if any(n == p or n.startswith(p + ".") for p in prefixes)}
    linears = [n for n, m in modules if isinstance(m, nn.Linear)]
    heads = {n for n in CLASSIFIER_NAMES if n in dict(modules)}
    if linears:
        heads.add(linears[-1])
    inside_factorized = set()
    for n, m in modules:
        if isinstance(m, FactorizedLayer):
            inside_factorized.update(c for c, _ in m.named_modules(prefix=n) if c != n)
    stems = declared | ({stem} if stem is not None else set())
    return {
        "stem": stem,
        "stems": stems,
        "declared_stems": declared,
        "heads": heads,
        "inside_factorized": inside_factorized,
    }


class WeightMethod(DecompMethod):
    """A weight decomposition. Subclasses implement :meth:`support_error`, :meth:`is_default_target`,
    :meth:`problem` and :meth:`build_layer` (or override :meth:`build` for grouped methods such as TRAWL).

    The calibration batches reach :meth:`prepare` like every method's; the data-free methods of today do not
    read them. :data:`WEIGHT_KEYS` (``ratio_tolerance``) are added to every subclass's ``extra_keys``.
    """

    extra_keys: ClassVar[dict[str, Any]] = dict(WEIGHT_KEYS)
    #: roles of the factors of the layers the method builds (lrk.decomp.freeze.LAYER_ROLES); a method that
    #: declares roles also has the keys ``freeze`` (Sec. 2.2) and ``merge`` (Sec. 2.3), :data:`FREEZE_MERGE_KEYS`
    factor_roles: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        roles = FREEZE_MERGE_KEYS if cls.factor_roles else {}
        cls.extra_keys = {**WEIGHT_KEYS, **roles, **cls.extra_keys}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        calib = self.cfg["calibration_batches"]
        if calib is not None and not (is_int(calib) and calib >= 0):
            raise LrkConfigError(
                f"decomp.calibration_batches={calib!r} is invalid: it must be an integer >= 0"
            )
        # rank_selector: policy (rank | ratio | energy) or evbmf (lrk.decomp.rank.evbmf)
        self.policy, self.rank_selector = rank_selection(self.cfg, self.name)
        per_layer = type(self).build is DecompMethod.build  # TRAWL builds groups: no per-layer rank search
        self.rank_search = RankSearch.from_config(self.cfg, self.name, per_layer)
        self.freeze: str | tuple[str, ...] = "none"
        self.merge = False
        if self.factor_roles:
            self.freeze = parse_freeze(self.cfg["freeze"], self.name, self.factor_roles)
            if not isinstance(self.cfg["merge"], bool):
                raise LrkConfigError(
                    f"decomp.merge={self.cfg['merge']!r} is invalid: it must be true or false"
                )
            self.merge = self.cfg["merge"]

    # --- hooks -----------------------------------------------------------------------------------------
    def support_error(self, name: str, module: nn.Module) -> str | None:
        """Why ``module`` cannot be decomposed by this method (None when it can)."""
        raise NotImplementedError

    def is_default_target(self, name: str, module: nn.Module, facts: dict[str, Any]) -> bool:
        """Whether ``module`` is decomposed when ``targets`` is null (``facts``: :func:`model_facts`)."""
        return name not in facts["heads"] and name not in facts["stems"]

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
        selector = bound_selector(self.rank_selector, self.policy, targets)
        problems = {name: self.problem(name, module) for name, module in targets}
        if isinstance(selector, FixedRank):
            for problem in problems.values():
                selector.check(problem)
        if self.merge:  # before any maths: merge must find something, and have batches to re-fit BNs
            check_mergeable(model, [name for name, _ in targets], self.name)
            if not batches:
                raise LrkConfigError(
                    f"decomp.merge=true needs calibration batches (decomp={self.name}): the merged blocks' batch "
                    "norms are re-fitted and their errors measured on them; set decomp.calibration_batches >= 1"
                )
        search = self.rank_search.prepare(model, targets, batches, problems) if self.rank_search else None
        return {"selector": selector, "problems": problems, "rows": {}, "rank_search": search}

    def policy_for(self, module: nn.Module) -> RankPolicy:
        """The rank policy of one target (the method's; a method whose layers round ranks differently, such as
        branched Tucker's multiples of N for k x k convs, returns its variant)."""
        return self.policy

    def build_module(self, name: str, module: nn.Module, context: dict[str, Any]) -> nn.Module:
        """The factorized layer at the policy's ranks, or ``module`` itself (left dense, with a warning) when
        the requested ratio is unreachable, before or (counted from the built module) after building."""
        problem = context["problems"][name]
        policy = self.policy_for(module)
        search, found = context.get("rank_search"), None  # decomp.rank_search=latency: Algorithm 1
        extra = EMPTY_FIELDS if search is not None else {}
        with torch.no_grad():
            start = time.perf_counter()
            choice = policy.choose(problem, context["selector"])
            if not choice.reachable:
                problem.notes.pop("usv", None)
                row = self.dense_row(name, module, choice, time.perf_counter() - start, problem, policy)
                context["rows"][name] = {**row, **extra}
                return module
            ranks = choice.ranks
            if search is not None:
                found = search.search(name, module, problem, choice.ranks, policy)
                start += found.seconds  # the search has its own column, search_s
                extra = found.fields()
                if found.ranks is None:  # no decomposed candidate beat the dense layer
                    problem.notes.pop("usv", None)
                    context["rows"][name] = found.dense_row(name, module, time.perf_counter() - start)
                    return module
                ranks = found.ranks
            new = self.build_layer(name, module, ranks, problem)
            new.train(module.training)
            seconds = time.perf_counter() - start
        problem.notes.pop("usv", None)  # free the cached SVD
        row = self.row(name, module, new, ranks, seconds, problem)
        row["note"] = "; ".join(n for n in (choice.note, found and found.note) if n) or None
        row.update(extra)
        built = row["params_after"] / row["params_before"]
        if not (found.ratio_ok(policy, built) if found else policy.within(built)):
            # the closed form and the module disagree: trust the module
            row = self.dense_row(name, module, choice, seconds, problem, policy, built=built)
            context["rows"][name] = {**row, **extra}
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
        policy: RankPolicy,
        built: float | None = None,
    ) -> dict[str, Any]:
        """The row of a layer left dense (kind ``dense (ratio unreachable)``), and its warning.

        ``built``: the fraction the built module had, when the closed form promised the target but the module
        missed it (``choice`` then holds the closed form's ranks)."""
        low, high = policy.tolerance_range()
        achieved = choice.achieved if built is None else built
        how = "best achievable" if built is None else "the built module has"
        note = (
            f"ratio {policy.ratio:g} unreachable within ratio_tolerance={policy.ratio_tolerance:g} "
            f"([{low:.3f}, {high:.3f}] of the layer): {how} {achieved:.4f} (ranks {list(choice.ranks)}); "
            "left dense"
        )
        message = f"decomp={self.name}: layer '{name}' ({problem.description}) left dense: {note}"
        log.warning(message)
        warnings.warn(message, RatioUnreachableWarning, stacklevel=2)
        return dense_row(name, module, DENSE_KIND, seconds, note)

    def finish(self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]) -> Rows:
        rows = [context["rows"][name] for name, _, _ in built]
        return self.merge_and_freeze(model, built, batches, rows)

    def merge_and_freeze(
        self, model: nn.Module, built: Built, batches: list[Any], rows: list[dict[str, Any]]
    ) -> Rows:
        """``merge: true``: :func:`lrk.decomp.merge.merge_model` (the merged units' rows replace their layers'
        rows); then ``freeze``: the factors of the named roles of every decomposed layer still in the model get
        ``requires_grad=False`` (rows gain ``frozen`` and ``frozen_params``), lrk.decomp.freeze."""
        if self.merge:
            report = merge_model(model, batches, {name: old for name, old, new in built if new is not old})
            if not report.rows:
                reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in report.skipped[:5])
                raise LrkConfigError(
                    f"decomp.merge=true merged nothing after decomp={self.name} ({reasons or 'no unit'}): e.g. every "
                    "targeted conv2 stayed dense (ratio unreachable); set merge: false or other targets"
                )
            log.info("decomp=%s merge: %s", self.name, report.summary())
            rows = merged_rows(rows, report)
        if self.freeze != "none":
            modules = dict(model.named_modules())
            owner = {n: row for row in rows for n in row.get("merged_layers") or [row["name"]]}
            for row in rows:
                row.update(frozen=[], frozen_params=0)
            for name in sorted({name for name, _, _ in built} | set(owner)):
                module, row = modules.get(name), owner.get(name)
                if isinstance(module, FactorizedLayer):
                    info = freeze_layer(module, self.freeze)
                    if row is not None:
                        row["frozen"] = sorted({*row["frozen"], *info["frozen"]})
                        row["frozen_params"] += info["frozen_params"]
        return rows

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
