"""Command-line entry point shared by ``python train.py`` and the ``lrk`` console script."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lrk.config import register_resolvers
from lrk.errors import LrkConfigError

#: conf/ of the checkout lrk is installed from (``pip install -e .``)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def task(cfg: DictConfig) -> dict[str, float]:
    """One Hydra job: run the grid point, turn bad input into one clear message.

    Returns the metrics dict (the Optuna sweeper reads ``optimized_metric`` from it).
    """
    from lrk.train import run  # heavy imports after Hydra has parsed the command line

    _log_once_through_hydra()

    try:
        return run(cfg)
    except LrkConfigError as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed trial and goes on
        print(f"lrk: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _log_once_through_hydra() -> None:
    """Lightning gives its loggers their own console handler; Hydra's root handlers already print
    (and write the run's log file), so each line would show twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """``lrk [overrides]``: the same as ``python train.py [overrides]`` from the checkout."""
    if not (CONFIG_DIR / "train.yaml").is_file():
        sys.exit(
            f"lrk: error: no configs at {CONFIG_DIR}: install lrk from its checkout with pip install -e ."
        )
    register_resolvers()
    # paths.root_dir: where logs/ and data/ go; known before Hydra starts, so sweeps resolve it too
    os.environ.setdefault("PROJECT_ROOT", os.getcwd())
    # SIGTERM (a scheduler or `kill`) ends a fit like Ctrl+C: checkpoint kept, summary.json says interrupted
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(task)()
