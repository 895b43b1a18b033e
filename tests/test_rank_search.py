"""``decomp.rank_search: latency``: accelerating_lrd_paper Algorithm 1 (lrk.decomp.rank.latency).

The choice is tested on synthetic timing curves (no timing); the cache and the end-to-end ``apply`` replace the
timer (``latency.time_forwards``) by a counting fake with a known curve, except one test that times for real on
tiny layers. No test asserts a wall-clock time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lrk.decomp import build_method
from lrk.decomp.rank import latency
from lrk.decomp.rank.latency import (
    SLOWER_KIND,
    RankSearchCacheWarning,
    auto_step,
    candidate_ranks,
    candidate_scalars,
    select_rank,
)
from lrk.decomp.rank.policy import RankPolicy
from lrk.decomp.report import DecompReport
from lrk.decomp.weight.tucker import tucker_problem
from lrk.errors import LrkConfigError
from lrk.layers import SVDConv2d, SVDLinear, TuckerConv2d


# --- Algorithm 1 on synthetic curves (times from R down) ---------------------------------------------------------
@pytest.mark.parametrize(
    ("times", "dense", "min_drop", "index"),
    [
        ([10, 10, 10, 6, 6, 6], 20, 0.03, 3),  # one step: the rank right after it
        ([10, 9.6, 9.6, 5, 5], 20, 0.03, 3),  # two drops: the larger one
        ([10, 8, 8, 6, 6, 6], 20, 0.03, 1),  # equal drops: the higher rank
        ([5, 5, 5, 5], 20, 0.03, 0),  # flat: R
        ([5.0, 4.98, 5.01, 4.99], 20, 0.03, 0),  # flat with noise below min_drop: R
        ([10, 9.8, 9.6, 9.4, 9.2], 20, 0.03, 0),  # a slope of small drops: R
        ([10, 8, 6, 4, 2], 20, 0.03, 0),  # a steep steady slope: every drop is the slope, no step: R
        ([10, 9, 8, 5, 4, 3], 20, 0.03, 3),  # a step on a slope: the excess over the slope (3 - 1) wins
        ([10, 9, 9], 20, 0.03, 1),  # two drops: no slope taken, the larger drop
        ([5, 9, 6], 20, 0.03, 0),  # a drop from a slow candidate, onto one no faster than R: R
        ([10, 10, 16, 9.8, 9.8, 6, 6], 20, 0.03, 5),  # a spike is no step: the one onto 6 is
        ([5], 20, 0.03, 0),  # one candidate
        ([10, 10, 6], 5, 0.03, None),  # dense faster than every candidate: dense
        ([10, 10, 6], 6, 0.03, None),  # t(R_opt) = T is not faster: dense
        ([4, 10, 6], 5, 0.03, 0),  # R beats T and no usable step: R (not dense)
    ],
)
def test_algorithm_1_picks_the_documented_rank(times, dense, min_drop, index):
    assert select_rank(times, dense, min_drop).index == index


def test_select_rank_needs_a_curve():
    with pytest.raises(ValueError, match="at least one"):
        select_rank([], 1.0)
    with pytest.raises(ValueError, match="positions"):
        select_rank([1.0, 2.0], 1.0, positions=[3])


def test_unequal_rank_gaps_are_weighed_by_the_slope():
    """Candidates R = 309, then multiples of 8: time proportional to the rank has no step (the short first gap
    drops less, not more); the same curve with a 20 % step onto 256 picks 256."""
    ranks = [309, *range(304, 159, -8)]
    times = [r / 100 for r in ranks]
    assert select_rank(times, 100.0, 0.03, ranks).index == 0
    stepped = [t * (0.8 if r <= 256 else 1.0) for t, r in zip(times, ranks, strict=True)]
    assert ranks[select_rank(stepped, 100.0, 0.03, ranks).index] == 256


def test_candidates_are_R_then_multiples_of_the_step_then_R_min():
    assert candidate_scalars(10, 7, 1) == [10, 9, 8, 7]
    assert candidate_scalars(309, 155, 8) == [309, *range(304, 159, -8), 155]
    assert candidate_scalars(256, 128, 16) == list(range(256, 127, -16))  # R and R_min multiples: no repeats
    assert auto_step(38, 19) == 1  # 20 ranks
    assert auto_step(309, 155) == 8  # 21 candidates; 4 would give 39
    assert len(candidate_scalars(309, 155, auto_step(309, 155))) <= latency.AUTO_CANDIDATES


def test_multi_rank_layers_search_along_the_scalar_curve():
    conv = nn.Conv2d(32, 64, 3)
    problem = tucker_problem("c", conv, beta=2.0)  # (R2, R1) = (round(2 r), r)
    policy = RankPolicy(ratio=0.5)
    ranks = (24, 12)
    cands = candidate_ranks(problem, ranks, policy, 1, 0.5)
    assert cands == [(24, 12), (22, 11), (20, 10), (18, 9), (16, 8), (14, 7), (12, 6)]
    off_curve = candidate_ranks(problem, (25, 12), policy, 1, 0.5)  # the policy's pair first, then the curve
    assert off_curve[:2] == [(25, 12), (24, 12)]
    # rank_multiple rounds every candidate up (scalars 12..6 -> (2 s, s) rounded to multiples of 4), once each
    rounded = candidate_ranks(problem, (24, 12), RankPolicy(ratio=0.5, rank_multiple=4), 1, 0.5)
    assert rounded == [(24, 12), (20, 12), (16, 8), (12, 8)]


# --- a tiny model and a fake timer ----------------------------------------------------------------------------------
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # "0": the stem, not a default target
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),  # "2": svd rank 7 at ratio 0.5 (Tucker: 11)
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),  # "6": svd rank 5
        nn.ReLU(),
        nn.Linear(32, 4),  # "8": the head
    ).eval()


BATCHES = [torch.randn(2, 3, 8, 8)]


class FakeTimer:
    """Stands in for ``latency.time_forwards``: seconds from the label (``dense`` or ranks ``AxB``) by ``curve``,
    counting the forwards it was asked to time."""

    def __init__(self, curve, dense: float = 1.0) -> None:
        self.curve, self.dense, self.calls, self.labels = curve, dense, 0, []

    def __call__(self, fns, repeats, warmup, sync):
        for fn in fns.values():
            fn()  # the built candidates run on the captured input shape
        self.calls += 1
        self.labels += list(fns)
        return {k: self.dense if k == "dense" else self.curve(int(k.split("x")[-1])) for k in fns}


def step_curve(rank: int) -> float:
    return 0.5 if rank <= 4 else 0.9  # a step between 5 and 4


def method(tmp_path: Path | None, **keys):
    cfg = {
        "name": "svd",
        "ratio": 0.5,
        "rank_search": "latency",
        "rank_search_cache": None if tmp_path is None else str(tmp_path / "cache.json"),
        "rank_search_repeats": 1,
        "rank_search_warmup": 0,
        "rank_search_floor": 0.5,
        **keys,
    }
    return build_method(cfg)


def test_apply_reports_the_curve_and_builds_the_chosen_rank(tmp_path, monkeypatch):
    timer = FakeTimer(step_curve)
    monkeypatch.setattr(latency, "time_forwards", timer)
    model = tiny_model()
    x = BATCHES[0]
    dense_out = model(x)
    report = method(tmp_path).apply(model, BATCHES)
    rows = {r["name"]: r for r in report.rows}
    assert set(rows) == {"2", "6"}
    conv, linear = rows["2"], rows["6"]
    assert conv["rank_policy"] == [7] and conv["rank_chosen"] == [4] and conv["ranks"] == [4]
    assert [c[0] for c in conv["latency_curve"]] == [7, 6, 5, 4]  # R = 7 down to ceil(0.5 R) = 4
    assert conv["latency_curve"][-1] == [4, 500.0] and conv["dense_ms"] == 1000.0
    assert (conv["policy_ms"], conv["chosen_ms"]) == (900.0, 500.0)
    assert conv["search_timed"] == 5 and conv["search_s"] >= 0  # 4 ranks + dense
    assert "Algorithm 1" in conv["note"] and "[7] -> [4]" in conv["note"]
    assert linear["rank_policy"] == [5] and linear["rank_chosen"] == [4]  # 5, 4, 3: the step onto 4
    assert conv["rank_chosen"][0] <= conv["rank_policy"][0]
    assert isinstance(model[2], SVDConv2d) and model[2].ranks == (4,)
    assert isinstance(model[6], SVDLinear) and model[6].ranks == (4,)
    assert not torch.allclose(model(x), dense_out)  # the computation changed
    # below the policy's rank the parameters are under the ratio: only the tolerance's upper end applies
    assert conv["params_after"] / conv["params_before"] < 0.45
    # the rows reach summary.json / decomp_layers.csv as plain JSON and table columns
    json.dumps(report.rows)
    columns, _ = DecompReport("svd", report.rows).table()
    assert {"rank_policy", "rank_chosen", "dense_ms", "policy_ms", "chosen_ms", "latency_curve"} <= set(
        columns
    )


def test_a_layer_no_candidate_beats_stays_dense(monkeypatch):
    monkeypatch.setattr(latency, "time_forwards", FakeTimer(step_curve, dense=0.1))
    model = tiny_model()
    conv = model[2]
    report = method(None, targets=["2"]).apply(model, BATCHES)
    (row,) = report.rows
    assert row["kind"] == SLOWER_KIND and row["rank_chosen"] == "dense" and row["chosen_ms"] is None
    assert row["rank"] is None and row["params_after"] == row["params_before"]
    assert model[2] is conv  # the original layer, untouched
    assert DecompReport("svd", report.rows).metrics()["decomp/layer_compression"] == 1.0


def test_flat_curve_keeps_the_policy_rank_and_tucker_curves_hold_both_ranks(monkeypatch):
    monkeypatch.setattr(latency, "time_forwards", FakeTimer(lambda r: 0.5))
    model = tiny_model()
    report = build_method(
        {
            "name": "tucker",
            "ratio": 0.5,
            "targets": ["2"],
            "rank_search": "latency",
            "rank_search_cache": None,
        }
    ).apply(model, BATCHES)
    (row,) = report.rows
    assert row["rank_chosen"] == row["rank_policy"] == row["ranks"]
    assert all(
        len(point) == 3 and point[0] == point[1] for point in row["latency_curve"]
    )  # [R2, R1, ms], beta 1
    assert isinstance(model[2], TuckerConv2d) and list(model[2].ranks) == row["rank_policy"]


def test_rank_search_batch_sets_the_timing_input(monkeypatch):
    shapes = []

    def timer(fns, repeats, warmup, sync):
        return {k: 1.0 for k in fns}

    monkeypatch.setattr(latency, "time_forwards", timer)
    real = latency.LatencySearch.input_shape
    monkeypatch.setattr(
        latency.LatencySearch, "input_shape", lambda self, n: shapes.append(real(self, n)) or real(self, n)
    )
    method(None, targets=["6"], rank_search_batch=5).apply(tiny_model(), BATCHES)
    assert set(shapes) == {(5, 16)}  # the Linear's input [2, 16] at batch 5


# --- the cache ------------------------------------------------------------------------------------------------------
def test_a_second_search_reuses_the_cache_and_another_device_does_not(tmp_path, monkeypatch):
    timer = FakeTimer(step_curve)
    monkeypatch.setattr(latency, "time_forwards", timer)
    first = method(tmp_path).apply(tiny_model(), BATCHES)
    assert timer.calls == 2  # one alternating run per layer
    path = tmp_path / "cache.json"
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 5 + 4  # conv: 4 ranks + dense; linear: 3 ranks + dense
    key = next(iter(entries))
    assert latency.device_name(torch.device("cpu")) in key and "32-true" in key and "in=" in key
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left

    second = method(tmp_path).apply(tiny_model(), BATCHES)  # a new run, same device: nothing timed
    assert timer.calls == 2
    assert [r["latency_curve"] for r in second.rows] == [r["latency_curve"] for r in first.rows]
    assert all(r["search_timed"] == 0 for r in second.rows)

    monkeypatch.setattr(latency, "device_name", lambda device: "cuda:Another GPU|torch x")
    method(tmp_path).apply(tiny_model(), BATCHES)  # same layers, another device: timed again
    assert timer.calls == 4
    assert len(json.loads(path.read_text())["entries"]) == 2 * 9  # both devices kept

    method(tmp_path, rank_search_batch=3).apply(tiny_model(), BATCHES)  # another input shape: timed again
    assert timer.calls == 6


def test_a_corrupt_cache_is_warned_about_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "time_forwards", FakeTimer(step_curve))
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    with pytest.warns(RankSearchCacheWarning, match="unreadable"):
        method(tmp_path).apply(tiny_model(), BATCHES)
    assert len(json.loads(path.read_text())["entries"]) == 9
    path.write_text(json.dumps({"version": 99, "entries": {}}))
    with pytest.warns(RankSearchCacheWarning):
        method(tmp_path).apply(tiny_model(), BATCHES)


def test_real_timing_on_tiny_layers(tmp_path):
    """The real timer (lrk.measure.alternating_latency) on the captured shapes: a curve of positive times and a
    rank at most the policy's, or the dense layer."""
    model = tiny_model()
    report = method(tmp_path, rank_search_warmup=1).apply(model, BATCHES)
    for row in report.rows:
        assert all(point[-1] > 0 for point in row["latency_curve"]) and row["dense_ms"] > 0
        assert row["rank_chosen"] == "dense" or row["rank_chosen"][0] <= row["rank_policy"][0]
    assert model(BATCHES[0]).shape == (2, 4)


