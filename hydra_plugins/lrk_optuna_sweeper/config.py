"""The config of ``hydra/sweeper=lrk_optuna`` (every key under ``hydra.sweeper``)."""

# OmegaConf's structured configs need typing's Optional/Dict, and no `from __future__ import annotations`
# (Hydra loads plugin modules without registering them in sys.modules, which dataclasses then need)
# ruff: noqa: UP006, UP045

from dataclasses import dataclass, field
from typing import Any, Dict, Optional  # noqa: UP035

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConf:
    # tpe | random | grid | nsgaii
    name: str = "tpe"
    # the study's trial number k is drawn with seed + k: reproducible, and neither a resumed study nor a second
    # worker replays points already drawn; null: not seeded
    seed: Optional[int] = 42
    # more keyword arguments of the Optuna sampler class, e.g. {n_startup_trials: 5} or {population_size: 20}
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerConf:
    # none | median | hyperband (single objective only)
    name: str = "none"
    # keyword arguments of the Optuna pruner, e.g. {n_startup_trials: 5, n_warmup_steps: 2}
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LrkOptunaSweeperConf:
    _target_: str = "hydra_plugins.lrk_optuna_sweeper.lrk_optuna_sweeper.LrkOptunaSweeper"
    # null: derived from the config (<hparams_search>-<data>-<backbone>); same name + storage = resume
    study_name: Optional[str] = None
    # null: sqlite:///<paths.log_dir>/optuna/<study_name>.db; any SQLAlchemy URL; or journal:///path/file.log
    storage: Optional[str] = None
    # maximize | minimize, or a list with one per optimized_metric
    direction: Any = "maximize"
    # COMPLETE + PRUNED trials the study must hold: a resumed sweep runs only the rest; workers share the count
    n_trials: int = 20
    # trials per launch (a parallel Hydra launcher runs them at once; the basic launcher one after another)
    n_jobs: int = 1
    # the sweep stops when more than this fraction of n_trials failed in this run
    max_failure_rate: float = 0.25
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    # seconds between heartbeats of a running trial (null: off); a trial silent for grace_period (null: 2 x
    # heartbeat_interval) is marked FAIL by another worker and retried up to max_retry times
    heartbeat_interval: Optional[int] = 60
    grace_period: Optional[int] = None
    max_retry: int = 1
    # key -> sweep string: interval(a, b), tag(log, interval(a, b)), range(a, b, step=s), choice(x, y)
    params: Optional[Dict[str, Any]] = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="lrk_optuna", node=LrkOptunaSweeperConf, provider="lrk"
)
