"""Tucker-2 of a convolution kernel (accelerating_lrd_paper Eqs. 4-7, tensor_methods_lecture HOSVD/HOOI).

A kernel ``W in R^{S x C x kh x kw}`` (PyTorch order: out, in, kh, kw) is approximated as
``W ~= G x_0 U_out x_1 U_in`` with ``U_out in R^{S x R2}``, ``U_in in R^{C x R1}`` orthonormal and a
core ``G in R^{R2 x R1 x kh x kw}``: a 1x1 conv C->R1, the core conv R1->R2, a 1x1 conv R2->S.
Only the channel modes are decomposed (the spatial modes are tiny), as in the paper.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from lrk.linalg.svd import singular_values, tensorly_svd, thin_svd


class Tucker2(NamedTuple):
    """``W ~= core x_0 out_factor x_1 in_factor``."""

    core: torch.Tensor  # (R2, R1, kh, kw) -- or (L, R2, R1, kh, kw) for a stack
    out_factor: torch.Tensor  # (S, R2)
    in_factor: torch.Tensor  # (C, R1)


def unfolding(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding (matricization): that mode's index on the rows."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def mode_singular_values(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the mode-``mode`` unfolding (float64, descending): the spectrum that the
    energy rule reads for that Tucker rank (HOSVD, De Lathauwer et al.)."""
    return singular_values(unfolding(tensor.detach().double(), mode))


def tucker2(
    weight: torch.Tensor, ranks: tuple[int, int], n_iter_max: int = 0, tol: float = 1e-6, modes=(0, 1)
) -> Tucker2:
    """Tucker-2 of ``weight`` along ``modes`` (out, in) with ``ranks = (R2, R1)``.

    HOSVD initialisation refined by ``n_iter_max`` HOOI sweeps (TensorLy ``partial_tucker``; 0 sweeps is
    the truncated HOSVD). Computed in float64, returned in ``weight``'s dtype. For a stack of kernels
    (L, S, C, ...) pass ``modes=(1, 2)``: the factors are then shared by all L kernels.
    """
    w = weight.detach().double()
    r_out, r_in = ranks
    for mode, r in zip(modes, ranks, strict=True):
        if not 1 <= r <= w.shape[mode]:
            raise ValueError(
                f"Tucker rank {r} for mode {mode} of a {tuple(w.shape)} tensor must lie in [1, {w.shape[mode]}]"
            )
    with tl.backend_context("pytorch", local_threadsafe=True):
        (core, factors), _ = partial_tucker(
            w, rank=[r_out, r_in], modes=list(modes), n_iter_max=n_iter_max, tol=tol, svd=tensorly_svd
        )
    return Tucker2(core.to(weight.dtype), factors[0].to(weight.dtype), factors[1].to(weight.dtype))


def tucker2_to_tensor(t: Tucker2, modes=(0, 1)) -> torch.Tensor:
    """Rebuild the dense kernel ``core x_out U_out x_in U_in``."""
    out = torch.movedim(
        torch.tensordot(t.out_factor, torch.movedim(t.core, modes[0], 0), dims=([1], [0])), 0, modes[0]
    )
    return torch.movedim(
        torch.tensordot(t.in_factor, torch.movedim(out, modes[1], 0), dims=([1], [0])), 0, modes[1]
    )


def tucker2_params(
    out_channels: int, in_channels: int, kernel: int, ranks: tuple[int, int], bias: bool = False
) -> int:
    """Parameters of the three convolutions: C R1 + R1 R2 k + R2 S (+ S for a bias); ``kernel`` = kh kw."""
    r_out, r_in = ranks
    return in_channels * r_in + r_in * r_out * kernel + r_out * out_channels + (out_channels if bias else 0)


def tucker2_rank_eq7(
    out_channels: int, in_channels: int, kernel: int, alpha: float, beta: float, branches: int = 1
) -> float:
    """Real-valued R1 of accelerating_lrd_paper Eq. 7 for compression ratio ``alpha`` (dense / decomposed)
    with R2 = beta R1; ``kernel`` is k^2 = kh kw.

    Solves C R1 + beta R1^2 k^2 + beta R1 S = C S k^2 / alpha:
    R1 = ( -(C + beta S)/(beta k^2) + sqrt((C + beta S)^2/(beta^2 k^4) + 4 C S/(beta alpha)) ) / 2.
    With ``branches`` = N (Sec. 2.4) the core has R1 R2 k^2 / N parameters (Eq. 20): k^2 becomes k^2 / N in
    the core term only, R1 = ( -N (C + beta S)/(beta k^2) + sqrt(N^2 (C + beta S)^2/(beta^2 k^4)
    + 4 N C S/(beta alpha)) ) / 2 (the total rank r1, not the per-branch r1 / N).
    """
    c, s, k2, n = float(in_channels), float(out_channels), float(kernel), float(branches)
    b = n * (c + beta * s) / (beta * k2)
    return (-b + math.sqrt(b * b + 4.0 * n * c * s / (beta * alpha))) / 2.0


