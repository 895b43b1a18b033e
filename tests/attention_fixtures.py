"""Set-up shared by the tests of the attention-swap methods (tests/test_sdrm.py, tests/test_attn_*.py,
tests/test_attention_swap.py): a seeded dense attention, a tiny ViT, random images (one torch thread per test
comes from tests/conftest.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lrk.models import MultiHeadSelfAttention, build_backbone


def seeded_dense(
    dim: int, heads: int, dtype: torch.dtype = torch.float64, bias: bool = True, seed: int = 0
) -> MultiHeadSelfAttention:
    """A dense :class:`MultiHeadSelfAttention` with the weights of ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return MultiHeadSelfAttention(dim, heads, qkv_bias=bias).to(dtype).eval()


def tiny_vit(
    dim: int, heads: int, depth: int, image_size: int = 16, patch_size: int | None = None
) -> nn.Module:
    """A lrk ViT for one-channel images, two classes, weights of ``torch.manual_seed(0)``, in eval mode (the
    default patch size at 16 px: 8x8 patches + cls = 65 tokens)."""
    torch.manual_seed(0)
    cfg = {"name": "vit", "dim": dim, "depth": depth, "num_heads": heads}
    if patch_size is not None:
        cfg["patch_size"] = patch_size
    return build_backbone(cfg, num_classes=2, in_chans=1, image_size=image_size).eval()


def random_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` one-channel ``size`` x ``size`` images of a seeded standard normal."""
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
