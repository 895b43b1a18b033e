"""lrk.progress: the shared progress helper (tqdm on a terminal, plain log lines when redirected, quiet for small
work) and its users: decomposing layers, calibration passes, the latency rank search and the sweep's trials."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import optuna
import pytest
import torch
from conftest import SWEEP_APP_DIR, load_sweep_app
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

import lrk.decomp.attention.base as attention_base
import lrk.decomp.base as decomp_base
import lrk.progress as progress_module
from lrk.decomp.base import build_method
from lrk.decomp.rank import latency
from lrk.progress import Progress, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def redirected(monkeypatch):
    """stderr is not a terminal (as in a log file or CI), whatever pytest's capture does."""
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())


def messages(caplog, name: str = "lrk.progress") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def counts(lines: list[str]) -> list[int]:
    """The k of each ``desc: k/n (..%), .. s`` line."""
    return [int(line.rsplit(": ", 1)[1].split("/")[0]) for line in lines]


def quarter_steps(n: int) -> list[int]:
    """The steps k of n at which a new quarter is reached: the smallest k with k >= q n / 4, q = 1..4."""
    return sorted({-(-q * n // 4) for q in range(1, 5)})


# -- the helper ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [10, 7, 4, 1000])
def test_redirected_lines_at_each_quarter(total, caplog, redirected) -> None:
    with caplog.at_level(logging.INFO, logger="lrk.progress"), Progress(total, "work", min_total=1) as bar:
        for _ in range(total):
            bar.update()
    lines = messages(caplog)
    assert counts(lines) == quarter_steps(total)
    assert lines[-1].startswith(f"work: {total}/{total} (100%), ")
    assert all("\r" not in line and "\n" not in line for line in lines)


def test_redirected_lines_at_most_every_interval(caplog, redirected, monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    with caplog.at_level(logging.INFO, logger="lrk.progress"):
        bar = Progress(100, "slow", min_total=1, interval_s=10.0)
        for _ in range(100):
            clock.now += 1.0  # one second per step
            bar.update()
    lines = messages(caplog)
    # every 10 s since the last line, plus the quarters (25, 50, 75, 100), which restart the interval
    assert counts(lines) == [10, 20, 25, 35, 45, 50, 60, 70, 75, 85, 95, 100]
    assert lines[0] == "slow: 10/100 (10%), 10.0 s" and lines[2] == "slow: 25/100 (25%), 25.0 s"


def test_quiet_below_min_total(caplog, redirected) -> None:
    with caplog.at_level(logging.INFO, logger="lrk.progress"):
        for total in (0, 3, 9):
            with Progress(total, "tiny", min_total=10) as bar:
                for _ in range(total):
                    bar.update()
        assert messages(caplog) == []
        with Progress(10, "enough", min_total=10) as bar:  # min_total itself shows progress
            bar.update(10)
    (line,) = messages(caplog)
    assert line.startswith("enough: 10/10 (100%), ")


def test_terminal_gets_a_bar_and_no_log_lines(caplog, monkeypatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger="lrk.progress"), Progress(8, "drawing", min_total=1) as bar:
        assert bar.bar is not None
        bar.update(8)
    assert bar.bar is None  # closed on leaving the block
    assert messages(caplog) == []
    assert "drawing" in terminal.getvalue()


def test_iterator_wrapper_yields_every_item(caplog, redirected) -> None:
    items = [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]
    with caplog.at_level(logging.INFO, logger="lrk.progress"):
        assert list(progress(items, "items", min_total=1)) == items
        lines = messages(caplog)
        assert counts(lines) == quarter_steps(5) and lines[-1].startswith("items: 5/5 (100%)")
        caplog.clear()
        # a generator has no length: quiet unless total is given
        assert list(progress((i * i for i in range(6)), "squares", min_total=1)) == [0, 1, 4, 9, 16, 25]
        assert messages(caplog) == []
        assert list(progress((i for i in range(8)), "given", total=8, min_total=1)) == list(range(8))
        assert counts(messages(caplog)) == quarter_steps(8)
        caplog.clear()
        # a step is counted after the item's work, when the loop asks for the next item
        seen = []
        for item in progress(range(4), "late", min_total=1):
            seen.append((item, counts(messages(caplog))))
        assert seen == [(0, []), (1, [1]), (2, [1, 2]), (3, [1, 2, 3])]


def test_iterator_wrapper_closes_the_bar_on_break(monkeypatch) -> None:
    monkeypatch.setattr(progress_module.sys, "stderr", FakeTerminal())
    closed = []
    monkeypatch.setattr(Progress, "close", lambda self: closed.append(self.done))
    steps = progress(range(10), "cut", min_total=1)
    for i in steps:
        if i == 3:
            break
    steps.close()  # what the garbage collector does at once in CPython
    assert closed == [3]


def test_a_caller_logger_names_the_lines(caplog, redirected) -> None:
    mine = logging.getLogger("lrk.some.module")
    with caplog.at_level(logging.INFO, logger="lrk.some.module"):
        list(progress(range(4), "mine", min_total=1, logger=mine))
    assert counts(messages(caplog, "lrk.some.module")) == [1, 2, 3, 4]


# -- its users ----------------------------------------------------------------------------------------
def mlp(layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [m for _ in range(layers) for m in (nn.Linear(16, 16), nn.ReLU())]
    return nn.Sequential(*blocks, nn.Linear(16, 3))  # svd leaves the classifier (the last Linear) dense


def test_apply_logs_decomposing_lines_for_many_layers(caplog, redirected, monkeypatch) -> None:
    batches = [torch.randn(4, 16)]
    with caplog.at_level(logging.INFO, logger="lrk.decomp.base"):
        report = build_method({"name": "svd", "rank": 4}).apply(mlp(6), batches)
        assert len(report.rows) == 6 and messages(caplog, "lrk.decomp.base") == []  # under 16 layers: quiet
        monkeypatch.setattr(decomp_base, "PROGRESS_MIN_LAYERS", 6)
        report = build_method({"name": "svd", "rank": 4}).apply(mlp(6), batches)
    lines = messages(caplog, "lrk.decomp.base")
    assert counts(lines) == quarter_steps(len(report.rows)) == [2, 3, 5, 6]
    assert all(line.startswith("decomposing layers (svd): ") and "/6 (" in line for line in lines)


def test_calibration_pass_logs_its_batches(caplog, redirected, monkeypatch) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    batches = [(torch.randn(2, 3, 2, 2), torch.zeros(2, dtype=torch.long)) for _ in range(8)]
    with caplog.at_level(logging.INFO, logger="lrk.decomp.attention.base"):
        assert attention_base.run_batches(model, batches[:7]) == 7  # under 8 batches: quiet
        assert messages(caplog, "lrk.decomp.attention.base") == []
        assert attention_base.run_batches(model, batches, "calibration x") == 8
    lines = messages(caplog, "lrk.decomp.attention.base")
    assert counts(lines) == [2, 4, 6, 8] and lines[-1].startswith("calibration x: 8/8 (100%)")


def test_latency_rank_search_logs_each_layer(caplog, redirected, monkeypatch) -> None:
    def fake_times(fns, repeats, warmup, sync):  # rank r takes r ms, the dense layer 100 ms
        return {k: 0.1 if k == "dense" else int(k.split("x")[-1]) / 1000 for k in fns}

    monkeypatch.setattr(latency, "time_forwards", fake_times)
    cfg = {"name": "svd", "ratio": 0.5, "rank_search": "latency", "rank_search_cache": None}
    with caplog.at_level(logging.INFO, logger="lrk.decomp.rank.latency"):
        report = build_method(cfg).apply(mlp(3), [torch.randn(4, 16)])
        assert len(report.rows) == 3 and messages(caplog, "lrk.decomp.rank.latency") == []  # under 4
        report = build_method(cfg).apply(mlp(5), [torch.randn(4, 16)])
    searched = [r for r in report.rows if r.get("latency_curve")]
    assert len(searched) == 5
    lines = messages(caplog, "lrk.decomp.rank.latency")
    assert counts(lines) == quarter_steps(5) and lines[-1].startswith("rank search (latency): 5/5 (100%)")


# -- the sweep ----------------------------------------------------------------------------------------
def toy_sweep(tmp_path: Path, *extra: str) -> None:
    overrides = [
        "hparams_search=toy",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db",
        f"paths.log_dir={tmp_path / 'logs'}",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
        *extra,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(SWEEP_APP_DIR / "conf"), version_base="1.3", job_name="app"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        hydra.multirun(
            config_name="config",
            task_function=load_sweep_app().task,
            overrides=overrides,
            with_log_configuration=False,
        )


def test_each_launched_trial_logs_k_of_n_with_the_done_count(tmp_path, caplog) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with caplog.at_level(logging.INFO, logger="lrk.search"):
        # trial 0 fails: it holds no slot of n_trials, trial 1 takes slot 1 again, trial 2 slot 2
        toy_sweep(
            tmp_path, "hydra.sweeper.n_trials=2", "fail_trials=[0]", "hydra.sweeper.max_failure_rate=1.0"
        )
    launched = [m for m in messages(caplog, "lrk.search") if "done): " in m]
    heads = [m.split(": ", 1)[0] for m in launched]
    assert heads == ["trial 0 (1/2, 0 done)", "trial 1 (1/2, 0 done)", "trial 2 (2/2, 1 done)"]
    assert all("x=" in m and "y=" in m for m in launched)  # the trial's overrides follow
