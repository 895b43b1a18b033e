"""What a sweep leaves in its sweep dir: ``optimization_results.yaml`` (best trial or Pareto front) and ``trials.csv``.

Also the counting rules shared by the sweep loop: ``n_trials`` counts COMPLETE and PRUNED trials (as Optuna's
``MaxTrialsCallback``); a FAIL trial does not use up a slot, it is replaced by a new one (up to
``max_failure_rate``). A trial marked ``lrk_surplus`` was asked by two workers racing for the last slot and never ran.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RESULTS_FILE = "optimization_results.yaml"
TRIALS_FILE = "trials.csv"
SURPLUS_ATTR = "lrk_surplus"


def is_surplus(trial: Any) -> bool:
    return bool(trial.user_attrs.get(SURPLUS_ATTR))


@dataclass(frozen=True)
class Counts:
    """Trials of a study by state (surplus trials left out)."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def done(self) -> int:
        """The trials that count towards ``n_trials``."""
        return self.complete + self.pruned


def count_trials(trials: Sequence[Any]) -> Counts:
    from optuna.trial import TrialState

    states = [t.state for t in trials if not is_surplus(t)]
    return Counts(
        complete=states.count(TrialState.COMPLETE),
        pruned=states.count(TrialState.PRUNED),
        failed=states.count(TrialState.FAIL),
        running=states.count(TrialState.RUNNING),
        waiting=states.count(TrialState.WAITING),
    )


def occupied_before(trials: Sequence[Any], number: int) -> int:
    """How many trials numbered below ``number`` hold a slot (COMPLETE, PRUNED or RUNNING)."""
    from optuna.trial import TrialState

    holding = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in trials if t.number < number and t.state in holding and not is_surplus(t))


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def summarize(study: Any, metric_names: Sequence[str], n_trials: int, storage: str) -> dict[str, Any]:
    """The content of ``optimization_results.yaml``: the best trial (one objective) or the Pareto front."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    directions = [d.name.lower() for d in study.directions]
    out: dict[str, Any] = {
        "name": "lrk_optuna",
        "study_name": study.study_name,
        "storage": storage,
        "optimized_metric": list(metric_names) if len(metric_names) > 1 else metric_names[0],
        "direction": directions if len(directions) > 1 else directions[0],
        "n_trials": n_trials,
        "trials": {
            "complete": counts.complete,
            "pruned": counts.pruned,
            "fail": counts.failed,
            "running": counts.running,
            "waiting": counts.waiting,
        },
    }
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        out["best_params"] = None
        out["best_value"] = None
        return out
    if len(directions) == 1:
        best = study.best_trial
        out["best_trial"] = best.number
        out["best_value"] = _finite(best.value)
        out["best_params"] = dict(best.params)
        out["best_run_dir"] = best.user_attrs.get("run_dir")
    else:
        front = sorted(study.best_trials, key=lambda t: t.number)
        out["best_params"] = None
        out["pareto_front"] = [
            {
                "trial": t.number,
                "values": {name: _finite(v) for name, v in zip(metric_names, t.values, strict=True)},
                "params": dict(t.params),
                "run_dir": t.user_attrs.get("run_dir"),
            }
            for t in front
        ]
    return out


def write_results(
    study: Any, sweep_dir: str | Path, metric_names: Sequence[str], n_trials: int, storage: str
) -> dict[str, Any]:
    """Write ``optimization_results.yaml`` and ``trials.csv`` into ``sweep_dir``; return the summary."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(study, metric_names, n_trials, storage)
    _atomic_write(sweep_dir / RESULTS_FILE, yaml.safe_dump(summary, sort_keys=False, allow_unicode=True))
    _atomic_write(sweep_dir / TRIALS_FILE, trials_csv(study, metric_names))
    return summary


def trials_csv(study: Any, metric_names: Sequence[str]) -> str:
    """All trials (surplus ones left out): number, state, one column per objective, params, duration, error."""
    import io

    trials = [t for t in study.get_trials(deepcopy=False) if not is_surplus(t)]
    param_names = sorted({name for t in trials for name in t.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "number",
            "state",
            *metric_names,
            *(f"params.{p}" for p in param_names),
            "duration_s",
            "retry_of",
            "run_dir",
            "error",
        ]
    )
    for t in trials:
        values = list(t.values) if t.values is not None else [None] * len(metric_names)
        duration = t.duration.total_seconds() if t.duration is not None else None
        writer.writerow(
            [
                t.number,
                t.state.name,
                *(_cell(v) for v in values),
                *(_cell(t.params.get(p)) for p in param_names),
                _cell(round(duration, 3) if duration is not None else None),
                _cell(t.system_attrs.get("failed_trial")),
                _cell(t.user_attrs.get("run_dir")),
                _cell(t.user_attrs.get("error")),
            ]
        )
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value
