"""Hydra launchers under lrk's Optuna sweeper: joblib and submitit_local run the trials of a batch in other
processes, at the same time; a launcher that cannot start here is one clear error before any trial."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from lrk.errors import LrkConfigError
from lrk.search.launchers import check_launcher

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "sweep_app" / "app.py"


def toy_sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """``app.py -m hparams_search=toy`` in its own process; returns the finished process and its pid."""
    command = [
        sys.executable, str(APP), "-m", "hparams_search=toy", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db", f"paths.log_dir={tmp_path / 'logs'}",
        "hydra/job_logging=none", "hydra/hydra_logging=none", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, out.decode(), None), process.pid


@pytest.mark.parametrize(
    "launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["hydra/launcher=submitit_local"]]
)
def test_parallel_launchers_run_each_batch_at_once_in_other_processes(tmp_path, launcher):
    barrier = tmp_path / "barrier"
    done, sweeper_pid = toy_sweep(
        tmp_path, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", *launcher,
        f"barrier.dir={barrier}", "barrier.workers=2", "barrier.timeout=120",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path}/study.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert sorted(int(p.name) for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()) == [0, 1, 2, 3]
    # every trial passed the barrier in a process of the launcher, never in the sweeper's own
    pids = {int(p.name) for p in barrier.iterdir()}
    assert len(pids) >= 2 and sweeper_pid not in pids


def test_slurm_launcher_without_sbatch_is_one_clear_error_before_any_trial(tmp_path, monkeypatch):
    if any((Path(d) / "sbatch").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("this machine is a Slurm node")
    done, _ = toy_sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra/launcher=submitit_slurm")
    assert done.returncode != 0
    assert (
        "hydra/launcher=submitit_slurm cannot start a trial here: 'sbatch' is not on the PATH" in done.stdout
    )
    assert (
        not (tmp_path / "study.db").exists()
        or not optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path}/study.db").trials
    )


def test_lrk_slurm_config_is_the_submitit_slurm_launcher_with_lrk_defaults():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=lrk_slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.timeout_min == 240 and launcher.tasks_per_node == 1 and launcher.partition is None


def test_check_launcher_names_the_launchers_that_run_here(monkeypatch):
    slurm = type("SlurmLauncher", (), {})()
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(LrkConfigError, match="basic, joblib, submitit_local"):
        check_launcher(slurm, n_jobs=4)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    check_launcher(slurm, n_jobs=4)  # a Slurm node: accepted
    check_launcher(SimpleNamespace(), n_jobs=1)  # the basic launcher


@pytest.mark.slow
def test_real_train_py_sweep_with_submitit_local(tmp_path):
    """``python train.py -m hparams_search=rank_svd hydra/launcher=submitit_local`` on tiny synthetic data."""
    from conftest import TINY

    storage = f"sqlite:///{tmp_path}/study.db"
    command = [
        sys.executable, str(REPO / "train.py"), "-m", "hparams_search=rank_svd", *TINY,
        "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=submitit_local",
        f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    study = optuna.load_study(study_name="rank_svd-synthetic-vit_edge", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        assert (tmp_path / "sweep" / str(trial.number) / "summary.json").is_file()
