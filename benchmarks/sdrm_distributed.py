"""SDRM attention with its heads spread over 2 processes (``distributed_heads``; issue #14 item 3) against one process.

Two gloo processes on 127.0.0.1 (this machine's 2 cores; one torch thread each) hold the same SDRM attention
(phi = 0.9, batch t-SVD by the gram solver, factored order where r < d/h) and the same input. Candidates, timed in
alternating rounds (the order rotated each round, a barrier around each call, one warm-up round):

- ``1p x 1t``: one process, one thread, all heads (rank 0; rank 1 waits in a barrier, which does not spin);
- ``1p x 2t``: one process, two threads (the same two cores used by intra-op parallelism instead);
- ``2p``: heads sharded over the 2 processes (each computes h/2 heads, the outputs are all-gathered, W^O on both);
  a round's time is the slower rank's;
- ``share``: what rank 0 computes in ``2p``, alone in one process with one thread and the collectives replaced by
  local copies (the module's ``shard``, ``copy_to_heads`` and ``gather_heads`` patched): the compute of one device;
  ``comm`` is the all-gather (fwd) plus the all-reduce (fwd+bwd) of the same sizes timed alone between the 2
  processes. ``share + comm`` is what 2 devices with a core each would take (``ideal`` throughput = 1p x 1t over
  it), which this loaded 2-core machine cannot show directly.

``fwd`` is an eval forward without gradients, ``fwd+bwd`` one training step of the module (forward,
loss = mean(out^2), backward to the input and the weights); figures are minima over ``--repeats`` rounds and
``throughput`` = t(1p x 1t) / t(2p) (> 1: the 2 processes are faster). Shapes: ``vit_edge`` (d 128, 4 heads,
T 65) and ``vit_s`` (d 384, 6 heads, T 197), spectral tokens (benchmarks/_common.py) and random weights.

Bytes each rank sends per layer, three ways: the formula (lrk.layers.attention.distributed; s = bytes per element)

    forward  (all_gather of the [B, T, d/W] head outputs):  (W - 1) / W * B T d s
    backward (all_reduce of dL/dX, [B, T, d]):             2 (W - 1) / W * B T d s

the module's counter (``stats.gather_bytes`` / ``reduce_bytes`` per call), and what the kernel counted the process
writing during the call (``wchar`` of /proc/self/io: gloo's socket writes, its headers included). The sizing table
applies the formula to N devices per image and per model (depth x layers); the t-SVD is computed on every rank
(no bytes), W^Q, W^K, W^V gradients stay sharded (lrk.layers.attention.distributed.all_reduce_head_grads adds
2 (W-1)/W (3 d^2 + 3 d) s per layer and step for a replicated optimizer; not timed here).

The machine is shared: the load average is printed at the start and the end; figures are noisy.

    python benchmarks/sdrm_distributed.py --quick    # vit_edge, batch 4, 2 rounds (< 30 s)
    python benchmarks/sdrm_distributed.py            # both shapes, batch 32, 7 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import infer, load_average, spectral_tokens, train_step
from rich.console import Console
from rich.table import Table

from lrk.layers.attention import sdrm as sdrm_layer
from lrk.layers.attention.distributed import sharded_layer_bytes, valid_world_sizes
from lrk.layers.attention.sdrm import SDRMAttention
from lrk.models import MultiHeadSelfAttention

SHAPES = {"vit_s": (384, 6, 197, 12), "vit_edge": (128, 4, 65, 6)}  # dim, heads, tokens, depth
CANDIDATES = ("1p x 1t", "1p x 2t", "2p", "share", "comm")
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def written_bytes() -> int:
    """Bytes this process has written so far (files and sockets), 0 where /proc is missing."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("wchar:")).split()[1])
    except OSError:
        return 0


def timed(fn: Callable[[], None]) -> tuple[float, int]:
    """Seconds of ``fn()`` and the bytes the process wrote meanwhile."""
    w0 = written_bytes()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, written_bytes() - w0


@contextlib.contextmanager
def alone(module: SDRMAttention) -> Iterator[None]:
    """Run ``module``'s rank-0 share of the sharded forward in this process without communication."""
    saved = sdrm_layer.copy_to_heads, sdrm_layer.gather_heads
    sdrm_layer.copy_to_heads = lambda x, group, counter: x
    sdrm_layer.gather_heads = lambda local, group, counter: torch.cat([local] * WORLD, dim=-1)
    module.shard = lambda: (0, WORLD)  # type: ignore[method-assign]
    try:
        yield
    finally:
        sdrm_layer.copy_to_heads, sdrm_layer.gather_heads = saved
        del module.shard