# --- branched Tucker (accelerating_lrd_paper Sec. 2.4, Eqs. 8-20, Fig. 4) -----------------------------------
class BranchedTucker2(NamedTuple):
    """``W ~= sum_j X_j x_0 V_j x_1 U_j`` over N branches (Eq. 17), stored as one grouped convolution.

    ``core`` (r2, r1 / N, kh, kw) is the weight of a ``groups=N`` conv r1 -> r2: rows ``j R2 .. (j+1) R2 - 1``
    are branch j's core ``X_j`` (R2 x R1 x kh x kw, R2 = r2 / N, R1 = r1 / N); ``out_factor`` (S, r2) is
    ``[V_1 ... V_N]`` and ``in_factor`` (C, r1) is ``[U_1 ... U_N]`` (branch j: columns j R .. (j+1) R - 1).
    """

    core: torch.Tensor
    out_factor: torch.Tensor
    in_factor: torch.Tensor
    branches: int


def check_branches(ranks: tuple[int, int], branches: int, who: str = "branched Tucker") -> None:
    """ValueError unless ``branches`` is an int >= 1 that divides both ranks (Eqs. 10-11: r = N R)."""
    if not (isinstance(branches, int) and not isinstance(branches, bool) and branches >= 1):
        raise ValueError(f"{who}: branches={branches!r} is invalid: it must be an integer >= 1")
    for name, r in zip(("R2", "R1"), ranks, strict=True):
        if r % branches:
            low, high = (r // branches) * branches, (r // branches + 1) * branches
            nearest = f"{low} or {high}" if low >= branches else f"{high}"
            raise ValueError(
                f"{who}: {name}={r} is invalid: it must be a multiple of branches={branches} "
                f"(Eqs. 10-11), e.g. {nearest}"
            )


def block_diagonal(core: torch.Tensor, branches: int) -> torch.Tensor:
    """The full (r2, r1, kh, kw) core of a grouped core (r2, r1 / N, kh, kw): branch j's block on the diagonal,
    zeros elsewhere (the core a vanilla Tucker layer would hold; Fig. 4, the two equivalent architectures)."""
    r2, r1_branch = core.shape[:2]
    r2_branch = r2 // branches
    full = core.new_zeros((r2, r1_branch * branches, *core.shape[2:]))
    for j in range(branches):
        rows, cols = slice(j * r2_branch, (j + 1) * r2_branch), slice(j * r1_branch, (j + 1) * r1_branch)
        full[rows, cols] = core[rows]
    return full


def grouped_core(full: torch.Tensor, branches: int) -> torch.Tensor:
    """The diagonal blocks of a full (r2, r1, kh, kw) core as a grouped core (r2, r1 / N, kh, kw): Eqs. 12-16
    keep ``X_j``, the j-th group of R2 rows and R1 columns of X, and drop the blocks that mix branches."""
    r2, r1 = full.shape[:2]
    r2_branch, r1_branch = r2 // branches, r1 // branches
    return torch.cat(
        [
            full[j * r2_branch : (j + 1) * r2_branch, j * r1_branch : (j + 1) * r1_branch]
            for j in range(branches)
        ]
    )


def branched_tucker2_to_tensor(t: BranchedTucker2) -> torch.Tensor:
    """Rebuild the dense kernel ``sum_j X_j x V_j x U_j`` (Eq. 17)."""
    full = block_diagonal(t.core, t.branches)
    return torch.einsum("sa,abhw,cb->schw", t.out_factor, full, t.in_factor)


def _branch(core: torch.Tensor, out_f: torch.Tensor, in_f: torch.Tensor) -> torch.Tensor:
    """One branch's kernel ``X_j x_S V_j x_C U_j`` (S, C, kh, kw)."""
    return torch.einsum("sa,abhw,cb->schw", out_f, core, in_f)


def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The leading ``rank`` left singular vectors of ``matrix``."""
    u, _, _ = thin_svd(matrix)
    return u[:, :rank]


def branched_tucker2(
    weight: torch.Tensor,
    ranks: tuple[int, int],
    branches: int,
    n_iter_max: int = 0,
    sweeps: int = 0,
) -> BranchedTucker2:
    """N-branch Tucker-2 of a kernel ``weight`` (S, C, kh, kw) with total ranks ``ranks = (r2, r1)``, both
    multiples of ``branches`` (accelerating_lrd_paper Sec. 2.4).

    1. The Tucker-2 of ``weight`` at (r2, r1) (:func:`tucker2`: HOSVD, plus ``n_iter_max`` HOOI sweeps),
       ``W ~= X x_S V x_C U`` (Eqs. 8-9).
    2. Eqs. 12-17: the factors split into N consecutive groups of columns, ``U_j`` (C x R1) and ``V_j``
       (S x R2) in the order of the singular values (Eq. 12 sums i = (j-1) R2 + 1 .. j R2), and the core
       into its diagonal blocks ``X_j`` (R2 x R1 x k^2). The paper writes the split as an identity; it is
       one only for a block-diagonal X: the blocks of X that pair branch j's input factors with branch
       i != j's output factors are dropped. As U and V are orthonormal and X is the projection of W,
       ``||W - W_branched||^2 = ||W - W_tucker||^2 + ||X_offdiag||^2`` (what the tests check by hand).
    3. ``sweeps`` (lrk's addition, not in the paper; 0 = the paper's split alone): block-coordinate
       refinement of the block-term model ``W ~= sum_j X_j x V_j x U_j`` (Eq. 17). For each branch j in
       turn, with the residual ``E_j = W - sum_{i != j} branch_i``: ``U_j`` <- the leading R1 left singular
       vectors of ``E_j x_S V_j^T`` unfolded along C, ``V_j`` <- the leading R2 of ``E_j x_C U_j^T``
       unfolded along S, ``X_j = E_j x_S V_j^T x_C U_j^T`` (one HOOI step on the residual). Each update is
       optimal for its variables with the others fixed, so the error never increases; the branches' factors
       stop being mutually orthogonal (they need not be: each branch is its own Tucker-2).

    Computed in float64, returned in ``weight``'s dtype. ``branches=1`` is :func:`tucker2` exactly (for
    ``sweeps=0``).
    """
    check_branches(ranks, branches)
    if not (isinstance(sweeps, int) and sweeps >= 0):
        raise ValueError(f"branched Tucker: sweeps={sweeps!r} is invalid: it must be an integer >= 0")
    w = weight.detach().double()
    joint = tucker2(w, ranks, n_iter_max=n_iter_max)
    core, out_f, in_f = joint.core, joint.out_factor, joint.in_factor
    if branches == 1:
        return BranchedTucker2(core.to(weight.dtype), out_f.to(weight.dtype), in_f.to(weight.dtype), 1)
    r2b, r1b = ranks[0] // branches, ranks[1] // branches
    cores = list(grouped_core(core, branches).split(r2b))
    outs, ins = list(out_f.split(r2b, dim=1)), list(in_f.split(r1b, dim=1))
    if sweeps:
        parts = [_branch(x, v, u) for x, v, u in zip(cores, outs, ins, strict=True)]
        approx = sum(parts)
        for _ in range(sweeps):
            for j in range(branches):
                resid = w - (approx - parts[j])  # E_j
                b = torch.einsum("schw,sa->cahw", resid, outs[j])  # E_j x_S V_j^T
                ins[j] = _leading(b.reshape(b.shape[0], -1), r1b)
                a = torch.einsum("schw,cb->sbhw", resid, ins[j])  # E_j x_C U_j^T
                outs[j] = _leading(a.reshape(a.shape[0], -1), r2b)
                cores[j] = torch.einsum("sbhw,sa->abhw", a, outs[j])  # X_j
                new = _branch(cores[j], outs[j], ins[j])
                approx, parts[j] = approx - parts[j] + new, new
    dtype = weight.dtype
    return BranchedTucker2(
        torch.cat(cores).to(dtype),
        torch.cat(outs, dim=1).to(dtype),
        torch.cat(ins, dim=1).to(dtype),
        branches,
    )


def branched_core_params(ranks: tuple[int, int], kernel: int, branches: int) -> int:
    """Parameters of the grouped core, Eqs. 18-19: ``N x (R1 x R2 x k^2)`` with R = r / N; equal to
    Eq. 20's ``(r1 x r2 x k^2) / N`` (``kernel`` = kh kw, 9 in the paper)."""
    r2, r1 = ranks
    return branches * ((r1 // branches) * (r2 // branches) * kernel)


def branched_tucker2_params(
    out_channels: int,
    in_channels: int,
    kernel: int,
    ranks: tuple[int, int],
    branches: int,
    bias: bool = False,
) -> int:
    """Parameters of the branched layer: C r1 + (r1 r2 k / N) + r2 S (+ S for a bias): :func:`tucker2_params`
    with the core of Eqs. 18-20 (``kernel`` = kh kw; ranks = (r2, r1), totals, multiples of N)."""
    r2, r1 = ranks
    return (
        in_channels * r1
        + branched_core_params(ranks, kernel, branches)
        + r2 * out_channels
        + (out_channels if bias else 0)
    )
