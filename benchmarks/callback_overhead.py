"""Overhead of lrk's measurement callbacks on a training step, as a ratio in one process.

Per training step, lrk's callbacks add only PhaseTimer's forward hooks on the attention modules
(``time/mha_s``); ModelStats runs once at fit start (a FLOP count) and PeakMemory / PhaseTimer's
epoch hooks once per epoch. So the benchmark times training steps (forward, backward, AdamW) of the
same model on the same batch with and without those hooks, alternating step by step (a paired design
that a busy, shared CPU disturbs equally on both sides), and reports the median ratio. The one-off
FLOP count is reported apart, next to the measured epoch time.

    python benchmarks/callback_overhead.py [--backbone vit_edge] [--pairs 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from lrk.lit import LitClassifier, ModelStats, PhaseTimer
from lrk.models import build_backbone


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> float:
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="vit_edge")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = OmegaConf.load(f"conf/backbone/{args.backbone}.yaml")
    model = build_backbone(cfg, num_classes=2, in_chans=1, image_size=args.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 1, args.image_size, args.image_size)
    labels = torch.randint(0, 2, (args.batch_size,))
    timer = PhaseTimer()
    attention = timer._attention_modules(model)

    def hooked(on: bool) -> list:
        if not on:
            return []
        return [
            h
            for m in attention
            for h in (m.register_forward_pre_hook(timer._pre_hook), m.register_forward_hook(timer._post_hook))
        ]

    for _ in range(3):  # warm-up
        train_step(model, optimizer, images, labels)
    plain, measured = [], []
    for _ in range(args.pairs):
        for on, times in ((False, plain), (True, measured)):
            handles = hooked(on)
            times.append(train_step(model, optimizer, images, labels))
            for handle in handles:
                handle.remove()
    ratios = [m / p for m, p in zip(measured, plain, strict=True)]
    start = time.perf_counter()

    class Shapes:
        in_chans, image_size = 1, args.image_size

    ModelStats.measure(LitClassifier(model, num_classes=2), Shapes())
    stats_s = time.perf_counter() - start
    step_s = statistics.median(plain)

    table = Table(
        title=f"lrk callbacks, {args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}, {len(attention)} attention modules, {torch.get_num_threads()} threads"
    )
    for column in ("", "median", "ratio to a plain step"):
        table.add_column(column)
    table.add_row("training step, no hooks", f"{1000 * step_s:.1f} ms", "1.000")
    table.add_row(
        "training step, PhaseTimer attention hooks",
        f"{1000 * statistics.median(measured):.1f} ms",
        f"{statistics.median(ratios):.4f} (paired median)",
    )
    table.add_row(
        "once per fit: ModelStats FLOP count", f"{1000 * stats_s:.1f} ms", f"{stats_s / step_s:.2f} steps"
    )
    Console().print(table)
    print(json.dumps({
        "benchmark": "callback_overhead", "backbone": args.backbone, "threads": torch.get_num_threads(),
        "step_ms_plain": 1000 * step_s, "step_ms_with_hooks": 1000 * statistics.median(measured),
        "overhead_ratio_paired_median": statistics.median(ratios), "model_stats_once_ms": 1000 * stats_s,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
