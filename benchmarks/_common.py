"""Measuring helpers shared by the benchmark scripts (imported as ``_common`` when a script runs from benchmarks/)."""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.profiler import ProfilerActivity, profile

CONF = Path(__file__).resolve().parents[1] / "conf"


def decomp_config(overrides: dict) -> DictConfig:
    """The ``decomp`` node ``python train.py decomp=<name> decomp.<key>=<value> ...`` composes: the method's
    ``conf/decomp/<name>.yaml`` with ``overrides`` (which name the method) merged on top."""
    return OmegaConf.merge(OmegaConf.load(CONF / "decomp" / f"{overrides['name']}.yaml"), overrides)


def train_step(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One training step of ``module`` alone: forward, loss = mean(out^2), backward to the input and weights."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).square().mean().backward()


def infer(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One inference forward without gradients."""
    with torch.no_grad():
        module(x)


def peak_memory_mb(fn: Callable[[], None]) -> float:
    """Peak of the profiler's CPU memory timeline while ``fn`` runs (allocations minus frees, all categories)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            fn()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "timeline.json"
            prof.export_memory_timeline(str(path), device="cpu")
            _, sizes = json.loads(path.read_text())
    return max(sum(row) for row in sizes) / 2**20 if sizes else float("nan")


def paired_min(a: Callable[[], None], b: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Minimum seconds of ``a`` and of ``b`` over ``repeats`` alternating runs (after one warm-up each)."""
    a()
    b()
    ta, tb = math.inf, math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a()
        ta = min(ta, time.perf_counter() - start)
        start = time.perf_counter()
        b()
        tb = min(tb, time.perf_counter() - start)
    return ta, tb


def spectral_tokens(batch: int, tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[batch, tokens, dim] tokens with singular values s_i = i^-0.6 (s_1 = 2) in a random orthonormal basis,
    normalised to unit standard deviation: the spectrum measured on ViT token matrices (benchmarks/tsvd.py)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    s = torch.arange(1, dim + 1, dtype=torch.float64) ** -0.6
    s[0] = 2.0
    y = (torch.randn(batch * tokens, dim, generator=g, dtype=torch.float64) * s) @ basis.T
    return (y / y.std()).float().reshape(batch, tokens, dim)
