"""Factorized layers and models against their dense originals (issue #3 benchmark).

For each method (svd, tucker, cp, tt, trawl) at ``ratio=0.5`` of each targeted layer's parameters (the shared rank
policy), on single ResNet-18 / ViT-S layers and on the whole models (default targets of each method: the stem and the
classifier stay dense, so a whole model keeps more than half its parameters, e.g. ResNet-50 13.84 M of 25.56 M), it
reports: decomposition time (s), params, FLOPs (``lrk.measure.count_flops``, batch 1) and CPU latency at
batch 1 and batch 64, each as a ratio to the dense layer/model measured in the same process. Latencies
are the minimum over repeats, dense and factorized timed alternately so that a ratio compares the same
stretch of machine load (the machine is shared: the load average is printed; treat single figures as
noisy). TRAWL needs a group of same-shaped layers, so it is measured on whole models only.

The anchor, accelerating_lrd_paper Table 1: vanilla LRD (Tucker-2 + SVD) at 2x on ResNet-50 (every conv and fc
layer, 25.56 M -> 12.78 M parameters) gave -43 % FLOPs for only +6.8 % inference throughput (latency ratio ~0.94)
on their accelerator. ``--resnet50`` adds tucker on ResNet-50 with the default targets (stem and fc dense, 13.84 M):
near that setting, not the paper's row; the paper's setting is ``experiment=lrd_2x`` (every layer, 12.81 M), whose
counts ``benchmarks/lrd_2x_counts.py`` prints.

Defaults: images 112 x 112 (ResNet-18: standard stem; ViT-S: patch 16 -> 50 tokens), 1 thread
(with 2 threads LAPACK and convolutions ran 10-20x slower while other jobs shared the 2 cores), 3 repeats.
CP on the ViT-S model runs ``--cp-vit-sweeps`` ALS sweeps (default 1): at 2x a tensorized 1152x384
weight needs R ~ 2000 and one sweep takes seconds, 48 layers x 25 sweeps would take an hour; its
decomposition time is therefore not comparable, its params/FLOPs/latency are (they depend on R only).
Prints rich tables and ends with one line of JSON holding every figure.

    python benchmarks/factorized_layers.py --quick     # < 1 minute: small inputs, fewer layers
    python benchmarks/factorized_layers.py             # several minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Callable

import torch
import torchvision
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from lrk.decomp import build_method
from lrk.measure import Stopwatch, alternating_latency, count_flops, count_params

METHODS = ["svd", "tucker", "cp", "tt", "trawl"]
RESNET_LAYERS = ["layer2.1.conv1", "layer4.1.conv2", "layer4.0.downsample.0"]
VIT_LAYERS = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


class _Block(nn.Module):
    """Stand-in ViT block with lrk.models' module names (used only if lrk.models cannot build vit)."""

    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = (
            self.attn.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.attn.proj(out.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class _StandInViT(nn.Module):
    def __init__(
        self, image: int, dim: int = 384, depth: int = 12, heads: int = 6, classes: int = 1000
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, stride=16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([_Block(dim, 4 * dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build_model(name: str, image: int) -> tuple[nn.Module, str]:
    """ResNet-18/50 from torchvision (weights=None) and ViT-S from lrk.models (patch 16), else a stand-in."""
    torch.manual_seed(0)
    if name.startswith("resnet"):
        return getattr(torchvision.models, name)(weights=None, num_classes=1000).eval(), "torchvision"
    try:
        from lrk.models import build_backbone

        cfg = OmegaConf.load(
            os.path.join(os.path.dirname(__file__), "..", "conf", "backbone", "vit_small.yaml")
        )
        cfg.patch_size = 16
        cfg.drop_path_rate = 0.0
        return build_backbone(cfg, num_classes=1000, in_chans=3, image_size=image).eval(), "lrk.models"
    except Exception as err:  # report and fall back
        print(f"lrk.models could not build ViT-S ({err}); using a stand-in with the same Linear shapes")
        return _StandInViT(image).eval(), "stand-in"


def paired_latency(dense: nn.Module, other: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Minimum seconds per forward of each, timed alternately after one warm-up each."""
    with torch.inference_mode():
        stats = alternating_latency({"dense": lambda: dense(x), "other": lambda: other(x)}, repeats, warmup=1)
    return stats["dense"].min_s, stats["other"].min_s


def layer_inputs(model: nn.Module, names: list[str], image: int) -> dict[str, tuple[int, ...]]:
    """Input shape (batch 1) of each named layer in a forward of one image."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return record

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.inference_mode():
        model(torch.randn(1, 3, image, image))
    for h in hooks:
        h.remove()
    return shapes


def method_cfg(name: str, extra: dict | None = None) -> dict:
    cfg = {"name": name, "ratio": 0.5}
    return {**cfg, **(extra or {})}


def measure(
    dense: nn.Module,
    build: Callable[[nn.Module], tuple[nn.Module, float, dict]],
    example: Callable[[int], torch.Tensor],
    batches: list[int],
    repeats: int,
) -> dict:
    """Ratios of a factorized copy of ``dense`` (built by ``build``) to ``dense``."""
    other, seconds, metrics = build(copy.deepcopy(dense))
    out = {
        "decompose_s": seconds,
        "params": count_params(other) / count_params(dense),
        "flops": count_flops(other, example(1)).total / count_flops(dense, example(1)).total,
        "rel_error": metrics.get("decomp/rel_error_mean", float("nan")),
        "rank_mean": metrics.get("decomp/rank_mean", float("nan")),
    }
    for b in batches:
        t_dense, t_other = paired_latency(dense, other, example(b), repeats)
        out[f"latency_b{b}"] = t_other / t_dense
        out[f"dense_ms_b{b}"] = 1000 * t_dense
    return out


def decompose_with(cfg: dict) -> Callable[[nn.Module], tuple[nn.Module, float, dict]]:
    def build(module: nn.Module) -> tuple[nn.Module, float, dict]:
        with Stopwatch() as watch:
            report = build_method(cfg).apply(module)
        return module, watch.seconds, report.metrics()

    return build


def table(title: str, rows: list[dict], batches: list[int]) -> Table:
    t = Table(title=title)
    for col in [
        "model",
        "layer",
        "method",
        "rank",
        "rr s",
        "params",
        "FLOPs",
        *[f"lat b{b}" for b in batches],
        "err",
    ]:
        t.add_column(col, justify="right" if col not in ("model", "layer", "method") else "left")
    for r in rows:
        if "skipped" in r:
            t.add_row(
                r["model"], r["layer"], r["method"], "", "", "", "", *["" for _ in batches], r["skipped"]
            )
            continue
        t.add_row(
            r["model"],
            r["layer"],
            r["method"],
            f"{r['rank_mean']:.0f}",
            f"{r['decompose_s']:.2f}",
            f"{r['params']:.3f}",
            f"{r['flops']:.3f}",
            *[f"{r[f'latency_b{b}']:.3f}" for b in batches],
            f"{r['rel_error']:.3f}",
        )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32x32 inputs, batch 8, one layer per model, CP with 1 sweep: ~1 minute",
    )
    parser.add_argument("--image", type=int, default=112)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cp-vit-sweeps", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument(
        "--models", default="resnet18,vit_small", help="comma-separated subset of the two models"
    )
    parser.add_argument("--no-layers", action="store_true", help="skip the single-layer table")
    parser.add_argument(
        "--resnet50",
        action="store_true",
        help="add tucker on ResNet-50 with the default targets (near the paper's Table 1 setting; that one is experiment=lrd_2x)",
    )
    args = parser.parse_args()
    if args.quick:
        args.image, args.batch, args.repeats = 32, 8, 2
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    batches = [1, args.batch]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(
        f"torch {torch.__version__}, {args.threads} thread(s), image {args.image}, batches {batches}, "
        f"repeats {args.repeats}, load average {load:.2f} (shared 2-core machine: figures are noisy)"
    )
    results: dict = {"config": vars(args), "load_avg_start": load, "layers": [], "models": []}

    models = {name: build_model(name, args.image) for name in ("resnet18", "vit_small")}
    results["vit_source"] = models["vit_small"][1]
    # --- single layers ---------------------------------------------------------------------------------
    methods = [m for m in args.methods.split(",") if m]
    model_names = [m for m in args.models.split(",") if m]
    layer_sets = {
        "resnet18": RESNET_LAYERS[1:2] if args.quick else RESNET_LAYERS,
        "vit_small": VIT_LAYERS[:1] if args.quick else VIT_LAYERS,
    }
    layer_sets = {} if args.no_layers else {k: v for k, v in layer_sets.items() if k in model_names}
    for model_name, names in layer_sets.items():
        model = models[model_name][0]
        shapes = layer_inputs(model, names, args.image)
        for layer_name in names:
            dense = model.get_submodule(layer_name)
            shape = shapes[layer_name]

            def example(b: int, shape=shape) -> torch.Tensor:
                return torch.randn(b, *shape[1:])

            for method in [m for m in methods if m != "trawl"]:
                row = {"model": model_name, "layer": layer_name, "method": method}
                probe = build_method(method_cfg(method))
                if probe.support_error(layer_name, dense) is not None:
                    results["layers"].append({**row, "skipped": "unsupported"})
                    continue
                extra = {"targets": ["layer"]}
                if method == "cp" and args.quick:
                    extra["n_iter_max"] = 1

                cfg = method_cfg(method, extra)

                def build(module: nn.Module, cfg=cfg) -> tuple[nn.Module, float, dict]:
                    wrapper = nn.Module()
                    wrapper.layer = module
                    with Stopwatch() as watch:
                        report = build_method(cfg).apply(wrapper)
                    return wrapper.layer, watch.seconds, report.metrics()

                row.update(measure(dense, build, example, batches, args.repeats))
                results["layers"].append(row)
                console.print(f"  {model_name} {layer_name} {method}: done", style="dim")
    console.print(
        table("Single layers at ratio 0.5, as ratios to the dense layer", results["layers"], batches)
    )

    # --- whole models ----------------------------------------------------------------------------------
    runs = [(m, method) for m in model_names for method in methods]
    if args.resnet50 and not args.quick:
        models["resnet50"] = build_model("resnet50", args.image)
        runs.append(("resnet50", "tucker"))
    for model_name, method in runs:
        model = models[model_name][0]
        extra: dict = {}
        if method == "cp":
            extra["n_iter_max"] = (
                args.cp_vit_sweeps if model_name == "vit_small" else (3 if args.quick else 25)
            )
        if method == "trawl" and args.quick:
            extra["n_iter_max"] = 0
        row = {"model": model_name, "layer": "(model)", "method": method}
        if method == "cp":
            row["cp_sweeps"] = extra["n_iter_max"]
        if args.quick and model_name == "vit_small" and method == "cp":
            results["models"].append(
                {**row, "skipped": "skipped (--quick): CP-ALS of 48 Linear layers takes minutes"}
            )
            continue

        def example(b: int) -> torch.Tensor:
            return torch.randn(b, 3, args.image, args.image)

        row.update(measure(model, decompose_with(method_cfg(method, extra)), example, batches, args.repeats))
        results["models"].append(row)
        console.print(f"  {model_name} {method}: done", style="dim")
    console.print(
        table(
            "Whole models at ratio 0.5 (default targets), as ratios to the dense model",
            results["models"],
            batches,
        )
    )
    results["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
