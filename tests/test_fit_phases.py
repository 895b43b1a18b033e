"""lrk.pipeline: schedules registered by name and fit_phase, a further fit whose logs continue the run's."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lrk.pipeline import stages
from lrk.pipeline.schedules import SCHEDULES, register_schedule, run_stages
from lrk.summary import read_summary
from lrk.train import run


@register_schedule("test_two_fits")
def two_fits(state) -> None:
    run_stages(state, [stages.compress, stages.fit])
    stages.fit_phase(state, "second", max_epochs=1)
    stages.test(state)


def test_fit_phase_continues_the_logs_and_tests_its_own_best_checkpoint(tiny_cfg) -> None:
    cfg = tiny_cfg("decomp.schedule=test_two_fits")
    run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed", summary["error"]
    tested = Path(summary["extra"]["tested_checkpoint"])
    assert tested.parent == run_dir / "checkpoints" / "second"
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    steps = [int(row["step"]) for row in rows]
    # 2 epochs of the first fit, then 1 epoch of the second, on one increasing step axis
    assert len(steps) == 3 and steps == sorted(steps) and len(set(steps)) == 3


def test_an_unknown_schedule_is_one_clear_error_before_training(tiny_cfg) -> None:
    cfg = tiny_cfg("decomp.schedule=nonsense")
    with pytest.raises(Exception, match=r"decomp.schedule='nonsense' is invalid: it must be one of"):
        run(cfg)
    summary = read_summary(Path(cfg.paths.output_dir))
    assert summary["status"] == "failed" and "one_shot" in summary["error"]
    assert "test_two_fits" in SCHEDULES
