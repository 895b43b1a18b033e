"""Registry, config parsing and the ``apply`` contract shared by every method, weight and attention alike.

design.md "The decomposition contract": a method is a class registered by name, built from its config node
(every key validated once, in the constructor, before anything trains), with one entry point

    report = method.apply(model, calibration_batches)

which runs ``select_targets -> prepare -> build -> swap -> finish``:

- :meth:`DecompMethod.select_targets`: the one target selector (:mod:`lrk.decomp.targets`) over the kind of
  module the method replaces;
- :meth:`DecompMethod.prepare`: the checks that need the model and the calibration batches (every method
  receives them; a weight method may ignore them), and any calibration; returns a context;
- :meth:`DecompMethod.build`: every replacement is built before the first is swapped in, so a failure
  leaves the model unchanged;
- :meth:`DecompMethod.finish`: the report rows, after the swap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from torch import nn

from lrk.checks import is_int
from lrk.config import config_to_dict
from lrk.decomp.report import DecompReport
from lrk.decomp.schedule_keys import SCHEDULE_KEYS, check_schedule_keys
from lrk.decomp.targets import TargetSelector
from lrk.errors import LrkConfigError
from lrk.models.utils import replace_module
from lrk.progress import progress

log = logging.getLogger(__name__)

METHODS: dict[str, type[DecompMethod]] = {}
PROGRESS_MIN_LAYERS = 16  # fewer targets decompose quietly (a tiny model, a test)

COMMON_KEYS: dict[str, Any] = {
    "name": None,
    "stage": "init",
    # the order of compress / fit / test (lrk.pipeline.schedules.SCHEDULES; checked there, before training)
    "schedule": "one_shot",
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
    "calibration_batches": None,  # how many batches lrk.train hands to apply()
    # keys of schedule=multistage / accuracy_target (lrk.decomp.schedule_keys, checked in the constructor)
    **SCHEDULE_KEYS,
}
STAGES = ("init", "post")

Built = list[tuple[str, nn.Module, nn.Module]]  # (name, old module, new module)
Rows = list[dict[str, Any]]  # report rows (lrk.decomp.report.DecompReport)


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


class DecompMethod:
    """Base of every method. Subclasses set ``supported`` (text for errors) and ``extra_keys`` (their own config
    keys with defaults), and implement :meth:`selector`, :meth:`build_module` (or :meth:`build` for methods that
    replace groups of modules together) and :meth:`finish`; :meth:`prepare` is optional.

    ``generic_cases`` (class attribute) drives the tests every registered method gets
    (tests/test_methods_generic.py): ``exact`` are config keys under which the method reproduces the dense
    model, ``lossy`` keys under which it must change the output, and ``invalid`` keys it must refuse.
    """

    name: ClassVar[str] = ""
    supported: ClassVar[str] = ""
    extra_keys: ClassVar[dict[str, Any]] = {}
    generic_cases: ClassVar[dict[str, Any]] = {}

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
        schedule = self.cfg["schedule"]
        if not (isinstance(schedule, str) and schedule):
            raise LrkConfigError(f"decomp.schedule={schedule!r} is invalid: it must be a schedule name")
        self.schedule: str = schedule
        check_schedule_keys(self.cfg)
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
    def selector(self, model: nn.Module) -> TargetSelector:
        """What this method replaces in ``model`` (the kind of module, the default targets, what is supported)."""
        raise NotImplementedError

    def check_batches(self, batches: list[Any]) -> None:
        """Refuse calibration batches the method cannot work with (e.g. none where it needs some)."""

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, nn.Module]], batches: list[Any]
    ) -> dict[str, Any]:
        """Checks that need the model or the calibration batches, and calibration; the model stays unchanged.
        Returns the context that :meth:`build_module` and :meth:`finish` read."""
        return {}

    def build_module(self, name: str, module: nn.Module, context: dict[str, Any]) -> nn.Module:
        """The replacement of one target module (no model change)."""
        raise NotImplementedError

    def build(self, targets: list[tuple[str, nn.Module]], context: dict[str, Any]) -> Built:
        """Every replacement, built before any is swapped in: (name, old module, new module); a progress bar
        (:mod:`lrk.progress`) over the layers from :data:`PROGRESS_MIN_LAYERS` of them."""
        steps = progress(
            targets, f"decomposing layers ({self.name})", min_total=PROGRESS_MIN_LAYERS, logger=log
        )
        return [(name, old, self.build_module(name, old, context)) for name, old in steps]

    def finish(self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]) -> Rows:
        """Report rows after the swap (:class:`~lrk.decomp.report.DecompReport` documents the keys)."""
        raise NotImplementedError

    def runtime_metrics(self, model: nn.Module) -> dict[str, float]:
        """Figures of the work the method does inside forwards during the fit (e.g. SDRM's t-SVD: ``time/rr_s``,
        ``decomp/rank_mean``), read after the fit; ``{}`` for a method whose work ends in :meth:`apply`."""
        return {}

    # --- the entry point ---------------------------------------------------------------------------------
    def select_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules this method replaces (``targets`` / ``skip`` globs, :mod:`lrk.decomp.targets`)."""
        return self.selector(model).select(model, self.targets, self.skip)

    def apply(self, model: nn.Module, calibration_batches: Iterable[Any] | None = None) -> DecompReport:
        """Replace the target modules of ``model`` in place and return the per-layer report.

        Raises :class:`LrkConfigError` (model untouched) for bad targets, layer types, ranks or calibration.
        """
        batches = list(calibration_batches) if calibration_batches is not None else []
        targets = self.select_targets(model)
        self.check_batches(batches)
        context = self.prepare(model, targets, batches)
        built = self.build(targets, context)
        for name, _, new in built:
            replace_module(model, name, new)
        return DecompReport(self.name, self.finish(model, built, batches, context))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stage={self.stage!r}, targets={self.targets}, skip={self.skip})"
