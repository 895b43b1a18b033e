"""The SDRM paper's phases (RR, MHA, Val; seeds/sdrm_paper.txt Figs. 6-8) for whole models, measured in one process.

The ``sdrm_paper`` experiment times each run on its own, so on a shared machine its time ratios mix the methods
with the load of the moment. This benchmark builds the experiment's models (vit_edge on 64 px elpv solar cells,
batch 64, the real images: their token spectra decide SDRM's rank) side by side and times them alternately on the
same batches, so that the ratios to NRR are measured under the same load:

- ``train step``: forward + backward of the whole model on one training batch (cross-entropy loss);
- ``MHA``: seconds inside the attention modules during that step (``lrk.measure.ModuleTimer`` on every AttentionBase);
- ``RR``: SDRM's t-SVD seconds inside that step (``module.stats.rr_seconds``, part of MHA); TRAWL's and the weight
  methods' decomposition is a one-off in ``apply`` and is given as ``apply s``;
- ``Val``: one inference forward (eval, no_grad) of a validation batch.

Minimum over ``--repeats`` rounds; each round runs every variant once, in turn.

    python benchmarks/sdrm_phases.py --quick          # 3 rounds
    python benchmarks/sdrm_phases.py --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from _common import CONF, decomp_config, load_average
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from lrk.data import build_datamodule
from lrk.decomp import build_method
from lrk.decomp.attention.sdrm import sdrm_modules
from lrk.measure import ModuleTimer, Stopwatch, time_call
from lrk.models import AttentionBase, build_backbone

VARIANTS: list[tuple[str, dict[str, Any] | None]] = [
    ("NRR", None),
    ("SDRM phi=0.9 (paper)", {"name": "sdrm", "energy": 0.9}),
    ("SDRM phi=0.7", {"name": "sdrm", "energy": 0.7}),
    ("SDRM calibrated phi=0.9", {"name": "sdrm", "energy": 0.9, "subspace": "calibrated"}),
    ("SDRM head_split=input phi=0.9", {"name": "sdrm", "energy": 0.9, "head_split": "input"}),
    ("TRAWL", {"name": "trawl"}),
]


def load_data(batch_size: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, Any]:
    cfg = OmegaConf.load(CONF / "data" / "surface_defect.yaml")
    cfg.root = "unused"  # source=elpv reads the installed package
    cfg.seed = 1
    cfg.batch_size = batch_size
    cfg.num_workers = 0
    dm = build_datamodule(cfg)
    dm.prepare()
    train = [next(iter(dm.train_dataloader()))]
    val_images, _ = next(iter(dm.val_dataloader()))
    return train, val_images, dm


def build_variants(
    dm: Any, calibration: list[torch.Tensor], checkpoint: str | None = None
) -> dict[str, tuple[nn.Module, float]]:
    """The variants from one dense vit_edge: freshly initialised, or the trained weights of ``checkpoint`` (a
    dense vit_edge run dir or .ckpt, loaded with lrk.load_model) -- SDRM's rank depends on the weights."""
    torch.manual_seed(0)
    if checkpoint is not None:
        import lrk

        dense = lrk.load_model(checkpoint)
    else:
        backbone = OmegaConf.load(CONF / "backbone" / "vit_edge.yaml")
        dense = build_backbone(
            backbone, num_classes=dm.num_classes, in_chans=dm.in_chans, image_size=dm.image_size
        )
    models = {}
    for label, cfg in VARIANTS:
        model = copy.deepcopy(dense)
        with Stopwatch() as watch:
            if cfg is not None:
                build_method(decomp_config(cfg)).apply(model, calibration)
        models[label] = (model, watch.seconds)
    return models


def step(
    model: nn.Module, mha: ModuleTimer, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """Seconds of one training step and the part of it inside the attention modules' forwards."""
    model.train()
    model.zero_grad(set_to_none=True)
    mha.reset()
    seconds = time_call(lambda: F.cross_entropy(model(images), labels).backward())
    return seconds, mha.seconds


def validate(model: nn.Module, images: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return time_call(lambda: model(images))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 on the shared 2-core machine)"
    )
    parser.add_argument(
        "--checkpoint",
        help="a trained dense vit_edge run dir or .ckpt on 64 px elpv (default: untrained weights)",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    torch.set_num_threads(args.threads)
    train, val_images, dm = load_data(args.batch)
    images, labels = train[0]
    models = build_variants(dm, [images], args.checkpoint)
    clocks = {
        label: ModuleTimer(m for m in model.modules() if isinstance(m, AttentionBase))
        for label, (model, _) in models.items()
    }
    best: dict[str, dict[str, float]] = {label: {"step": math.inf, "val": math.inf} for label in models}
    for _ in range(args.repeats + 1):  # the first round warms up
        for label, (model, _) in models.items():
            for st in (m.stats for _, m in sdrm_modules(model)):
                st.reset()
            step_s, mha_s = step(model, clocks[label], images, labels)
            rr_s = sum(m.stats.rr_seconds for _, m in sdrm_modules(model))
            if step_s < best[label]["step"]:
                best[label].update(step=step_s, mha=mha_s, rr=rr_s)
            best[label]["val"] = min(best[label]["val"], validate(model, val_images))
    base = best["NRR"]
    load = load_average()
    console = Console(width=150)
    console.print(
        f"SDRM paper phases, vit_edge on elpv 64 px ({'trained: ' + args.checkpoint if args.checkpoint else 'untrained'}), "
        f"batch {args.batch}, {args.threads} thread(s), min of "
        f"{args.repeats} rounds; shared CPU, load average {load:.2f} (noisy)"
    )
    table = Table("variant", "train step", "MHA", "RR (in MHA)", "MHA - RR", "Val", "apply s", "step ms")
    rows = []
    for label, (_, apply_s) in models.items():
        b = best[label]
        row = {
            "variant": label,
            "step_s": b["step"],
            "mha_s": b["mha"],
            "rr_s": b["rr"],
            "val_s": b["val"],
            "apply_s": apply_s,
            "step_ratio": b["step"] / base["step"],
            "mha_ratio": b["mha"] / base["mha"],
            "mha_minus_rr_ratio": (b["mha"] - b["rr"]) / base["mha"],
            "val_ratio": b["val"] / base["val"],
        }
        rows.append(row)
        table.add_row(
            label,
            f"{row['step_ratio']:.2f}x",
            f"{row['mha_ratio']:.2f}x",
            f"{1000 * b['rr']:.1f} ms",
            f"{row['mha_minus_rr_ratio']:.2f}x",
            f"{row['val_ratio']:.2f}x",
            f"{apply_s:.2f}",
            f"{1000 * b['step']:.1f}",
        )
    console.print(table)
    print(
        json.dumps(
            {
                "benchmark": "sdrm_phases",
                "batch": args.batch,
                "checkpoint": args.checkpoint,
                "load": load,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
