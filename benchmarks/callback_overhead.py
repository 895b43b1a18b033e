"""Overhead of lrk's measurement callbacks on a training step, as a ratio in one process.

Per training step, lrk's callbacks add only PhaseTimer's forward hooks on the attention modules
(``time/mha_s``); ModelStats runs once at fit start (a FLOP count) and PeakMemory / PhaseTimer's
epoch hooks once per epoch. So the benchmark times training steps (forward, backward, AdamW) of the
same model on the same batch with and without those hooks, alternating step by step
(``lrk.measure.alternating_latency``: a paired design that a busy, shared CPU disturbs equally on both
sides), and reports the median of the per-pair ratios. The hooked step also attaches and removes the
hooks (a few microseconds). The one-off FLOP count (on one batch) is reported apart, in steps.

    python benchmarks/callback_overhead.py --quick      # 10 pairs
    python benchmarks/callback_overhead.py [--backbone vit_edge] [--pairs 60]
"""

from __future__ import annotations

import argparse
import json

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrk.lit import LitClassifier, ModelStats, PhaseTimer
from lrk.measure import ModuleTimer, Stopwatch, alternating_latency, paired_ratio
from lrk.models import build_backbone


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> None:
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class Data:
    """What ModelStats reads of a datamodule: shapes, batch size and a val loader (the benchmark's batch)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.in_chans, self.image_size, self.batch_size = images.shape[1], images.shape[-1], images.shape[0]
        self._dataset = TensorDataset(images, labels)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset, batch_size=self.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="vit_edge")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="10 pairs")
    args = parser.parse_args()
    if args.quick:
        args.pairs = 10
    torch.manual_seed(0)
    cfg = OmegaConf.load(f"conf/backbone/{args.backbone}.yaml")
    model = build_backbone(cfg, num_classes=2, in_chans=1, image_size=args.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 1, args.image_size, args.image_size)
    labels = torch.randint(0, 2, (args.batch_size,))
    attention = PhaseTimer()._attention_modules(model)
    timer = ModuleTimer(attention, attach=False)  # the hooks PhaseTimer attaches for time/mha_s

    def hooked() -> None:
        with timer:
            train_step(model, optimizer, images, labels)

    stats = alternating_latency(
        {"plain": lambda: train_step(model, optimizer, images, labels), "hooks": hooked},
        repeats=args.pairs,
        warmup=3,
    )
    plain, measured = stats["plain"], stats["hooks"]
    overhead = paired_ratio(stats, "hooks", "plain")
    with Stopwatch() as watch:
        figures = ModelStats.measure(LitClassifier(model, num_classes=2), Data(images, labels))
    stats_s = watch.seconds
    step_s = plain.median_s

    table = Table(
        title=f"lrk callbacks, {args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}, {len(attention)} attention modules, {torch.get_num_threads()} threads"
    )
    for column in ("", "median", "ratio to a plain step"):
        table.add_column(column)
    table.add_row("training step, no hooks", f"{1000 * step_s:.1f} ms", "1.000")
    table.add_row(
        "training step, PhaseTimer attention hooks",
        f"{1000 * measured.median_s:.1f} ms",
        f"{overhead:.4f} (paired median)",
    )
    table.add_row(
        "once per fit: ModelStats (FLOP count on one batch)",
        f"{1000 * stats_s:.1f} ms",
        f"{stats_s / step_s:.2f} steps",
    )
    Console().print(table)
    print(json.dumps({
        "benchmark": "callback_overhead", "backbone": args.backbone, "threads": torch.get_num_threads(),
        "step_ms_plain": 1000 * step_s, "step_ms_with_hooks": 1000 * measured.median_s,
        "overhead_ratio_paired_median": overhead, "model_stats_once_ms": 1000 * stats_s,
        "model_flops_per_image": figures.get("model/flops"),
        "model_flops_attention_per_image": figures.get("model/flops_attention"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