def communicate(x: torch.Tensor, backward: bool) -> Callable[[], None]:
    """The collectives of one sharded layer alone: all-gather of [B, T, d/W] (and all-reduce of [B, T, d])."""
    local = x[..., : x.shape[-1] // WORLD].contiguous()
    parts = [torch.empty_like(local) for _ in range(WORLD)]
    grad = x.clone()

    def run() -> None:
        dist.all_gather(parts, local)
        if backward:
            dist.all_reduce(grad)

    return run


def measure(
    rank: int, one: SDRMAttention, shard: SDRMAttention, x: torch.Tensor, mode: str, repeats: int
) -> dict[str, Any]:
    """Alternating rounds of the three candidates in one mode; rank 0 gets every figure."""
    if mode == "fwd":
        one.eval()
        shard.eval()
        xs = x
        run_one, run_shard = (lambda: infer(one, xs)), (lambda: infer(shard, xs))
        run_comm = communicate(x, backward=False)
    else:
        one.train()
        shard.train()
        xs = x.clone().requires_grad_(True)
        run_one, run_shard = (lambda: train_step(one, xs)), (lambda: train_step(shard, xs))
        run_comm = communicate(x, backward=True)
    times: dict[str, list[float]] = {c: [] for c in CANDIDATES}
    sent: list[int] = []
    for round_ in range(1 + repeats):  # round 0: warm-up
        shift = round_ % len(CANDIDATES)
        for name in CANDIDATES[shift:] + CANDIDATES[:shift]:
            dist.barrier()
            seconds, wrote = 0.0, 0
            if name == "2p":
                seconds, wrote = timed(run_shard)
            elif name == "comm":
                seconds, _ = timed(run_comm)
            elif name == "share" and rank == 0:
                with alone(shard):
                    seconds, _ = timed(run_shard)
            elif rank == 0:
                torch.set_num_threads(2 if name == "1p x 2t" else 1)
                seconds, _ = timed(run_one)
                torch.set_num_threads(1)
            dist.barrier()
            if round_:
                times[name].append(seconds)
                if name == "2p":
                    sent.append(wrote)
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, {"t2p": times["2p"], "comm": times["comm"], "sent": sent})
    slower = {  # the slower rank per round
        k: [max(ts) for ts in zip(*(g[k] for g in gathered), strict=True)] for k in ("t2p", "comm")
    }
    return {
        "s": {
            "1p x 1t": min(times["1p x 1t"]),
            "1p x 2t": min(times["1p x 2t"]),
            "2p": min(slower["t2p"]),
            "share": min(times["share"]),
            "comm": min(slower["comm"]),
        },
        "sent_bytes_per_rank": [min(g["sent"]) for g in gathered],
    }


def run_shape(rank: int, shape: str, split: str, args: argparse.Namespace) -> dict[str, Any]:
    dim, heads, tokens, depth = SHAPES[shape]
    torch.manual_seed(0)
    dense = MultiHeadSelfAttention(dim, heads)
    kwargs: dict[str, Any] = {
        "energy": args.phi,
        "head_split": split,
        "svd_batch_size": args.svd_batch_size or None,
    }
    one = SDRMAttention.from_attention(dense, **kwargs)
    shard = SDRMAttention.from_attention(dense, distributed_heads=True, **kwargs)
    x = spectral_tokens(args.batch, tokens, dim, seed=0)
    with (
        torch.no_grad()
    ):  # the same numbers (tests/test_sdrm_distributed.py checks it to 1e-5, gradients too)
        error = float((shard.eval()(x) - one.eval()(x)).abs().max())
    shard.stats.reset()
    one.stats.reset()
    row: dict[str, Any] = {"shape": shape, "head_split": split, "dim": dim, "heads": heads, "tokens": tokens}
    row["depth"], row["batch"], row["max_abs_diff"] = depth, args.batch, error
    fwd = measure(rank, one, shard, x, "fwd", args.repeats)
    st = shard.stats
    counted_fwd = st.gather_bytes // max(st.gathers, 1)
    st.reset()
    step = measure(rank, one, shard, x, "fwd+bwd", args.repeats)
    counted_bwd = st.reduce_bytes // max(st.reduces, 1)
    row["rank_mean"] = one.stats.rank_sum / max(one.stats.factorizations, 1)
    row["factored"] = one.use_factored(max(1, round(row["rank_mean"])))
    formula = sharded_layer_bytes(args.batch, tokens, dim, WORLD, x.element_size())
    row["bytes"] = {
        "formula_fwd": formula["forward"],
        "formula_bwd": formula["backward"],
        "counted_fwd": counted_fwd,
        "counted_bwd": counted_bwd,
        "measured_fwd": fwd["sent_bytes_per_rank"],
        "measured_bwd": [
            s - f for s, f in zip(step["sent_bytes_per_rank"], fwd["sent_bytes_per_rank"], strict=True)
        ],
    }
    for mode, res in (("fwd", fwd), ("fwd+bwd", step)):
        s = res["s"]
        row[mode] = {
            **{f"{k}_s": v for k, v in s.items()},
            "throughput_vs_1t": s["1p x 1t"] / s["2p"],
            "throughput_vs_2t": s["1p x 2t"] / s["2p"],
            "ideal_throughput": s["1p x 1t"] / (s["share"] + s["comm"]),
        }
    return row


def worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        rows = [run_shape(rank, shape, split, args) for shape in args.shapes for split in args.splits]
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def sizing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The formula per image, per layer and per model, for every valid world size of each shape."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        dim, heads, tokens, depth = SHAPES[shape]
        for w in valid_world_sizes(heads)[1:]:
            for dtype, size in (("float32", 4), ("float16", 2)):
                b = sharded_layer_bytes(1, tokens, dim, w, size)
                out.append(
                    {
                        "shape": shape,
                        "world": w,
                        "dtype": dtype,
                        "fwd_bytes_per_image_layer": b["forward"],
                        "bwd_bytes_per_image_layer": b["backward"],
                        "fwd_bytes_per_image_model": b["forward"] * depth,
                        "train_bytes_per_image_model": (b["forward"] + b["backward"]) * depth,
                    }
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="vit_edge, batch 4, 2 rounds (< 30 s)")
    parser.add_argument("--shapes", default="vit_edge,vit_s", help="comma-separated: vit_edge, vit_s")
    parser.add_argument("--splits", default="projected,input", help="comma-separated head splits")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--phi", type=float, default=0.9)
    parser.add_argument(
        "--svd-batch-size", type=int, default=16, help="images per t-SVD chunk; 0 = the batch"
    )
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batch, args.repeats = "vit_edge", 4, 2
    args.shapes, args.splits = args.shapes.split(","), args.splits.split(",")
    console = Console(width=190)
    load = load_average()
    console.print(
        f"load average at the start {load:.2f} ({os.cpu_count()} cores); 2 gloo processes, 1 thread each"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(worker, args=(free_port(), args, out), nprocs=WORLD, join=True)
        rows = json.loads(Path(out).read_text())
    table = Table(
        title="SDRM attention, heads on 2 processes vs 1 process (throughput > 1: 2 processes faster)"
    )
    for col in (
        "shape",
        "split",
        "rank",
        "fwd ms 1p1t / 1p2t / 2p / share / comm",
        "fwd thr. vs 1t / 2t / ideal",
        "fwd+bwd ms 1p1t / 1p2t / 2p / share / comm",
        "fwd+bwd thr. vs 1t / 2t / ideal",
        "max |diff|",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        cells = [r["shape"], r["head_split"], f"{r['rank_mean']:.1f}" + (" f" if r["factored"] else "")]
        for mode in ("fwd", "fwd+bwd"):
            m = r[mode]
            cells.append(" / ".join(f"{1000 * m[f'{c}_s']:.1f}" for c in CANDIDATES))
            cells.append(
                f"{m['throughput_vs_1t']:.2f} / {m['throughput_vs_2t']:.2f} / {m['ideal_throughput']:.2f}"
            )
        cells.append(f"{r['max_abs_diff']:.1e}")
        table.add_row(*cells)
    console.print(table)
    bytes_table = Table(
        title="bytes sent per rank per layer (B x T x d floats; W = 2): formula / counter / kernel"
    )
    for col in (
        "shape",
        "split",
        "B T d",
        "fwd formula",
        "fwd counted",
        "fwd kernel (rank 0, 1)",
        "bwd formula",
        "bwd counted",
        "bwd kernel (rank 0, 1)",
    ):
        bytes_table.add_column(col, justify="right")
    for r in rows:
        b = r["bytes"]
        bytes_table.add_row(
            r["shape"],
            r["head_split"],
            f"{r['batch']} x {r['tokens']} x {r['dim']}",
            f"{b['formula_fwd']:,}",
            f"{b['counted_fwd']:,}",
            ", ".join(f"{v:,}" for v in b["measured_fwd"]),
            f"{b['formula_bwd']:,}",
            f"{b['counted_bwd']:,}",
            ", ".join(f"{v:,}" for v in b["measured_bwd"]),
        )
    console.print(bytes_table)
    plan = sizing(rows)
    plan_table = Table(
        title="on paper, N devices: KiB each device sends per image (formula; t-SVD on every device)"
    )
    for col in ("shape", "N", "dtype", "fwd / layer", "fwd / model", "fwd+bwd / model"):
        plan_table.add_column(col, justify="right")
    for p in plan:
        plan_table.add_row(
            p["shape"],
            str(p["world"]),
            p["dtype"],
            f"{p['fwd_bytes_per_image_layer'] / 1024:.1f}",
            f"{p['fwd_bytes_per_image_model'] / 1024:.1f}",
            f"{p['train_bytes_per_image_model'] / 1024:.1f}",
        )
    console.print(plan_table)
    console.print(
        "formula per layer and rank: forward (W-1)/W B T d s, backward 2 (W-1)/W B T d s; "
        f"load average at the end {load_average():.2f}"
    )
    print(
        json.dumps(
            {
                "benchmark": "sdrm_distributed",
                "world": WORLD,
                "threads_per_process": 1,
                "phi": args.phi,
                "batch": args.batch,
                "repeats": args.repeats,
                "svd_batch_size": args.svd_batch_size or None,
                "load_average": load,
                "load_average_end": load_average(),
                "formula": {
                    "forward": "(W - 1) / W * B * T * d * s",
                    "backward": "2 * (W - 1) / W * B * T * d * s",
                },
                "rows": rows,
                "sizing": plan,
            }
        )
    )


if __name__ == "__main__":
    main()
