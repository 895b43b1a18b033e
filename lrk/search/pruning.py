"""Pruning: intermediate values reported to the active trial, which may stop the job early.

A job raises ``optuna.TrialPruned``; the sweeper records the trial as PRUNED (and lrk's run writes
status ``pruned`` into summary.json).
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import Callback

from lrk.search.context import active_trial, report

__all__ = ["OptunaPruningCallback", "report"]

log = logging.getLogger(__name__)


class OptunaPruningCallback(Callback):
    """Report ``trainer.callback_metrics[monitor]`` to the active trial after each validation epoch.

    Raises ``optuna.TrialPruned`` when the study's pruner (median, hyperband) says the trial is hopeless.
    Outside a sweep, for multi-objective studies and under multi-process training it does nothing.
    """

    def __init__(self, monitor: str) -> None:
        super().__init__()
        self.monitor = monitor
        self._warned = False

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or active_trial() is None:
            return
        if trainer.world_size > 1:
            self._warn_once("pruning is off: it is not supported when training on several processes")
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            self._warn_once(
                f"pruning is off: {self.monitor} is not logged during validation "
                f"(logged: {', '.join(sorted(trainer.callback_metrics)) or 'nothing'})"
            )
            return
        report(float(value), int(trainer.current_epoch))

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            log.warning("%s", message)
            self._warned = True
