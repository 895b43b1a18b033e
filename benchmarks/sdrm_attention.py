"""SDRM attention against dense attention at ViT-S shapes (issue #5, benchmark 2).

One attention module of ViT-S (dim 384, 6 heads, T = 197 tokens, batch 32 by default) on synthetic tokens with
the power-law spectrum of benchmarks/tsvd.py (s_i = i^-0.6, s_1 = 2, in a random orthonormal basis: phi = 0.9
keeps r ~ 57 of 384, like measured ViT tokens). For phi = 0.7, 0.8, 0.9, 0.95 it measures, as ratios to
``MultiHeadSelfAttention`` measured in the same process:

- ``fwd+bwd``: one training step of the module (forward, loss = mean(out^2), backward to the input and the
  weights); ``fwd``: one inference forward (eval, no_grad). Minimum over ``--repeats``, each SDRM repeat timed
  alternately with a dense one so that both see the same stretch of machine load;
- ``peak mem``: the peak of the CPU memory timeline of torch's profiler (``profile_memory=True``,
  ``export_memory_timeline``: every tensor allocation and free of the step, inputs and parameters included),
  for the training step, in a separate untimed run;
- ``t-SVD share``: the part of the SDRM step spent factorizing (``module.stats.rr_seconds``, SDRM's RR phase).

Variants: ``batch`` (the paper: a t-SVD of every batch, ``--solver`` gram by default, ``--svd-batch-size`` 16
images per chunk), ``calibrated`` (lrk's option: the basis fitted once and frozen, no t-SVD per step), and with
``--adamatrix`` also the per-batch AdaMatrix solver (warm-started across repeats); each with ``core=qkv`` (Q, K, V
formed explicitly, as Algorithm 4 does) and ``core=auto`` (Eq. 14's factors kept through the T x T products when
r + 1 < d_h = 64: the same numbers, T^2 (r+1) instead of T^2 d_h).

The paper's claim to test: SDRM cuts the multi-head-attention time by 87.6 % against the same ViT without rank
reduction. The machine is a shared 2-core CPU: figures are noisy (the load average is printed); one torch thread
by default (with two, both modules ran 2-5x slower whenever another process held the second core).

    python benchmarks/sdrm_attention.py --quick     # batch 8, 3 repeats (< 1 minute)
    python benchmarks/sdrm_attention.py             # batch 32, 5 repeats
    python benchmarks/sdrm_attention.py --batch 64 --adamatrix
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import infer, load_average, spectral_tokens, train_step
from rich.console import Console
from rich.table import Table

from lrk.layers.attention.sdrm import SDRMAttention
from lrk.measure import paired_min, profiled_peak_mb
from lrk.models import MultiHeadSelfAttention

DIM, HEADS, TOKENS = 384, 6, 197
PHIS = (0.7, 0.8, 0.9, 0.95)
PAPER_MHA_CHANGE = -0.876


def vit_tokens(batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, 197, 384] tokens with the power-law spectrum of benchmarks/tsvd.py (phi = 0.9 keeps r ~ 57)."""
    return spectral_tokens(batch, TOKENS, DIM, seed)


