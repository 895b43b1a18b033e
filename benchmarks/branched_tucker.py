"""Throughput against the number of branches of branched Tucker (accelerating_lrd_paper Sec. 2.4, Fig. 5).

ResNet-50 (torchvision, weights=None: ranks chosen by ratio do not depend on the weights, and latency does not
depend on them at all) compressed 2x per layer by ``decomp=tucker`` with the default targets (the stem and the
classifier stay dense; Tucker-2 for the k x k convs, SVD for the 1x1 convs), for N = 1, 2, 4, 8 branches, in
two readings of "2x compressed":

- ``ratio``: ``decomp.ratio=0.5 decomp.branches=N``, the contract of lrk: every layer keeps 0.5 (+-10 %) of its
  parameters, so the 3x3 layers take the larger ranks branching allows (Eq. 7 with the core / N). With ranks
  capped at the channel count a square 3x3 layer keeps at most (2 + 9/N)/9 of its parameters: 0.47 at N = 4
  (full rank), 0.35 at N = 8, so at N = 8 those layers cannot meet the ratio and stay dense (counted in the
  table: "dense").
- ``ranks``: the paper's wording ("with the same large ranks, we can reduce computational cost"): the ranks of
  the vanilla 2x model (N = 1) kept (rounded to the nearest multiple of N) and the core split into N branches,
  so the model shrinks with N (Eq. 20). Fig. 5 does not say which of the two it plots.

Every candidate (dense, then each setting and N) is timed alternately in one process
(``lrk.measure.alternating_latency``: the order rotates each round) at batch 1 and batch 32; a latency is the
minimum over the repeats, throughput = batch / latency, "vs N=1" = throughput over vanilla Tucker's (of the
minimum latencies; the JSON adds ``paired_vs_vanilla``, the median over rounds of the same round's ratio, which
scatters more when other jobs share the cores). The machine is shared: the load average is printed.
"err" is the mean relative error of the rebuilt k x k kernels. FLOPs: ``lrk.measure.count_flops`` of one image.

    python benchmarks/branched_tucker.py --quick   # ResNet-18, 64 px: ~20 s
    python benchmarks/branched_tucker.py           # ResNet-50, 224 px: a few minutes on one thread

Prints a table and ends with one line of JSON holding every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import warnings

import torch
import torchvision
from _common import decomp_config, load_average
from rich.console import Console
from rich.table import Table
from torch import nn

from lrk.decomp import build_method
from lrk.decomp.report import is_dense_row
from lrk.layers.branched_tucker import BranchedTuckerConv2d
from lrk.measure import alternating_latency, count_flops, count_params, paired_ratio
from lrk.models.utils import replace_module

SPATIAL = ("tucker2", "branched_tucker2")


def build_ratio(dense: nn.Module, n: int, ratio: float) -> tuple[nn.Module, dict]:
    """``decomp=tucker decomp.ratio=<ratio> decomp.branches=<n>`` applied to a copy of ``dense``."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left dense are counted from the report instead
        report = build_method(decomp_config({"name": "tucker", "ratio": ratio, "branches": n})).apply(model)
    seconds = time.perf_counter() - start
    spatial = [r for r in report.rows if r["kind"] in SPATIAL]
    targeted = [r for r in report.rows if len(r["shape"]) == 4 and r["shape"][2:] != [1, 1]]
    return model, {
        "decompose_s": seconds,
        "spatial_layers": len(targeted),
        "left_dense": sum(1 for r in report.rows if is_dense_row(r)),
        "rank_mean": sum(r["rank"] for r in spatial) / len(spatial) if spatial else None,
        "rel_error": sum(r["rel_error"] for r in spatial) / len(spatial) if spatial else None,
        "ranks": {r["name"]: r["ranks"] for r in spatial},
    }


