"""The sweep loop of ``hydra/sweeper=lrk_optuna``: Optuna's ask/tell around Hydra's launcher.

Each round: fail the stale trials of dead workers, count the study's trials, ask for as many new trials as there
are free slots (up to ``n_jobs``), launch their jobs (the job gets ``optuna.trial``, ``optuna.study`` and
``optuna.storage`` as overrides), and tell Optuna what came back:

- a metrics dict (or a float): COMPLETE with the ``optimized_metric`` value(s);
- ``optuna.TrialPruned`` raised by the job: PRUNED;
- any other exception, a NaN or an infinite value: FAIL, with the error in the trial's user attributes,
  in ``trials.csv`` and in the run's summary.json; the sweep goes on up to ``max_failure_rate``;
- a return value that lacks ``optimized_metric``: FAIL, and the sweep stops (every trial would fail alike).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from itertools import product
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from lrk.errors import LrkConfigError
from lrk.search import context
from lrk.search.algorithms import make_pruner, make_sampler
from lrk.search.launchers import check_launcher
from lrk.search.results import SURPLUS_ATTR, count_trials, occupied_before, write_results
from lrk.search.space import parse_search_space
from lrk.search.storage import Liveness, open_storage, redact

log = logging.getLogger("lrk.search")

DIRECTIONS = ("maximize", "minimize")
SUMMARY_FILE = "summary.json"
#: config groups whose choices name a study by default, in this order
STUDY_NAME_GROUPS = ("hparams_search", "data", "backbone")
#: at most this many combinations of config-group choices are composed to check the search space
MAX_GROUP_COMBINATIONS = 32


class SweepConfigError(LrkConfigError, CompactHydraException):
    """Bad input found by the sweeper; Hydra prints its message alone, without a traceback."""


class SweepAborted(RuntimeError, CompactHydraException):
    """Too many trials failed: the study keeps every trial; fix the cause and run the same command to resume."""


@dataclass
class Settings:
    """``hydra.sweeper`` after validation."""

    study_name: str | None
    storage: str | None
    directions: list[str]
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    heartbeat_interval: int | None
    grace_period: int | None
    max_retry: int | None
    params: dict[str, Any]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def metric_names(config: DictConfig) -> list[str]:
    """``optimized_metric`` at the root of the config, as a list of names."""
    value = _plain(OmegaConf.select(config, "optimized_metric", default=None))
    names = [value] if isinstance(value, str) else value
    if not names or not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise LrkConfigError(
            f"optimized_metric={value} is invalid: set it at the root of the config (conf/hparams_search/*.yaml) "
            "to a metric name such as val/acc_best, or a list of names with one hydra.sweeper.direction each"
        )
    if len(set(names)) != len(names):
        raise LrkConfigError(f"optimized_metric={names} names a metric twice")
    return names


def read_settings(raw: Mapping[str, Any], n_objectives: int) -> Settings:
    """Check every ``hydra.sweeper`` value; one :class:`LrkConfigError` naming the first bad one."""
    raw = {k: _plain(v) for k, v in raw.items()}
    direction = raw.get("direction", "maximize")
    directions = [direction] if isinstance(direction, str) else list(direction or [])
    if not directions or any(d not in DIRECTIONS for d in directions):
        raise LrkConfigError(
            f"hydra.sweeper.direction={direction} is invalid: give maximize or minimize, or a list of them"
        )
    if len(directions) != n_objectives:
        raise LrkConfigError(
            f"hydra.sweeper.direction={directions} has {len(directions)} entries but optimized_metric names "
            f"{n_objectives} metrics: give one direction per metric"
        )

    def integer(key: str, minimum: int, optional: bool = False) -> int | None:
        value = raw.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            more = " or null" if optional else ""
            raise LrkConfigError(
                f"hydra.sweeper.{key}={value} is invalid: it must be an integer >= {minimum}{more}"
            )
        return value

    rate = raw.get("max_failure_rate", 0.25)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise LrkConfigError(
            f"hydra.sweeper.max_failure_rate={rate} is invalid: it must be a number in [0, 1]"
        )
    sampler = dict(raw.get("sampler") or {})
    pruner = dict(raw.get("pruner") or {})
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise LrkConfigError(f"hydra.sweeper.params={params} is invalid: give a mapping key -> sweep string")
    return Settings(
        study_name=raw.get("study_name"),
        storage=raw.get("storage"),
        directions=directions,
        n_trials=integer("n_trials", 1),  # type: ignore[arg-type]
        n_jobs=integer("n_jobs", 1),  # type: ignore[arg-type]
        max_failure_rate=float(rate),
        sampler={
            "name": sampler.get("name", "tpe"),
            "seed": sampler.get("seed"),
            "options": sampler.get("options"),
        },
        pruner={"name": pruner.get("name", "none"), "options": pruner.get("options")},
        heartbeat_interval=integer("heartbeat_interval", 1, optional=True),
        grace_period=integer("grace_period", 1, optional=True),
        max_retry=integer("max_retry", 0, optional=True),
        params=params,
    )


def default_study_name(config: DictConfig) -> str:
    """``<hparams_search>-<data>-<backbone>`` from the chosen config groups (the job name when there are none)."""
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    parts = [str(choices[g]) for g in STUDY_NAME_GROUPS if choices.get(g) not in (None, "null")]
    name = "-".join(parts) or str(OmegaConf.select(config, "hydra.job.name", default="lrk"))
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def default_storage(config: DictConfig, study_name: str) -> str:
    """``sqlite:///<paths.log_dir>/optuna/<study_name>.db`` (``<cwd>/logs`` without ``paths.log_dir``)."""
    log_dir = OmegaConf.select(config, "paths.log_dir", default=None)
    if log_dir is None:
        log_dir = Path(str(OmegaConf.select(config, "hydra.runtime.cwd", default="."))) / "logs"
    return f"sqlite:///{Path(str(log_dir)).resolve() / 'optuna' / study_name}.db"