def measure(
    dense: MultiHeadSelfAttention, sdrm: SDRMAttention, x: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Ratios SDRM / dense for one configuration, and what SDRM did."""
    xg = x.clone().requires_grad_(True)
    dense.train()
    sdrm.train()
    sdrm.stats.reset()
    t_sdrm, t_dense = paired_min(lambda: train_step(sdrm, xg), lambda: train_step(dense, xg), repeats)
    st = sdrm.stats
    rr_per_step = st.rr_seconds / max(st.forwards, 1)
    rank = st.rank_sum / max(st.factorizations, 1)
    energy = st.energy_sum / max(st.factorizations, 1)
    dense.eval()
    sdrm.eval()
    f_sdrm, f_dense = paired_min(lambda: infer(sdrm, x), lambda: infer(dense, x), repeats)
    dense.train()
    sdrm.train()
    m_dense = profiled_peak_mb(lambda: train_step(dense, xg))
    m_sdrm = profiled_peak_mb(lambda: train_step(sdrm, xg))
    return {
        "rank": rank,
        "energy": energy,
        "dense_step_s": t_dense,
        "sdrm_step_s": t_sdrm,
        "step_ratio": t_sdrm / t_dense,
        "fwd_ratio": f_sdrm / f_dense,
        "dense_fwd_s": f_dense,
        "sdrm_fwd_s": f_sdrm,
        "dense_peak_mb": m_dense,
        "sdrm_peak_mb": m_sdrm,
        "mem_ratio": m_sdrm / m_dense,
        "rr_share": min(rr_per_step / t_sdrm, 1.0) if t_sdrm > 0 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 repeats (< 1 minute)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--solver", default="gram", choices=["gram", "lowrank", "svd", "adamatrix"])
    parser.add_argument("--svd-batch-size", type=int, default=16)
    parser.add_argument("--adamatrix", action="store_true", help="also the per-batch AdaMatrix solver")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: two threads on the shared, loaded 2-core "
        "machine made every small op wait on the other core, 2-5x slower)",
    )
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 8, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = MultiHeadSelfAttention(DIM, HEADS)
    x = vit_tokens(args.batch)
    variants = [("batch", args.solver, "qkv"), ("batch", args.solver, "auto")]
    if args.adamatrix and args.solver != "adamatrix":
        variants.append(("batch", "adamatrix", "auto"))
    variants += [("calibrated", "-", "qkv"), ("calibrated", "-", "auto")]
    console = Console(width=140)
    load = load_average()
    console.print(
        f"SDRM vs dense attention: B={args.batch}, T={TOKENS}, d={DIM}, {HEADS} heads, svd_batch_size="
        f"{args.svd_batch_size}, {args.threads} thread(s), min of {args.repeats} repeats; shared CPU, "
        f"load average {load:.2f} (noisy)"
    )
    rows = []
    for subspace, solver, core in variants:
        for phi in PHIS:
            kwargs = {
                "energy": phi,
                "subspace": subspace,
                "svd_batch_size": args.svd_batch_size,
                "core": core,
            }
            if subspace == "batch":
                kwargs["solver"] = solver
            sdrm = SDRMAttention.from_attention(dense, **kwargs)
            if subspace == "calibrated":
                Y = x.reshape(-1, DIM).double()
                sdrm.fit_basis(Y.T @ Y, Y.shape[0])
            result = measure(dense, sdrm, x, args.repeats)
            factored = sdrm._use_factored(sdrm._bases(x[: args.svd_batch_size]))
            rows.append(
                {
                    "subspace": subspace,
                    "solver": solver,
                    "core": core,
                    "factored": factored,
                    "phi": phi,
                    **result,
                }
            )
            console.print(f"  done: {subspace} {solver} {core} phi={phi}", style="dim")
    table = Table(title="SDRM / dense attention (ratios < 1: SDRM is cheaper)")
    for column in (
        "subspace",
        "solver",
        "core",
        "phi",
        "rank",
        "fwd+bwd",
        "fwd",
        "peak mem",
        "t-SVD share",
        "MHA time change",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["subspace"],
            r["solver"],
            r["core"] + (" (fact.)" if r["core"] == "auto" and r["factored"] else ""),
            f"{r['phi']:.2f}",
            f"{r['rank']:.0f}",
            f"{r['step_ratio']:.2f}",
            f"{r['fwd_ratio']:.2f}",
            f"{r['mem_ratio']:.2f}",
            f"{100 * r['rr_share']:.0f} %",
            f"{100 * (r['step_ratio'] - 1):+.1f} %",
        )
    console.print(table)
    d0 = rows[0]
    console.print(
        f"dense: {1000 * d0['dense_step_s']:.1f} ms per fwd+bwd, {1000 * d0['dense_fwd_s']:.1f} ms per fwd, "
        f"peak {d0['dense_peak_mb']:.1f} MB. Paper: {100 * PAPER_MHA_CHANGE:+.1f} % MHA time."
    )
    best = min(rows, key=lambda r: r["step_ratio"])
    print(
        json.dumps(
            {
                "benchmark": "sdrm_attention",
                "batch": args.batch,
                "tokens": TOKENS,
                "dim": DIM,
                "heads": HEADS,
                "svd_batch_size": args.svd_batch_size,
                "threads": args.threads,
                "repeats": args.repeats,
                "load_average": load,
                "memory": "torch.profiler CPU memory timeline peak (profile_memory, export_memory_timeline)",
                "paper_mha_change": PAPER_MHA_CHANGE,
                "best_mha_change": best["step_ratio"] - 1,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
