"""A toy Hydra app for the sweeper's tests: a score computed from x, y and kind, in a few milliseconds.

    python tests/sweep_app/app.py -m hparams_search=toy hydra.sweeper.n_trials=5

It can fail on purpose (``fail_trials``), be interrupted (``interrupt_trials``), hang (``hang_trials``), return NaN (``nan_trials``), wait for other
worker processes (``barrier``), report intermediate values to the active
trial so that a hopeless one is pruned (``epochs``), sleep or compute for a while (``sleep``, ``busy``), and
write a summary.json like lrk's run (``write_summary``). It has the same ``optuna`` node as conf/train.yaml.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lrk.search.context import report

KIND_BONUS = {"a": 0.0, "b": 0.1, "c": -0.1}


def score_of(x: float, y: float, kind: str) -> float:
    """Best at x=0.3, y=2, kind=b: 1.1."""
    return 1.0 - (x - 0.3) ** 2 - 0.01 * (y - 2) ** 2 + KIND_BONUS[kind]


def wait_for_workers(barrier_dir: str, workers: int, timeout: float) -> None:
    """Block until ``workers`` processes have reached this point (each leaves a file named by its pid)."""
    folder = Path(barrier_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    end = time.monotonic() + timeout
    while len(list(folder.iterdir())) < workers and time.monotonic() < end:
        time.sleep(0.05)


def task(cfg: DictConfig) -> Any:
    trial = cfg.optuna.trial
    if cfg.barrier.dir:
        wait_for_workers(cfg.barrier.dir, cfg.barrier.workers, cfg.barrier.timeout)
    if trial is not None and trial in cfg.hang_trials:
        time.sleep(600)  # a worker stuck in a trial, for the tests that kill it
    if cfg.sleep:
        time.sleep(cfg.sleep)
    if cfg.busy:
        end, n = time.perf_counter() + cfg.busy, 0
        while time.perf_counter() < end:
            n += sum(i * i for i in range(1000))
    if trial is not None and trial in cfg.interrupt_trials:
        raise KeyboardInterrupt(f"Ctrl+C in trial {trial}")
    if trial is not None and trial in cfg.fail_trials:
        raise RuntimeError(f"forced failure in trial {trial}")
    score = score_of(cfg.x, cfg.y, cfg.kind)
    if trial is not None and trial in cfg.nan_trials:
        score = math.nan
    for epoch in range(cfg.epochs):
        report(score, epoch)  # raises optuna.TrialPruned when the pruner says so
    metrics = {"score": score, "size": float(cfg.y * 10), "x": float(cfg.x)}
    if cfg.write_summary:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "metrics": metrics}))
    if cfg.return_mode == "float":
        return score
    if cfg.return_mode == "none":
        return None
    return metrics


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return task(cfg)


if __name__ == "__main__":
    main()
