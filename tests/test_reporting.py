"""lrk.reporting: every figure function on data it is handed, the Pareto front against a brute-force search, and
the data the figures get from real runs checked against the runs' summary.json files."""

from __future__ import annotations

import json
import random
import statistics

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from report_fixtures import make_study, real_runs, write_summary  # noqa: F401  (real_runs: a fixture)

from lrk.reporting import (
    Point,
    confusion_figure,
    confusions,
    dataset_figures,
    groups_of,
    load_report_runs,
    pareto_front,
    phase_time_figure,
    phase_times,
    rank_map_figure,
    rank_table,
    recall_figure,
    recalls,
    results_table,
    study_figures,
    tradeoff_figure,
    tradeoff_points,
    varying_keys,
)
from lrk.reporting.runs import find_summaries
from lrk.reporting.sweep import load_study, storage_missing, study_refs


def brute_force_front(xs, ys, minimize_x=True, maximize_y=True):
    """Point i is on the front when no j is at least as good in both and strictly better in one."""
    sx = [x if minimize_x else -x for x in xs]
    sy = [-y if maximize_y else y for y in ys]
    return [
        not any(
            sx[j] <= sx[i] and sy[j] <= sy[i] and (sx[j] < sx[i] or sy[j] < sy[i])
            for j in range(len(xs))
            if j != i
        )
        for i in range(len(xs))
    ]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("directions", [(True, True), (False, True), (True, False)])
def test_pareto_front_matches_brute_force(seed, directions):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    # small integer grids make ties in x, in y and whole duplicate points
    xs = [float(rng.randint(0, 6)) for _ in range(n)]
    ys = [float(rng.randint(0, 6)) for _ in range(n)]
    assert pareto_front(xs, ys, *directions) == brute_force_front(xs, ys, *directions)


def test_pareto_front_by_hand():
    # (params, acc): b dominates a (fewer params, higher acc); c and d trade off; e duplicates d
    xs = [10, 5, 20, 2, 2]
    ys = [0.7, 0.8, 0.9, 0.6, 0.6]
    assert pareto_front(xs, ys) == [False, True, True, True, True]
    assert pareto_front([], []) == []
    with pytest.raises(ValueError, match="2 x values but 1"):
        pareto_front([1, 2], [1])


def test_tradeoff_figure_draws_every_point_with_error_bars_and_marks_the_front():
    points = [
        Point("dense", 100.0, 0.90, 0.0, 0.02, 3),
        Point("svd", 40.0, 0.88, 1.0, 0.01, 3),
        Point("tucker", 50.0, 0.85, 0.0, 0.03, 2),  # dominated by svd
        Point("tt", 10.0, 0.70, 0.0, 0.0, 1),
    ]
    fig = tradeoff_figure(points, "model/params", "test/acc", baseline=0.6)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 4
    for container, point in zip(bars, points, strict=True):
        (x, y) = container.lines[0].get_xydata()[0]
        assert (x, y) == pytest.approx((point.x, point.y))
        # the y error bar segment spans mean +- std
        assert container.has_xerr and container.has_yerr
        x_bar, y_bar = (coll.get_segments()[0] for coll in container.lines[2])  # x error bar first, then y
        assert abs(x_bar[1][0] - x_bar[0][0]) == pytest.approx(2 * point.x_err)
        assert abs(y_bar[1][1] - y_bar[0][1]) == pytest.approx(2 * point.y_err)
    front_line = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    assert front_line.get_xydata().tolist() == [[10.0, 0.70], [40.0, 0.88], [100.0, 0.90]]
    assert any(line.get_label().startswith("majority class (0.600)") for line in ax.get_lines())
    assert ax.get_xlabel() == "parameters" and ax.get_ylabel() == "test accuracy"
    assert ax.get_xscale() == "linear"  # 100 / 10 < 20
    assert (
        tradeoff_figure([Point("a", 1, 1), Point("b", 1000, 1)], "model/flops").axes[0].get_xscale() == "log"
    )


def test_rank_map_figure_is_layers_by_variants_with_blanks():
    ranks = {"svd": {"fc1": 8.0, "fc2": 4.0}, "tucker": {"fc2": 6.0, "conv": 3.0}}
    fig = rank_map_figure(ranks)
    ax = fig.axes[0]
    grid = ax.get_images()[0].get_array()
    assert grid.shape == (3, 2)  # layers fc1, fc2, conv in order of first appearance
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fc1", "fc2", "conv"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["svd", "tucker"]
    expected = np.ma.masked_invalid([[8.0, np.nan], [4.0, 6.0], [np.nan, 3.0]])
    assert (grid.mask == expected.mask).all()
    assert grid.compressed().tolist() == expected.compressed().tolist()
    assert ax.get_xlabel() == "variant" and ax.get_ylabel() == "layer"


