"""In-memory size of a module's tensors."""

from __future__ import annotations

from torch import nn

__all__ = ["MIB", "module_size_mb"]

MIB = 2**20


def module_size_mb(module: nn.Module) -> float:
    """Bytes of the parameters and buffers of ``module`` (each shared tensor once), in MiB (2^20 bytes)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / MIB
