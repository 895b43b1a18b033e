"""Truncated SVD of a weight matrix and the Eckart-Young error (accelerating_lrd_paper Eqs. 1-3).

Pure tensor maths: no nn.Module, no config. Matrices follow PyTorch's Linear convention
``W in R^{out x in}`` (the paper writes ``C x S``, the transpose; the maths is the same).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SVDFactors(NamedTuple):
    """``W ~= first @ second`` with ``first = U' sqrt(S')`` and ``second = sqrt(S') V'^T`` (Eq. 3)."""

    first: torch.Tensor  # (out, r)
    second: torch.Tensor  # (r, in)
    singular_values: torch.Tensor  # the full spectrum, descending


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` computed on the tall orientation.

    On this CPU LAPACK's SVD of a wide matrix was 3-7x slower than of its (contiguous) transpose, e.g.
    512 x 4608 float64: 6.4 s against 0.9 s (noisy shared machine), so a wide matrix is transposed first.
    """
    if matrix.shape[-2] >= matrix.shape[-1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = torch.linalg.svd(matrix.mT.contiguous(), full_matrices=False)
    return vh.mT, s, u.mT


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values of ``matrix`` in descending order (float64 for a stable energy rule)."""
    m = matrix.detach().double()
    return torch.linalg.svdvals(m if m.shape[0] >= m.shape[1] else m.T.contiguous())


def tensorly_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_: object):
    """An SVD function for TensorLy's ``svd=`` arguments: :func:`thin_svd`, truncated to ``n_eigenvecs``."""
    u, s, vh = thin_svd(matrix)
    if n_eigenvecs is not None:
        u, s, vh = u[:, :n_eigenvecs], s[:n_eigenvecs], vh[:n_eigenvecs]
    return u, s, vh


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(U', S', V'^T)`` of ``matrix`` (Eq. 2), computed in float64."""
    m = matrix.detach().double()
    if not 1 <= rank <= min(m.shape):
        raise ValueError(
            f"rank={rank} is invalid for a {tuple(m.shape)} matrix: it must lie in [1, {min(m.shape)}]"
        )
    u, s, vh = thin_svd(m)
    return u[:, :rank], s[:rank], vh[:rank]


def svd_factors(
    matrix: torch.Tensor, rank: int, usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> SVDFactors:
    """Two factors with sqrt(Sigma') split onto both (Eq. 3), in ``matrix``'s dtype.

    ``first @ second`` is the Eckart-Young optimal rank-``rank`` approximation of ``matrix``. ``usv`` is the
    float64 thin SVD of ``matrix`` when the caller already has it.
    """
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(
            f"rank={rank} is invalid for a {tuple(matrix.shape)} matrix: it must lie in [1, {min(matrix.shape)}]"
        )
    u, s, vh = usv if usv is not None else thin_svd(matrix.detach().double())
    root = s[:rank].sqrt()
    first = (u[:, :rank] * root).to(matrix.dtype)
    second = (root[:, None] * vh[:rank]).to(matrix.dtype)
    return SVDFactors(first, second, s)


def eckart_young_error(singular_values: torch.Tensor, rank: int, relative: bool = True) -> float:
    """Frobenius error of the best rank-``rank`` approximation: sqrt(sum_{i>r} s_i^2) (Eckart-Young).

    With ``relative`` it is divided by ``||W||_F = sqrt(sum_i s_i^2)``.
    """
    squared = singular_values.detach().double().flatten() ** 2
    tail = float(squared[rank:].sum().sqrt())
    if not relative:
        return tail
    total = float(squared.sum().sqrt())
    return tail / total if total > 0 else 0.0


def svd_params(out_features: int, in_features: int, rank: int, bias: bool = False) -> int:
    """Parameters of the two factors of Eq. 3: r (in + out), plus ``out`` for a bias."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def svd_rank_for_ratio(out_features: int, in_features: int, ratio: float, bias: bool = False) -> int:
    """Rank whose parameter count is nearest to ``ratio`` times the dense layer's (bias counted on both
    sides), clipped to [1, min(out, in)]."""
    dense = out_features * in_features + (out_features if bias else 0)
    target = ratio * dense - (out_features if bias else 0)
    exact = target / (in_features + out_features)
    best = min(
        (max(1, math.floor(exact)), max(1, math.ceil(exact))),
        key=lambda r: abs(svd_params(out_features, in_features, r, bias) - ratio * dense),
    )
    return min(best, min(out_features, in_features))