def test_phase_time_figure_stacks_disjoint_phases_and_overlays_attention():
    times = {
        "dense": {"time/rr_s": 0.0, "time/train_s": 10.0, "time/val_s": 2.0, "time/mha_s": 4.0},
        "sdrm": {"time/rr_s": 1.5, "time/train_s": 8.0, "time/val_s": 1.0, "time/mha_s": 2.5},
    }
    ax = phase_time_figure(times).axes[0]
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in containers] == [
        "rank reduction",
        "training steps",
        "validation",
        "attention (inside training + validation)",
    ]
    assert all(len(c) == 2 for c in containers)
    for k, name in enumerate(times):
        rr, train, val, mha = (containers[i][k] for i in range(4))
        assert (rr.get_y(), rr.get_height()) == pytest.approx((0.0, times[name]["time/rr_s"]))
        assert train.get_y() == pytest.approx(times[name]["time/rr_s"])
        assert val.get_y() + val.get_height() == pytest.approx(
            sum(times[name][m] for m in ("time/rr_s", "time/train_s", "time/val_s"))
        )
        assert (mha.get_y(), mha.get_height()) == pytest.approx(
            (times[name]["time/rr_s"], times[name]["time/mha_s"])
        )
    assert ax.get_ylabel().startswith("seconds")


def test_recall_figure_has_a_bar_per_variant_and_class_with_error_bars():
    data = {
        "dense": {"good": (0.9, 0.05), "bad": (0.6, 0.1)},
        "svd": {"good": (0.8, 0.0), "bad": (0.7, 0.02)},
    }
    ax = recall_figure(data).axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == ["dense", "svd"]
    assert [round(p.get_height(), 6) for p in bars[0]] == [0.9, 0.6]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["good", "bad"]
    assert all(c.errorbar is not None for c in bars)
    segs = bars[0].errorbar.lines[2][0].get_segments()
    assert [abs(s[1][1] - s[0][1]) for s in segs] == pytest.approx([0.1, 0.2])
    assert ax.get_ylabel() == "test recall"


def test_confusion_figure_shades_row_shares_and_prints_counts():
    matrices = {"dense": [[8, 2], [1, 9]], "svd": [[5, 5], [0, 10]]}
    fig = confusion_figure(matrices, ["good", "bad"])
    visible = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in visible] == ["dense", "svd"]
    shares = visible[0].get_images()[0].get_array()
    assert np.allclose(shares, [[0.8, 0.2], [0.1, 0.9]])
    assert sorted(t.get_text() for t in visible[1].texts) == ["0", "10", "5", "5"]
    assert visible[0].get_xlabel() == "predicted" and visible[0].get_ylabel() == "true"
    assert [t.get_text() for t in visible[0].get_yticklabels()] == ["good", "bad"]


def _summaries(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("summary.json"))]


def test_real_runs_give_the_figures_their_data(real_runs):  # noqa: F811
    runs, unreadable = load_report_runs(find_summaries([real_runs]))
    assert not unreadable and len(runs) == 3 and all(r.status == "completed" for r in runs)
    assert varying_keys(runs) == ["decomp.name"]
    groups, names = groups_of(runs)
    assert sorted(names.values()) == ["none", "svd"]
    raw = {
        d["config"]["seed"] if d["config"]["decomp"]["name"] == "svd" else 0: d for d in _summaries(real_runs)
    }
    svd = [raw[1], raw[2]]

    points = {p.label: p for p in tradeoff_points(groups, names, "model/params", "test/acc")}
    accs = [d["metrics"]["test/acc"] for d in svd]
    assert points["svd"].n == 2 and points["svd"].y == pytest.approx(statistics.fmean(accs))
    assert points["svd"].y_err == pytest.approx(statistics.stdev(accs))
    assert points["svd"].x == pytest.approx(svd[0]["metrics"]["model/params"])
    assert points["none"].x == pytest.approx(raw[0]["metrics"]["model/params"]) and points["none"].n == 1
    assert points["svd"].x < points["none"].x  # the factorization has fewer parameters

    ranks = rank_table(groups, names)
    assert set(ranks) == {"svd"}  # the dense baseline has no per-layer report
    for row in svd[0]["decomp_layers"]:
        assert ranks["svd"][row["name"]] == pytest.approx(
            statistics.fmean(
                d_row["rank"] for d in svd for d_row in d["decomp_layers"] if d_row["name"] == row["name"]
            )
        )

    matrices, classes = confusions(groups, names)
    summed = np.add(*(np.array(d["extra"]["test_confusion_matrix"]) for d in svd))
    assert matrices["svd"] == summed.tolist() and classes == raw[0]["extra"]["data"]["class_names"]

    times = phase_times(groups, names)
    assert times["svd"]["time/train_s"] == pytest.approx(
        statistics.fmean(d["metrics"]["time/train_s"] for d in svd)
    )
    assert times["svd"]["time/rr_s"] > 0 and times["none"]["time/rr_s"] == 0

    recall = recalls(groups, names)
    good = [d["metrics"]["test/recall/good"] for d in svd]
    assert recall["svd"]["good"] == pytest.approx((statistics.fmean(good), statistics.stdev(good)))

    figs = dataset_figures(runs)
    assert set(figs) == {
        "acc_vs_params",
        "acc_vs_flops",
        "acc_vs_infer_ms",
        "rank_map",
        "phase_time",
        "recall",
        "confusion",
    }

    table = results_table(groups, names, ["decomp.name"], ["test/acc"])
    majority = statistics.fmean(d["metrics"]["test/acc_majority"] for d in raw.values())
    assert f"| majority class | - | {majority:.3f} |" in table


