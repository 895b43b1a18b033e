"""Parameters, FLOPs and per-layer ratios of the paper's "2x LRD" setting (``experiment=lrd_2x``).

accelerating_lrd_paper Table 1: ResNet-50 with every conv and fc layer decomposed at 2x (vanilla LRD:
Tucker-2 for k x k convs, SVD for 1x1 convs and fc), 25.56 M -> 12.78 M parameters, 8.23 -> 4.67 GFLOPs.
This script composes the config exactly as ``python train.py experiment=lrd_2x decomp=<method>`` does (Hydra
compose of conf/), builds the backbone randomly initialised (ranks chosen by ratio do not depend on the
weights), applies each method and counts, on the built models:

- total parameters, ``sum(p.numel())`` of the model;
- FLOPs of one [1, 3, S, S] zeros image, ``lrk.measure.count_flops`` (2 per multiply-add of convolutions and
  matmuls; norms, activations, pooling and additions are not counted, as in the paper's figures);
- per layer, the achieved fraction ``params_after / params_before`` of the report rows against the requested
  ``decomp.ratio`` (min, max), and any layer left dense (``dense (ratio unreachable)``);
- the weight layers (Conv2d + Linear modules: the depth the paper's "Layers" column counts, downsample
  convs included here).

A row "tucker, default targets" shows the same method with the methods' default targets (stem and classifier
left dense) for comparison.

    python benchmarks/lrd_2x_counts.py --quick     # ResNet-18, seconds
    python benchmarks/lrd_2x_counts.py             # ResNet-50 (seconds to tens of seconds)
    python benchmarks/lrd_2x_counts.py decomp.rank_multiple=8   # extra Hydra overrides for every run

Prints a table and ends with one line of JSON holding every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from lrk.decomp import build_method
from lrk.decomp.report import is_dense_row
from lrk.measure import count_flops
from lrk.models import build_backbone

CONF = Path(__file__).resolve().parents[1] / "conf"
#: accelerating_lrd_paper Table 1, ResNet-50 on ImageNet
PAPER = {"dense": {"params": 25.56e6, "flops": 8.23e9}, "lrd": {"params": 12.78e6, "flops": 4.67e9}}


def composed(overrides: list[str]) -> tuple[dict, dict]:
    """The ``decomp`` and ``backbone`` nodes of ``train.py experiment=lrd_2x <overrides>``."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=lrd_2x", *overrides])
    return (
        OmegaConf.to_container(cfg.decomp, resolve=True),
        OmegaConf.to_container(cfg.backbone, resolve=True),
    )


def weight_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())


def counts(model: nn.Module, image: int) -> dict:
    flops = count_flops(model, torch.zeros(1, 3, image, image))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": float(flops.total),
        "weight_layers": weight_layers(model),
    }


