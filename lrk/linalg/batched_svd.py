"""Per-matrix truncated SVD of a batch of small matrices through their Gram matrices (pure torch).

Used by ``decomp=attn_svd`` (seeds/vit_nla_slides.txt, "Used methods. SVD": TransformerBlockSVD "applies SVD to
the attention output, retaining only the top singular values and vectors for a low-rank approximation"): every
image's attention output O_i (T x D) is replaced by its best rank-r approximation O_i V_r V_r^T (Eckart-Young),
for each image on its own, in every forward. A full ``torch.linalg.svd`` per step is what the slides' code runs;
this module computes only what the truncation needs.

The route of :func:`batched_truncation` (x of shape [B, m, n], k = min(m, n)):

1. G = x^T x ([B, n, n], "right" side) when n <= m, else G = x x^T ([B, m, m], "left" side): the smaller Gram
   matrix, one batched matmul (B m n k flops).
2. ``torch.linalg.eigh(G)``, batched: lambda_i = s_i^2 and the singular vectors of the smaller side, V (right)
   or U (left); ~4 k^3 flops per matrix (tridiagonalisation, divide and conquer, back-transformation).
3. Ranks per matrix: a fixed ``rank``, or the energy rule (SDRM paper, Eqs. 2-3: the smallest r with
   sum_{i<=r} s_i^2 >= phi sum_i s_i^2; :func:`energy_ranks`, the arithmetic of :func:`lrk.linalg.rank.energy_rank`)
   on all matrices at once. Variable ranks stay batched: the basis is cut to the batch's largest rank r_max and
   column i of matrix b is zeroed by a mask when i >= r_b.
4. The projection, 2 B m n r_max flops: (x V_r) V_r^T on the right side; U_r (U_r^T x) on the left side, which is
   the same matrix (U_r U_r^T x = x V_r V_r^T) without forming V_r. Its backward is that of x V_r V_r^T with V_r
   constant (:class:`_LeftProjection`), so both sides have the same gradient convention.

Cost: B (m n k + 4 k^3 + 2 m n r_max) flops, against a batched ``torch.linalg.svd`` (bidiagonalisation of every
m x n matrix and all singular vectors). :func:`right_projector` (the projector builder: V_r itself, orthonormalised
by a thin QR of x^T U_r on the left side) adds B (m n r_max + 2 n r_max^2).

Measured on the shared 2-core CPU, one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), float32
N(0, 1) inputs, median of 9 calls, two runs (torch 2.14.1): :func:`batched_truncation` (spectrum, ranks and
projection) against ``torch.linalg.svd(x, full_matrices=False)`` alone (no projection):

    shape           torch.linalg.svd  rank = k/2           energy = 0.9         precision="float64", rank = k/2
    [64, 65, 192]   36-41 ms          16-19 ms (0.44-0.45)  16-20 ms (0.45-0.48)  23-29 ms (0.63-0.69)
    [32, 197, 384]  186-194 ms        87-93 ms (0.47-0.48)  96-98 ms (0.51)       139-148 ms (0.72-0.79)

The batched eigh is most of it (the Gram product + eigh alone: 0.33-0.36 of the SVD).

Precision (``precision``, default "auto"): the Gram matrix squares the condition number, so in float32 it cannot
resolve singular values below ~sqrt(eps) s_1 (3e-4 s_1), and the projection's error grows as the cut s_r
approaches that (measured, relative to ||x||, 10 % gap at the cut: 1e-6 at s_r = 0.1 s_1, 3e-6 at 0.03 s_1,
1e-5 to 4e-5 at 0.01 s_1, 5e-4 at 1e-3 s_1). "auto" runs the Gram and the eigh in x's dtype and redoes, in
float64, only the matrices whose cut lies below s_r^2 = RESOLVED_FACTOR * eps * s_1^2 (s_r < 0.035 s_1 in
float32; a phi = 1 energy rule lands there too), so that every projection is within ~5e-6 of the exact one
(2e-7 measured after a redo). "float64" always computes in float64 (the table's last column); "input" never redoes.

Nothing here tracks gradients through the basis: it comes from ``x.detach()``; in :func:`batched_truncation` the
gradient reaches ``x`` through the projection only (g V_r V_r^T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lrk.linalg.tsvd import small_lapack_threads

# the same relative slack as lrk.linalg.rank.energy_rank: phi = 1 never asks for more than all values
_ENERGY_SLACK = 1e-12
# precision="auto": a cut at s_r^2 >= RESOLVED_FACTOR * eps * s_1^2 (s_r >= 0.035 s_1 in float32) is resolved by a
# Gram matrix in x's dtype (projection within ~5e-6 of the exact one, relative to ||x||, even for a 10 % gap at the
# cut); lower cuts are redone in float64
RESOLVED_FACTOR = 1e4
PRECISIONS = ("auto", "float64", "input")


@dataclass
class BatchedSpectrum:
    """Singular values and one side's singular vectors of every matrix of a batch [B, m, n].

    ``values``: [B, k] float64, descending (k = min(m, n)); ``vectors``: [B, n, k] right singular vectors
    (``side == "right"``) or [B, m, k] left ones (``side == "left"``), columns in the order of ``values``.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    side: str


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or min(x.shape[1:]) < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x={shape} is invalid: it must be a 3-D tensor [B, m, n] of non-empty matrices")
    if not x.is_floating_point():
        raise ValueError(f"x.dtype={x.dtype} is invalid: it must be a floating-point tensor")


