"""Runs for the report tests: real tiny trainings (session-scoped, a few seconds) and hand-written summary.json
files that follow the contract of lrk.summary, plus a tiny Optuna study in a SQLite file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY, compose_train
from omegaconf import open_dict

#: the real runs: the dense baseline once, truncated SVD at two seeds (mean +- std over seeds)
REAL_RUNS = (("none", 1, []), ("svd", 1, ["decomp.ratio=0.3"]), ("svd", 2, ["decomp.ratio=0.3"]))


_REAL_RUNS: list[Path] = []  # one set per test session, whichever test module asks first


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multirun-like folder ``multirun/<k>/summary.json`` of three real one-epoch runs on synthetic data
    (about 3 s); tests copy it before changing it."""
    from lrk.train import run

    if _REAL_RUNS:
        return _REAL_RUNS[0]
    root = tmp_path_factory.mktemp("report_runs")
    for k, (decomp, seed, extra) in enumerate(REAL_RUNS):
        cfg = compose_train(
            [*TINY, "trainer.max_epochs=1", f"decomp={decomp}", f"seed={seed}", *extra], root / "work"
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(root / "multirun" / str(k))
        run(cfg)
    _REAL_RUNS.append(root / "multirun")
    return root / "multirun"


def write_summary(
    run_dir: Path,
    decomp: str = "svd",
    seed: int = 0,
    metrics: dict[str, float] | None = None,
    status: str = "completed",
    dataset: str = "synthetic",
    layers: list[dict[str, Any]] | None = None,
    confusion: list[list[int]] | None = None,
    class_names: tuple[str, ...] = ("good", "defective"),
    optuna: dict[str, Any] | None = None,
    backbone: dict[str, Any] | None = None,
    **config: Any,
) -> Path:
    """A summary.json as lrk.summary.RunSummary writes it (the keys a report reads); ``config``: decomp keys."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "status": status,
        "error": None if status == "completed" else "RuntimeError: boom",
        "metrics": metrics or {},
        "config": {
            "seed": seed,
            "data": {"name": dataset, "seed": seed},
            **({"backbone": backbone} if backbone else {}),
            "decomp": {"name": decomp, **config},
            "optuna": optuna or {"trial": None, "study": None, "storage": None},
        },
        "decomp_layers": layers or [],
        "versions": {},
        "run_dir": str(run_dir),
        "extra": {"data": {"class_names": list(class_names)}, "test_confusion_matrix": confusion},
    }
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary))
    return path


def make_study(path: Path, name: str, objectives: int = 1, n_trials: int = 6) -> str:
    """A small Optuna study in SQLite (``x`` in [0, 1], ``kind`` in {a, b}); returns the storage URL as the lrk
    sweeper writes it (``sqlite:////abs/path.db``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{path.resolve()}"
    directions = ["maximize"] if objectives == 1 else ["maximize", "minimize"]
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        directions=directions,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.set_metric_names(["val/acc_best", "model/params"][:objectives])

    def objective(trial: optuna.Trial) -> Any:
        x = trial.suggest_float("x", 0.0, 1.0)
        bonus = 0.1 if trial.suggest_categorical("kind", ["a", "b"]) == "a" else 0.0
        acc = 0.5 + 0.4 * x + bonus
        return acc if objectives == 1 else (acc, 1000 * x)

    study.optimize(objective, n_trials=n_trials)
    return storage
