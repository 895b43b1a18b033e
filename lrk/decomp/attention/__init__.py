"""Attention methods: attention modules replaced by low-rank attention modules (lrk.layers.attention)."""

from lrk.decomp.attention import attn_svd, attn_tensor, cholesky, pca, sdrm  # noqa: F401  (register the methods)
