"""The Hydra Sweeper class; the work is in :mod:`lrk.search.sweep` (imported only when a sweep runs)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import LrkOptunaSweeperConf  # noqa: F401  (registers hydra/sweeper=lrk_optuna)


class LrkOptunaSweeper(Sweeper):
    """Optuna ask/tell over Hydra jobs: pruning, failure tolerance, resumable and shared storage."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = settings
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        from lrk.search.context import TrialTask

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=TrialTask(task_function), config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from lrk.search.sweep import OptunaSweep

        assert self.hydra_context is not None and self.config is not None
        return OptunaSweep(self.settings, self.config, self.hydra_context, self.launcher).run(list(arguments))
