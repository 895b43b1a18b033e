"""Truncated SVD Y ≈ U diag(S) V^T of a matrix, by four solvers (SDRM, seeds/sdrm_paper.txt, section 3.1).

``gram_svd(Y, rank=r)`` or ``gram_svd(Y, energy=phi)`` (likewise ``lowrank_svd``, ``full_svd``) (exactly one of them; phi picks the smallest r
with sum_{i<=r} s_i^2 >= phi * ||Y||_F^2, Eqs. 2-3 via :func:`lrk.linalg.rank.energy_rank`). Solvers:

- ``gram`` (default): eigen-decomposition of the Gram matrix Y^T Y (the route of Theorem 2's proof), then
  U = Y V / S. One pass over Y (the Gram product) plus one thin product; the Gram product and the n x n eigh run in Y's dtype
  (``accumulate="float64"`` forms Y^T Y and its eigh in float64, for ill-conditioned Y).
  S is taken as the column norms of Y V, not as sqrt(eigenvalue), so small singular values do not lose half
  their digits to the squaring. Wide Y (m < n) uses Y Y^T instead.
  ``compute_u=False`` (a caller that needs only V and S, e.g. SDRM, which forms Y V_r itself with the gradient
  attached): tall Y skips the thin product Y V altogether, ``U`` is None and S = sqrt(eigenvalue) (small singular
  values then carry about half the digits: absolute error ~ sqrt(eps) s_1); rank, energy and rel_error come from
  the same eigenvalues as with U (energy = sum_{i<=r} lambda_i / trace(Y^T Y), exact for an SVD). Wide Y needs the
  thin product Y^T U for V anyway, so there only U (free: the eigenvectors) is dropped.
- ``lowrank``: randomized range finder, ``torch.svd_lowrank`` with ``oversample`` extra columns and ``niter``
  power iterations. With ``energy`` the spectrum is unknown in advance: the block q starts at an estimate
  from a row sample of Y and doubles until the computed singular values hold phi of ||Y||_F^2 (exact, from
  one pass); since randomized singular values can only underestimate, the rank it returns keeps at least
  phi of the energy (it may be larger than the exact energy rank by the solver's error).
- ``svd``: ``torch.linalg.svd(Y, full_matrices=False)``, the reference.
- ``adamatrix``: SDRM's gradient iteration (section 3.2, Algorithm 1), see :mod:`lrk.linalg.adamatrix`.

:func:`lrk.linalg.svd_solvers.truncated_svd` picks one of them by name.

Every result reports the relative error ||Y - U diag(S) V^T||_F / ||Y||_F of the returned factors and the
retained energy ||U diag(S) V^T||_F^2 / ||Y||_F^2; :func:`optimal_rank_error` is the Eckart-Young optimum
to compare them with. Bad requests raise ``ValueError`` with one message naming the value and the valid
range (the config layer turns it into ``LrkConfigError``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lrk.linalg.rank import energy_rank

# Dense LAPACK on small matrices (the n x n eigh, thin QR) runs on one thread: on the shared 2-core machine a
# 2-thread MKL eigh of a 192 x 192 matrix took 1 ms at best and 627 ms at worst (OpenMP threads spinning
# against other processes), 1.1-1.4 ms on one thread. Set to None to leave torch's thread count alone.
SMALL_LAPACK_THREADS: int | None = 1


@dataclass
class TruncatedSVD:
    """A rank-r factorisation Y ≈ U diag(S) V^T (U: [m, r], S: [r], V: [n, r]) and how it was obtained."""

    U: torch.Tensor | None  # None when the solver was asked not to form it (gram_svd(..., compute_u=False))
    S: torch.Tensor
    V: torch.Tensor
    rank: int
    energy: float  # explained fraction of ||Y||_F^2: 1 - rel_error^2 (= ||U S V^T||^2 / ||Y||^2 for SVDs)
    rel_error: float  # ||Y - U diag(S) V^T||_F / ||Y||_F
    iterations: int  # solver iterations (0 for the direct solvers, niter for lowrank)
    solver: str
    fell_back: bool = False  # AdaMatrix diverged and the exact gram solver produced this result
    converged: bool = True  # AdaMatrix met its tolerance/target before max_iter

    def reconstruct(self) -> torch.Tensor:
        """U diag(S) V^T (ValueError when U was not formed)."""
        if self.U is None:
            raise ValueError("this TruncatedSVD has no U (compute_u=False): it cannot be reconstructed")
        return (self.U * self.S) @ self.V.T


@contextlib.contextmanager
def small_lapack_threads(device: torch.device) -> Iterator[None]:
    """Run small dense LAPACK calls on ``SMALL_LAPACK_THREADS`` threads (CPU only); see the note above."""
    if SMALL_LAPACK_THREADS is None or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(SMALL_LAPACK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def optimal_rank_error(singular_values: torch.Tensor, rank: int) -> float:
    """Eckart-Young optimum of the rank-r relative error: sqrt(sum_{i>r} s_i^2) / ||Y||_F, from the full spectrum."""
    squared = singular_values.detach().double().flatten() ** 2
    total = squared.sum()
    if total <= 0:
        return 0.0
    return math.sqrt(max(float(squared[rank:].sum() / total), 0.0))


def check_request(shape: tuple[int, ...], rank: int | None, energy: float | None) -> None:
    """Validate a truncation request for a matrix of ``shape``: exactly one of rank in [1, min(m, n)] or
    energy in (0, 1]. Raises ValueError naming the bad value and the valid range."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"Y of shape {tuple(shape)} is invalid: it must be a non-empty 2-D matrix (m, n)")
    if (rank is None) == (energy is None):
        raise ValueError(
            f"rank={rank}, energy={energy} is invalid: give exactly one of rank (an integer) or energy (phi)"
        )
    limit = min(shape)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit):
        raise ValueError(
            f"rank={rank!r} is invalid: it must be an integer in [1, min(m, n)] = [1, {limit}] "
            f"for Y of shape {tuple(shape)}"
        )
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0
    ):
        raise ValueError(f"energy={energy!r} is invalid: it must lie in (0, 1]")


