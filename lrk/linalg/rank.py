"""Rank selection from a spectrum: the energy rule shared by every method.

SDRM (seeds/sdrm_paper.txt, Eqs. 2-3): with E = sum_i sigma_i^2, keep the smallest r such that
sum_{i<=r} sigma_i^2 >= phi * E.
"""

from __future__ import annotations

import math

import torch


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= energy * sum_i s_i^2 (SDRM Eqs. 2-3).

    ``singular_values`` must be sorted in descending order; ``energy`` (phi) lies in (0, 1].
    A zero spectrum returns 1 (the smallest valid rank).
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy} is invalid: it must lie in (0, 1]")
    squared = singular_values.detach().double().flatten() ** 2
    total = squared.sum()
    if squared.numel() == 0:
        raise ValueError("energy_rank needs at least one singular value")
    if total <= 0:
        return 1
    cumulative = torch.cumsum(squared, 0) / total
    # a relative slack of 1e-12 keeps phi = 1 from asking for more than all values through rounding
    rank = (
        int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12).item()) + 1
    )
    return min(rank, squared.numel())


def fraction_rank(ratio: float, size: int) -> int:
    """r = ceil(ratio * size), clamped to [1, size]: a rank given as a fraction of the largest one (a relative
    slack of 1e-9 keeps float noise from rounding up: 0.3 * 10 gives 3, not 4)."""
    return max(1, min(size, math.ceil(ratio * size - 1e-9)))


def retained_energy(singular_values: torch.Tensor, rank: int) -> float:
    """Fraction of the spectrum's energy kept by the leading ``rank`` values."""
    squared = singular_values.detach().double().flatten() ** 2
    total = squared.sum()
    return float(squared[:rank].sum() / total) if total > 0 else 1.0


def tsvd_compression_ratio(batch: int, tokens: int, dim: int, rank: int) -> float:
    """Storage compression ratio of a rank-r t-SVD of X in R^{b x t x d} (SDRM Theorem 1):
    CR = b t d / (b t r + r + r d)."""
    return batch * tokens * dim / (batch * tokens * rank + rank + rank * dim)
