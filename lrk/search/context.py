"""The trial a job belongs to, seen from inside the job (for pruning).

The sweeper runs each job through :class:`TrialTask`, which activates the job's trial around the task
function: jobs launched in-process (Hydra's basic launcher) see the very ``optuna.Trial`` the sweeper asked
for; jobs in another process (a parallel launcher) load it from the storage named by ``optuna.storage``.
Outside a sweep there is no active trial and :func:`active_trial` returns None.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_ACTIVE: Any = None  # optuna.Trial | None
_REGISTERED: dict[tuple[str, int], Any] = {}  # (study name, trial number) -> optuna.Trial


def active_trial() -> Any:
    """The ``optuna.Trial`` of the running job, or None outside a sweep."""
    return _ACTIVE


@contextmanager
def activate(trial: Any) -> Iterator[Any]:
    """Make ``trial`` the active trial inside the ``with`` block (None: no trial)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, trial
    try:
        yield trial
    finally:
        _ACTIVE = previous


def report(value: float, step: int, trial: Any = None) -> None:
    """Report ``value`` at ``step`` to ``trial`` (default: the active one); raise ``optuna.TrialPruned`` to stop.

    Does nothing without a trial, or when the study is multi-objective (Optuna cannot prune those).
    """
    trial = trial if trial is not None else active_trial()
    if trial is None or len(trial.study.directions) > 1:
        return
    import optuna

    trial.report(float(value), step)
    if trial.should_prune():
        shown = f"{value:.6g}" if math.isfinite(value) else str(value)
        raise optuna.TrialPruned(f"trial {trial.number} pruned at step {step} (value {shown})")


def register(study_name: str, trial: Any) -> None:
    """Remember a trial the sweeper of this process launched, for :func:`trial_for_config`."""
    _REGISTERED[(study_name, trial.number)] = trial


def unregister(study_name: str, number: int) -> None:
    _REGISTERED.pop((study_name, number), None)


def trial_for_config(cfg: Any) -> Any:
    """The trial named by the job config's ``optuna.{study,trial,storage}``, or None when there is none."""
    node = cfg.get("optuna") if hasattr(cfg, "get") else None
    if not node or node.get("trial") is None or not node.get("study"):
        return None
    key = (str(node.study), int(node.trial))
    if key in _REGISTERED:
        return _REGISTERED[key]
    if not node.get("storage"):
        return None
    try:  # another process (a parallel launcher): load the trial from the shared storage
        import optuna

        from lrk.search.storage import open_storage

        storage = open_storage(str(node.storage), heartbeat_interval=None)
        study = optuna.load_study(study_name=key[0], storage=storage)
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(key[0]), key[1]
        )
        return optuna.trial.Trial(study, trial_id)
    except Exception as exc:
        log.warning(
            "trial %s of study %s not reachable (%s): pruning is off for this job", key[1], key[0], exc
        )
        return None


class TrialTask:
    """Hydra task function wrapper: runs ``task_function(cfg)`` with the job's trial active."""

    def __init__(self, task_function: Callable[[Any], Any]) -> None:
        self.task_function = task_function

    def __call__(self, cfg: Any) -> Any:
        with activate(trial_for_config(cfg)):
            return self.task_function(cfg)
