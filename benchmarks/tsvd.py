"""Truncated-SVD solvers against the floor of one Gram product Y^T Y (issue #5, benchmark 1).

For Y of shapes 12608 x 192, 50432 x 384 and 200704 x 768 (ViT-Ti/S/B tokens x features of a batch; synthetic,
with a power-law spectrum s_i = i^-0.6 and a dominant first direction, which gives r = 37 / 57 / 86 at phi = 0.9
like measured ViT tokens), it times how long each solver needs to reach a rank-r factorisation within 1 % of
the Eckart-Young optimal error, as a ratio to one Gram product measured in the same process:

- gram: eigh of Y^T Y, U = Y V / S (lrk's default);
- lowrank: torch.svd_lowrank with oversample 10, the smallest niter (0..8) that reaches 1 %;
- svd: torch.linalg.svd (skipped on the largest shape: a full SVD of a 200704 x 768 matrix takes minutes on
  two cores, and it is the slowest solver on every smaller shape);
- adamatrix cold: from the spectral start (row sample), stopped when it reaches 1 % (``target_error``), and
  with its own default stopping rule (``tol=1e-3``, which does not know the optimum: the honest figure);
- adamatrix warm: started from the previous batch's V (a new token draw whose feature basis drifted by a
  small random rotation), likewise;
- adamatrix random: Algorithm 1's random start.

Times are the minimum over repeats (5; 2 on the largest shape), and each solver's floor is timed alternately
with it, so that a ratio compares the same stretch of machine load: the machine is shared and other processes
add noise (the load average is printed too). Prints a rich table and ends with one line of JSON. ``--quick``: the
first shape only (< 1 minute). ``--ablation``: the
measurements behind the changes to the paper's AdaMatrix (module docstring of lrk.linalg.adamatrix).

    python benchmarks/tsvd.py --quick
    python benchmarks/tsvd.py
    python benchmarks/tsvd.py --ablation
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from lrk.linalg.adamatrix import adamatrix
from lrk.linalg.rank import energy_rank
from lrk.linalg.svd_solvers import truncated_svd
from lrk.linalg.tsvd import TruncatedSVD, gram_svd, optimal_rank_error
from lrk.measure import Stopwatch, alternating_latency

SHAPES = [(12608, 192), (50432, 384), (200704, 768)]
PHI = 0.9
DRIFT = 0.05  # rotation (radians scale) of the feature basis between the previous batch and this one


def vit_like(m: int, n: int, batch: int = 0, drift: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Synthetic token matrix: Gaussian tokens with power-law spectrum s_i = i^-0.6 (s_1 = 2) in a random basis."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    gb = torch.Generator().manual_seed(1000 + batch)
    if drift:
        A = torch.randn(n, n, generator=gb, dtype=torch.float64)
        Q = Q @ torch.linalg.matrix_exp(drift * (A - A.T) / math.sqrt(2 * n))
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -0.6
    s[0] = 2.0
    B = (s[:, None] * Q.T).float()
    return (torch.randn(m, n, generator=gb) / math.sqrt(m)) @ B


def best_time(
    fn: Callable[[], TruncatedSVD], floor: Callable[[], object], repeats: int
) -> tuple[float, float, TruncatedSVD]:
    """Minimum time of ``fn`` and of the floor, measured alternately (the same stretch of machine load)."""
    results: list[TruncatedSVD] = []
    stats = alternating_latency({"fn": lambda: results.append(fn()), "floor": floor}, repeats, warmup=1)
    return stats["fn"].min_s, stats["floor"].min_s, results[-1]


def bench_shape(m: int, n: int, repeats: int, console: Console) -> list[dict]:
    Y = vit_like(m, n)
    # the reference spectrum by an independent route: float64 Gram matrix and eigvalsh
    Y64 = Y.double()
    spectrum = torch.linalg.eigvalsh(Y64.T @ Y64).flip(0).clamp_min(0.0).sqrt()
    del Y64
    r = energy_rank(spectrum, PHI)
    opt = optimal_rank_error(spectrum, r)
    target = 1.01 * opt
    V_prev = gram_svd(vit_like(m, n, batch=1, drift=DRIFT), rank=r).V
    rows: list[dict] = []

    def add(name: str, fn: Callable[[], TruncatedSVD], note: str = "") -> None:
        seconds, floor, res = best_time(fn, lambda: Y.T @ Y, repeats)
        rows.append(
            dict(
                shape=f"{m}x{n}",
                r=r,
                solver=name,
                iterations=res.iterations,
                err_over_opt=res.rel_error / opt,
                within_1pct=res.rel_error <= target,
                ms=seconds * 1e3,
                x_floor=seconds / floor,
                floor_ms=floor * 1e3,
                repeats=repeats,
                note=note,
            )
        )
        console.log(f"{m}x{n} {name}: {seconds * 1e3:.0f} ms, err/opt {res.rel_error / opt:.4f}")

    add("gram", lambda: truncated_svd(Y, rank=r, solver="gram"))
    add("gram (energy)", lambda: truncated_svd(Y, energy=PHI, solver="gram"), "rank from phi")
    for niter in range(9):
        res = truncated_svd(
            Y, rank=r, solver="lowrank", niter=niter, generator=torch.Generator().manual_seed(0)
        )
        if res.rel_error <= target:
            break
    add(
        "lowrank",
        lambda: truncated_svd(
            Y, rank=r, solver="lowrank", niter=niter, generator=torch.Generator().manual_seed(0)
        ),
        f"niter={niter}",
    )
    if m * n <= 50432 * 384:
        add("svd", lambda: truncated_svd(Y, rank=r, solver="svd"))
    for label, init in (("cold", "spectral"), ("warm", V_prev), ("random", "random")):
        gen = torch.Generator().manual_seed(0)

        def to_target(init=init, gen=gen) -> TruncatedSVD:
            return adamatrix(Y, rank=r, init=init, target_error=target, tol=0.0, max_iter=30, generator=gen)

        def default_stop(init=init, gen=gen) -> TruncatedSVD:
            return adamatrix(Y, rank=r, init=init, generator=gen)

        add(f"adamatrix {label}", to_target, "stopped at 1 %")
        add(f"adamatrix {label}, tol", default_stop, "default tol=1e-3")
    console.log(
        f"{m}x{n}: the warm start (previous batch's V) begins at err/opt {_start_ratio(Y, V_prev, opt):.4f}"
    )
    return rows


def _start_ratio(Y: torch.Tensor, V: torch.Tensor, opt: float) -> float:
    Z = Y @ V
    total = float((torch.linalg.vector_norm(Y, dim=1).double() ** 2).sum())
    return math.sqrt(max(1 - float((Z.double() ** 2).sum()) / total, 0.0)) / opt


def ablation(console: Console, steps: int) -> list[dict]:
    """Iterations to reach 1 % of the optimum for the paper's AdaMatrix and each change (3 seeds)."""
    rows = []
    m, n = 3000, 96
    variants: list[tuple[str, dict]] = [
        ("paper: Algorithm 1, raw Y, lr 1e-4", dict(variant="paper", normalize=False, init="random")),
        ("paper, ||Y||_F = 1, lr 1e-3", dict(variant="paper", lr=1e-3, init="random")),
        ("paper, ||Y||_F = 1, lr 1e-2", dict(variant="paper", lr=1e-2, init="random")),
        ("closed-form U,S + Adam on V, lr 1e-2, random", dict(update="adam", lr=1e-2, init="random")),
        ("closed-form U,S + Adam on V, lr 1e-2, spectral", dict(update="adam", lr=1e-2)),
        ("engineered (newton), random", dict(init="random")),
        ("engineered (newton), spectral", dict()),
        ("engineered + betas (0.9, 0.999), spectral", dict(betas=(0.9, 0.999))),
        ("engineered + momentum 0.2, spectral", dict(momentum=0.2)),
        ("engineered + momentum 0.5, spectral", dict(momentum=0.5)),
        ("engineered + W (Eq. 8), spectral", dict(weighting=True)),
        ("engineered + W (Eq. 8), random", dict(weighting=True, init="random")),
        ("engineered + oversample r/4, spectral", dict(oversample=-1)),
        ("engineered, lr 1.5, spectral", dict(lr=1.5)),
    ]
    for label, kw in variants:
        its, ratios, stop_its, stop_ratios, secs = [], [], [], [], []
        for seed in range(3):
            Y = vit_like(m, n, batch=seed, seed=seed)
            s = torch.linalg.svdvals(Y.double())
            r = energy_rank(s, PHI)
            opt = optimal_rank_error(s, r)
            opts = dict(kw)
            if opts.get("oversample") == -1:
                opts["oversample"] = r // 4
            paper = opts.get("variant") == "paper"
            gen = torch.Generator().manual_seed(seed)
            with Stopwatch() as watch:
                res = adamatrix(Y, rank=r, target_error=1.01 * opt, tol=0.0, max_iter=steps if paper else 300,
                                generator=gen, **opts)  # fmt: skip
            secs.append(watch.seconds)
            its.append(res.iterations if res.converged else None)
            ratios.append(res.rel_error / opt)
            if not paper:
                stop = adamatrix(Y, rank=r, generator=torch.Generator().manual_seed(seed), **opts)
                stop_its.append(stop.iterations)
                stop_ratios.append(stop.rel_error / opt)
        rows.append(
            dict(
                variant=label,
                iterations_to_1pct=its,
                final_err_over_opt=[round(x, 4) for x in ratios],
                tol_stop_iterations=stop_its,
                tol_stop_err_over_opt=[round(x, 4) for x in stop_ratios],
                seconds=round(sum(secs), 2),
            )
        )
        console.log(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="first shape only (< 1 minute)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 5; 2 on the largest)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--ablation", action="store_true", help="the measurements behind the AdaMatrix changes"
    )
    parser.add_argument("--steps", type=int, default=2000, help="ablation: steps of the paper's variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    out = Console(width=150)
    if args.ablation:
        rows = ablation(console, args.steps)
        table = Table(title=f"AdaMatrix ablation: 3000 x 96, phi = {PHI}, 3 seeds (None = not within 1 %)")
        for col in ("variant", "iters to 1 %", "err/opt there", "iters (tol)", "err/opt (tol)", "s"):
            table.add_column(col)
        for row in rows:
            table.add_row(
                row["variant"],
                str(row["iterations_to_1pct"]),
                str(row["final_err_over_opt"]),
                str(row["tol_stop_iterations"]),
                str(row["tol_stop_err_over_opt"]),
                f"{row['seconds']:.1f}",
            )
        out.print(table)
        print(json.dumps({"benchmark": "tsvd_ablation", "rows": rows}))
        return
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    for m, n in shapes:
        # min over repeats: 5 (the shared machine is noisy), 2 on the largest shape (a Gram product takes ~1 s)
        repeats = args.repeats or (5 if m * n <= 50432 * 384 else 2)
        rows += bench_shape(m, n, repeats, console)
    table = Table(
        title=f"Truncated SVD to within 1 % of the optimal rank-r error (phi = {PHI}), {args.threads} threads"
    )
    for col in ("shape", "r", "solver", "iters", "err/opt", "ms", "x Gram floor", "note"):
        table.add_column(col, justify="left" if col in ("shape", "solver", "note") else "right")
    for row in rows:
        table.add_row(
            row["shape"],
            str(row["r"]),
            row["solver"],
            str(row["iterations"]),
            f"{row['err_over_opt']:.4f}" + ("" if row["within_1pct"] else " (!)"),
            f"{row['ms']:.1f}",
            f"{row['x_floor']:.2f}",
            row["note"],
        )
    out.print(table)
    floors: dict[str, list[float]] = {}
    for row in rows:
        floors.setdefault(row["shape"], []).append(row["floor_ms"])
    out.print(
        "Gram floor Y^T Y (ms, min-max over the rows; each ratio uses the floor timed beside it): "
        + ", ".join(f"{k}: {min(v):.1f}-{max(v):.1f}" for k, v in floors.items())
    )
    figures = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
    load = [round(x, 2) for x in os.getloadavg()]  # other processes on the machine (noise)
    out.print(f"load average at the end (1, 5, 15 min): {load}")
    print(json.dumps({"benchmark": "tsvd", "threads": args.threads, "load": load, "rows": figures}))


if __name__ == "__main__":
    main()
