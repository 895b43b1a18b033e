"""The training path end to end on tiny data: metrics, summary.json, failures, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from lrk.errors import LrkConfigError
from lrk.summary import read_summary
from lrk.train import run

# every metric of design.md's table that applies to a dense run
DENSE_METRICS = {
    "train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "val/bal_acc", "val/f1",
    "test/acc", "test/bal_acc", "test/f1", "test/acc_majority",
    "model/params", "model/params_dense", "model/compression", "model/flops", "model/size_mb",
    "time/rr_s", "time/mha_s", "time/train_s", "time/val_s", "time/epoch_s",
    "time/infer_ms", "time/throughput_ips", "mem/peak_mb",
}  # fmt: skip


def expected_flops_per_image(cfg) -> tuple[float, int]:
    """FLOPs of one forward per image of the dense tiny ViT of ``cfg``, counted independently of lrk.measure:
    (1) the matrix products and convolutions by hand (2 per multiply-add; biases, norms, softmax, GELU not
    counted), checked against torch's own FlopCounterMode, which counts 0 for the CPU kernel of
    scaled_dot_product_attention (design.md); (2) attention's Q K^T and A V by hand: 4 H T^2 d_h per layer.
    Returns (expected total, the model's parameter count)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lrk.models import build_backbone

    data, bb = cfg.data, cfg.backbone
    classes = 2 if data.label_mode == "binary" else 4
    model = build_backbone(bb, num_classes=classes, in_chans=data.channels, image_size=data.image_size).eval()
    d, depth, hidden = bb.dim, bb.depth, int(bb.dim * bb.mlp_ratio)
    patch = model.patch_embed.patch_size
    patches = (data.image_size // patch) ** 2
    t = patches + 1  # + the class token
    by_hand = 2 * patches * d * data.channels * patch * patch  # patch embedding
    by_hand += depth * 2 * t * (d * 3 * d + d * d + d * hidden + hidden * d)  # qkv, proj, fc1, fc2
    by_hand += 2 * d * classes  # head on the class token
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, data.channels, data.image_size, data.image_size))
    assert counter.get_total_flops() == by_hand  # torch agrees on the products outside attention
    attention = depth * 4 * t * t * d  # 4 H T^2 d_h with H d_h = d
    return float(by_hand + attention), sum(p.numel() for p in model.parameters())


def test_dense_run_writes_every_metric_and_summary(tiny_cfg):
    cfg = tiny_cfg()
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["error"] is None
    assert set(summary) >= {"status", "error", "metrics", "config", "decomp_layers", "versions"}
    missing = DENSE_METRICS - set(metrics)
    assert not missing, f"metrics missing: {missing}"
    assert summary["metrics"] == pytest.approx(metrics)
    assert metrics["model/params"] == metrics["model/params_dense"] and metrics["model/compression"] == 1.0
    flops, params = expected_flops_per_image(cfg)
    assert metrics["model/params"] == params  # the model counted is the one rebuilt here
    assert metrics["model/flops"] == pytest.approx(flops, rel=1e-9)  # attention's T^2 products included
    assert metrics["time/mha_s"] > 0
    assert metrics["time/train_s"] > 0 and metrics["time/epoch_s"] > 0
    assert 0.0 <= metrics["test/bal_acc"] <= 1.0
    assert summary["versions"]["torch"] and summary["config"]["data"]["name"] == "synthetic"
    # the confusion matrix counts every test image once
    confusion = summary["extra"]["test_confusion_matrix"]
    assert sum(map(sum, confusion)) == summary["extra"]["data"]["split_sizes"]["test"]
    # the trivial baseline: the test split's most frequent class, counted from the confusion matrix's rows
    assert metrics["test/acc_majority"] == pytest.approx(max(map(sum, confusion)) / sum(map(sum, confusion)))
    assert (run_dir / "confusion_matrix.csv").is_file()
    # the CSV logger holds the same names, one row per epoch for the validation metrics
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"val/acc", "val/bal_acc", "train/loss", "time/epoch_s"} <= set(rows[0])
    assert len({row["epoch"] for row in rows if row.get("val/acc")}) == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_bad_input_fails_before_training_and_still_writes_summary(tiny_cfg):
    cfg = tiny_cfg("data.image_size=0")
    with pytest.raises(LrkConfigError, match="image_size"):
        run(cfg)
    summary = read_summary(cfg.paths.output_dir)
    assert summary["status"] == "failed"
    assert "image_size" in summary["error"] and summary["metrics"] == {}
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ckpt_path=/no/such/file.ckpt", "ckpt_path=/no/such/file.ckpt does not exist"),
        ("ckpt_path=last", "ckpt_path=last found no"),
        ("model.lr=0", "model.lr=0"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0"),
        ("backbone.checkpoint_path=/no/weights.pt", "/no/weights.pt"),
    ],
)
def test_bad_paths_and_values_name_the_value(tiny_cfg, override, message):
    cfg = tiny_cfg(override)
    with pytest.raises(LrkConfigError, match=message.replace("/", ".").replace("(", ".")):
        run(cfg)
    assert read_summary(cfg.paths.output_dir)["status"] == "failed"