def squared_norm(Y: torch.Tensor) -> float:
    """||Y||_F^2 accurately and in one pass: norms along the shorter side, summed in float64. (A float32
    ``vector_norm`` of a whole 200704 x 768 matrix was 3.8 % off on this machine; float64 took 4 s.)"""
    dim = 1 if Y.shape[0] >= Y.shape[1] else 0
    return float((torch.linalg.vector_norm(Y, dim=dim).double() ** 2).sum())


def _check_matrix(Y: torch.Tensor) -> torch.Tensor:
    if not isinstance(Y, torch.Tensor) or Y.dim() != 2:
        shape = tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__
        raise ValueError(f"Y={shape} is invalid: it must be a 2-D torch.Tensor (m, n)")
    if not Y.is_floating_point():
        raise ValueError(f"Y.dtype={Y.dtype} is invalid: it must be a floating-point tensor")
    return Y.float() if Y.dtype in (torch.float16, torch.bfloat16) else Y


def _non_finite(what: str) -> ValueError:
    return ValueError(f"{what} is not finite: Y contains NaN or inf (or overflows its dtype)")


def complete_orthonormal(U: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """Replace the columns of U where ``good`` is False by an orthonormal completion of the good columns
    (used for zero singular values, whose singular vectors are arbitrary)."""
    if bool(good.all()):
        return U
    m, r = U.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    fill = torch.randn(m, r, generator=gen, dtype=torch.float64).to(U.device)
    basis = torch.cat([U[:, good].double(), fill[:, ~good]], dim=1)
    with small_lapack_threads(U.device):
        Q, R = torch.linalg.qr(basis)
    Q = Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)
    out = U.clone()
    out[:, ~good] = Q[:, int(good.sum()) :].to(U.dtype)
    return out


def _finish(
    U: torch.Tensor | None,
    S: torch.Tensor,
    V: torch.Tensor,
    total: float,
    solver: str,
    iterations: int = 0,
    kept: float | None = None,
) -> TruncatedSVD:
    """Package factors whose U, V are orthonormal and S = diag(U^T Y V) (a projection of Y): then
    ||Y - U S V^T||^2 = ||Y||^2 - ||S||^2 exactly. ``kept``: ||S||^2 when the caller has it more exactly than S
    (the float64 eigenvalues of gram_svd without U)."""
    if kept is None:
        kept = float((S.double() ** 2).sum())
    energy = min(kept / total, 1.0) if total > 0 else 1.0
    rel_error = math.sqrt(max(1.0 - energy, 0.0))
    return TruncatedSVD(U, S, V, int(S.numel()), energy, rel_error, iterations, solver)


