"""Registry, config parsing, target selection and the ``apply`` loop shared by every method.

design.md "The decomposition contract": a method is a class registered by name, built from its config
node, with one entry point ``report = method.apply(model, calibration_batches)`` that changes the model
in place. Every check (targets, layer types, explicit ranks) runs before the model is touched, and the
new modules are all built before the first one is swapped in, so a failure leaves the model unchanged.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_int
from lrk.config import config_to_dict
from lrk.decomp.rank.policy import FixedRank, RankPolicy, RankProblem, Ranks
from lrk.decomp.report import DecompReport
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer, _describe, own_params

METHODS: dict[str, type[DecompMethod]] = {}

COMMON_KEYS: dict[str, Any] = {
    "name": None,
    "stage": "init",
    "finetune_epochs": 0,
    "ckpt_path": None,
    "rank": None,
    "ratio": None,
    "energy": None,
    "default_ratio": None,
    "rank_multiple": 1,
    "min_rank": 1,
    "targets": None,
    "skip": [],
    "calibration_batches": None,  # read by lrk.train (how many batches to pass); the weight methods ignore them
}
STAGES = ("init", "post")
WEIGHT_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
CLASSIFIER_NAMES = ("head", "head_dist", "fc", "classifier")


def register_method(name: str):
    """Class decorator: register a :class:`DecompMethod` subclass under ``name`` (``decomp=<name>``)."""

    def decorator(cls: type[DecompMethod]) -> type[DecompMethod]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(
                f"decomposition method {name!r} is already registered by {METHODS[name].__name__}"
            )
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def build_method(cfg: Mapping[str, Any] | Any) -> DecompMethod:
    """Build the method named ``cfg['name']`` from its config node (conf/decomp/<name>.yaml); every key is
    validated here, before anything trains (:class:`LrkConfigError` otherwise)."""
    values = config_to_dict(cfg, "decomp") if cfg is not None else {}
    name = values.get("name")
    if name not in METHODS:
        raise LrkConfigError(f"decomp.name={name!r} is invalid: it must be one of {sorted(METHODS)}")
    return METHODS[name](values)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class DecompMethod:
    """A weight decomposition. Subclasses set ``supported`` (text for errors), ``extra_keys`` (their own
    config keys with defaults) and implement :meth:`support_error`, :meth:`is_default_target`,
    :meth:`problem` and :meth:`build` (or override :meth:`decompose` for grouped methods such as TRAWL).
    """

    name: ClassVar[str] = ""
    supported: ClassVar[str] = ""
    extra_keys: ClassVar[dict[str, Any]] = {}
    needs_policy: ClassVar[bool] = True

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        values = dict(cfg)
        known = {**COMMON_KEYS, **self.extra_keys}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise LrkConfigError(
                f"decomp key(s) {unknown} are invalid for decomp={self.name}: valid keys are {sorted(known)}"
            )
        self.cfg = {**known, **values}
        stage = self.cfg["stage"]
        if stage not in STAGES:
            raise LrkConfigError(f"decomp.stage={stage!r} is invalid: it must be one of {list(STAGES)}")
        self.stage: str = stage
        epochs = self.cfg["finetune_epochs"]
        if not (is_int(epochs) and epochs >= 0):
            raise LrkConfigError(f"decomp.finetune_epochs={epochs!r} is invalid: it must be an integer >= 0")
        self.finetune_epochs: int = epochs
        ckpt = self.cfg["ckpt_path"]
        if ckpt is not None and not isinstance(ckpt, str):
            raise LrkConfigError(f"decomp.ckpt_path={ckpt!r} is invalid: it must be a path string or null")
        self.ckpt_path: str | None = ckpt or None
        self.targets: list[str] | None = self._patterns("targets", allow_none=True)
        self.skip: list[str] = self._patterns("skip", allow_none=False) or []
        self.policy: RankPolicy | None = RankPolicy.from_config(self.cfg) if self.needs_policy else None

    def _patterns(self, key: str, allow_none: bool) -> list[str] | None:
        value = self.cfg[key]
        if value is None:
            return None if allow_none else []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise LrkConfigError(
                f"decomp.{key}={value!r} is invalid: it must be a list of glob patterns over module names"
            )
        return list(value)

    # --- hooks -----------------------------------------------------------------------------------------
    def support_error(self, name: str, module: nn.Module) -> str | None:
        """Why ``module`` cannot be decomposed by this method (None when it can)."""
        raise NotImplementedError

    def is_default_target(self, name: str, module: nn.Module, context: dict[str, Any]) -> bool:
        """Whether ``module`` is decomposed when ``targets`` is null."""
        raise NotImplementedError

    def problem(self, name: str, module: nn.Module) -> RankProblem:
        """The rank problem of one layer (cheap: spectra are computed lazily)."""
        raise NotImplementedError

    def build(self, name: str, module: nn.Module, ranks: Ranks, problem: RankProblem) -> FactorizedLayer:
        """The factorized replacement of ``module`` at ``ranks``."""
        raise NotImplementedError

    def runtime_metrics(self, model: nn.Module) -> dict[str, float]:
        """Figures of the work the method does inside forwards during the fit (e.g. SDRM's t-SVD: ``time/rr_s``,
        ``decomp/rank_mean``), read after the fit; ``{}`` for a method whose work ends in :meth:`apply`."""
        return {}

    # --- target selection --------------------------------------------------------------------------------
    def context(self, model: nn.Module) -> dict[str, Any]:
        """Model facts the default targets need: the stem (first Conv2d) and the classifier head(s)."""
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

    def select_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Resolve ``targets`` / ``skip`` globs (fnmatch over module names) to the layers to decompose.

        Explicit ``targets`` keep only weight layers (Linear / Conv); each pattern must match at least one,
        and each matched layer must be supported. ``targets: null`` takes the method's default layers.
        Each ``skip`` pattern must match at least one module.
        """
        modules = [(n, m) for n, m in model.named_modules() if n]
        names = [n for n, _ in modules]
        sample = ", ".join(n for n, m in modules if isinstance(m, WEIGHT_LAYERS))[:300]
        context = self.context(model)
        if self.targets is None:
            chosen = [
                (n, m)
                for n, m in modules
                if n not in context["inside_factorized"]
                and self.support_error(n, m) is None
                and self.is_default_target(n, m, context)
            ]
            if not chosen:
                raise LrkConfigError(
                    f"decomp={self.name} found no layer to decompose by default in this model ({self.supported}); "
                    f"set decomp.targets to glob patterns over its layers, e.g. {sample[:120]}"
                )
        else:
            picked: dict[str, nn.Module] = {}
            for pattern in self.targets:
                hits = [(n, m) for n, m in modules if fnmatch.fnmatchcase(n, pattern)]
                layers = [(n, m) for n, m in hits if isinstance(m, WEIGHT_LAYERS)]
                if not layers:
                    what = (
                        f"only non-weight modules ({', '.join(n for n, _ in hits[:5])})"
                        if hits
                        else "nothing"
                    )
                    raise LrkConfigError(
                        f"decomp.targets pattern '{pattern}' matches {what}: it must match Linear/Conv layers "
                        f"by module name, e.g. {sample}"
                    )
                for n, m in layers:
                    reason = self.support_error(n, m)
                    if reason is not None:
                        raise LrkConfigError(
                            f"decomp={self.name} cannot decompose layer '{n}' ({_describe(m)}): {reason}; "
                            f"decomp={self.name} supports {self.supported}"
                        )
                    picked[n] = m
            chosen = [(n, m) for n, m in modules if n in picked]
        for pattern in self.skip:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise LrkConfigError(
                    f"decomp.skip pattern '{pattern}' matches no module of the model; module names look like {sample}"
                )
        chosen = [(n, m) for n, m in chosen if not any(fnmatch.fnmatchcase(n, p) for p in self.skip)]
        if not chosen:
            raise LrkConfigError(f"decomp={self.name}: decomp.skip={self.skip} removes every target layer")
        return chosen

    # --- the entry point ---------------------------------------------------------------------------------
    def decompose(self, targets: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, dict[str, Any]]]:
        """Build the replacement of every target (no model change yet): (name, new module, report row)."""
        assert self.policy is not None
        selector = self.policy.selector()
        problems = [self.problem(n, m) for n, m in targets]
        if isinstance(selector, FixedRank):  # every explicit rank is checked before any maths runs
            for p in problems:
                selector.check(p)
        out = []
        for (name, module), problem in zip(targets, problems, strict=True):
            start = time.perf_counter()
            ranks = self.policy.select(problem, selector)
            new = self.build(name, module, ranks, problem)
            new.train(module.training)
            seconds = time.perf_counter() - start
            problem.notes.pop("usv", None)  # free the cached SVD
            out.append((name, new, self.row(name, module, new, ranks, seconds, problem)))
        return out

    def row(
        self,
        name: str,
        module: nn.Module,
        new: FactorizedLayer,
        ranks: Ranks,
        seconds: float,
        problem: RankProblem,
    ) -> dict[str, Any]:
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

    def apply(self, model: nn.Module, calibration_batches: Iterable[Any] | None = None) -> DecompReport:
        """Decompose the target layers of ``model`` in place and return the per-layer report.

        The weight methods are data-free: ``calibration_batches`` is accepted for the common interface and
        not read. Raises :class:`LrkConfigError` (model untouched) for bad targets, layer types or ranks.
        """
        del calibration_batches
        targets = self.select_targets(model)
        with torch.no_grad():
            built = self.decompose(targets)
        for name, new, _ in built:
            _swap(model, name, new)
        return DecompReport(self.name, [row for _, _, row in built])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stage={self.stage!r}, policy={self.policy}, targets={self.targets}, skip={self.skip})"
