"""Base of the factorized layers and helpers to build them from dense ones (no config here)."""

from __future__ import annotations

import torch
from torch import nn

Ranks = tuple[int, ...]


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "x".join(str(k) for k in module.kernel_size)
        groups = f", groups={module.groups}" if module.groups != 1 else ""
        return f"{type(module).__name__} {module.in_channels}->{module.out_channels} {kernel}{groups}"
    return type(module).__name__


def conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    """A bias-free Conv2d with ``conv``'s kernel size, stride, padding, dilation, padding mode, device and
    dtype: the spatial factor of a factorized convolution (SVD, Tucker-2 core, CP depthwise)."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=groups,
        bias=False,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def own_params(module: nn.Module) -> int:
    """Parameters of ``module`` (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())


class FactorizedLayer(nn.Module):
    """Base of every factorized layer: it can rebuild its dense weight (for errors and tests)."""

    ranks: Ranks

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"ranks={tuple(self.ranks)}"
