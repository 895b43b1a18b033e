"""decomp.schedule=multistage (lrk.pipeline.multistage): stages compress again, stop on an accuracy drop or a
divergence keeping the last good stage, summary.json's stages rows, bad keys refused before training."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_train

import lrk.pipeline.multistage as multistage
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer
from lrk.measure import count_params
from lrk.pipeline.structure import load_model
from lrk.summary import read_summary
from lrk.train import run

# a learnable tiny point: digits (real, 10 classes) on a one-block ViT that reaches ~56 % val accuracy
DIGITS = [
    "data=digits",
    "backbone=vit_edge",
    "backbone.dim=32",
    "backbone.depth=1",
    "backbone.num_heads=2",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "callbacks.inference_benchmark.max_batches=2",
    "callbacks.inference_benchmark.warmup_batches=1",
    "model.lr=1e-2",
    "model.warmup_epochs=0",
    "trainer.max_epochs=6",
]
MULTI = ["decomp=svd", "decomp.stage=post", "decomp.schedule=multistage"]


def svd_params(shape: list[int], rank: int, bias: bool = True) -> int:
    """Parameters of a Linear [out, in] as two layers at rank r: r (in + out) + out (bias)."""
    out, inp = shape[0], math.prod(shape[1:])
    return rank * (inp + out) + (out if bias else 0)


def expected_params(dense: int, rows: list[dict]) -> int:
    """The model's parameters from the dense count and each factorized layer's closed form."""
    total = dense
    for row in rows:
        if row["ranks"]:
            out, inp = row["shape"][0], math.prod(row["shape"][1:])
            total += svd_params(row["shape"], row["ranks"][0]) - (out * inp + out)
    return total


@pytest.mark.slow
def test_a_collapsing_stage_stops_the_schedule_and_the_last_good_stage_is_kept(tmp_path: Path) -> None:
    # stage 2 at ratio 0.07 (rank 1-2 for every layer) collapses the accuracy: more than 0.1 below dense
    cfg = compose_train(
        [
            *DIGITS,
            *MULTI,
            "++decomp.stages=2",
            "++decomp.stage_ratios=[0.9,0.07]",
            "++decomp.max_acc_drop=0.1",
            "decomp.finetune_epochs=1",
            "decomp.ratio_tolerance=1.0",
        ],
        tmp_path,
    )
    run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed", summary["error"]
    dense, first, second = summary["stages"]
    assert [r["stage"] for r in summary["stages"]] == [0, 1, 2]
    assert dense["val_acc"] > 0.3  # the dense model learned something to lose
    assert second["val_acc"] < dense["val_acc"] - 0.1 and second["kept"] is False
    assert "max_acc_drop=0.1" in second["reason"] and first["kept"] is True
    assert summary["schedule"]["kept_stage"] == 1 and summary["schedule"]["stopped_early"] is True
    assert "kept stage 1" in summary["schedule"]["reason"]
    # parameters of each stage, counted independently from the closed form of its ranks
    assert first["params"] == expected_params(dense["params"], summary["decomp_layers"])
    assert second["params"] < first["params"] < dense["params"]
    assert second["flops"] < first["flops"] < dense["flops"]
    # the tested model is stage 1's: its report, its parameter count, its checkpoint's structure
    assert {r["name"]: r["ranks"] for r in summary["decomp_layers"]} == first["ranks"]
    assert summary["metrics"]["model/params"] == first["params"]
    tested = Path(summary["extra"]["tested_checkpoint"])
    assert tested.parent == run_dir / "checkpoints" / "stage1"
    model = load_model(tested)
    assert count_params(model) == first["params"]
    # the stage-2 layers were re-decomposed from the folded stage-1 layers: no factorized layer inside another
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer):
            assert not any(isinstance(m, FactorizedLayer) for m in list(module.modules())[1:]), name
    # the logs continue across the stages' fits: one epoch each, on one increasing step axis
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(steps) == 2 and steps[0] < steps[1]


def test_layers_per_stage_compresses_new_layers_and_the_earlier_ones_again(tiny_cfg) -> None:
    # ratio 0.5 per step: a layer compressed n times keeps 0.5^n of its parameters (within ratio_tolerance)
    cfg = tiny_cfg(
        *MULTI,
        "decomp.ratio=0.5",
        "++decomp.stages=2",
        "++decomp.layers_per_stage=2",
        "decomp.finetune_epochs=0",
        "trainer.max_epochs=1",
        "decomp.ratio_tolerance=0.5",
    )
    run(cfg)
    summary = read_summary(cfg.paths.output_dir)
    assert summary["status"] == "completed", summary["error"]
    dense, first, second = summary["stages"]
    assert len(first["ranks"]) == 2 and len(second["ranks"]) == 4
    assert list(first["ranks"]) == list(second["ranks"])[:2]
    assert first["ratio"] == [0.5] and second["ratio"] == [0.25, 0.5]
    rows = {r["name"]: r for r in summary["decomp_layers"]}
    for name in first["ranks"]:  # compressed twice: 0.25 of the dense layer
        row = rows[name]
        assert row["params_after"] == svd_params(row["shape"], row["ranks"][0])
        assert row["params_after"] / row["params_before"] == pytest.approx(0.25, rel=0.5)
        assert row["ranks"][0] < first["ranks"][name][0]
    assert second["params"] == expected_params(dense["params"], summary["decomp_layers"])
    assert summary["schedule"]["kept_stage"] == 2 and summary["schedule"]["stopped_early"] is False


def test_a_diverging_stage_stops_with_the_last_good_model(tiny_cfg, monkeypatch) -> None:
    real = multistage.finetune

    def poisoned(state, phase, terms):  # stage 2's fine-tuning "diverges": NaN weights and loss
        values = real(state, phase, terms)
        if phase == "stage2":
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))
            return {**values, "train/loss": float("nan")}
        return values

    monkeypatch.setattr(multistage, "finetune", poisoned)
    cfg = tiny_cfg(
        *MULTI, "decomp.ratio=0.5", "++decomp.stages=3", "decomp.finetune_epochs=0", "trainer.max_epochs=1"
    )
    run(cfg)
    summary = read_summary(cfg.paths.output_dir)
    assert summary["status"] == "completed", summary["error"]
    assert [r["stage"] for r in summary["stages"]] == [0, 1, 2]  # stage 3 never ran
    assert "stage 2 diverged: train/loss is not finite" in summary["stages"][2]["reason"]
    assert summary["schedule"]["kept_stage"] == 1
    assert summary["metrics"]["model/params"] == summary["stages"][1]["params"]
    assert math.isfinite(summary["metrics"]["test/loss"])  # the tested model is stage 1's, not the NaN one


def test_distillation_from_the_dense_model_is_a_loss_term_of_every_stage(tiny_cfg) -> None:
    cfg = tiny_cfg(
        *MULTI,
        "decomp.ratio=0.5",
        "++decomp.stages=2",
        "++decomp.distill_weight=0.5",
        "decomp.finetune_epochs=1",
        "trainer.max_epochs=1",
    )
    run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert read_summary(run_dir)["status"] == "completed"
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        values = [float(row["train/distill"]) for row in csv.DictReader(handle) if row.get("train/distill")]
    assert len(values) == 2 and all(v > 0 for v in values)  # one epoch per stage, a positive KL


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["++decomp.stages=0"], r"decomp.stages=0 is invalid: it must be an integer >= 1"),
        (
            ["++decomp.max_acc_drop=1.0"],
            r"decomp.max_acc_drop=1.0 is invalid: it must be null or a number in \[0, 1\)",
        ),
        (["++decomp.max_acc_drop=-0.1"], r"decomp.max_acc_drop=-0.1 is invalid"),
        (
            ["++decomp.distill_weight=-1"],
            r"decomp.distill_weight=-1 is invalid: it must be a number in \[0, 1\]",
        ),
        (["++decomp.layers_per_stage=0"], r"decomp.layers_per_stage=0 is invalid"),
        (
            ["++decomp.stages=2", "++decomp.stage_ratios=[0.5]"],
            r"decomp.stage_ratios=\[0.5\] is invalid: it must have decomp.stages=2 entries",
        ),
        (
            ["++decomp.rank_selector=evbmf", "++decomp.evbmf_weakening=2"],
            r"decomp.evbmf_weakening=2 is invalid: it must be a number in \[0, 1\]",
        ),
        (
            ["++decomp.rank_selector=evbmf", "decomp.ratio=0.5"],
            r"rank_selector=evbmf chooses the ranks itself",
        ),
    ],
)
def test_bad_schedule_keys_are_one_error_before_training(
    tiny_cfg, overrides: list[str], message: str
) -> None:
    cfg = tiny_cfg(*MULTI, *overrides)
    with pytest.raises(LrkConfigError, match=message):
        run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and summary["stages"] == []
    assert not (run_dir / "dense").exists() and not (run_dir / "checkpoints").exists()  # nothing trained


def test_evbmf_ranks_fall_stage_after_stage(tiny_cfg) -> None:
    # MUSCO: each stage re-estimates the EVBMF rank of the folded layer's R x R core and weakens it towards R
    cfg = tiny_cfg(
        *MULTI,
        "++decomp.rank_selector=evbmf",
        "++decomp.evbmf_weakening=0.5",
        "decomp.default_ratio=null",
        "++decomp.stages=2",
        "decomp.finetune_epochs=0",
        "trainer.max_epochs=1",
    )
    run(cfg)
    summary = read_summary(cfg.paths.output_dir)
    assert summary["status"] == "completed", summary["error"]
    _, first, second = summary["stages"]
    assert first["ranks"].keys() == second["ranks"].keys() and first["ranks"]
    for name, (rank,) in first["ranks"].items():
        (again,) = second["ranks"][name]
        assert again < rank  # w = 0.5 moves at most half-way: ceil(R - 0.5 (R - R_e)) >= R / 2
        assert again >= math.ceil(rank / 2)
    assert second["params"] < first["params"]


def test_evbmf_on_a_layer_smaller_than_2x2_is_refused_before_training(tiny_cfg) -> None:
    # the 1-channel stem (32 x 1 x 2 x 2) has a 1 x 128 input-mode unfolding under Tucker-2
    cfg = tiny_cfg(
        "decomp=tucker",
        "decomp.schedule=multistage",
        "++decomp.rank_selector=evbmf",
        "decomp.default_ratio=null",
        "decomp.targets=[patch_embed.proj]",
    )
    with pytest.raises(LrkConfigError, match=r"'patch_embed.proj' .*mode-1 unfolding has shape \[1, 128\]"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "dense").exists()