class CrashAtEpoch(Callback):
    """Stands in for a killed process: raises when epoch ``epoch`` starts (after last.ckpt was saved)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")


def test_interrupted_fit_resumes_and_finishes_the_same_epochs(tiny_cfg):
    crashed = tiny_cfg("trainer.max_epochs=3", run="crashed")
    with open_dict(crashed):
        crashed.callbacks.crash = {"_target_": f"{__name__}.CrashAtEpoch", "epoch": 2}
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed)
    summary = read_summary(crashed.paths.output_dir)
    assert summary["status"] == "failed" and "simulated crash" in summary["error"]

    resumed = tiny_cfg("trainer.max_epochs=3", f"ckpt_path={crashed.paths.output_dir}", run="resumed")
    metrics = run(resumed)
    assert read_summary(resumed.paths.output_dir)["status"] == "completed"
    with (Path(resumed.paths.output_dir) / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    trained_epochs = {int(row["epoch"]) for row in rows if row.get("train/loss")}
    assert trained_epochs == {2}, "the resumed fit trains only the missing epoch"
    assert max(int(row["step"]) for row in rows) == 15  # 3 epochs x 5 batches in all
    checkpoint = __import__("torch").load(
        Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False
    )
    assert checkpoint["epoch"] == 2  # 0-based: three epochs in all
    # time totals continue from the interrupted fit (PhaseTimer state is in the checkpoint)
    assert metrics["time/epoch_s"] > 0


def test_test_only_run_evaluates_a_checkpoint(tiny_cfg):
    trained = tiny_cfg("trainer.max_epochs=1", run="trained")
    first = run(trained)
    evaluated = tiny_cfg("train=false", f"ckpt_path={trained.paths.output_dir}", run="evaluated")
    second = run(evaluated)
    # one epoch: the best checkpoint the first run tested is its last.ckpt, evaluated again here
    assert second["test/acc"] == pytest.approx(first["test/acc"], abs=1e-6)
    assert second["test/bal_acc"] == pytest.approx(first["test/bal_acc"], abs=1e-6)
    assert "train/loss" not in second and "model/params" in second


def test_summary_is_valid_json_even_with_nan(tmp_path):
    from lrk.summary import RunSummary

    summary = RunSummary(tmp_path, metrics={"val/loss": float("nan"), "val/acc": 0.5})
    summary.status = "failed"
    data = json.loads(summary.write().read_text())
    assert data["metrics"] == {"val/acc": 0.5, "val/loss": None}


def test_stage_post_reproduces_the_dense_checkpoint_then_decomposes(tiny_cfg):
    dense_cfg = tiny_cfg("trainer.max_epochs=2", run="dense")
    dense = run(dense_cfg)
    best = read_summary(dense_cfg.paths.output_dir)["extra"]["tested_checkpoint"]

    # full rank: the decomposed model is the dense one, to float tolerance
    full = run(
        tiny_cfg(
            "decomp=svd", "decomp.stage=post", f"decomp.ckpt_path={best}", "decomp.energy=1.0", run="full"
        )
    )
    assert full["dense/test/acc"] == pytest.approx(dense["test/acc"], abs=1e-6)
    assert full["test/acc"] == pytest.approx(dense["test/acc"], abs=1e-6)
    assert full["decomp/rel_error_mean"] < 1e-5

    # low rank: fewer parameters, counted from the built modules, and a different computation
    post = tiny_cfg("decomp=svd", "decomp.stage=post", f"decomp.ckpt_path={best}", "decomp.rank=2", run="low")
    low = run(post)
    assert low["dense/test/acc"] == pytest.approx(dense["test/acc"], abs=1e-6)
    assert low["model/params"] < low["model/params_dense"] == dense["model/params"]
    assert low["decomp/rel_error_mean"] > 0.05 and low["time/rr_s"] > 0
    rows = read_summary(post.paths.output_dir)["decomp_layers"]
    assert rows and all(row["rank"] == 2 for row in rows)
    assert (Path(post.paths.output_dir) / "decomp_layers.csv").is_file()


def test_stage_post_with_a_foreign_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    import torch

    foreign = tmp_path / "foreign.pt"
    torch.save({"some.other.weight": torch.zeros(3)}, foreign)
    cfg = tiny_cfg("decomp=svd", "decomp.stage=post", f"decomp.ckpt_path={foreign}", run="foreign")
    with pytest.raises(LrkConfigError, match="does not fit this backbone"):
        run(cfg)


def test_sdrm_run_reports_its_rank_reduction(tiny_cfg):
    metrics = run(tiny_cfg("decomp=sdrm", "trainer.max_epochs=1", "decomp.energy=0.9"))
    assert metrics["time/rr_s"] > 0 and metrics["decomp/factorizations"] > 0
    assert 1 <= metrics["decomp/rank_mean"] <= 32  # at most the feature dim of the tiny ViT
    assert 0.9 - 1e-6 <= metrics["decomp/energy"] <= 1.0
    assert (
        metrics["time/mha_s"] >= metrics["time/rr_forward_s"]
    )  # the t-SVD runs inside the attention modules