# --- bad input: one clear LrkConfigError before anything is built or trained ---------------------------------------
@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"rank_search": "fast"}, r"decomp.rank_search='fast' is invalid: it must be none or latency"),
        (
            {"rank_search_step": 0},
            r"decomp.rank_search_step=0 is invalid: it must be an integer >= 1 or auto",
        ),
        ({"rank_search_step": "half"}, r"decomp.rank_search_step='half' is invalid"),
        ({"rank_search_step": 1.5}, r"decomp.rank_search_step=1.5 is invalid"),
        ({"rank_search_batch": 0}, r"decomp.rank_search_batch=0 is invalid: it must be an integer >= 1"),
        ({"rank_search_repeats": 0}, r"decomp.rank_search_repeats=0 is invalid"),
        ({"rank_search_warmup": -1}, r"decomp.rank_search_warmup=-1 is invalid"),
        ({"rank_search_floor": 1.5}, r"decomp.rank_search_floor=1.5 is invalid"),
        ({"rank_search_min_drop": 1}, r"decomp.rank_search_min_drop=1 is invalid"),
        ({"rank_search_cache": ""}, r"decomp.rank_search_cache='' is invalid"),
        ({"rank_search_device": "tpu"}, r"decomp.rank_search_device='tpu' is invalid"),
        ({"rank_search_precision": "8-bit"}, r"decomp.rank_search_precision='8-bit' is invalid"),
        ({"calibration_batches": 0}, r"rank_search=latency needs a calibration batch.*calibration_batches=0"),
    ],
)
def test_bad_keys_fail_in_the_constructor(keys, match):
    with pytest.raises(LrkConfigError, match=match):
        method(None, **keys)


