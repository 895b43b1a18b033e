"""`python train.py ...` as a user runs it: run dirs, one-line errors, interruption and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TINY_CLI = [
    "data=synthetic", "data.num_samples=96", "data.image_size=16", "data.batch_size=16",
    "backbone.dim=32", "backbone.depth=1", "backbone.num_heads=2",
    "logger=csv", "trainer.enable_progress_bar=false",
]  # fmt: skip


def train_cmd(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        *TINY_CLI,
        f"paths.log_dir={tmp_path / 'logs'}",
        *overrides,
    ]


def run_dirs(tmp_path: Path, task: str = "train") -> list[Path]:
    return sorted((tmp_path / "logs" / task / "runs").glob("*"))


def test_unknown_group_choice_lists_the_options(tmp_path):
    out = subprocess.run(train_cmd(tmp_path, "data=nosuch"), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Could not find 'data/nosuch'" in out.stderr and "surface_defect" in out.stderr


def test_unknown_key_is_rejected(tmp_path):
    out = subprocess.run(
        train_cmd(tmp_path, "trainer.max_epoch=3"), capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "max_epoch" in out.stderr


def test_bad_value_is_one_message_and_a_failed_summary(tmp_path):
    out = subprocess.run(
        train_cmd(tmp_path, "data.image_size=-4"), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert out.stderr.count("data.image_size=-4") == 1 and "Traceback" not in out.stderr
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "image_size" in summary["error"]


def test_two_runs_started_together_get_their_own_dirs(tmp_path):
    cmd = train_cmd(tmp_path, "trainer.max_epochs=1", "test=false")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2
    for run_dir in dirs:
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_sigint_interrupts_then_the_fit_resumes(tmp_path):
    cmd = train_cmd(tmp_path, "trainer.max_epochs=40", "data.num_samples=192")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "logs").rglob("last.ckpt")):
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert f"ckpt_path={run_dir}" in summary["error"]
    resumed = subprocess.run([*cmd, f"ckpt_path={run_dir}"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    last = max(run_dirs(tmp_path), key=lambda p: p.stat().st_mtime)
    assert json.loads((last / "summary.json").read_text())["status"] == "completed"
    # the resumed fit ends at the configured number of epochs, counted from the interrupted one
    import torch

    assert torch.load(last / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 39


def test_plain_multirun_runs_every_job(tmp_path):
    out = subprocess.run(
        [*train_cmd(tmp_path, "seed=1,2", "trainer.max_epochs=1", "test=false"), "--multirun"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    summaries = sorted((tmp_path / "logs" / "train" / "multiruns").rglob("summary.json"))
    assert [json.loads(p.read_text())["config"]["seed"] for p in summaries] == [1, 2]
