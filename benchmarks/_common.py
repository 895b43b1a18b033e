"""Benchmark-only helpers: composing method configs, the workloads and inputs the scripts time (imported as
``_common`` when a script runs from benchmarks/). Timing, FLOPs and memory come from :mod:`lrk.measure`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

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


def classifier_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    """A closure running one training step of a classifier: zero the grads, cross-entropy of ``model(x)`` against
    ``y``, backward, ``optimizer.step()`` (the step a candidate of ``lrk.measure.alternating_latency`` times)."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def inference_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running one inference forward of ``model`` on ``x`` under ``torch.inference_mode()``."""

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def load_average() -> float:
    """The 1-minute load average of the machine (other processes: noise on every timing), NaN where unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def spectral_tokens(batch: int, tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[batch, tokens, dim] tokens with singular values s_i = i^-0.6 (s_1 = 2) in a random orthonormal basis,
    normalised to unit standard deviation: the spectrum measured on ViT token matrices (benchmarks/tsvd.py)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    s = torch.arange(1, dim + 1, dtype=torch.float64) ** -0.6
    s[0] = 2.0
    y = (torch.randn(batch * tokens, dim, generator=g, dtype=torch.float64) * s) @ basis.T
    return (y / y.std()).float().reshape(batch, tokens, dim)
