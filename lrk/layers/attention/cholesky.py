"""``decomp=cholesky``: Cholesky-based symmetric query-key attention (seeds/vit_nla_slides.txt, slides "Used methods.
Cholesky corrected, ok?" and "Cholesky-Based Symmetric Attention: d_k(d_k+1)/2 parameters instead of d_k^2").

The slides score tokens with S = X W_QK X^T where W_QK is symmetric and factored as L L^T. lrk's reading, per head h
(d_k = head_dim, H heads, D = dim):

    q_h = X W_h + b_h                 (W: one shared query-key projection Linear(D, D), heads split like dense q)
    z_h = q_h L_h                     (L_h: d_k x d_k lower-triangular, stored packed: d_k(d_k+1)/2 parameters)
    S_h = z_h z_h^T / sqrt(d_k) = q_h L_h L_h^T q_h^T / sqrt(d_k)
    out = proj(concat_h softmax(S_h) v_h)         (values and output projection as in dense attention)

so W_QK^h = W_h L_h L_h^T W_h^T is symmetric positive semi-definite and S_h = S_h^T. The attention core is
``F.scaled_dot_product_attention(z, z, v)``: queries and keys are the same tensor. Softmax runs over the keys of
each image; tokens of different images never mix.

Parameters of the query-key part: D^2 (+ D bias) for W plus H d_k(d_k+1)/2 for the packed L, instead of 2 D^2
(+ 2 D) for dense W_Q, W_K. The dense key projection is not kept.

Building from a dense :class:`~lrk.models.MultiHeadSelfAttention` (``init``):

- ``dense`` (the default with ``stage=post``): per head the dense form A_h = W_Q^h W_K^h^T (D x D, rank d_k) is
  replaced by its nearest rank-d_k positive-definite matrix W_h L_h L_h^T W_h^T
  (:func:`lrk.linalg.psd.nearest_spd_factor`: symmetric part, top d_k eigenpairs, negatives clipped, a shift of
  ``eps`` times the largest |eigenvalue|, Cholesky). This is exact when A_h is already symmetric positive
  semi-definite; otherwise ``qk_rel_error`` in the report says what forcing symmetry cost.
  Biases: the key bias b_K adds q_i . b_K to every score of query i, a constant per row that the softmax removes,
  so dropping it is exact. The query bias b_Q adds x_j . c_h with c_h = W_K^h b_Q^h, a term that depends on the
  key; in the symmetric form a shared bias b_h contributes x_j . (W_h M_h b_h) (M_h = L_h L_h^T) plus per-query
  constants, so b_h = M_h^{-1} W_h^T c_h reproduces the projection of c_h on span(W_h) (exact when c_h lies in
  it, as it does for a symmetric dense form). Directions whose kept eigenvalue is below ``BIAS_RCOND`` times the
  largest get no bias: there b_h would grow as 1 / eigenvalue and its per-query constants would swamp the scores.
- ``identity`` (the default with ``stage=init``, training from scratch): W_h = the dense query projection (weight
  and bias), L_h = I; the dense key projection is dropped.

The value projection and ``proj`` are copied from the dense module in both cases. The report's ``rel_error`` is
the measured relative error of each swapped module's output against the dense module's on the attention inputs
of the calibration batches (as the swapped model computes them); ``qk_rel_error`` is
||W_QK^sym - W_QK^dense||_F / ||W_QK^dense||_F averaged over heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrk.layers.attention import args
from lrk.layers.attention.dense import AttentionBase
from lrk.linalg.psd import nearest_spd_factor, pack_tril, tril_size, unpack_tril

INITS = ("auto", "dense", "identity")
DEFAULT_EPS = 1e-6
BIAS_RCOND = 1e-4


class CholeskyAttention(AttentionBase):
    """Multi-head self-attention with a symmetric PSD query-key form W_h L_h L_h^T W_h^T per head (module docstring).

    Parameters (and nothing else):

    - ``qk``: Linear(dim, dim, bias=qkv_bias), the shared query-key projection W; output columns split into heads
      like the dense query (head h owns columns h d_k ... (h+1) d_k - 1);
    - ``tril``: [num_heads, d_k (d_k + 1) / 2], the lower triangles of the L_h row by row
      (:func:`lrk.linalg.psd.unpack_tril`); a freshly built module has L_h = I;
    - ``v``: Linear(dim, dim, bias=qkv_bias), the value projection (the dense qkv's v rows);
    - ``proj``: Linear(dim, dim), the output projection.

    It has no ``qkv``: the dense key projection is gone; the hyper-parameters (``qkv_bias``, ``attn_drop``,
    ``proj_drop``) are those of :class:`~lrk.models.MultiHeadSelfAttention`.
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
        hd = self.head_dim
        self.qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.tril = nn.Parameter(pack_tril(torch.eye(hd).expand(num_heads, hd, hd)).clone())
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_kwargs(self) -> dict[str, Any]:
        return {
            **super().init_kwargs(),
            "qkv_bias": self.qkv_bias,
            "attn_drop": self.attn_drop,
            "proj_drop": self.proj_drop.p,
        }

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, packed_tril={tril_size(self.head_dim)} per head"

    # --- the factors -------------------------------------------------------------------------------------
    def factor(self) -> torch.Tensor:
        """The lower-triangular L_h, [num_heads, d_k, d_k], unpacked from ``tril``."""
        return unpack_tril(self.tril, self.head_dim)

    def qk_forms(self) -> torch.Tensor:
        """W_QK^h = W_h L_h L_h^T W_h^T for every head, [num_heads, dim, dim] (symmetric PSD)."""
        w = self.qk.weight.reshape(self.num_heads, self.head_dim, self.dim).transpose(1, 2)  # [H, D, d_k]
        wl = w @ self.factor()
        return wl @ wl.transpose(1, 2)

    def _z(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.qk(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d_k]
        return q @ self.factor()  # q_h L_h, broadcast over the batch

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-softmax scores z_h z_h^T / sqrt(d_k), [B, H, T, T] (symmetric in the last two axes)."""
        z = self._z(x)
        return z @ z.transpose(-2, -1) * self.head_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        z = self._z(x)
        v = self.v(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(z, z, v, dropout_p=drop, scale=self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))

    # --- building from a dense module ----------------------------------------------------------------------
    @classmethod
    def from_attention(  # type: ignore[override]
        cls, other: AttentionBase, init: str = "dense", eps: float = DEFAULT_EPS, **overrides: Any
    ) -> CholeskyAttention:
        """Build from a dense attention with a ``qkv`` Linear(dim, 3 dim) ([q | k | v], e.g.
        :class:`~lrk.models.MultiHeadSelfAttention`): ``init='dense'`` factors each head's W_Q W_K^T into the
        nearest positive-definite W L L^T W^T, ``init='identity'`` takes W = W_Q, L = I (module docstring).
        ``v`` and ``proj`` are copied. The result is on ``other``'s device/dtype and in its train/eval mode.
        Raises ValueError for a module without such a ``qkv`` or an impossible ``init`` / ``eps`` (the config
        rules, e.g. ``init: auto``, are :class:`lrk.decomp.attention.cholesky.CholeskyMethod`'s)."""
        who = "CholeskyAttention.from_attention"
        args.choice(who, "init", init, INITS[1:])
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1):
            raise ValueError(f"{who}: eps={eps!r} is invalid: it must be a number in (0, 1)")
        qkv = dense_qkv(other)
        kwargs = {
            "dim": other.dim,
            "num_heads": other.num_heads,
            "qkv_bias": qkv.bias is not None,
            "attn_drop": getattr(other, "attn_drop", 0.0),
            "proj_drop": getattr(getattr(other, "proj_drop", None), "p", 0.0),
            **overrides,
        }
        new = cls(**kwargs)
        ref = qkv.weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        dim, heads, hd = new.dim, new.num_heads, new.head_dim
        with torch.no_grad():
            weight = qkv.weight.detach().double()
            bias = None if qkv.bias is None else qkv.bias.detach().double()
            wq, wk, wv = weight.split(dim)  # each [D, D]: rows = output features
            if init == "identity":
                new.qk.weight.copy_(wq)
                new.tril.copy_(pack_tril(torch.eye(hd, dtype=torch.float64).expand(heads, hd, hd)))
                qk_bias = None if bias is None else bias[:dim]
            else:
                wq_h = wq.reshape(heads, hd, dim)
                wk_h = wk.reshape(heads, hd, dim)
                dense_form = wq_h.transpose(1, 2) @ wk_h  # A_h = W_Q^h W_K^h^T, [H, D, D]
                fac = nearest_spd_factor(dense_form, rank=hd, eps=eps)
                new.qk.weight.copy_(fac.basis.transpose(1, 2).reshape(dim, dim))
                new.tril.copy_(pack_tril(fac.chol))
                qk_bias = (
                    None if bias is None else _shared_bias(fac.basis, fac.chol, fac.eigenvalues, wk_h, bias)
                )
            if qk_bias is not None and new.qk.bias is not None:
                new.qk.bias.copy_(qk_bias)
            new.v.weight.copy_(wv)
            if bias is not None and new.v.bias is not None:
                new.v.bias.copy_(bias[2 * dim :])
            proj = getattr(other, "proj", None)
            if isinstance(proj, nn.Linear) and proj.weight.shape == new.proj.weight.shape:
                new.proj.load_state_dict(proj.state_dict())
        new.train(other.training)
        return new


def _shared_bias(
    basis: torch.Tensor, chol: torch.Tensor, kept: torch.Tensor, wk_h: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """The shared projection's bias b_h = M_h^{-1} W_h^T c_h, c_h = W_K^h b_Q^h (module docstring), [D]."""
    heads, hd, dim = wk_h.shape
    bq = bias[:dim].reshape(heads, hd, 1)
    c = wk_h.transpose(1, 2) @ bq  # [H, D, 1]: the key-dependent score term x_j . c_h of the dense head
    coeff = basis.double().transpose(1, 2) @ c  # [H, d_k, 1]
    b = torch.cholesky_solve(coeff, chol.double())  # M^{-1} W^T c
    keep = kept.double() > BIAS_RCOND * kept.double().amax(dim=-1, keepdim=True)
    return (b.squeeze(-1) * keep).reshape(dim)


def dense_qkv(module: nn.Module) -> nn.Linear:
    """The ``qkv`` Linear(dim, 3 dim) of a dense attention module; ValueError when it has none."""
    qkv = getattr(module, "qkv", None)
    dim = getattr(module, "dim", None)
    if not (isinstance(qkv, nn.Linear) and dim is not None and tuple(qkv.weight.shape) == (3 * dim, dim)):
        raise ValueError(
            f"CholeskyAttention cannot be built from {type(module).__name__}: it needs a dense attention with a "
            "qkv Linear(dim, 3 dim) laid out [q | k | v] (lrk.models.MultiHeadSelfAttention)"
        )
    return qkv


def dense_qk_forms(module: nn.Module) -> torch.Tensor:
    """A_h = W_Q^h W_K^h^T of a dense attention, [num_heads, dim, dim] (scores are x_i A_h x_j^T / sqrt(d_k))."""
    weight = dense_qkv(module).weight
    dim, heads = module.dim, module.num_heads
    hd = dim // heads
    wq, wk = weight[:dim].reshape(heads, hd, dim), weight[dim : 2 * dim].reshape(heads, hd, dim)
    return wq.transpose(1, 2) @ wk


def qk_rel_errors(dense: nn.Module, new: CholeskyAttention) -> torch.Tensor:
    """Per head ||W_QK^sym - W_QK^dense||_F / ||W_QK^dense||_F ([num_heads], float64; inf for a zero dense form
    that the symmetric one does not match, 0 when both are zero)."""
    with torch.no_grad():
        ref = dense_qk_forms(dense).double()
        diff = torch.linalg.matrix_norm(new.qk_forms().double() - ref)
        norm = torch.linalg.matrix_norm(ref)
    zero = torch.where(diff > 0, torch.full_like(diff, math.inf), torch.zeros_like(diff))
    return torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(norm.dtype).tiny), zero)
