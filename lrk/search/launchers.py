"""Checks of the Hydra launcher a sweep runs its trials with, before the first trial.

lrk's sweeper asks Optuna for ``hydra.sweeper.n_jobs`` trials at a time and hands them to the launcher:

- ``hydra/launcher=basic`` (Hydra's default): one trial after another in this process;
- ``hydra/launcher=joblib``: ``hydra.launcher.n_jobs`` local processes (hydra-joblib-launcher);
- ``hydra/launcher=submitit_local``: local processes through submitit (the same path a cluster job takes);
- ``hydra/launcher=submitit_slurm``: Slurm jobs (hydra-submitit-launcher; needs ``sbatch`` on the PATH).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from lrk.errors import LrkConfigError

log = logging.getLogger(__name__)

#: launcher class name -> the command it needs on the PATH
NEEDS_COMMAND = {"SlurmLauncher": "sbatch"}
PARALLEL = {"JoblibLauncher", "LocalLauncher", "SlurmLauncher"}


def check_launcher(launcher: Any, n_jobs: int) -> None:
    """Refuse a launcher that cannot start a trial on this machine (one :class:`LrkConfigError`), and say when
    ``n_jobs`` leaves a parallel launcher running one trial at a time."""
    kind = type(launcher).__name__
    command = NEEDS_COMMAND.get(kind)
    if command is not None and shutil.which(command) is None:
        raise LrkConfigError(
            f"hydra/launcher={_config_name(kind)} cannot start a trial here: {command!r} is not on the PATH "
            "(not a Slurm login node); launchers that run on this machine: basic, joblib, submitit_local"
        )
    if kind in PARALLEL and n_jobs == 1:
        log.warning(
            "hydra/launcher=%s runs trials in parallel, but hydra.sweeper.n_jobs=1 asks for one trial at a "
            "time: set hydra.sweeper.n_jobs to the number of parallel trials",
            _config_name(kind),
        )


def _config_name(kind: str) -> str:
    return {
        "SlurmLauncher": "submitit_slurm",
        "LocalLauncher": "submitit_local",
        "JoblibLauncher": "joblib",
    }.get(kind, kind)