def gram_svd(
    Y: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    accumulate: str = "input",
    compute_u: bool = True,
) -> TruncatedSVD:
    """Truncated SVD through eigh of the Gram matrix (SDRM Theorem 2's direct route): Y^T Y = V Λ V^T,
    S_i = ||Y v_i||, U = Y V / S; wide Y uses Y Y^T. ``accumulate``: "input" (Y's dtype) or "float64".

    ``compute_u=False``: V and S only (``U`` is None). Tall Y then forms no m x r product at all: S = sqrt(Λ_r)
    and the energy sum_{i<=r} Λ_i / trace(Y^T Y) come from the eigenvalues (the module docstring says what
    precision S keeps); the rank and V are those that ``compute_u=True`` returns."""
    Y = _check_matrix(Y)
    check_request(tuple(Y.shape), rank, energy)
    if accumulate not in ("input", "float64"):
        raise ValueError(f"accumulate={accumulate!r} is invalid: it must be 'input' or 'float64'")
    if not isinstance(compute_u, bool):
        raise ValueError(f"compute_u={compute_u!r} is invalid: it must be True or False")
    if Y.shape[0] < Y.shape[1]:  # V = the U of Y^T, which needs its thin product; our U is then free
        t = gram_svd(Y.T, rank, energy, accumulate)
        return TruncatedSVD(t.V if compute_u else None, t.S, t.U, t.rank, t.energy, t.rel_error, 0, "gram")
    Yc = Y.double() if accumulate == "float64" else Y
    G = Yc.T @ Yc
    total = float(torch.diagonal(G).double().sum())
    if not math.isfinite(total):
        raise _non_finite("||Y||_F^2")
    # eigh in G's own precision: a float32 G carries float32 rounding already, and float32 eigh of a
    # 192 x 192 matrix is ~2x faster than float64 (0.4 of the Gram product itself at 12608 x 192)
    with small_lapack_threads(Y.device):
        evals, evecs = torch.linalg.eigh(G)
    evals = evals.double().flip(0).clamp_min(0.0)
    r = rank if rank is not None else energy_rank(evals.sqrt(), energy)
    V = evecs[:, evecs.shape[1] - r :].flip(1).to(Y.dtype)  # the leading r eigenvectors, descending
    if not compute_u:
        kept = evals[:r]
        return _finish(None, kept.sqrt().to(Y.dtype), V, total, "gram", kept=float(kept.sum()))
    Z = Y @ V
    S = torch.linalg.vector_norm(Z, dim=0)
    # (numerically) zero singular values carry no direction: complete U orthonormally there. The rounding of
    # ||Y v|| is ~ eps * s_1 * sqrt(m); a floor of eps * s_1 * max(m, n) (numpy's matrix_rank rule) zeroed real
    # values below 0.024 s_1 of a float32 200704 x 768 matrix
    floor = math.sqrt(float(evals[0])) * torch.finfo(Y.dtype).eps * math.sqrt(max(Y.shape))
    good = S.gt(floor)
    U = Z / torch.where(good, S, torch.ones_like(S))
    U = complete_orthonormal(U, good)
    S = torch.where(good, S, torch.zeros_like(S))
    return _finish(U, S, V, total, "gram")


def full_svd(Y: torch.Tensor, rank: int | None = None, energy: float | None = None) -> TruncatedSVD:
    """Truncation of ``torch.linalg.svd(Y, full_matrices=False)`` (the reference solver)."""
    Y = _check_matrix(Y)
    check_request(tuple(Y.shape), rank, energy)
    if not math.isfinite(squared_norm(Y)):
        raise _non_finite("||Y||_F^2")
    U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    total = float((S.double() ** 2).sum())
    r = rank if rank is not None else energy_rank(S, energy)
    return _finish(U[:, :r], S[:r], Vh[:r].T, total, "svd")