def check_rule(k: int, rank: int | None, energy: float | None) -> None:
    """Exactly one of ``rank`` (an integer in [1, k]) or ``energy`` (phi in (0, 1]); ValueError otherwise."""
    if (rank is None) == (energy is None):
        raise ValueError(f"rank={rank}, energy={energy} is invalid: give exactly one of rank or energy (phi)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k):
        raise ValueError(f"rank={rank!r} is invalid: it must be an integer in [1, min(m, n)] = [1, {k}]")
    if energy is not None and (
        isinstance(energy, bool)
        or not isinstance(energy, (int, float))
        or not math.isfinite(energy)
        or not 0.0 < energy <= 1.0
    ):
        raise ValueError(f"energy={energy!r} is invalid: it must lie in (0, 1]")


def gram_spectrum(x: torch.Tensor, dtype: torch.dtype | None = None) -> BatchedSpectrum:
    """Singular values and the singular vectors of the smaller side of every matrix of ``x`` ([B, m, n]) from
    a batched ``eigh`` of the smaller Gram matrix (x^T x when n <= m, else x x^T). No gradient.

    The Gram product and the eigh run in ``dtype`` (None: x's dtype, half precisions raised to float32).
    ``values`` are float64; ``vectors`` come back in x's working dtype (float32 for half precisions).
    """
    _check_batch(x)
    with torch.no_grad():
        out_dtype = _working_dtype(x)
        work = x.detach().to(dtype or out_dtype)
        m, n = work.shape[1:]
        side = "right" if n <= m else "left"
        gram = work.transpose(1, 2) @ work if side == "right" else work @ work.transpose(1, 2)
        with small_lapack_threads(x.device):
            evals, evecs = torch.linalg.eigh(gram)  # ascending
        values = evals.double().flip(-1).clamp_min(0.0).sqrt()
        vectors = evecs.flip(-1).to(out_dtype)
    return BatchedSpectrum(values, vectors, side)


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def energy_ranks(values: torch.Tensor, energy: float) -> torch.Tensor:
    """Per row of ``values`` ([B, k], descending): the smallest r with sum_{i<=r} s_i^2 >= phi sum_i s_i^2 (SDRM
    Eqs. 2-3), as a long tensor [B]; a zero row gets 1. Row by row identical to
    :func:`lrk.linalg.rank.energy_rank` (same float64 arithmetic)."""
    squared = values.detach().double() ** 2
    total = squared.sum(-1, keepdim=True)
    cumulative = torch.cumsum(squared, -1) / torch.where(total > 0, total, torch.ones_like(total))
    target = torch.full_like(total, energy) - _ENERGY_SLACK
    ranks = torch.searchsorted(cumulative.contiguous(), target).squeeze(-1) + 1
    ranks = ranks.clamp(max=squared.shape[-1])
    return torch.where(total.squeeze(-1) > 0, ranks, torch.ones_like(ranks))


def retained_energies(values: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """sum_{i<=r_b} s_i^2 / sum_i s_i^2 per row of ``values`` ([B, k]) for ranks [B] (1.0 for a zero row)."""
    squared = values.detach().double() ** 2
    total = squared.sum(-1)
    keep = torch.arange(squared.shape[-1], device=values.device) < ranks.unsqueeze(-1)
    kept = (squared * keep).sum(-1)
    return torch.where(
        total > 0, kept / torch.where(total > 0, total, torch.ones_like(total)), torch.ones_like(total)
    )


def _ranks(values: torch.Tensor, rank: int | None, energy: float | None) -> torch.Tensor:
    if rank is not None:
        return torch.full((values.shape[0],), rank, dtype=torch.long, device=values.device)
    return energy_ranks(values, float(energy))  # type: ignore[arg-type]


def unresolved_cuts(values: torch.Tensor, ranks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose truncation cuts the spectrum where a ``dtype`` Gram matrix cannot resolve it: r_b < k and
    s_{r_b}^2 < RESOLVED_FACTOR * eps(dtype) * s_1^2 (bool [B])."""
    squared = values.double() ** 2
    last_kept = squared.gather(1, (ranks - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    floor = RESOLVED_FACTOR * torch.finfo(dtype).eps * squared[:, 0]
    return (ranks < values.shape[1]) & (last_kept < floor)


def _spectrum_and_ranks(
    x: torch.Tensor, rank: int | None, energy: float | None, precision: str
) -> tuple[BatchedSpectrum, torch.Tensor]:
    """The spectrum of every matrix and its rank, with precision="auto"'s float64 redo of unresolved cuts."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: it must be one of {', '.join(PRECISIONS)}")
    spectrum = gram_spectrum(x, torch.float64 if precision == "float64" else None)
    ranks = _ranks(spectrum.values, rank, energy)
    work = _working_dtype(x)
    if precision == "auto" and work != torch.float64:
        redo = unresolved_cuts(spectrum.values, ranks, work)
        if bool(redo.any()):
            index = redo.nonzero().squeeze(1)
            exact = gram_spectrum(x.index_select(0, index), torch.float64)
            spectrum.values[index] = exact.values
            spectrum.vectors[index] = exact.vectors
            ranks[index] = _ranks(exact.values, rank, energy)
    return spectrum, ranks


def _rank_mask(ranks: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: column i of matrix b is kept when i < r_b."""
    return torch.arange(width, device=ranks.device) < ranks.unsqueeze(-1)


def _floor(values: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """[B, 1]: singular values below eps * max(m, n) * s_1 are numerically zero (numpy's matrix_rank rule)."""
    return values[:, :1] * torch.finfo(dtype).eps * max(shape[1:])


def right_projector(
    x: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projector basis of every matrix of ``x`` ([B, m, n]): ``(basis, ranks, retained_energy)``.

    ``basis`` is [B, n, r_max] (r_max = the batch's largest rank) holding each matrix's leading right singular
    vectors, with the columns beyond its own rank zeroed, so that ``x_b @ basis_b @ basis_b^T`` is the best
    rank-r_b approximation of x_b (Eckart-Young). ``ranks`` [B] (long): ``rank`` for every matrix, or the energy
    rule per matrix. ``retained_energy`` [B] (float64): sum_{i<=r_b} s_i^2 / ||x_b||_F^2. No gradient.
    On the left side (m < n) V_r = the orthonormalised x^T U_r (thin QR; x^T u_i = s_i v_i); numerically zero
    singular values (a rank-deficient x_b) give no direction: their columns are zero.

    ``precision``: "auto" (Gram + eigh in x's dtype; the matrices whose cut lies below what that dtype resolves,
    see :func:`unresolved_cuts`, are redone in float64), "float64" (always), "input" (never redone).
    """
    _check_batch(x)
    check_rule(min(x.shape[1:]), rank, energy)
    spectrum, ranks = _spectrum_and_ranks(x, rank, energy, precision)
    retained = retained_energies(spectrum.values, ranks)
    r_max = int(ranks.max())
    with torch.no_grad():
        basis = spectrum.vectors[..., :r_max]
        keep = _rank_mask(ranks, r_max)
        if spectrum.side == "left":
            basis, upper = torch.linalg.qr(x.detach().to(basis.dtype).transpose(1, 2) @ basis)
            diag = torch.diagonal(upper, dim1=-2, dim2=-1).abs()
            keep &= diag > _floor(spectrum.values, basis.dtype, x.shape).to(diag.dtype)
        basis = basis * keep.unsqueeze(1).to(basis.dtype)
    return basis, ranks, retained


class _LeftProjection(torch.autograd.Function):
    """x -> U U^T x for a constant U (orthonormal columns, masked) with the backward of x -> x V_r V_r^T.

    On the left side (m < n) the truncation U_r U_r^T x equals x V_r V_r^T; the forward takes the first form (U
    comes from the eigh, no V needed). The backward is that of V_r detached: g V_r V_r^T, with
    V_r V_r^T = Z^T diag(1 / ||z_i||^2) Z for Z = U_r^T x = S_r V_r^T (rows z_i = s_i v_i^T); rows of numerically
    zero norm (masked columns, zero singular values) are left out.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, U: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        Z = U.transpose(1, 2) @ x  # [B, r, n]
        norms = (Z * Z).sum(-1)  # [B, r] = s_i^2
        usable = norms > floor.square()
        inverse = torch.where(usable, 1.0 / torch.where(usable, norms, torch.ones_like(norms)), 0.0)
        ctx.save_for_backward(Z, inverse)
        return U @ Z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        Z, inverse = ctx.saved_tensors
        return ((grad @ Z.transpose(1, 2)) * inverse.unsqueeze(1)) @ Z, None, None


def batched_truncation(
    x: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each matrix of ``x`` ([B, m, n]) replaced by its best rank-r approximation x_b V_r V_r^T (Eckart-Young):
    ``(projected, ranks, retained_energy)``, with exactly one of ``rank`` (the same r for every matrix, in
    [1, min(m, n)]) or ``energy`` (phi, per matrix). Matrices never mix: each gets its own basis.

    V_r is a constant (no gradient through the subspace); the gradient reaches ``x`` as g V_r V_r^T. When every
    rank is full (r = min(m, n)), ``x`` itself is returned (the projection is the identity on its row space).
    ``ranks`` [B] long, ``retained_energy`` [B] float64 (sum_{i<=r} s_i^2 / ||x_b||_F^2, from the spectrum).
    ``precision``: see :func:`right_projector`.
    """
    _check_batch(x)
    k = min(x.shape[1:])
    check_rule(k, rank, energy)
    if rank == k:
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return x, torch.full((x.shape[0],), k, dtype=torch.long, device=x.device), ones
    spectrum, ranks = _spectrum_and_ranks(x, rank, energy, precision)
    retained = retained_energies(spectrum.values, ranks)
    if bool((ranks == k).all()):
        return x, ranks, retained
    r_max = int(ranks.max())
    with torch.no_grad():
        basis = spectrum.vectors[..., :r_max]
        basis = (basis * _rank_mask(ranks, r_max).unsqueeze(1).to(basis.dtype)).to(x.dtype)
    if spectrum.side == "right":
        return (x @ basis) @ basis.transpose(1, 2), ranks, retained
    floor = _floor(spectrum.values, _working_dtype(x), x.shape).to(x.dtype)
    return _LeftProjection.apply(x, basis, floor), ranks, retained