def test_varying_keys_are_the_keys_that_vary_within_a_method(tmp_path):
    write_summary(tmp_path / "a", "none", 0, stage="init")
    for seed in (0, 1):
        write_summary(tmp_path / f"b{seed}", "tucker", seed, beta=1.0, ratio=0.5, branches=1, stage="post")
        write_summary(tmp_path / f"c{seed}", "tucker", seed, beta=1.0, ratio=0.5, branches=2, stage="post")
    write_summary(tmp_path / "d", "tucker", 0, {"test/acc": 0.0}, status="failed", branches=3, beta=2.0)
    runs, _ = load_report_runs(find_summaries([tmp_path]))
    # beta, ratio, stage: one value per method; seeds never count; the failed run's beta=2.0 makes no variant
    assert varying_keys(runs) == ["decomp.name", "decomp.branches"]
    _, names = groups_of(runs)
    assert sorted(names.values()) == [
        "none",
        "tucker, branches=1",
        "tucker, branches=2",
        "tucker, branches=3",
    ]


def test_varying_keys_of_a_sweep_keep_every_searched_key(tmp_path):
    for k, (ratio, lr) in enumerate([(0.1, 1e-3), (0.2, 3e-4), (0.3, 1e-3)]):
        write_summary(tmp_path / str(k), "svd", 0, ratio=ratio, lr=lr)
    runs, _ = load_report_runs(find_summaries([tmp_path]))
    assert varying_keys(runs) == [
        "decomp.lr",
        "decomp.ratio",
    ]  # ratio alone tells them apart; lr is shown too


def test_varying_keys_split_variants_set_by_different_keys(tmp_path):
    write_summary(tmp_path / "a", "svd", 0, rank=8, ratio=None)
    write_summary(tmp_path / "b", "svd", 0, rank=None, ratio=0.5)
    runs, _ = load_report_runs(find_summaries([tmp_path]))
    groups, names = groups_of(runs)
    assert len(groups) == 2 and sorted(names.values()) == ["rank=8", "ratio=0.5"]  # null values left out


def test_failed_runs_are_not_drawn(tmp_path):
    write_summary(tmp_path / "ok", "svd", 0, {"test/acc": 0.8, "model/params": 10.0, "test/recall/good": 0.9})
    write_summary(tmp_path / "bad", "svd", 1, {"test/acc": 0.0, "model/params": 10.0}, status="failed")
    runs, _ = load_report_runs(find_summaries([tmp_path]))
    groups, names = groups_of(runs)
    (point,) = tradeoff_points(groups, names, "model/params", "test/acc")
    assert point.n == 1 and point.y == pytest.approx(0.8)


@pytest.mark.parametrize("objectives", [1, 2])
def test_study_figures_come_from_the_study_in_its_storage(tmp_path, objectives):
    storage = make_study(tmp_path / "s.db", "toy", objectives)
    write_summary(tmp_path / "runs" / "0", optuna={"trial": 0, "study": "toy", "storage": storage})
    runs, _ = load_report_runs(find_summaries([tmp_path / "runs"]))
    assert study_refs(runs) == [("toy", storage)]
    figs = study_figures(load_study("toy", storage))
    if objectives == 1:
        assert set(figs) == {"history", "importances"}
        ax = figs["history"].axes[0]
        assert ax.get_ylabel() == "val/acc_best"
        # one point per completed trial in the history
        assert sum(len(c.get_offsets()) for c in ax.collections if len(c.get_offsets())) >= 6
        labels = [t.get_text() for t in figs["importances"].axes[0].get_yticklabels()]
        assert sorted(labels) == ["kind", "x"]
    else:
        assert set(figs) == {"history_0", "history_1", "pareto", "importances_0", "importances_1"}
        pareto_ax = figs["pareto"].axes[0]
        assert (pareto_ax.get_xlabel(), pareto_ax.get_ylabel()) == ("val/acc_best", "model/params")


def test_a_missing_sqlite_file_is_named_and_not_created(tmp_path):
    url = f"sqlite:///{tmp_path / 'gone.db'}"
    assert "does not exist" in storage_missing(url)
    assert not (tmp_path / "gone.db").exists()
    assert storage_missing(make_study(tmp_path / "here.db", "x")) is None