def sample_spectrum(Y: torch.Tensor, rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Right singular vectors and values estimated from ``rows`` uniformly sampled rows of tall Y, scaled to
    the whole matrix (a cheap spectral sketch). Returns (s [n], V [n, n]) with s descending."""
    m = Y.shape[0]
    if rows >= m:
        sample, scale = Y, 1.0
    else:
        idx = torch.randperm(m, generator=generator, device="cpu")[:rows].to(Y.device)
        sample, scale = Y.index_select(0, idx), m / rows
    G = (sample.T @ sample).double() * scale
    with small_lapack_threads(Y.device):
        evals, evecs = torch.linalg.eigh(G)
    return evals.flip(0).clamp_min(0.0).sqrt(), evecs.flip(1)


def lowrank_svd(
    Y: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    oversample: int = 10,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> TruncatedSVD:
    """Randomized truncated SVD (``torch.svd_lowrank`` with q = r + oversample, ``niter`` power iterations).

    With ``energy`` the block starts at the energy rank of a row-sample spectrum (+ oversample) and doubles
    until the computed values hold phi of ||Y||_F^2. ``generator`` makes the sketch reproducible (the global
    RNG that svd_lowrank draws from is seeded from it inside ``fork_rng``, so the caller's RNG is untouched).
    """
    Y = _check_matrix(Y)
    check_request(tuple(Y.shape), rank, energy)
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample={oversample!r} is invalid: it must be a non-negative integer")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter={niter!r} is invalid: it must be a non-negative integer")
    limit = min(Y.shape)
    total = squared_norm(Y)
    if not math.isfinite(total):
        raise _non_finite("||Y||_F^2")
    if rank is not None:
        q = rank
    else:
        tall = Y if Y.shape[0] >= Y.shape[1] else Y.T
        s_est, _ = sample_spectrum(tall, max(4 * tall.shape[1], 256), generator)
        q = energy_rank(s_est, energy)
    seed = None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
    while True:
        k = min(q + oversample, limit)
        with torch.random.fork_rng(devices=[Y.device] if Y.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(Y, q=k, niter=niter)
        if rank is not None:
            r = rank
            break
        cum = torch.cumsum(S.double() ** 2, 0)
        if cum[-1] >= energy * total * (1 - 1e-12) or k == limit:
            hits = torch.nonzero(cum >= energy * total * (1 - 1e-12))
            r = int(hits[0]) + 1 if hits.numel() else k
            break
        q = min(2 * q, limit)
    return _finish(U[:, :r], S[:r], V[:, :r], total, "lowrank", iterations=niter)


@dataclass
class HeadTruncatedSVD:
    """Per-head rank-r_h right factors of a batch of matrices Y_h ([H, m, n]), zero-padded to the largest rank.

    ``V``: [H, n, r_max], column i of head h zero for i >= r_h (so ``Y_h V_h`` and everything built from it carry
    exactly the rank-r_h factors); ``S``: [H, r_max] (zero beyond r_h); ``ranks``, ``energies``, ``rel_errors``:
    per head, on the host."""

    V: torch.Tensor
    S: torch.Tensor
    ranks: list[int]
    energies: list[float]
    rel_errors: list[float]


def head_gram_svd(Y: torch.Tensor, rank: int | None = None, energy: float | None = None) -> HeadTruncatedSVD:
    """Truncated SVD of every Y_h of ``Y`` ([H, m, n], m >= n) through its Gram matrix, batched: one batched
    product Y_h^T Y_h (H m n^2 flops: 1/H of the Gram matrix of the concatenated features when n = d / H), one
    batched eigh of H n x n matrices, then the rank per head (fixed ``rank``, or the energy rule of Eqs. 2-3 on
    each head's own spectrum). V and S only, as :func:`gram_svd` with ``compute_u=False``; S = sqrt(eigenvalue).
    SDRM with ``head_split=input`` (Section 3.2: X divided into X_i in R^{b x t x d/h}, one t-SVD per head)."""
    if not isinstance(Y, torch.Tensor) or Y.dim() != 3 or not Y.is_floating_point():
        shape = tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__
        raise ValueError(f"Y={shape} is invalid: it must be a 3-D floating-point torch.Tensor (H, m, n)")
    heads, m, n = Y.shape
    if m < n:
        raise ValueError(f"Y of shape {tuple(Y.shape)} is invalid: head_gram_svd needs m >= n (tall Y_h)")
    check_request((m, n), rank, energy)
    Y = Y.float() if Y.dtype in (torch.float16, torch.bfloat16) else Y
    G = Y.transpose(1, 2) @ Y
    totals = torch.diagonal(G, dim1=1, dim2=2).double().sum(-1)
    if not bool(torch.isfinite(totals).all()):
        raise _non_finite("||Y_h||_F^2")
    with small_lapack_threads(Y.device):
        evals, evecs = torch.linalg.eigh(G)
    evals = evals.double().flip(-1).clamp_min(0.0)  # [H, n], descending
    values = evals.sqrt()
    host = evals.cpu()
    if rank is not None:
        ranks = [rank] * heads
    else:
        ranks = [energy_rank(host[h].sqrt(), energy) for h in range(heads)]  # type: ignore[arg-type]
    sums = host.sum(-1)
    energies = [float(host[h, : ranks[h]].sum() / sums[h]) if sums[h] > 0 else 1.0 for h in range(heads)]
    ranks_t = torch.tensor(ranks, device=Y.device)
    r_max = max(ranks)
    keep = (torch.arange(r_max, device=Y.device) < ranks_t[:, None]).to(Y.dtype)  # [H, r_max]
    V = evecs.flip(-1)[:, :, :r_max] * keep[:, None, :]
    S = values[:, :r_max].to(Y.dtype) * keep
    errors = [math.sqrt(max(1.0 - e, 0.0)) for e in energies]
    return HeadTruncatedSVD(V, S, ranks, energies, errors)
