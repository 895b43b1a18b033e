"""python -m lrk.report: the page and files it writes from real runs, sweeps, and every bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from report_fixtures import make_study, real_runs, write_summary  # noqa: F401  (real_runs: a fixture)

from lrk.report import main

FIGURES = {
    "acc_vs_params",
    "acc_vs_flops",
    "acc_vs_infer_ms",
    "rank_map",
    "phase_time",
    "recall",
    "confusion",
}


def _images(page: str) -> list[str]:
    return re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)


def test_report_of_real_runs_writes_the_page_and_every_figure(real_runs, tmp_path, capsys):  # noqa: F811
    runs = tmp_path / "multirun"
    shutil.copytree(real_runs, runs)
    write_summary(runs / "9", "svd", 9, {"test/acc": 0.0}, status="failed")
    assert main([str(runs), "--no-progress"]) == 0
    out = runs / "report"  # the default --out
    assert {p.stem for p in out.glob("*.png")} == FIGURES == {p.stem for p in out.glob("*.svg")}
    assert all(p.stat().st_size > 1000 for p in out.iterdir())
    page = (out / "index.html").read_text()
    images = _images(page)
    assert {name for name, _ in images} == FIGURES
    assert all(len(data) > 1000 for _, data in images)  # real PNGs inside the page, not links
    assert "<table>" in page and "<td>majority class</td>" in page
    assert "runs that did not complete (1, not drawn)" in page and "RuntimeError: boom" in page
    # the failed run's zero accuracy is not in the svd row: n counts the two completed seeds
    assert re.search(r"<td>svd</td><td>2</td>", page)
    printed = capsys.readouterr().out
    assert f"report: {out / 'index.html'} (7 figures" in printed


def test_existing_out_is_refused_unless_force_and_force_keeps_other_files(tmp_path, capsys):
    write_summary(tmp_path / "runs" / "0", "svd", 0, {"test/acc": 0.8, "model/params": 10.0})
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "runs"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrk: error: --out ") and "already exists" in err and "--force" in err
    assert not (out / "index.html").exists()
    (out / "old_figure.png").write_bytes(b"x")
    assert main([str(tmp_path / "runs"), "--out", str(out), "--force", "--no-progress"]) == 0
    assert (out / "index.html").is_file() and (out / "notes.txt").read_text() == "mine"
    assert not (out / "old_figure.png").exists() and (out / "acc_vs_params.png").is_file()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist: give run, multirun or sweep folders"),
        (lambda p: ((p / "empty").mkdir(), p / "empty")[1], "holds no summary.json"),
        (lambda p: ((p / "x.txt").write_text(""), p / "x.txt")[1], "is not a folder nor a summary.json"),
    ],
)
def test_bad_paths_are_one_error_line(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main([str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lrk: error: ") and message in err[0] and str(path) in err[0]


def test_a_folder_without_runs_among_good_ones_is_an_error(tmp_path, capsys):
    write_summary(tmp_path / "good" / "0", "svd")
    (tmp_path / "typo").mkdir()
    assert main([str(tmp_path / "good"), str(tmp_path / "typo"), "--no-progress"]) == 2
    assert f"{tmp_path / 'typo'} holds no summary.json" in capsys.readouterr().err


def test_mixed_datasets_are_said_and_grouped(tmp_path, capsys):
    for seed in (0, 1):
        write_summary(tmp_path / f"a{seed}", "svd", seed, {"test/acc": 0.8 + seed / 100, "model/params": 5.0})
        write_summary(
            tmp_path / f"b{seed}", "svd", seed, {"test/acc": 0.5, "model/params": 5.0}, dataset="cifar10"
        )
    assert main([str(tmp_path), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (
        "lrk: note: runs of 2 datasets mixed (synthetic: 2 runs, cifar10: 2 runs): one section per dataset"
        in err
    )
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<h2>dataset synthetic</h2>" in page and "<h2>dataset cifar10</h2>" in page
    assert {p.stem for p in (tmp_path / "r").glob("*.png")} == {
        "synthetic_acc_vs_params",
        "cifar10_acc_vs_params",
    }


def test_unreadable_summary_is_listed_and_the_rest_reported(tmp_path, capsys):
    write_summary(tmp_path / "ok", "svd", 0, {"test/acc": 0.8, "model/params": 5.0})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{half")
    assert main([str(tmp_path), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert f"lrk: note: {tmp_path / 'broken'}: summary.json unreadable" in capsys.readouterr().err
    assert "summary.json unreadable" in (tmp_path / "r" / "index.html").read_text()


def test_sweep_dir_gets_the_study_figures(tmp_path):
    sweep = tmp_path / "sweep"
    storage = make_study(tmp_path / "study.db", "pareto", objectives=2)
    for k in range(3):
        write_summary(
            sweep / str(k),
            "svd",
            k,
            {"test/acc": 0.6 + k / 10, "model/params": 100.0 * (k + 1)},
            optuna={"trial": k, "study": "pareto", "storage": storage},
            ratio=0.1 * (k + 1),
        )
    (sweep / "optimization_results.yaml").write_text(f"study_name: pareto\nstorage: {storage}\n")
    assert main([str(sweep), "--no-progress"]) == 0
    pngs = {p.stem for p in (sweep / "report").glob("*.png")}
    assert {"optuna_pareto_pareto", "optuna_pareto_history_0", "optuna_pareto_history_1"} <= pngs
    names = {name for name, _ in _images((sweep / "report" / "index.html").read_text())}
    assert "pareto: pareto" in names and "acc_vs_params" in names


def test_a_sweep_whose_storage_is_gone_is_said(tmp_path):
    gone = f"sqlite:///{tmp_path / 'gone.db'}"
    write_summary(
        tmp_path / "s" / "0", "svd", 0, {"test/acc": 0.7}, optuna={"trial": 0, "study": "x", "storage": gone}
    )
    assert main([str(tmp_path / "s"), "--no-progress"]) == 0
    page = (tmp_path / "s" / "report" / "index.html").read_text()
    assert f"study x: storage {gone} cannot be read" in page and not (tmp_path / "gone.db").exists()


def test_redirected_progress_is_plain_lines(tmp_path):
    for k in range(3):
        write_summary(tmp_path / "runs" / str(k), "svd", k, {"test/acc": 0.7, "model/params": 5.0})
    done = subprocess.run(
        [sys.executable, "-m", "lrk.report", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "lrk.report: reading summaries 3/3" in lines and "lrk.report: drawing figures 1/1" in lines
    assert not any("\x1b[" in line or "\r" in line for line in lines)  # no terminal control codes
