"""The Optuna side of a report: which studies the runs belong to, and their figures.

A sweep's runs name their study in the config (``optuna.study``, ``optuna.storage``: the overrides the lrk
sweeper hands every trial, hydra_plugins/lrk_optuna_sweeper) and the sweep dir holds
``optimization_results.yaml`` with ``study_name`` and ``storage``. The figures are Optuna's own
(``optuna.visualization.matplotlib``): the optimization history, the parameter importances, and for several
objectives the Pareto front.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lrk.reporting.runs import ReportRun

#: what a sweep leaves in its sweep dir (lrk.search.results.RESULTS_FILE)
RESULTS_FILE = "optimization_results.yaml"


def study_refs(runs: Sequence[ReportRun], roots: Iterable[str | Path] = ()) -> list[tuple[str, str]]:
    """The (study name, storage URL) pairs named by the runs' configs and by ``optimization_results.yaml``
    files below ``roots``, each once, in the order found."""
    import yaml

    refs: list[tuple[str, str]] = []
    for run in runs:
        study, storage = run.value("optuna.study"), run.value("optuna.storage")
        if study and storage and (str(study), str(storage)) not in refs:
            refs.append((str(study), str(storage)))
    for root in roots:
        root = Path(root)
        for file in sorted(root.rglob(RESULTS_FILE)) if root.is_dir() else []:
            try:
                data = yaml.safe_load(file.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            ref = (str(data.get("study_name")), str(data.get("storage")))
            if data.get("study_name") and data.get("storage") and ref not in refs:
                refs.append(ref)
    return refs


def storage_missing(storage: str) -> str | None:
    """Why a file storage cannot be read (its file is gone), or None. Checked first because Optuna creates an
    empty SQLite file for a path that does not exist."""
    for prefix in (
        "sqlite:///",
        "journal://",
    ):  # sqlite:////abs/x.db or sqlite:///rel/x.db; journal:///abs/x.log
        if storage.startswith(prefix):
            path = Path(storage[len(prefix) :])
            return None if path.is_file() else f"{path} does not exist"
    return None


def load_study(name: str, storage: str) -> Any:
    """``optuna.load_study`` over lrk's storage URLs (``journal:///path`` included)."""
    import optuna

    if storage.startswith("journal://"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        store: Any = JournalStorage(JournalFileBackend(storage[len("journal://") :]))
    else:
        store = storage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=store)


def study_figures(study: Any) -> dict[str, Figure]:
    """Optuna's matplotlib figures of ``study``: ``history`` (one per objective when there are several),
    ``importances`` (two or more completed trials and at least one searched parameter), and ``pareto`` (several
    objectives). Figures that the study cannot have yet (no completed trial) are left out."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return {}
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    out: dict[str, Figure] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if len(study.directions) == 1:
            out["history"] = _figure(ovm.plot_optimization_history(study, target_name=names[0]))
        else:
            for i, name in enumerate(names):
                ax = ovm.plot_optimization_history(study, target=lambda t, i=i: t.values[i], target_name=name)
                out[f"history_{i}"] = _figure(ax)
            out["pareto"] = _figure(ovm.plot_pareto_front(study, target_names=names))
        if len(complete) >= 2 and any(t.params for t in complete):
            targets = [None] if len(study.directions) == 1 else list(range(len(names)))
            for i in targets:
                target = None if i is None else (lambda t, i=i: t.values[i])
                key = "importances" if i is None else f"importances_{i}"
                try:
                    ax = ovm.plot_param_importances(
                        study,
                        evaluator=FanovaImportanceEvaluator(seed=0),  # direction-free, reproducible
                        target=target,
                        target_name=names[0] if i is None else names[i],
                    )
                except (RuntimeError, ValueError, ZeroDivisionError):  # e.g. a parameter that never varied
                    continue
                out[key] = _figure(ax)
    return out


def best_trials_table(study: Any, top: int = 5) -> str:
    """A Markdown table of the ``top`` best completed trials (one objective: by its direction; several: the
    Pareto-optimal trials, ``study.best_trials``): number, values, parameters, and the trial's run dir."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    if len(study.directions) == 1:
        reverse = study.direction.name == "MAXIMIZE"
        best = sorted(trials, key=lambda t: t.value, reverse=reverse)[:top]
        title = f"best {len(best)} of {len(trials)} completed trials"
    else:
        best = sorted(study.best_trials, key=lambda t: t.number)[:top]
        title = f"{len(best)} Pareto-optimal of {len(trials)} completed trials"
    params = sorted({p for t in best for p in t.params})
    head = ["trial", *names, *params]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for trial in best:
        cells = [str(trial.number), *(f"{v:.4g}" for v in trial.values)]
        cells += [_cell(trial.params.get(p)) for p in params]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _figure(axes: Any) -> Figure:
    """The Figure behind what optuna.visualization.matplotlib returns (an Axes, or an array of them),
    taken out of pyplot's list so it is freed with the report."""
    import matplotlib.pyplot as plt

    ax = axes.ravel()[0] if hasattr(axes, "ravel") else axes
    fig = ax.get_figure()
    fig.set_layout_engine("constrained")
    plt.close(fig)
    return fig