def _quoted(text: str) -> str:
    """A string as a quoted Hydra override value."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise LrkConfigError(f"{text!r} holds both kinds of quotes: Hydra cannot pass it as one override")


def extract_values(returned: Any, names: Sequence[str]) -> tuple[list[float] | None, str | None, bool]:
    """``(values, error, fatal)`` from a job's return value.

    ``fatal`` marks errors every trial would repeat (a missing metric, a wrong return type): the sweep stops.
    """
    if isinstance(returned, Mapping):
        missing = [n for n in names if n not in returned]
        if missing:
            available = ", ".join(sorted(map(str, returned))) or "none"
            return (
                None,
                f"optimized_metric={missing[0]} is not among the metrics the task returned: {available}",
                True,
            )
        raw = [returned[n] for n in names]
    elif isinstance(returned, int | float) and not isinstance(returned, bool):
        if len(names) != 1:
            return (
                None,
                f"the task returned one number, but optimized_metric names {len(names)} metrics",
                True,
            )
        raw = [returned]
    elif isinstance(returned, list | tuple) and len(returned) == len(names):
        raw = list(returned)
    else:
        return (
            None,
            (
                f"the task returned {type(returned).__name__}: it must return a dict of metrics holding "
                f"optimized_metric ({', '.join(names)}), or a float"
            ),
            True,
        )
    values = []
    for name, value in zip(names, raw, strict=True):
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            return None, f"optimized_metric {name}={value!r} is not a number", True
    bad = [f"{n}={v}" for n, v in zip(names, values, strict=True) if not math.isfinite(v)]
    if bad:
        return None, f"optimized_metric {', '.join(bad)} is not finite", False
    return values, None, False


def _update_summary(run_dir: str | None, record: dict[str, Any]) -> None:
    """Add the sweep's verdict (``optuna``: study, trial, state, values, error) to the run's summary.json."""
    if not run_dir:
        return
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return
    try:
        summary = json.loads(path.read_text())
        summary["optuna"] = record
        tmp = path.with_name(f".{path.name}.sweeper.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(path)
    except (OSError, ValueError) as exc:
        log.warning("could not add the trial's state to %s: %s", path, exc)


class OptunaSweep:
    """One worker's sweep: validate everything, then ask / launch / tell until the study holds ``n_trials``."""

    def __init__(
        self, settings: Mapping[str, Any], config: DictConfig, hydra_context: Any, launcher: Any
    ) -> None:
        self.raw_settings = settings
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = launcher
        self.failures_here = 0
        self.returns: list[Sequence[Any]] = []

    # ---------------------------------------------------------------- setup
    def prepare(self, arguments: list[str]) -> None:
        """Everything that can be checked before the first trial; raises :class:`LrkConfigError`."""
        import optuna
        from hydra.core.hydra_config import HydraConfig

        # the sweeper reads ${hydra:...} interpolations (paths.log_dir, hydra.sweep.dir) of the sweep config
        HydraConfig.instance().set_config(self.config)
        self.metric_names = metric_names(self.config)
        self.settings = read_settings(self.raw_settings, len(self.metric_names))
        self.space = parse_search_space(self.settings.params, arguments)
        if not self.space.params:
            raise LrkConfigError(
                "nothing to search: hydra.sweeper.params is empty and no override on the command line is a sweep "
                "(e.g. model.lr='tag(log, interval(1e-4, 1e-2))')"
            )
        s = self.settings
        self.n_trials = s.n_trials
        grid = None
        if s.sampler["name"] == "grid":
            grid = self.space.grid()
            size = self.space.grid_size()
            if size < self.n_trials:
                log.info("the grid holds %d points: n_trials %d -> %d", size, self.n_trials, size)
                self.n_trials = size
        pruner = make_pruner(s.pruner["name"], s.pruner["options"], n_objectives=len(self.metric_names))
        # fail on a bad sampler name or option now; each trial gets its own seed (sampler_for)
        make_sampler(s.sampler["name"], s.sampler["seed"], s.sampler["options"], grid)

        self.study_name = s.study_name or default_study_name(self.config)
        self.storage_url = s.storage or default_storage(self.config, self.study_name)
        self.shown_storage = redact(self.storage_url)
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self.check_space()
        check_launcher(self.launcher, s.n_jobs)

        self.storage = open_storage(
            self.storage_url,
            heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period,
            max_retry=s.max_retry,
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study = optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                pruner=pruner,
                directions=s.directions,
                load_if_exists=True,
            )
        found = [d.name.lower() for d in self.study.directions]
        if found != s.directions:
            raise LrkConfigError(
                f"study {self.study_name} in {self.shown_storage} optimizes {found}, but this sweep asks for "
                f"{s.directions}: choose another hydra.sweeper.study_name, or the same direction(s)"
            )
        self.grid = grid
        self.study.sampler = self.sampler_for(0 if grid else len(self.study.get_trials(deepcopy=False)))
        self.study_id = self.storage.get_study_id_from_name(self.study_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not self.study.metric_names:
                self.study.set_metric_names(self.metric_names)
            space_text = {p.key: p.source for p in self.space.params.values()}
            previous = self.study.user_attrs.get("lrk_search_space")
            if previous is None:
                self.study.set_user_attr("lrk_search_space", space_text)
            elif previous != space_text:
                log.warning(
                    "study %s was created with the search space %s; this sweep uses %s",
                    self.study_name,
                    previous,
                    space_text,
                )
        self.liveness = Liveness(self.storage, s.heartbeat_interval, s.grace_period, s.max_retry)

    def sampler_for(self, index: int) -> Any:
        """The sampler that draws the study's trial number ``index``: seeded with ``seed + index``.

        Optuna's samplers keep no state of their own between trials (they read the study), so a fresh one per
        trial costs nothing and makes every draw reproducible, while a resumed study or a second worker (whose
        trials have other numbers) does not replay the points already drawn.
        """
        seed = self.settings.sampler["seed"]
        options = self.settings.sampler["options"]
        return make_sampler(
            self.settings.sampler["name"], None if seed is None else seed + index, options, self.grid
        )

    def optuna_overrides(self, number: int) -> list[str]:
        return [
            f"++optuna.trial={number}",
            f"++optuna.study={_quoted(self.study_name)}",
            f"++optuna.storage={_quoted(self.shown_storage)}",
        ]

    def _compose(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(
            master_config=self.config, sweep_overrides=overrides
        )

    def check_space(self) -> None:
        """Compose the config for the search space (each config-group choice) and check every key exists."""
        from optuna.distributions import CategoricalDistribution

        choices = OmegaConf.select(self.config, "hydra.runtime.choices", default=None) or {}
        groups = [
            p
            for p in self.space.params.values()
            if p.name in choices and isinstance(p.distribution, CategoricalDistribution)
        ]
        keys = [p for p in self.space.params.values() if p not in groups and not p.key.startswith("+")]
        combos: list[tuple[Any, ...]] = list(product(*(p.distribution.choices for p in groups)))
        if len(combos) > MAX_GROUP_COMBINATIONS:  # check each choice once, not every combination
            combos = [
                tuple(c if j == i else g.distribution.choices[0] for j, g in enumerate(groups))
                for i, p in enumerate(groups)
                for c in p.distribution.choices
            ]
        for combo in combos:
            group_overrides = [p.override(v) for p, v in zip(groups, combo, strict=True)]
            where = f" with {' '.join(group_overrides)}" if group_overrides else ""
            try:
                cfg = self._compose([*self.space.fixed, *group_overrides])
            except Exception as exc:
                raise LrkConfigError(
                    f"the sweep's config does not compose{where}: {_one_line(exc)}"
                ) from None
            for p in keys:
                _check_key(cfg, p, where)
        first = self.space.first_values()
        try:
            self._compose([*self.space.overrides(first), *self.optuna_overrides(0)])
        except Exception as exc:
            raise LrkConfigError(
                f"the search space does not fit the config ({' '.join(self.space.overrides(first))}): {_one_line(exc)}"
            ) from None

    # ---------------------------------------------------------------- loop
    def run(self, arguments: list[str]) -> list[Sequence[Any]]:
        """The whole sweep of this worker; returns the Hydra job returns, batch by batch."""
        try:
            return self._run(arguments)
        except LrkConfigError as exc:
            if isinstance(exc, CompactHydraException):
                raise
            raise SweepConfigError(str(exc)) from None

    def _run(self, arguments: list[str]) -> list[Sequence[Any]]:
        self.prepare(arguments)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        counts = count_trials(self.study.get_trials(deepcopy=False))
        log.info(
            "Optuna study %s in %s: %d of %d trials done; results in %s",
            self.study_name,
            self.shown_storage,
            counts.done,
            self.n_trials,
            self.sweep_dir,
        )
        waiting_logged = -math.inf  # when "waiting for other workers" was last logged
        try:
            while True:
                self.liveness.fail_stale(self.study)
                counts = count_trials(self.study.get_trials(deepcopy=False))
                if counts.done >= self.n_trials:
                    break
                free = self.n_trials - counts.done - counts.running
                if free <= 0:
                    if not self.liveness.enabled:
                        break  # the running trials belong to other workers, which finish them
                    if time.monotonic() - waiting_logged > 60:
                        log.info(
                            "waiting for %d trial(s) running in other workers (a dead worker's trial is retried "
                            "here once its heartbeat is %d s old; Ctrl+C stops this worker, losing nothing)",
                            counts.running,
                            self.liveness.grace,
                        )
                        waiting_logged = time.monotonic()
                    time.sleep(min(2.0, float(self.liveness.interval or 2)))
                    continue
                waiting_logged = -math.inf
                batch = self.ask(min(self.settings.n_jobs, free))
                if batch:
                    self.launch(batch)
                    self.write()
        except BaseException:
            with contextlib.suppress(Exception):  # Ctrl+C, a fatal error: the results so far stay readable
                self.write()
            raise
        finally:
            self.liveness.close()
        summary = self.write()
        self.log_summary(summary)
        return self.returns

    def ask(self, size: int) -> list[Any]:
        """Ask Optuna for up to ``size`` trials; a trial that lost the race for the last slot is marked surplus."""
        import optuna

        batch = []
        for _ in range(size):
            # (the grid sampler needs one fixed seed: it shuffles the grid with it, then takes point k for trial k)
            if self.settings.sampler["seed"] is not None and self.grid is None:
                self.study.sampler = self.sampler_for(len(self.study.get_trials(deepcopy=False)))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = self.study.ask(self.space.distributions())
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
            self.liveness.add(trial_id)
            if occupied_before(self.study.get_trials(deepcopy=False), trial.number) >= self.n_trials:
                trial.set_user_attr(SURPLUS_ATTR, True)
                trial.set_user_attr("error", "another worker took the last slot: this trial never ran")
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                self.liveness.remove(trial_id)
                break
            batch.append((trial, trial_id))
        return batch

    def launch(self, batch: list[tuple[Any, int]]) -> None:
        """Launch the jobs of ``batch`` (consecutive trial numbers together: each job dir is its trial number)."""
        groups: list[list[tuple[Any, int]]] = []
        # Hydra's basic launcher runs jobs one after another anyway: one launch per trial tells Optuna each
        # result at once, and Ctrl+C loses no finished trial of the batch
        one_by_one = type(self.launcher).__name__ == "BasicLauncher"
        for item in sorted(batch, key=lambda x: x[0].number):
            if groups and not one_by_one and groups[-1][-1][0].number + 1 == item[0].number:
                groups[-1].append(item)
            else:
                groups.append([item])
        pending = {trial.number: trial for trial, _ in batch}
        stop: BaseException | None = None  # a fatal error or too many failures, raised once the batch is told
        try:
            for group in groups:
                overrides = [
                    [*self.space.overrides(trial.params), *self.optuna_overrides(trial.number)]
                    for trial, _ in group
                ]
                trials = self.study.get_trials(deepcopy=False)
                done = count_trials(trials).done
                for trial, _ in group:
                    context.register(self.study_name, trial)
                    log.info(  # k/n: the trial's slot of n_trials (k != number + 1 after failed or surplus trials)
                        "trial %d (%d/%d, %d done): %s",
                        trial.number,
                        occupied_before(trials, trial.number) + 1,
                        self.n_trials,
                        done,
                        " ".join(self.space.overrides(trial.params)),
                    )
                try:
                    returns = self.launcher.launch(overrides, initial_job_idx=group[0][0].number)
                except Exception as exc:  # the launcher itself failed for these jobs
                    returns = [exc] * len(group)
                else:
                    self.returns.append(returns)
                for (trial, _), job in zip(group, returns, strict=True):
                    pending.pop(trial.number)
                    try:
                        if isinstance(job, Exception):
                            self.record(trial, None, error=f"launch failed: {_one_line(job)}")
                        else:
                            self.tell(trial, job)
                    except (LrkConfigError, SweepAborted) as exc:
                        stop = stop or exc
                if stop is not None:
                    break
        except BaseException as exc:
            stop = exc  # Ctrl+C, SIGTERM: the unfinished trials become FAIL below, not RUNNING forever
        finally:
            for trial in pending.values():  # asked but not run (or cut short)
                reason = f"{type(stop).__name__}: {_one_line(stop)}" if stop else "not run"
                self.record(trial, None, error=f"interrupted ({reason})"[:500], count=False)
            for trial, trial_id in batch:
                context.unregister(self.study_name, trial.number)
                self.liveness.remove(trial_id)
        if stop is not None:
            raise stop

    def tell(self, trial: Any, job: Any) -> None:
        """Record one finished job as COMPLETE, PRUNED or FAIL."""
        import optuna

        run_dir = None
        if job.hydra_cfg is not None:
            run_dir = OmegaConf.select(job.hydra_cfg, "hydra.runtime.output_dir", default=None)
        trial.set_user_attr("run_dir", run_dir)
        try:
            returned = job.return_value
        except optuna.TrialPruned as exc:
            self.record(trial, run_dir, pruned=str(exc) or "pruned")
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            _save_traceback(run_dir, exc)
            fatal = isinstance(exc, LrkConfigError) and "optimized_metric" in str(exc)
            self.record(trial, run_dir, error=error, fatal=fatal)
            return
        values, error, fatal = extract_values(returned, self.metric_names)
        if isinstance(returned, Mapping):
            metrics = {str(k): float(v) for k, v in returned.items() if _is_finite_number(v)}
            trial.set_user_attr("metrics", metrics)
        if error is not None:
            self.record(trial, run_dir, error=error, fatal=fatal)
            return
        self.record(trial, run_dir, values=values)

    def record(
        self,
        trial: Any,
        run_dir: str | None,
        *,
        values: list[float] | None = None,
        error: str | None = None,
        pruned: str | None = None,
        fatal: bool = False,
        count: bool = True,
    ) -> None:
        """Tell Optuna, note the outcome in summary.json, and stop the sweep when the failures are too many."""
        from optuna.trial import TrialState

        # a retried trial inherits the user attributes of the trial it retries: clear the old error
        inherited_error = trial.user_attrs.get("error") is not None
        if values is not None:
            state = TrialState.COMPLETE
            if inherited_error:
                trial.set_user_attr("error", None)
            self.study.tell(trial, values)
            shown = ", ".join(f"{n}={v:.6g}" for n, v in zip(self.metric_names, values, strict=True))
            log.info("trial %d COMPLETE: %s", trial.number, shown)
        elif pruned is not None:
            state = TrialState.PRUNED
            if inherited_error:
                trial.set_user_attr("error", None)
            self.study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d PRUNED: %s", trial.number, pruned)
        else:
            state = TrialState.FAIL
            trial.set_user_attr("error", error)
            self.study.tell(trial, state=TrialState.FAIL)
            log.warning(
                "trial %d FAIL: %s%s", trial.number, error, f" (run dir {run_dir})" if run_dir else ""
            )
        _update_summary(
            run_dir,
            {
                "study": self.study_name,
                "trial": trial.number,
                "state": state.name,
                "values": dict(zip(self.metric_names, values, strict=True)) if values else None,
                "error": error,
                "storage": self.shown_storage,
            },
        )
        if state != TrialState.FAIL or not count:
            return
        self.failures_here += 1
        if fatal:
            self.write()
            raise LrkConfigError(error)
        allowed = math.floor(self.settings.max_failure_rate * self.n_trials)
        if self.failures_here > allowed:
            self.write()
            raise SweepAborted(
                f"{self.failures_here} trials failed in this sweep, more than hydra.sweeper.max_failure_rate="
                f"{self.settings.max_failure_rate} x n_trials={self.n_trials} allows ({allowed}); last error: {error}. "
                f"Study {self.study_name} in {self.shown_storage} keeps every trial: fix the cause and run the same "
                "command to resume"
            )

    # ---------------------------------------------------------------- results
    def write(self) -> dict[str, Any]:
        return write_results(self.study, self.sweep_dir, self.metric_names, self.n_trials, self.shown_storage)

    def log_summary(self, summary: dict[str, Any]) -> None:
        counts = summary["trials"]
        log.info(
            "study %s: %d complete, %d pruned, %d failed",
            self.study_name,
            counts["complete"],
            counts["pruned"],
            counts["fail"],
        )
        if summary.get("best_value") is not None:
            log.info(
                "best %s=%s at trial %s: %s",
                summary["optimized_metric"],
                summary["best_value"],
                summary["best_trial"],
                summary["best_params"],
            )
        elif summary.get("pareto_front"):
            log.info("Pareto front: trials %s", [t["trial"] for t in summary["pareto_front"]])
        log.info(
            "results in %s; browse the study with: optuna-dashboard %s", self.sweep_dir, self.shown_storage
        )


def _check_key(cfg: DictConfig, param: Any, where: str) -> None:
    """The searched key must be a key of ``cfg``; else one message listing the keys next to it."""
    name, key = param.name, param.key
    parent_key, _, leaf = name.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    keys = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []  # noqa: SIM118 (holds ??? keys)
    if leaf in keys:
        return
    if isinstance(parent, DictConfig):
        siblings = [k for k in keys if not (not parent_key and k == "hydra")]
        close = get_close_matches(leaf, siblings, n=1)
        hint = f" (did you mean {parent_key + '.' if parent_key else ''}{close[0]}?)" if close else ""
        listed = ", ".join(siblings[:30]) + (", ..." if len(siblings) > 30 else "")
        raise LrkConfigError(
            f"{param.origin}: {key} is not a key of the config{where}{hint}; keys of "
            f"{parent_key or 'the root'}: {listed}. To add a new key, write +{name}"
        )
    raise LrkConfigError(
        f"{param.origin}: {key} is not a key of the config{where}: {parent_key or name} is not a config node"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _is_finite_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _save_traceback(run_dir: str | None, exc: BaseException) -> None:
    if not run_dir or not Path(run_dir).is_dir():
        return
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        (Path(run_dir) / "traceback.txt").write_text(text)
    except OSError:
        pass