def run_method(dense: nn.Module, decomp: dict, image: int) -> dict:
    model = copy.deepcopy(dense)
    method = build_method(decomp)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = method.apply(model)
    seconds = time.perf_counter() - start
    rows = report.rows
    requested = method.policy.ratio
    fractions = {r["name"]: r["params_after"] / r["params_before"] for r in rows}
    decomposed = [r for r in rows if not is_dense_row(r)]
    out = counts(model, image)
    out.update(
        {
            "method": decomp["name"],
            "targets": decomp.get("targets"),
            "requested_ratio": requested,
            "ratio_tolerance": method.policy.ratio_tolerance,
            "layers_targeted": len(rows),
            "layer_ratio_min": min(fractions[r["name"]] for r in decomposed) if decomposed else None,
            "layer_ratio_max": max(fractions[r["name"]] for r in decomposed) if decomposed else None,
            "layer_ratio_min_layer": min(decomposed, key=lambda r: fractions[r["name"]])["name"]
            if decomposed
            else None,
            "layer_ratio_max_layer": max(decomposed, key=lambda r: fractions[r["name"]])["name"]
            if decomposed
            else None,
            "dense_left": [{"name": r["name"], "note": r["note"]} for r in rows if is_dense_row(r)],
            "fallbacks": [{"name": r["name"], "note": r["note"]} for r in decomposed if r.get("note")],
            "warnings": [str(w.message) for w in caught if "left dense" in str(w.message)],
            "decompose_s": seconds,
            "targeted_params_before": sum(r["params_before"] for r in rows),
            "targeted_params_after": sum(r["params_after"] for r in rows),
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18 instead of ResNet-50 (seconds)")
    parser.add_argument("--backbone", default="resnet50", help="a conf/backbone choice (a ResNet)")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--methods", default="tucker,svd", help="comma-separated decomp choices")
    parser.add_argument("--no-default-targets", action="store_true", help="skip the default-targets row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides for every run, e.g. decomp.rank_multiple=8 decomp.ratio_tolerance=0.05",
    )
    args = parser.parse_args()
    if args.quick:
        args.backbone = "resnet18"
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.backbone} at {args.image} px, "
        f"{args.classes} classes, load average {load:.2f}"
    )

    methods = [m for m in args.methods.split(",") if m]
    _, backbone = composed([f"backbone={args.backbone}"])
    torch.manual_seed(0)
    dense = build_backbone(
        OmegaConf.create(backbone), num_classes=args.classes, in_chans=3, image_size=args.image
    ).eval()
    results: dict = {
        "config": vars(args),
        "load_avg_start": load,
        "flop_counter": "lrk.measure.count_flops",
        "dense": counts(dense, args.image),
        "methods": {},
        "paper_resnet50": PAPER,
    }
    runs = [(m, [f"backbone={args.backbone}", f"decomp={m}", *args.overrides]) for m in methods]
    if not args.no_default_targets and "tucker" in methods:
        runs.append(
            (
                "tucker, default targets",
                [f"backbone={args.backbone}", "decomp=tucker", "decomp.targets=null", *args.overrides],
            )
        )
    for label, overrides in runs:
        decomp, _ = composed(overrides)
        results["methods"][label] = run_method(dense, decomp, args.image)

    d = results["dense"]
    t = Table(
        title=f"{args.backbone} {args.image} px: experiment=lrd_2x (ratio per layer, counted from the built model)"
    )
    for col in [
        "model",
        "params",
        "x dense",
        "GFLOPs",
        "x dense",
        "weight layers",
        "layer ratio min..max",
        "dense-left",
        "rr s",
    ]:
        t.add_column(col, justify="left" if col in ("model", "dense-left") else "right")
    t.add_row(
        "dense",
        f"{d['params'] / 1e6:.2f} M",
        "1.000",
        f"{d['flops'] / 1e9:.2f}",
        "1.000",
        str(d["weight_layers"]),
        "",
        "",
        "",
    )
    for label, r in results["methods"].items():
        span = (
            f"{r['layer_ratio_min']:.3f}..{r['layer_ratio_max']:.3f}"
            if r["layer_ratio_min"] is not None
            else "-"
        )
        t.add_row(
            label,
            f"{r['params'] / 1e6:.2f} M",
            f"{r['params'] / d['params']:.3f}",
            f"{r['flops'] / 1e9:.2f}",
            f"{r['flops'] / d['flops']:.3f}",
            str(r["weight_layers"]),
            span,
            ", ".join(x["name"] for x in r["dense_left"]) or "none",
            f"{r['decompose_s']:.1f}",
        )
    if args.backbone == "resnet50":
        p = PAPER
        t.add_row(
            "paper: ResNet-50",
            f"{p['dense']['params'] / 1e6:.2f} M",
            "1.000",
            f"{p['dense']['flops'] / 1e9:.2f}",
            "1.000",
            "50",
            "",
            "",
            "",
        )
        t.add_row(
            "paper: vanilla LRD 2x",
            f"{p['lrd']['params'] / 1e6:.2f} M",
            f"{p['lrd']['params'] / p['dense']['params']:.3f}",
            f"{p['lrd']['flops'] / 1e9:.2f}",
            f"{p['lrd']['flops'] / p['dense']['flops']:.3f}",
            "115",
            "",
            "",
            "",
        )
    console.print(t)
    for label, r in results["methods"].items():
        for x in r["fallbacks"]:
            console.print(f"{label}: {x['name']}: {x['note']}")
        for x in r["dense_left"]:
            console.print(f"{label}: {x['name']} left dense: {x['note']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
