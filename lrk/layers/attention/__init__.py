"""Attention modules: the dense multi-head attention every lrk ViT uses and its low-rank replacements."""

from lrk.layers.attention.dense import AttentionBase, MultiHeadSelfAttention, split_heads

__all__ = ["AttentionBase", "MultiHeadSelfAttention", "split_heads"]
