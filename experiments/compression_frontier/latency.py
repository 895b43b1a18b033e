"""Inference latency of the frontier's models, side by side in one process (the per-run ``time/infer_ms`` of a
shared machine is not evidence): every run dir given is loaded with its trained weights (``lrk.load_model``) and
timed alternately with the dense run on the same batch of grey 64 px images.

    python experiments/compression_frontier/latency.py <dense run dir> <run dir> [<run dir> ...] [--batch 64]

Prints a table (median ms, paired ratio to dense) and one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import lrk
from lrk.measure import alternating_latency, count_params, paired_ratio
from lrk.summary import read_summary


def label(run_dir: Path) -> str:
    decomp = read_summary(run_dir)["config"]["decomp"]
    parts = [decomp["name"], decomp.get("schedule") or ""]
    for key in ("weighting", "rank_selector", "distill_weight", "stages"):
        value = decomp.get(key)
        if value not in (None, "none", "policy", 0, 0.0, 1, "one_shot"):
            parts.append(f"{key}={value}")
    return " ".join(p for p in parts if p and p != "one_shot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 1, 64, 64)
    models = {"dense": lrk.load_model(args.dense)}
    for run in args.runs:
        models[f"{label(run)} ({run.name})"] = lrk.load_model(run)
    fns = {}
    for name, model in models.items():
        model.eval()
        fns[name] = lambda m=model: m(images)
    with torch.no_grad():
        stats = alternating_latency(fns, repeats=args.repeats, warmup=2)
    rows = []
    print(
        f"batch {args.batch}, {args.threads} thread(s), {args.repeats} alternating rounds, load {os.getloadavg()[0]:.2f}"
    )
    print("| model | params | median ms | paired ratio to dense |")
    print("|---|---|---|---|")
    for name, model in models.items():
        r = paired_ratio(stats, name, "dense") if name != "dense" else 1.0
        ms = stats[name].median_s * 1e3
        rows.append({"model": name, "params": count_params(model), "median_ms": ms, "ratio": r})
        print(f"| {name} | {count_params(model):,} | {ms:.1f} | {r:.2f} |")
    print(json.dumps({"benchmark": "compression_frontier_latency", "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
