"""Hardware-aware rank selection (``decomp.rank_search=latency``, accelerating_lrd_paper Sec. 2.1, Algorithm 1) on
ResNet-18: what the search does to a whole model, and one layer's t(r) curve (a Fig. 2-like table).

ResNet-18 (torchvision, random weights: the timing does not depend on them) under ``decomp=tucker ratio=0.5
rank_search=latency`` (conf/decomp/tucker.yaml's defaults otherwise: step auto, floor 0.5, min_drop 0.03, 5
repeats after 2 warm-up rounds, every candidate once per round) is decomposed on one calibration batch of random
images; the script reports the search's seconds, how many layers kept the policy rank, moved to a lower one or
stayed dense (no candidate faster than the dense layer), and the t(r) curve of ``--layer`` from its report row:
rank, ms, ms / dense, parameters / dense. The paper's Fig. 2 is a [512, 512, 3, 3] conv of ResNet-152 under
Tucker-2 (257 -> 256: 15 % less time); ResNet-18's layer4.*.conv2 has that shape. Times are CPU (the paper's are
a GPU's), 1 thread by default (the machine is shared: the load average is printed; treat single figures as
noisy). No timing cache unless ``--cache`` is given (so every figure is measured by this run).

    python benchmarks/rank_search_curve.py --quick     # seconds: 32 px, batch 4, two layers
    python benchmarks/rank_search_curve.py             # minutes: 112 px, batch 32, every default target
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torchvision
from _common import decomp_config
from rich.console import Console
from rich.table import Table

from lrk.decomp import build_method
from lrk.decomp.rank.latency import SLOWER_KIND
from lrk.measure import Stopwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 px, batch 4, two layers, 2 repeats")
    parser.add_argument("--image", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--layer", default="layer4.0.conv2", help="the layer whose t(r) curve is printed")
    parser.add_argument("--step", default="auto", help="decomp.rank_search_step (an integer or auto)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache", default=None, help="decomp.rank_search_cache (default: none, time everything)"
    )
    args = parser.parse_args()
    targets = None
    if args.quick:
        args.image, args.batch, args.repeats, args.warmup = 32, 4, 2, 1
        targets = [args.layer, "layer3.0.conv1"]
    torch.set_num_threads(args.threads)
    console = Console(width=140)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    overrides = {
        "name": "tucker",
        "ratio": args.ratio,
        "rank_search": "latency",
        "rank_search_step": args.step if args.step == "auto" else int(args.step),
        "rank_search_repeats": args.repeats,
        "rank_search_warmup": args.warmup,
        "rank_search_cache": args.cache,
        "rank_search_device": "cpu",
        "rank_search_precision": "32-true",
    }
    if targets:
        overrides["targets"] = targets
    method = build_method(decomp_config(overrides))
    batch = torch.randn(args.batch, 3, args.image, args.image)
    with Stopwatch() as watch:
        report = method.apply(model, [batch])
    rows = report.rows
    search_s = sum(r["search_s"] or 0.0 for r in rows)
    kept = [r for r in rows if r["rank_chosen"] == r["rank_policy"]]
    lowered = [r for r in rows if isinstance(r["rank_chosen"], list) and r["rank_chosen"] != r["rank_policy"]]
    dense = [r for r in rows if r["kind"] == SLOWER_KIND]

    table = Table(
        title=f"rank search, ResNet-18 {args.image} px, batch {args.batch}, tucker ratio {args.ratio}"
    )
    for col in (
        "layer",
        "kind",
        "policy",
        "chosen",
        "dense ms",
        "policy ms",
        "chosen ms",
        "points",
        "search s",
    ):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for r in rows:
        table.add_row(
            r["name"],
            r["kind"],
            "x".join(map(str, r["rank_policy"] or [])),
            r["rank_chosen"]
            if isinstance(r["rank_chosen"], str)
            else "x".join(map(str, r["rank_chosen"] or [])),
            f"{r['dense_ms']:.3f}" if r["dense_ms"] is not None else "-",
            f"{r['policy_ms']:.3f}" if r["policy_ms"] is not None else "-",
            f"{r['chosen_ms']:.3f}" if r["chosen_ms"] is not None else "-",
            str(len(r["latency_curve"] or [])),
            f"{r['search_s']:.1f}" if r["search_s"] is not None else "-",
        )
    console.print(table)

    row = next((r for r in rows if r["name"] == args.layer), None)
    curve = []
    if row is not None and row["latency_curve"]:
        fig = Table(title=f"t(r) of {args.layer} {row['shape']} (Fig. 2-like; ranks from R down)")
        for col in ("ranks", "ms", "x dense", "params x dense", "mark"):
            fig.add_column(col, justify="right")
        problem = method.problem(args.layer, dict(torchvision.models.resnet18().named_modules())[args.layer])
        for point in row["latency_curve"]:
            ranks, ms = tuple(point[:-1]), point[-1]
            mark = []
            if list(ranks) == row["rank_policy"]:
                mark.append("policy R")
            if list(ranks) == row["rank_chosen"]:
                mark.append("chosen")
            frac = problem.params(ranks) / problem.dense_params
            fig.add_row(
                "x".join(map(str, ranks)),
                f"{ms:.3f}",
                f"{ms / row['dense_ms']:.3f}",
                f"{frac:.3f}",
                ", ".join(mark),
            )
            curve.append(
                {
                    "ranks": list(ranks),
                    "ms": ms,
                    "x_dense": round(ms / row["dense_ms"], 4),
                    "params": round(frac, 4),
                }
            )
        console.print(fig)
        console.print(f"{args.layer}: dense {row['dense_ms']:.3f} ms; {row['note']}")
    load = [round(x, 2) for x in os.getloadavg()]
    console.print(
        f"search {search_s:.1f} s (apply {watch.seconds:.1f} s) over {len(rows)} layers: {len(kept)} kept the policy "
        f"rank, {len(lowered)} moved lower, {len(dense)} stayed dense; load average (1, 5, 15 min) {load}"
    )
    summary = {
        "benchmark": "rank_search_curve",
        "quick": args.quick,
        "image": args.image,
        "batch": args.batch,
        "ratio": args.ratio,
        "threads": args.threads,
        "load": load,
        "search_s": round(search_s, 2),
        "apply_s": round(watch.seconds, 2),
        "layers": len(rows),
        "kept": len(kept),
        "lowered": len(lowered),
        "dense": len(dense),
        "rows": [
            {
                k: r[k]
                for k in ("name", "kind", "rank_policy", "rank_chosen", "dense_ms", "policy_ms", "chosen_ms")
            }
            for r in rows
        ],
        "layer": args.layer,
        "curve": curve,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
