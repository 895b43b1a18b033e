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
    Outside a sweep and for multi-objective studies it does nothing. Under DDP only rank zero (the process the
    sweeper gave the trial; ranks 1.. have none) reports, and its decision is broadcast, so every rank raises
    ``TrialPruned`` at the same epoch (no rank is left waiting in a collective for the others).
    """

    def __init__(self, monitor: str) -> None:
        super().__init__()
        self.monitor = monitor
        self._warned = False

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        if trainer.world_size <= 1:
            self._report(trainer)
            return
        # every rank takes part in the broadcast, trial or not: rank zero's decision stops all of them
        pruned: str | None = None
        if trainer.is_global_zero:
            try:
                self._report(trainer)
            except Exception as exc:
                if type(exc).__name__ != "TrialPruned":
                    raise
                pruned = str(exc)
        pruned = trainer.strategy.broadcast(pruned, src=0)
        if pruned is not None:
            import optuna

            raise optuna.TrialPruned(pruned)

    def _report(self, trainer: Any) -> None:
        if active_trial() is None:
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