def nearest_multiple(r: int, n: int, limit: int) -> int:
    return max(n, min((limit // n) * n, n * round(r / n)))


def build_ranks(dense: nn.Module, vanilla: nn.Module, ranks: dict, n: int) -> tuple[nn.Module, dict]:
    """The vanilla model with each Tucker layer replaced by N branches at its ranks (nearest multiples of N)."""
    model = copy.deepcopy(vanilla)
    start = time.perf_counter()
    errors, used = [], []
    for name, (r2, r1) in ranks.items():
        conv = dense.get_submodule(name)
        r2, r1 = nearest_multiple(r2, n, conv.out_channels), nearest_multiple(r1, n, conv.in_channels)
        layer = BranchedTuckerConv2d.from_dense(conv, (r2, r1), branches=n)
        replace_module(model, name, layer.train(conv.training))
        w = conv.weight.detach()
        errors.append(float((layer.dense_weight().detach() - w).norm() / w.norm()))
        used.append((r2 + r1) / 2)
    return model, {
        "decompose_s": time.perf_counter() - start,
        "spatial_layers": len(ranks),
        "left_dense": 0,
        "rank_mean": sum(used) / max(1, len(used)),
        "rel_error": sum(errors) / max(1, len(errors)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px, 2 repeats (~20 s)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--branches", default="1,2,4,8")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.model, args.image, args.repeats = "resnet18", 64, 2
    torch.set_num_threads(args.threads)
    logging.getLogger("lrk.decomp").setLevel(logging.ERROR)  # layers left dense are counted in the table
    batches = [int(b) for b in args.batches.split(",")]
    branch_counts = [int(n) for n in args.branches.split(",")]
    if 1 not in branch_counts:
        branch_counts = [1, *branch_counts]
    console = Console(width=170)
    console.print(
        f"{args.model}, {args.image} px, ratio {args.ratio}, batches {batches}, {args.threads} thread(s), "
        f"{args.repeats} repeats, torch {torch.__version__}, load average {load_average():.2f}"
    )

    torch.manual_seed(0)
    dense = getattr(torchvision.models, args.model)(weights=None, num_classes=1000).eval()
    models: dict[str, nn.Module] = {"dense": dense}
    rows: dict[str, dict] = {
        "dense": {"setting": "dense", "branches": 0, "spatial_layers": 0, "left_dense": 0, "decompose_s": 0.0}
    }
    vanilla_ranks: dict = {}
    for n in branch_counts:
        model, info = build_ratio(dense, n, args.ratio)
        if n == 1:
            vanilla_ranks = info["ranks"]
        info.pop("ranks")
        key = f"ratio N={n}" if n > 1 else "vanilla N=1"
        models[key], rows[key] = model, {"setting": "ratio" if n > 1 else "vanilla", "branches": n, **info}
    for n in branch_counts:
        if n == 1:
            continue
        key = f"ranks N={n}"
        model, info = build_ranks(dense, models["vanilla N=1"], vanilla_ranks, n)
        models[key], rows[key] = model, {"setting": "ranks", "branches": n, **info}

    example = torch.randn(1, 3, args.image, args.image)
    dense_params = count_params(dense)
    dense_flops = count_flops(dense, example).total
    for key, model in models.items():
        rows[key]["params_m"] = count_params(model) / 1e6
        rows[key]["params"] = count_params(model) / dense_params
        rows[key]["flops"] = count_flops(model, example).total / dense_flops

    for b in batches:
        x = torch.randn(b, 3, args.image, args.image)
        with torch.inference_mode():
            stats = alternating_latency(
                {k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, args.repeats, warmup=1
            )
        for key in models:
            rows[key][f"ms_b{b}"] = 1000 * stats[key].min_s
            rows[key][f"ips_b{b}"] = b / stats[key].min_s
            rows[key][f"vs_vanilla_b{b}"] = stats["vanilla N=1"].min_s / stats[key].min_s
            rows[key][f"vs_dense_b{b}"] = stats["dense"].min_s / stats[key].min_s
            rows[key][f"paired_vs_vanilla_b{b}"] = 1.0 / paired_ratio(stats, key, "vanilla N=1")

    table = Table(title=f"branched Tucker on {args.model}: throughput against N (Fig. 5)")
    columns = ["model", "3x3 rank", "dense", "params", "FLOPs", "err", "rr s"]
    for b in batches:
        columns += [f"ms b{b}", f"img/s b{b}", f"vs N=1 b{b}", f"vs dense b{b}"]
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for key, r in rows.items():
        spatial = r["spatial_layers"]
        cells = [
            key,
            f"{r['rank_mean']:.0f}" if r.get("rank_mean") is not None else "",
            f"{r['left_dense']}/{spatial}" if spatial else "",
            f"{r['params_m']:.2f} M ({r['params']:.3f})",
            f"{r['flops']:.3f}",
            f"{r['rel_error']:.3f}" if r.get("rel_error") is not None else "",
            f"{r['decompose_s']:.1f}",
        ]
        for b in batches:
            cells += [
                f"{r[f'ms_b{b}']:.1f}",
                f"{r[f'ips_b{b}']:.1f}",
                f"{r[f'vs_vanilla_b{b}']:.3f}",
                f"{r[f'vs_dense_b{b}']:.3f}",
            ]
        table.add_row(*cells)
    console.print(table)
    console.print(
        "dense: k x k layers left dense (ratio unreachable) / k x k layers targeted; params, FLOPs: fraction of "
        "the dense model; vs N=1 / vs dense: throughput ratios of the minimum latencies (the JSON also holds "
        "paired_vs_vanilla: the median over rounds of the same round's ratio)"
    )
    print(
        json.dumps(
            {
                "benchmark": "branched_tucker",
                "model": args.model,
                "image": args.image,
                "ratio": args.ratio,
                "threads": args.threads,
                "repeats": args.repeats,
                "batches": batches,
                "load_average": load_average(),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
