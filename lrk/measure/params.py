"""Parameter counts of built modules (design.md: always count from the modules, never trust a requested ratio)."""

from __future__ import annotations

from torch import nn

__all__ = ["count_params"]


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module``; a tensor shared by several submodules (TRAWL, tied weights) counts once.

    ``trainable_only``: only the parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
