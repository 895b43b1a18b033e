"""Parameter and FLOP counts measured on the built modules (design.md: never trust a requested ratio)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``; tensors shared by several submodules (TRAWL) are counted once."""
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward on ``example`` as counted by ``torch.utils.flop_counter`` (2 per multiply-add
    of matmuls and convolutions; elementwise ops, norms and softmax are not counted)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(example)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())
