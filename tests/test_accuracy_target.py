"""decomp.schedule=accuracy_target (lrk.pipeline.accuracy_target): a bisection over one global ratio, every point
from the dense weights and recorded, the best feasible point's model tested."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lrk.pipeline.accuracy_target as accuracy_target
from lrk.errors import LrkConfigError
from lrk.pipeline.accuracy_target import bisection_levels
from lrk.summary import read_summary
from lrk.train import run

SEARCH = ["decomp=svd", "decomp.stage=post", "decomp.schedule=accuracy_target"]


def test_bisection_levels_by_hand() -> None:
    assert bisection_levels(0.0, 1.0, []) == (0.5, 0.0, 1.0)
    assert bisection_levels(0.0, 1.0, [True]) == (0.25, 0.0, 0.5)  # feasible: search below
    assert bisection_levels(0.0, 1.0, [True, False]) == (0.375, 0.25, 0.5)  # infeasible: above
    assert bisection_levels(0.2, 1.0, [False, False])[0] == pytest.approx(0.9)


def test_the_search_records_every_point_and_returns_the_best_feasible_one(tiny_cfg, monkeypatch) -> None:
    seen: list[dict[str, torch.Tensor]] = []  # the model each point starts from
    real = accuracy_target.compress_with

    def watched(state, targets):
        seen.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})
        return real(state, targets)

    monkeypatch.setattr(accuracy_target, "compress_with", watched)
    drop = 0.15
    cfg = tiny_cfg(
        *SEARCH,
        f"++decomp.max_acc_drop={drop}",
        "++decomp.search_steps=3",
        "++decomp.ratio_min=0.1",
        "++decomp.ratio_max=0.9",
        "decomp.finetune_epochs=1",
        "decomp.ratio_tolerance=1.0",
        "trainer.max_epochs=1",
    )
    run(cfg)
    summary = read_summary(cfg.paths.output_dir)
    assert summary["status"] == "completed", summary["error"]
    points = summary["search_points"]
    dense_acc = summary["metrics"]["dense/val/acc"]
    assert len(points) == 3
    # the levels follow the bisection of the recorded outcomes, each outcome the rule applied to its val/acc
    low, high = 0.1, 0.9
    for point in points:
        assert point["level"] == pytest.approx((low + high) / 2)
        assert point["feasible"] == (point["val_acc"] >= dense_acc - drop - 1e-12)
        low, high = (low, point["level"]) if point["feasible"] else (point["level"], high)
    # every point started from the same dense weights (not from the previous, fine-tuned point)
    assert len(seen) == 3 and all(set(s) == set(seen[0]) for s in seen)
    assert all(torch.equal(s[k], seen[0][k]) for s in seen[1:] for k in seen[0])
    feasible = [p for p in points if p["feasible"]]
    if feasible:
        best = min(feasible, key=lambda p: (p["level"], -p["val_acc"]))
    else:
        best = max(points, key=lambda p: p["val_acc"])
    chosen = summary["schedule"]
    assert chosen["chosen_point"] == best["point"] and chosen["feasible"] == bool(feasible)
    # the tested model is the chosen point's: its parameters and its report's ranks
    assert summary["metrics"]["model/params"] == best["params"]
    assert {r["name"]: r["ranks"] for r in summary["decomp_layers"]} == best["ranks"]
    assert summary["metrics"]["decomp/search_level"] == pytest.approx(best["level"])
    assert math.isfinite(summary["metrics"]["test/acc"])
    # a point's parameters fall with its level (each from the same dense weights, not compounded)
    by_level = sorted(points, key=lambda p: p["level"])
    assert [p["params"] for p in by_level] == sorted(p["params"] for p in points)


def test_accuracy_target_needs_max_acc_drop(tiny_cfg) -> None:
    cfg = tiny_cfg(*SEARCH)
    with pytest.raises(
        LrkConfigError, match=r"max_acc_drop=None is invalid with decomp.schedule=accuracy_target"
    ):
        run(cfg)
    cfg = tiny_cfg(*SEARCH, "++decomp.max_acc_drop=0.1", "++decomp.ratio_min=0.9", "++decomp.ratio_max=0.5")
    with pytest.raises(LrkConfigError, match=r"0 < ratio_min < ratio_max <= 1"):
        run(cfg)


def test_accuracy_target_refuses_evbmf_ranks(tiny_cfg) -> None:
    cfg = tiny_cfg(
        *SEARCH, "++decomp.max_acc_drop=0.1", "++decomp.rank_selector=evbmf", "decomp.default_ratio=null"
    )
    with pytest.raises(
        LrkConfigError, match=r"rank_selector=evbmf is invalid with decomp.schedule=accuracy_target"
    ):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "dense").exists()
