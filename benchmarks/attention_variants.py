"""The attention-level methods of issue #4 (and SDRM) against dense attention, one module, in one process.

Each variant is built exactly as ``python train.py decomp=<name>`` builds it: the registered method's ``apply`` on
a one-module model (a dense ``MultiHeadSelfAttention`` named ``attn``) with calibration batches of tokens. The
tokens have the power-law spectrum measured on ViT token matrices (benchmarks/_common.spectral_tokens). For each
variant, as ratios to the dense module measured in the same process:

- ``fwd+bwd``: one training step of the module (forward, loss = mean(out^2), backward to input and weights);
  ``fwd``: one inference forward (eval, no_grad); minimum over ``--repeats``, alternating with the dense module so
  that both see the same stretch of machine load;
- ``peak mem``: the peak of the CPU memory timeline of torch's profiler for one training step (every allocation
  and free, inputs and parameters included), in a separate untimed run;
- ``params``: parameters of the module; ``rel err``: the report's relative output error against the dense module
  on the calibration batches;
- ``FLOPs``: FLOPs per image of one inference forward at the benchmark's batch (``lrk.measure.count_flops``:
  the attention products and the factorizations a method computes inside its forward included); a second table
  gives them apart: inside ``F.scaled_dot_product_attention``, factorizations (eigh / SVD / QR / ...), the rest.

Shapes: ``--shape edge`` (default: the experiment's vit_edge on 64 px elpv: B=64, T=65, d=128, 4 heads),
``--shape tiny`` (ViT-Ti at 224 px: B=32, T=197, d=192, 3 heads). The slides' claims this speaks to
(seeds/vit_nla_slides.txt, "Methods validation. CIFIR100"): Cholesky raised time and memory, PCA doubled memory,
SVD left time and memory unchanged.

    python benchmarks/attention_variants.py --quick     # 3 repeats (< 1 minute)
    python benchmarks/attention_variants.py --shape tiny --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch
from _common import decomp_config, infer, load_average, spectral_tokens, train_step
from rich.console import Console
from rich.table import Table
from torch import nn

from lrk.decomp import build_method
from lrk.measure import FlopCount, count_flops, count_params, paired_min, profiled_peak_mb
from lrk.models import MultiHeadSelfAttention

SHAPES = {"edge": (64, 65, 128, 4), "tiny": (32, 197, 192, 3)}  # batch, tokens, dim, heads
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("cholesky", {"name": "cholesky", "init": "dense"}),
    ("pca batch r=d/2", {"name": "pca", "basis": "batch", "ratio": 0.5}),
    ("pca calibrated r=d/2", {"name": "pca", "basis": "calibrated", "ratio": 0.5}),
    ("attn_svd r=min(T,d)/2", {"name": "attn_svd", "ratio": 0.5}),
    ("attn_svd phi=0.9", {"name": "attn_svd", "energy": 0.9}),
    ("attn_tensor tucker T/2", {"name": "attn_tensor", "decomposition": "tucker", "ratio": 0.5}),
    ("attn_tensor cp r=8", {"name": "attn_tensor", "decomposition": "cp", "rank": 8}),
    ("sdrm phi=0.9", {"name": "sdrm", "energy": 0.9}),
]


class TokenModel(nn.Module):
    """One attention module over token inputs, shaped like a ViT for the methods' checks (``patch_embed``)."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.num_patches = tokens
        self.num_prefix_tokens = 0
        self.attn = MultiHeadSelfAttention(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def build_variant(
    dense: TokenModel, cfg: dict[str, Any], calibration: list[torch.Tensor]
) -> tuple[nn.Module, dict]:
    """The swapped attention module and its report row, built by the registered method."""
    model = copy.deepcopy(dense)
    report = build_method(decomp_config(cfg)).apply(model, calibration)
    return model.attn, report.rows[0]


def measure(dense: nn.Module, module: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    xg = x.clone().requires_grad_(True)
    dense.train()
    module.train()
    t_var, t_dense = paired_min(lambda: train_step(module, xg), lambda: train_step(dense, xg), repeats)
    dense.eval()
    module.eval()
    f_var, f_dense = paired_min(lambda: infer(module, x), lambda: infer(dense, x), repeats)
    dense.train()
    module.train()
    m_dense = profiled_peak_mb(lambda: train_step(dense, xg))
    m_var = profiled_peak_mb(lambda: train_step(module, xg))
    p_dense, p_var = count_params(dense), count_params(module)
    flops_dense, flops = image_flops(dense, x), image_flops(module, x)
    return {
        "dense_step_s": t_dense,
        "step_s": t_var,
        "step_ratio": t_var / t_dense,
        "fwd_ratio": f_var / f_dense,
        "dense_peak_mb": m_dense,
        "peak_mb": m_var,
        "mem_ratio": m_var / m_dense,
        "params_ratio": p_var / p_dense,
        "flops": flops.total,
        "flops_attention": flops.attention,
        "flops_factorization": flops.factorization,
        "flops_ratio": flops.total / flops_dense.total,
    }


def image_flops(module: nn.Module, x: torch.Tensor) -> FlopCount:
    """FLOPs per image of one inference forward on the batch ``x`` (lrk.measure: T x T products and the
    factorizations done inside the forward included; per-batch factorizations are paid at this batch size)."""
    return count_flops(module, x).per_image()


def flop_table(dense: FlopCount, rows: list[dict]) -> Table:
    table = Table(
        "variant", "MFLOPs / image", "attention", "factorization", "rest", "x dense",
        title="FLOPs per image of one forward (2 per multiply-add; elementwise, softmax and norms not counted; "
        "'attention' = inside F.scaled_dot_product_attention, T x T products by explicit matmuls fall in 'rest')",
    )  # fmt: skip
    figures = [("dense", dense.total, dense.attention, dense.factorization)]
    figures += [(r["variant"], r["flops"], r["flops_attention"], r["flops_factorization"]) for r in rows]
    for label, total, attention, factorization in figures:
        rest = total - attention - factorization
        table.add_row(
            label,
            *(f"{v / 1e6:.2f}" for v in (total, attention, factorization, rest)),
            f"{total / dense.total:.2f}x",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="edge")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 on the shared 2-core machine)"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, tokens, dim, heads = SHAPES[args.shape]
    dense = TokenModel(dim, heads, tokens)
    x = spectral_tokens(batch, tokens, dim, seed=1)
    calibration = [spectral_tokens(batch, tokens, dim, seed=2 + i) for i in range(2)]
    console = Console(width=150)
    load = load_average()
    console.print(
        f"attention variants vs dense: B={batch}, T={tokens}, d={dim}, {heads} heads, {args.threads} thread(s), "
        f"min of {args.repeats} repeats; shared CPU, load average {load:.2f} (noisy)"
    )
    table = Table("variant", "rank", "rel err", "fwd+bwd", "fwd", "peak mem", "params", "FLOPs", "step (ms)")
    rows = []
    for label, cfg in VARIANTS:
        if args.only and label.split()[0] not in args.only and label not in args.only:
            continue
        module, row = build_variant(dense, cfg, calibration)
        result = measure(dense.attn, module, x, args.repeats)
        rows.append({"variant": label, "rank": row["rank"], "rel_error": row["rel_error"], **result})
        table.add_row(
            label,
            f"{row['rank']:.1f}",
            f"{row['rel_error']:.3f}",
            f"{result['step_ratio']:.2f}x",
            f"{result['fwd_ratio']:.2f}x",
            f"{result['mem_ratio']:.2f}x",
            f"{result['params_ratio']:.2f}x",
            f"{result['flops_ratio']:.2f}x",
            f"{1000 * result['step_s']:.1f} (dense {1000 * result['dense_step_s']:.1f})",
        )
    console.print(table)
    dense_flops = image_flops(dense.attn, x)
    console.print(flop_table(dense_flops, rows))
    dense_row = {
        "flops": dense_flops.total,
        "flops_attention": dense_flops.attention,
        "flops_factorization": dense_flops.factorization,
    }
    print(json.dumps({
        "benchmark": "attention_variants", "shape": args.shape, "load": load, "dense": dense_row, "rows": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
