"""The lrk_optuna Hydra sweeper on the toy app of tests/sweep_app (a score from x, y, kind in milliseconds).

Most sweeps run in this process through Hydra's own multirun; the tests of several workers start real processes
(``python tests/sweep_app/app.py -m ...``) against one SQLite file, one journal file and a PostgreSQL server.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml
from conftest import SWEEP_APP_DIR, load_sweep_app
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from lrk.errors import LrkConfigError
from lrk.search import context
from lrk.search.results import RESULTS_FILE, TRIALS_FILE
from lrk.search.space import parse_search_space
from lrk.search.storage import HEARTBEAT_ATTR, Liveness, open_storage
from lrk.search.sweep import SweepAborted

APP = load_sweep_app()
score_of, task = APP.score_of, APP.task
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none"]  # no log files and handlers in this process
optuna.logging.set_verbosity(optuna.logging.WARNING)
# the liveness tests ask() on storages with heartbeats, which Optuna only expects inside study.optimize
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


# ---------------------------------------------------------------- helpers
def base_overrides(tmp_path: Path, storage: str | None = None, sweep: str = "sweep") -> list[str]:
    return [
        "hparams_search=toy",
        f"hydra.sweep.dir={tmp_path / sweep}",
        f"hydra.sweeper.storage={storage or f'sqlite:///{tmp_path}/study.db'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *QUIET,
    ]


def multirun(tmp_path: Path, *overrides: str, storage: str | None = None, sweep: str = "sweep") -> Any:
    """``app.py -m hparams_search=toy ...`` in this process; returns what the sweeper returns."""
    with initialize_config_dir(str(SWEEP_APP_DIR / "conf"), version_base="1.3", job_name="app"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        return hydra.multirun(
            config_name="config",
            task_function=task,
            overrides=[*base_overrides(tmp_path, storage, sweep), *overrides],
            with_log_configuration=False,
        )


def load(tmp_path: Path, storage: str | None = None, name: str = "toy") -> optuna.Study:
    url = storage or f"sqlite:///{tmp_path}/study.db"
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_interval=None))


def results(tmp_path: Path, sweep: str = "sweep") -> dict[str, Any]:
    return yaml.safe_load((tmp_path / sweep / RESULTS_FILE).read_text())


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def job_dirs(sweep_dir: Path) -> set[int]:
    return {int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()}


def worker(tmp_path: Path, sweep: str, *overrides: str, storage: str) -> subprocess.Popen[str]:
    """A real worker process: ``python tests/sweep_app/app.py -m hparams_search=toy ...``."""
    command = [
        sys.executable,
        str(SWEEP_APP_DIR / "app.py"),
        "-m",
        *base_overrides(tmp_path, storage, sweep),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


# ---------------------------------------------------------------- plugin and search space
def test_hydra_discovers_the_plugin_and_its_config():
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    assert "LrkOptunaSweeper" in [p.__name__ for p in Plugins.instance().discover(Sweeper)]
    assert "lrk_optuna.yaml" in ConfigStore.instance().list("hydra/sweeper")


def test_search_space_from_hydra_sweep_syntax():
    space = parse_search_space(
        {
            "model.lr": "tag(log, interval(1e-4, 1e-1))",
            "decomp.ratio": "interval(0.1, 0.5)",
            "decomp.rank": "range(4, 20, step=4)",
            "decomp.phi": "range(0.7, 1.0, step=0.1)",
            "decomp": "choice(svd, tucker)",
            "block": "tag(int, interval(2, 8))",
            "decomp.energy": None,
        },
        ["data=synthetic", "seed=1,2"],
    )
    d = space.distributions()
    assert d["model.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["decomp.ratio"] == FloatDistribution(0.1, 0.5)
    assert d["decomp.rank"] == IntDistribution(4, 16, step=4)  # range excludes its end, like Python's
    assert d["decomp.phi"].low == pytest.approx(0.7) and d["decomp.phi"].high == pytest.approx(0.9)
    assert d["decomp"] == CategoricalDistribution(["svd", "tucker"])
    assert d["block"] == IntDistribution(2, 8)
    assert d["seed"] == CategoricalDistribution([1, 2])  # a sweep on the command line joins the space
    assert space.fixed == ["decomp.energy=null", "data=synthetic"]
    overrides = space.overrides({"model.lr": 1e-3, "decomp.ratio": 0.25, "decomp.rank": 8, "decomp.phi": 0.8,
                                 "decomp": "tucker", "block": 3, "seed": 2})  # fmt: skip
    assert overrides[2:] == [
        "model.lr=0.001", "decomp.ratio=0.25", "decomp.rank=8", "decomp.phi=0.8", "decomp=tucker", "block=3", "seed=2",
    ]  # fmt: skip
    assert space.params["decomp.phi"].grid_values() == pytest.approx([0.7, 0.8, 0.9])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("interval(1)", "does not parse"),
        ("interval(0.5, 0.1)", "is empty"),
        ("range(5, 1)", "is empty"),
        ("tag(log, interval(0, 1))", "positive low bound"),
        ("tag(int, interval(0.5, 2))", "integer bounds"),
        ("tag(log, choice(1, 2))", "tag log does not apply"),
        ("glob(*)", "not a search space"),
        ("choice(", "does not parse"),
    ],
)
def test_unparsable_search_space_names_the_key_and_the_forms(value, message):
    with pytest.raises(LrkConfigError, match=message) as info:
        parse_search_space({"model.lr": value})
    assert "model.lr" in str(info.value)


def test_samplers_and_pruners_by_name():
    from lrk.search.algorithms import make_pruner, make_sampler

    assert isinstance(make_sampler("tpe", 3), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("nsgaii", 3, {"population_size": 10}), optuna.samplers.NSGAIISampler)
    assert isinstance(
        make_pruner("hyperband", {"min_resource": 1, "max_resource": 8}), optuna.pruners.HyperbandPruner
    )
    # pruner.name=none on the command line over a config whose pruner had options
    assert isinstance(make_pruner("none", {"n_warmup_steps": 2}), optuna.pruners.NopPruner)


# ---------------------------------------------------------------- one worker, in-process
def test_sweep_completes_and_writes_the_best_trial(tmp_path):
    multirun(tmp_path, "hydra.sweeper.n_trials=5", "write_summary=true")
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 5
    out = results(tmp_path)
    best = max(study.trials, key=lambda t: t.value)
    assert out["best_value"] == pytest.approx(best.value) and out["best_trial"] == best.number
    p = out["best_params"]
    assert out["best_value"] == pytest.approx(score_of(p["x"], p["y"], p["kind"]))
    assert 0 <= p["x"] <= 1 and p["y"] in range(5) and p["kind"] in "abc"
    assert out["trials"]["complete"] == 5
    # every trial's job ran in <sweep dir>/<trial number> and its config carries the trial and study
    assert job_dirs(tmp_path / "sweep") == {0, 1, 2, 3, 4}
    job_cfg = yaml.safe_load((tmp_path / "sweep" / "3" / ".hydra" / "config.yaml").read_text())
    assert job_cfg["optuna"] == {"trial": 3, "study": "toy", "storage": f"sqlite:///{tmp_path}/study.db"}
    assert job_cfg["x"] == pytest.approx(study.trials[3].params["x"], abs=1e-9)
    summary = json.loads((tmp_path / "sweep" / "3" / "summary.json").read_text())
    assert summary["optuna"]["state"] == "COMPLETE" and summary["optuna"]["trial"] == 3
    rows = (tmp_path / "sweep" / TRIALS_FILE).read_text().splitlines()
    assert (
        rows[0].startswith("number,state,score,params.kind,params.x,params.y,duration_s") and len(rows) == 6
    )


def test_resumed_sweep_runs_only_the_missing_trials(tmp_path):
    multirun(tmp_path, "hydra.sweeper.n_trials=2", sweep="first")
    first = [t.params for t in load(tmp_path).trials]
    multirun(tmp_path, "hydra.sweeper.n_trials=5", sweep="second")
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 5
    assert job_dirs(tmp_path / "second") == {2, 3, 4}  # three new jobs, numbered after the first two
    assert [t.params for t in study.trials[:2]] == first
    # a resumed seeded sampler must not replay the first run's points
    assert all(t.params != p for t in study.trials[2:] for p in first)
    assert results(tmp_path, "second")["trials"]["complete"] == 5
    multirun(tmp_path, "hydra.sweeper.n_trials=5", sweep="third")  # nothing left to do
    assert len(load(tmp_path).trials) == 5 and not (tmp_path / "third" / "0").exists()


def test_failing_and_nan_trials_are_fail_and_the_sweep_finishes(tmp_path):
    multirun(
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=1.0",
        "fail_trials=[1]",
        "nan_trials=[2]",
        "write_summary=true",
    )
    study = load(tmp_path)
    # n_trials counts COMPLETE (and PRUNED) trials: the two failures were replaced
    assert states(study) == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: forced failure in trial 1"
    assert study.trials[2].user_attrs["error"] == "optimized_metric score=nan is not finite"
    nan_summary = json.loads((tmp_path / "sweep" / "2" / "summary.json").read_text())
    assert nan_summary["optuna"]["state"] == "FAIL" and "not finite" in nan_summary["optuna"]["error"]
    assert "forced failure" in (tmp_path / "sweep" / "1" / "traceback.txt").read_text()
    rows = (tmp_path / "sweep" / TRIALS_FILE).read_text()
    assert "1,FAIL," in rows and "RuntimeError: forced failure in trial 1" in rows
    assert results(tmp_path)["trials"] == {"complete": 3, "pruned": 0, "fail": 2, "running": 0, "waiting": 0}


def test_batches_of_trials_and_an_interrupted_trial(tmp_path):
    multirun(tmp_path, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2")
    assert states(load(tmp_path)) == ["COMPLETE"] * 4 and job_dirs(tmp_path / "sweep") == {0, 1, 2, 3}
    # Ctrl+C (or SIGTERM, which lrk's train.py turns into KeyboardInterrupt) in trial 5 of a batch of 2
    with pytest.raises(KeyboardInterrupt):
        multirun(
            tmp_path, "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=2", "interrupt_trials=[5]", sweep="b"
        )
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5 + ["FAIL"]  # none left RUNNING
    assert trials[5].user_attrs["error"] == "interrupted (KeyboardInterrupt: Ctrl+C in trial 5)"
    assert results(tmp_path, "b")["trials"]["fail"] == 1
    multirun(tmp_path, "hydra.sweeper.n_trials=8", sweep="c")  # a resume replaces the interrupted trial
    assert [t.state.name for t in load(tmp_path).trials].count("COMPLETE") == 8


def test_too_many_failures_stop_the_sweep(tmp_path):
    with pytest.raises(
        SweepAborted, match=r"2 trials failed.*max_failure_rate=0.25 x n_trials=4 allows \(1\)"
    ):
        multirun(tmp_path, "hydra.sweeper.max_failure_rate=0.25", "fail_trials=[0,1,2,3,4,5]")
    assert states(load(tmp_path)) == ["FAIL", "FAIL"]
    assert results(tmp_path)["trials"]["fail"] == 2


def test_pruner_stops_hopeless_trials(tmp_path):
    # two good trials already in the study: the median at every step is 1.0
    storage = open_storage(f"sqlite:///{tmp_path}/study.db")
    study = optuna.create_study(study_name="toy", storage=storage, direction="maximize")
    x = CategoricalDistribution([0.3, 5.0])
    for _ in range(2):
        study.add_trial(optuna.create_trial(value=1.0, params={"x": 0.3}, distributions={"x": x},
                                            intermediate_values={0: 1.0, 1: 1.0, 2: 1.0}))  # fmt: skip
    multirun(
        tmp_path,
        "hydra.sweeper.n_trials=7",
        "hydra.sweeper.params={x: 'choice(0.3, 5.0)', y: 2, kind: a}",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.sampler.name=random",
        "hydra.sweeper.sampler.seed=5",  # draws 5.0, 5.0, 0.3, 0.3, 5.0 (the seed is offset by the 2 trials)
        "hydra.sweeper.pruner.name=median",
        "+hydra.sweeper.pruner.options.n_startup_trials=2",
        "+hydra.sweeper.pruner.options.n_warmup_steps=0",
        "epochs=3",
    )
    trials = load(tmp_path).trials[2:]
    hopeless = [t for t in trials if t.params["x"] == 5.0]
    assert hopeless and len(hopeless) < len(trials), "the seeded sampler drew only one kind of trial"
    assert all(t.state == TrialState.PRUNED and list(t.intermediate_values) == [0] for t in hopeless)
    assert all(t.state == TrialState.COMPLETE for t in trials if t.params["x"] == 0.3)
    out = results(tmp_path)
    assert out["trials"]["pruned"] == len(hopeless) and out["trials"]["complete"] == 7 - len(hopeless)
    assert out["best_value"] == pytest.approx(1.0)


def test_multi_objective_sweep_reports_the_pareto_front(tmp_path):
    multirun(
        tmp_path,
        "optimized_metric=[score,size]",
        "hydra.sweeper.direction=[maximize,minimize]",
        "hydra.sweeper.sampler.name=nsgaii",
        "hydra.sweeper.n_trials=6",
    )
    out = results(tmp_path)
    assert out["direction"] == ["maximize", "minimize"] and out["best_params"] is None
    front = out["pareto_front"]
    trials = [t for t in load(tmp_path).trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 6 and front

    def dominates(a: list[float], b: list[float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    front_numbers = {f["trial"] for f in front}
    for t in trials:  # the front holds exactly the non-dominated trials
        dominated = any(dominates(o.values, t.values) for o in trials)
        assert (t.number in front_numbers) == (not dominated)
    assert set(front[0]["values"]) == {"score", "size"}


def test_grid_sampler_covers_the_grid_and_caps_n_trials(tmp_path):
    multirun(
        tmp_path,
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.params={x: 'choice(0.1, 0.3)', y: 'range(1, 4)', kind: b}",
        "hydra.sweeper.n_trials=50",
    )
    trials = load(tmp_path).trials
    assert sorted((t.params["x"], t.params["y"]) for t in trials) == [
        (x, y) for x in (0.1, 0.3) for y in (1, 2, 3)
    ]
    assert results(tmp_path)["n_trials"] == 6


def test_float_returning_task_and_default_storage_under_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(str(SWEEP_APP_DIR / "conf"), version_base="1.3", job_name="app"):
        GlobalHydra.instance().hydra.multirun(  # type: ignore[union-attr]
            config_name="config",
            task_function=task,
            overrides=["hparams_search=toy", "return_mode=float", "hydra.sweeper.n_trials=2", *QUIET],
            with_log_configuration=False,
        )
    # the study is named after the chosen config groups and kept in logs/optuna/<study>.db
    database = tmp_path / "logs" / "optuna" / "toy.db"
    assert database.is_file()
    assert states(optuna.load_study(study_name="toy", storage=f"sqlite:///{database}")) == ["COMPLETE"] * 2


# ---------------------------------------------------------------- bad input: one message, no trial run
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nested.dpth=interval(0,1)"], r"nested.dpth is not a key of the config \(did you mean nested.depth\?\); keys of nested: depth"),
        (["+hydra.sweeper.params.nope='interval(0, 1)'"], "hydra.sweeper.params.nope: nope is not a key of the config"),
        (["hydra.sweeper.params={x: 'interval(1, 0)'}"], r"hydra.sweeper.params.x: interval\(1.0, 0.0\) is empty"),
        (["hydra.sweeper.params={x: 'range(a, b)'}"], r"hydra.sweeper.params.x=range\(a, b\) does not parse"),
        (["optimized_metric=null"], "optimized_metric=None is invalid"),
        (["optimized_metric=[score,size]"], "direction=.'maximize'. has 1 entries but optimized_metric names 2"),
        (["hydra.sweeper.direction=up"], "direction=up is invalid"),
        (["hydra.sweeper.n_trials=0"], "n_trials=0 is invalid"),
        (["hydra.sweeper.sampler.name=cmaes"], "sampler.name=cmaes is not a sampler lrk knows: valid: tpe, random, grid, nsgaii"),
        (["+hydra.sweeper.pruner.options.warmup=1", "hydra.sweeper.pruner.name=median"], "unknown key.s. warmup for MedianPruner"),
        (["hydra.sweeper.sampler.name=grid"], "x=interval.0.0, 1.0. is continuous"),
        (["hydra.sweeper.storage=postgresql://lrk:secret@127.0.0.1:1/none"], r"storage=postgresql://lrk:\*\*\*@127.0.0.1:1/none is unreachable"),
        (["hydra.sweeper.storage=mysql+nodriver://a@b/c"], "storage=mysql.nodriver://a@b/c"),
        (["hydra.sweeper.storage=not_a_url"], "storage=not_a_url is not a storage URL"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_any_trial(tmp_path, overrides, message):
    with pytest.raises(LrkConfigError, match=message):
        multirun(tmp_path, *overrides)
    assert not (tmp_path / "sweep" / "0").exists()
    assert "secret" not in message


def test_multi_objective_pruning_is_refused(tmp_path):
    with pytest.raises(LrkConfigError, match="cannot prune a multi-objective study"):
        multirun(tmp_path, "optimized_metric=[score,size]", "hydra.sweeper.direction=[maximize,minimize]",
                 "hydra.sweeper.pruner.name=median")  # fmt: skip


def test_a_metric_the_task_does_not_return_fails_one_trial_and_stops(tmp_path):
    with pytest.raises(
        LrkConfigError,
        match="optimized_metric=val/acc is not among the metrics the task returned: score, size, x",
    ):
        multirun(tmp_path, "optimized_metric=val/acc")
    study = load(tmp_path)
    assert states(study) == ["FAIL"] and "score, size, x" in study.trials[0].user_attrs["error"]


def test_a_task_returning_nothing_stops_the_sweep(tmp_path):
    with pytest.raises(LrkConfigError, match="the task returned NoneType: it must return a dict of metrics"):
        multirun(tmp_path, "return_mode=none")
    assert states(load(tmp_path)) == ["FAIL"]


def test_cli_prints_one_message_without_traceback(tmp_path):
    process = worker(tmp_path, "sweep", "nested.dpth=interval(0,1)", storage=f"sqlite:///{tmp_path}/study.db")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "nested.dpth is not a key of the config" in out and "Traceback" not in out


# ---------------------------------------------------------------- pruning callback and trial context
def _trainer(metrics: dict[str, float], epoch: int = 0, sanity: bool = False) -> Any:
    import torch

    return SimpleNamespace(
        sanity_checking=sanity,
        world_size=1,
        current_epoch=epoch,
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
    )


def test_pruning_callback_reports_to_the_active_trial_and_prunes():
    from lrk.search.pruning import OptunaPruningCallback

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(1, 0))
    good = study.ask()
    good.report(0.9, 0)
    study.tell(good, 0.9)
    callback = OptunaPruningCallback(monitor="val/acc")
    trial = study.ask()
    callback.on_validation_end(_trainer({"val/acc": 0.1}), None)  # no active trial: nothing happens
    with context.activate(trial):
        callback.on_validation_end(_trainer({"val/acc": 0.1}, sanity=True), None)  # sanity check: ignored
        callback.on_validation_end(_trainer({"other": 0.1}), None)  # metric not logged: a warning only
        assert study.trials[1].intermediate_values == {}
        with pytest.raises(optuna.TrialPruned, match="pruned at step 0"):
            callback.on_validation_end(_trainer({"val/acc": 0.1}), None)
    assert study.trials[1].intermediate_values == {0: pytest.approx(0.1)}
    assert context.active_trial() is None


def test_multi_objective_trials_are_never_pruned():
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    with context.activate(trial):
        context.report(-1e9, 0)  # Optuna cannot prune multi-objective trials: a no-op
    assert study.trials[0].intermediate_values == {}


# ---------------------------------------------------------------- liveness of trials
def test_journal_trial_without_heartbeat_fails_and_is_retried(tmp_path):
    storage = open_storage(f"journal:///{tmp_path}/study.log", heartbeat_interval=1, grace_period=5)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask({"x": FloatDistribution(0, 1)})
    liveness = Liveness(storage, heartbeat_interval=1, grace_period=5, max_retry=1)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), 0)
    liveness.beat(trial_id)
    liveness.fail_stale(study)
    assert states(study) == ["RUNNING"]  # a fresh heartbeat: alive
    storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time() - 60)  # its worker died a minute ago
    liveness.fail_stale(study)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[1].params == trial.params and trials[1].system_attrs["failed_trial"] == 0


def test_rdb_trial_without_heartbeat_fails_and_is_retried(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask({"x": FloatDistribution(0, 1)})
    liveness = Liveness(storage, heartbeat_interval=1, grace_period=1, max_retry=1)
    liveness.beat(storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), 0))
    time.sleep(2.2)  # the grace period passes without a beat (the server's clock has 1 s resolution)
    liveness.fail_stale(study)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"] and trials[1].params == trial.params


# ---------------------------------------------------------------- several worker processes
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_share_one_study(tmp_path, kind):
    storage = f"sqlite:///{tmp_path}/study.db" if kind == "sqlite" else f"journal:///{tmp_path}/study.log"
    # both workers wait for each other in their first trial, so they truly run at the same time
    common = ["hydra.sweeper.n_trials=6", f"barrier.dir={tmp_path / 'barrier'}", "sleep=0.05"]
    a = worker(tmp_path, "a", *common, storage=storage)
    b = worker(tmp_path, "b", *common, storage=storage)
    finish(a), finish(b)
    study = load(tmp_path, storage)
    trials = study.get_trials()
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE}
    assert len(complete) == 6
    assert all(t.user_attrs.get("lrk_surplus") for t in trials if t.state != TrialState.COMPLETE)
    ran_a, ran_b = job_dirs(tmp_path / "a"), job_dirs(tmp_path / "b")
    assert ran_a and ran_b and not ran_a & ran_b and ran_a | ran_b == complete
    assert len(list((tmp_path / "barrier").iterdir())) == 2


def test_killed_worker_leaves_no_trial_running(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    common = [
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=2",
    ]
    stuck = worker(tmp_path, "a", *common, "hang_trials=[0]", storage=storage)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if states(load(tmp_path)) == ["RUNNING"]:
                break
        except (KeyError, LrkConfigError):  # the study does not exist yet
            pass
        time.sleep(0.2)
    time.sleep(1.5)  # let it beat at least once
    os.kill(stuck.pid, signal.SIGKILL)
    stuck.communicate(timeout=30)
    # a second worker finds the dead worker's trial stale, fails it, and reruns its params
    multirun(tmp_path, *common, sweep="b")
    trials = load(tmp_path).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params


def _postgres_url() -> str:
    return os.environ.get("LRK_TEST_POSTGRES_URL", "postgresql://lrk:lrk@127.0.0.1:5432/lrk_test")


def test_two_workers_on_postgresql(tmp_path):
    url = _postgres_url()
    try:
        open_storage(url, heartbeat_interval=None)
    except LrkConfigError as exc:
        reason = f"no PostgreSQL server at LRK_TEST_POSTGRES_URL ({exc}); start one with .ci/postgres.sh"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    name = f"lrk-test-{uuid.uuid4().hex[:8]}"
    common = [
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.study_name={name}",
        f"barrier.dir={tmp_path / 'barrier'}",
    ]
    a = worker(tmp_path, "a", *common, storage=url)
    b = worker(tmp_path, "b", *common, storage=url)
    try:
        finish(a), finish(b)
        study = load(tmp_path, url, name)
        assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 4
        ran_a, ran_b = job_dirs(tmp_path / "a"), job_dirs(tmp_path / "b")
        assert ran_a and ran_b and not ran_a & ran_b
        assert math.isfinite(results(tmp_path, "a")["best_value"])
    finally:
        a.kill(), b.kill()
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=open_storage(url, heartbeat_interval=None))


# ---------------------------------------------------------------- the real training path
REPO = SWEEP_APP_DIR.parent.parent
TINY_TRAIN = [
    "data=synthetic", "data.num_samples=96", "data.image_size=16", "data.batch_size=16",
    "backbone=vit_edge", "backbone.dim=32", "backbone.depth=1", "backbone.num_heads=2",
    "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=csv", "callbacks.rich_progress_bar=null",
    "callbacks.inference_benchmark.max_batches=2", "callbacks.inference_benchmark.warmup_batches=1",
]  # fmt: skip


@pytest.mark.skipif(
    not (REPO / "conf" / "decomp" / "svd.yaml").is_file(), reason="conf/decomp/svd.yaml is not there yet"
)
def test_real_sweep_through_train_py(tmp_path):
    """``python train.py -m hparams_search=rank_svd`` on tiny synthetic data: 2 trials of a real SVD fit."""
    storage = f"sqlite:///{tmp_path}/study.db"
    command = [
        sys.executable, str(REPO / "train.py"), "-m", "hparams_search=rank_svd", *TINY_TRAIN,
        "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = optuna.load_study(study_name="rank_svd-synthetic-vit_edge", storage=open_storage(storage))
    assert states(study) == ["COMPLETE", "COMPLETE"]
    out = results(tmp_path)
    assert out["optimized_metric"] == "val/acc_best"
    assert out["best_value"] == pytest.approx(max(t.value for t in study.trials))
    for t in study.trials:
        summary = json.loads((tmp_path / "sweep" / str(t.number) / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["optuna"]["state"] == "COMPLETE"
        assert summary["config"]["optuna"]["trial"] == t.number
        assert summary["config"]["decomp"]["ratio"] == pytest.approx(t.params["decomp.ratio"], rel=1e-9)
        assert summary["metrics"]["val/acc_best"] == pytest.approx(t.value)
        assert summary["metrics"]["model/params"] < summary["metrics"]["model/params_dense"]
        assert len(t.intermediate_values) == 2  # the pruning callback reported each validation epoch
