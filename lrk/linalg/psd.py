"""Symmetric positive-definite factors for Cholesky-based symmetric attention (seeds/vit_nla_slides.txt, slides
"Used methods. Cholesky corrected, ok?": S = X W_QK X^T with W_QK = L L^T, and "Cholesky-Based Symmetric
Attention: d_k(d_k+1)/2 parameters instead of d_k^2").

- :func:`pack_tril` / :func:`unpack_tril`: a lower-triangular n x n matrix stored as its n(n+1)/2 entries (the
  order of ``torch.tril_indices(n, n)``: row by row), so that only the d_k(d_k+1)/2 free entries are parameters.
- :func:`nearest_spd_factor`: the rank-r symmetric positive-definite matrix nearest (Frobenius) to a general
  square matrix A, returned as W L L^T W^T with W orthonormal (n x r) and L lower-triangular (r x r). It turns
  a dense attention's W_QK = W_Q W_K^T (rank d_k, not symmetric) into the symmetric form of the slides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def tril_size(n: int) -> int:
    """Number of entries of an n x n lower-triangular matrix: n (n + 1) / 2."""
    if n < 0:
        raise ValueError(f"n={n} is invalid: a matrix order must be >= 0")
    return n * (n + 1) // 2


def tril_order(size: int) -> int:
    """The n with n (n + 1) / 2 == ``size`` (the inverse of :func:`tril_size`); ValueError if there is none."""
    n = (math.isqrt(8 * size + 1) - 1) // 2 if size >= 0 else -1
    if n < 0 or tril_size(n) != size:
        raise ValueError(
            f"size={size} is invalid: a packed lower triangle has n(n+1)/2 entries (1, 3, 6, 10, ...)"
        )
    return n


def pack_tril(matrix: torch.Tensor) -> torch.Tensor:
    """The lower triangle (diagonal included) of ``matrix`` ([..., n, n]) as a [..., n(n+1)/2] tensor, row by
    row (``torch.tril_indices`` order). The strictly upper part is ignored."""
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"pack_tril needs square matrices [..., n, n], got shape {tuple(matrix.shape)}")
    n = matrix.shape[-1]
    rows, cols = torch.tril_indices(n, n, device=matrix.device)
    return matrix[..., rows, cols]


def unpack_tril(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """The lower-triangular [..., n, n] matrix whose lower triangle is ``packed`` ([..., n(n+1)/2], the order of
    :func:`pack_tril`); zeros above the diagonal. Differentiable: the gradient reaches every packed entry."""
    size = packed.shape[-1]
    order = tril_order(size) if n is None else n
    if tril_size(order) != size:
        raise ValueError(
            f"packed size {size} is invalid for n={order}: it must be n(n+1)/2 = {tril_size(order)}"
        )
    rows, cols = torch.tril_indices(order, order, device=packed.device)
    out = packed.new_zeros(*packed.shape[:-1], order, order)
    out[..., rows, cols] = packed
    return out


@dataclass
class SPDFactor:
    """W L L^T W^T, a symmetric positive-definite matrix on the span of W (batched over leading axes).

    ``basis`` W: [..., n, r] orthonormal columns (eigenvectors of the symmetric part, largest eigenvalue first);
    ``chol`` L: [..., r, r] lower-triangular with L L^T = diag(eigenvalues + shift); ``eigenvalues``: [..., r] the
    clipped (>= 0) leading eigenvalues; ``shift``: [...] the positive shift that makes L L^T positive definite.
    """

    basis: torch.Tensor
    chol: torch.Tensor
    eigenvalues: torch.Tensor
    shift: torch.Tensor

    def reconstruction(self) -> torch.Tensor:
        """W L L^T W^T ([..., n, n])."""
        wl = self.basis @ self.chol
        return wl @ wl.transpose(-2, -1)


def nearest_spd_factor(matrix: torch.Tensor, rank: int | None = None, eps: float = 1e-6) -> SPDFactor:
    """Factor the rank-``rank`` positive-definite matrix nearest to ``matrix`` ([..., n, n]) as W L L^T W^T.

    The route (the slides' W_QK = L L^T for a weight that is not symmetric to begin with, seeds/vit_nla_slides.txt
    "Used methods. Cholesky corrected, ok?"):

    1. symmetric part S = (A + A^T) / 2: A - S is skew-symmetric and orthogonal to every symmetric matrix in the
       Frobenius inner product, so ||A - P||^2 = ||A - S||^2 + ||S - P||^2 for every symmetric P;
    2. S = U diag(lambda) U^T (``eigh``); the PSD matrix of rank <= r nearest to S keeps the r largest
       eigenvalues clipped at zero: P = U_r diag(max(lambda_r, 0)) U_r^T (Higham 1988 with Eckart-Young);
    3. shift the kept eigenvalues by ``eps`` times the largest |lambda| (1 for S = 0) so that P is positive
       definite on span(U_r) and its Cholesky factor exists: this adds eps ||S||_2 sqrt(r) to the error;
    4. W = U_r, L = cholesky(diag(max(lambda_r, 0) + shift)). With an eigenvector basis this L is diagonal (the
       Cholesky factor of a diagonal matrix); training is free to fill its strictly lower triangle.

    Computed in float64 and returned in ``matrix``'s dtype. ``rank`` None means n. Raises ValueError for a
    non-square matrix, a rank outside [1, n] or eps <= 0.
    """
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"nearest_spd_factor needs square matrices [..., n, n], got shape {tuple(matrix.shape)}"
        )
    n = matrix.shape[-1]
    r = n if rank is None else rank
    if not 1 <= r <= n:
        raise ValueError(f"rank={rank} is invalid: it must lie in [1, {n}]")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps} is invalid: it must be a positive number")
    a = matrix.detach().double()
    sym = (a + a.transpose(-2, -1)) / 2
    evals, evecs = torch.linalg.eigh(sym)  # ascending
    scale = evals.abs().amax(dim=-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    shift = eps * scale
    kept = evals[..., -r:].flip(-1).clamp_min(0.0)
    basis = evecs[..., -r:].flip(-1)
    chol = torch.linalg.cholesky(torch.diag_embed(kept + shift[..., None]))
    dtype = matrix.dtype
    return SPDFactor(basis.to(dtype), chol.to(dtype), kept.to(dtype), shift.to(dtype))