def test_bad_values_fail_even_without_the_search():
    with pytest.raises(LrkConfigError, match="rank_search_step=0"):
        build_method({"name": "svd", "ratio": 0.5, "rank_search_step": 0})


def test_trawl_cannot_search():
    with pytest.raises(LrkConfigError, match="not supported by decomp=trawl"):
        build_method({"name": "trawl", "ratio": 0.5, "rank_search": "latency"})


def test_no_calibration_batch_fails_before_any_change():
    model = tiny_model()
    before = [m for m in model]
    with pytest.raises(LrkConfigError, match=r"rank_search=latency needs at least one calibration batch"):
        method(None).apply(model, [])
    assert list(model) == before


def test_a_kind_it_cannot_time_fails_in_prepare(monkeypatch):
    monkeypatch.delitem(latency.SHAPE_BUILDERS, "svd")
    with pytest.raises(LrkConfigError, match=r"cannot time layer '2' \(Conv2d 16->16 3x3, kind 'svd'\)"):
        method(None).apply(tiny_model(), BATCHES)


def test_a_target_the_batch_never_reaches_fails_in_prepare():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_model()
            self.spare = nn.Linear(16, 16)  # never called

        def forward(self, x):
            return self.body(x)

    with pytest.raises(LrkConfigError, match=r"\['spare'\] received no input"):
        method(None, targets=["spare", "body.6"]).apply(Unused(), BATCHES)


def test_a_run_writes_the_search_columns_to_summary_and_csv(tiny_cfg):
    """``decomp=svd decomp.rank_search=latency`` through lrk.train.run: the rows reach summary.json's
    ``decomp_layers`` and decomp_layers.csv (real timing of the tiny ViT's layers, no cache file)."""
    import csv

    from lrk.summary import read_summary
    from lrk.train import run

    cfg = tiny_cfg(
        "decomp=svd",
        "decomp.rank_search=latency",
        "decomp.rank_search_cache=null",
        "decomp.rank_search_repeats=1",
        "decomp.rank_search_warmup=1",
        "trainer.max_epochs=1",
    )
    run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    rows = read_summary(run_dir)["decomp_layers"]
    assert rows and all(r["latency_curve"] and r["dense_ms"] > 0 for r in rows)
    assert all(r["rank_chosen"] == "dense" or r["rank_chosen"][0] <= r["rank_policy"][0] for r in rows)
    with (run_dir / "decomp_layers.csv").open() as handle:
        header = next(csv.reader(handle))
    assert {"rank_policy", "rank_chosen", "dense_ms", "policy_ms", "chosen_ms", "latency_curve"} <= set(
        header
    )
