"""Self-attention as its own swappable module.

Every attention in an lrk backbone is an :class:`AttentionBase`, so that a decomposition can find
them all (``lrk.models.attention_modules``) and swap one for another implementation
(``lrk.models.replace_module``) without knowing the rest of the model.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lrk.checks import positive_int
from lrk.errors import LrkConfigError

AttentionT = TypeVar("AttentionT", bound="AttentionBase")


class AttentionBase(nn.Module, metaclass=abc.ABCMeta):
    """Self-attention over the token axis: ``forward(x: [B, T, D]) -> [B, T, D]``.

    Attributes every implementation has: ``dim`` (D), ``num_heads`` (H) and ``head_dim`` (D / H).
    Tokens of different images never mix: the batch axis is a plain batch axis.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        positive_int("backbone.dim", dim)
        positive_int("backbone.num_heads", num_heads)
        if dim % num_heads:
            divisors = [h for h in range(1, dim + 1) if dim % h == 0]
            raise LrkConfigError(
                f"backbone.num_heads={num_heads} is invalid for dim={dim}: dim must be divisible by "
                f"num_heads (valid num_heads for dim={dim}: {divisors})"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens of each image: ``x`` is ``[B, T, D]``, the result too."""

    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments that rebuild a module like this one (overridden by subclasses)."""
        return {"dim": self.dim, "num_heads": self.num_heads}

    @classmethod
    def from_attention(cls: type[AttentionT], other: AttentionBase, **overrides: Any) -> AttentionT:
        """Build a ``cls`` with ``other``'s hyper-parameters (``init_kwargs``, minus those ``cls`` does
        not accept, updated by ``overrides``) and copy every parameter/buffer both have under the same
        name and shape. A replacement that transforms weights (e.g. factorizes ``qkv``) overrides this.
        The result is on ``other``'s device/dtype and in its train/eval mode.
        """
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in {**other.init_kwargs(), **overrides}.items() if k in accepted}
        new = cls(**kwargs)
        ref = next(iter(other.parameters()), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        target = new.state_dict()
        shared = {k: v for k, v in other.state_dict().items() if k in target and target[k].shape == v.shape}
        new.load_state_dict(shared, strict=False)
        new.train(other.training)
        return new


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a ``[B, T, 3 D]`` projection laid out ``[q | k | v]`` into q, k, v, each ``[B, H, T, D / H]``
    (head h owns feature columns h D/H ... (h+1) D/H - 1 of each part)."""
    batch, tokens, width = qkv.shape
    parts = qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    q, k, v = parts.unbind(0)
    return q, k, v


class MultiHeadSelfAttention(AttentionBase):
    """Standard multi-head self-attention (Vaswani et al. 2017, Eq. 1; ViT, Dosovitskiy et al. 2021):
    ``[q, k, v] = x W_qkv``, ``softmax(q k^T / sqrt(d_h)) v`` per head, then ``proj``.

    ``qkv`` is ``Linear(dim, 3 * dim)`` (output laid out as [q | k | v], each split into heads) and
    ``proj`` is ``Linear(dim, dim)``; the product runs in ``F.scaled_dot_product_attention`` on
    ``[B, H, T, head_dim]`` tensors, so it attends over the tokens of each image only.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads)
        self.qkv_bias = qkv_bias
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_kwargs(self) -> dict[str, Any]:
        return {
            **super().init_kwargs(),
            "qkv_bias": self.qkv_bias,
            "attn_drop": self.attn_drop,
            "proj_drop": self.proj_drop.p,
        }

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of ``x`` ([B, T, D]), each split into heads: [B, H, T, head_dim]."""
        return split_heads(self.qkv(x), self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))
