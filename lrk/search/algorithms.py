"""Samplers and pruners by name, with their options checked before any trial runs."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from lrk.errors import LrkConfigError

SAMPLERS = ("tpe", "random", "grid", "nsgaii")
PRUNERS = ("none", "median", "hyperband")


def _options(
    where: str, cls: Any, options: Mapping[str, Any] | None, reserved: tuple[str, ...] = ()
) -> dict[str, Any]:
    options = dict(options or {})
    valid = [p for p in inspect.signature(cls).parameters if p not in reserved]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise LrkConfigError(
            f"{where}.options has unknown key(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(valid)}"
        )
    return options


def make_sampler(
    name: str,
    seed: int | None,
    options: Mapping[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
    n_objectives: int = 1,
) -> Any:
    """``tpe`` (Optuna's default, seeded), ``random``, ``grid`` (``grid``: the values of each param) or ``nsgaii``."""
    from optuna import samplers

    where = "hydra.sweeper.sampler"
    classes = {
        "tpe": samplers.TPESampler,
        "random": samplers.RandomSampler,
        "grid": samplers.GridSampler,
        "nsgaii": samplers.NSGAIISampler,
    }
    if name not in classes:
        raise LrkConfigError(f"{where}.name={name} is not a sampler lrk knows: valid: {', '.join(SAMPLERS)}")
    cls = classes[name]
    kwargs = _options(where, cls, options, reserved=("seed", "search_space"))
    if name == "grid":
        assert grid is not None
        return _ask_tell_grid_sampler()(grid, seed=seed, **kwargs)
    try:
        return cls(seed=seed, **kwargs)
    except (TypeError, ValueError) as exc:
        raise LrkConfigError(f"{where}: {cls.__name__}({kwargs}) is invalid: {exc}") from None


def _ask_tell_grid_sampler() -> Any:
    """Optuna's GridSampler without its ``study.stop()`` once the grid is covered (that call only works inside
    ``study.optimize``); the sweeper caps ``n_trials`` at the grid size instead."""
    from optuna.samplers import GridSampler

    class AskTellGridSampler(GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return AskTellGridSampler


def make_pruner(name: str, options: Mapping[str, Any] | None = None, n_objectives: int = 1) -> Any:
    """``none``, ``median`` (:class:`optuna.pruners.MedianPruner`) or ``hyperband``."""
    from optuna import pruners

    where = "hydra.sweeper.pruner"
    classes = {
        "none": pruners.NopPruner,
        "median": pruners.MedianPruner,
        "hyperband": pruners.HyperbandPruner,
    }
    if name not in classes:
        raise LrkConfigError(f"{where}.name={name} is not a pruner lrk knows: valid: {', '.join(PRUNERS)}")
    if name != "none" and n_objectives > 1:
        raise LrkConfigError(
            f"{where}.name={name} cannot prune a multi-objective study (Optuna reports one value per step): "
            "use hydra.sweeper.pruner.name=none"
        )
    cls = classes[name]
    if name == "none":  # options left from a config that had a pruner (pruner.name=none on the command line)
        return cls()
    kwargs = _options(where, cls, options)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise LrkConfigError(f"{where}: {cls.__name__}({kwargs}) is invalid: {exc}") from None
