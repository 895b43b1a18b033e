"""Principal subspaces of token features, batched over leading axes (seeds/vit_nla_slides.txt, "Used methods.
PCA": X_reduced = X W, W holding the principal components as its columns).

For rows x_1..x_n of X ([..., n, d]) the principal basis of rank r is the top-r eigenvectors of the second
moment M = sum_i x_i x_i^T = X^T X ([..., d, d]); with ``center=True`` the rows lose their mean first (M is then
n times the covariance: classic PCA). The retained *energy* of rank r is sum_{i<=r} lambda_i / sum_i lambda_i
(lambda: eigenvalues of M, = squared singular values of X), the quantity of SDRM's energy rule (seeds/sdrm_paper.txt,
Eqs. 2-3; :func:`lrk.linalg.rank.energy_rank`).

Two solvers for :func:`principal_basis`:

- ``eigh`` (default): the exact, deterministic batched ``torch.linalg.eigh`` of the d x d moment. One pass over
  X (the moment product) plus one small eigen-decomposition per leading index.
- ``lowrank``: ``torch.pca_lowrank`` (randomized range finder, ``niter`` power iterations, q = rank + oversample
  columns). It draws from torch's global random generator (so a forward that uses it changes the RNG stream and is
  not a deterministic function of its input) and its subspace is approximate when q < d.

Measured on the development machine (2 shared CPU cores, one thread, float32, torch 2.14; x = [64, 4, 130, 16],
i.e. 64 images x 4 heads x (65 queries + 65 keys) x d_k = 16; median of 12-20 calls): rank 8, ``eigh`` 3.2-4.9 ms,
``lowrank`` (niter=2, oversample=4: q = 12) 14-18 ms; rank 4, 3.3 ms vs 9.3 ms. The moment product alone takes
0.3 ms. On a flat spectrum ``lowrank`` kept up to 2 % (mean 0.4 %) less energy than the exact optimum at rank 8;
at d_k = 64 (x = [64, 6, 130, 64], rank 32) ``eigh`` took 62 ms and ``lowrank`` 153 ms. ``eigh`` is therefore
the default: exact, deterministic, and 3-4x faster at head sizes (a d_k x d_k eigh is tiny; the randomized finder
pays for its QR steps and extra passes over X). No GPU timing was taken.
"""

from __future__ import annotations

import torch

from lrk.linalg.rank import energy_rank
from lrk.linalg.tsvd import small_lapack_threads

PCA_SOLVERS = ("eigh", "lowrank")
DEFAULT_PCA_SOLVER = "eigh"


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs (eigh and the randomized finder need at least single precision)."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def second_moment(x: torch.Tensor, center: bool = False) -> torch.Tensor:
    """M = X^T X over the rows (axis -2) of ``x`` ([..., n, d] -> [..., d, d]); ``center``: the rows minus their
    mean (over axis -2) first, so M = n Cov(X). Computed in float32 or better."""
    if x.dim() < 2:
        raise ValueError(f"x of shape {tuple(x.shape)} is invalid: it must be [..., n, d]")
    x = x.to(_work_dtype(x))
    if center:
        x = x - x.mean(dim=-2, keepdim=True)
    return x.mT @ x


def moment_spectrum(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0: a second moment is positive semi-definite) and eigenvectors (the
    matching columns) of the symmetric ``moment`` ([..., d, d]), by batched ``torch.linalg.eigh``."""
    with small_lapack_threads(moment.device):
        evals, evecs = torch.linalg.eigh(moment)
    return evals.flip(-1).clamp_min(0.0), evecs.flip(-1)


def principal_basis(
    x: torch.Tensor,
    rank: int,
    center: bool = False,
    method: str = DEFAULT_PCA_SOLVER,
    niter: int = 2,
    oversample: int = 4,
) -> torch.Tensor:
    """Orthonormal basis ([..., d, rank]) of the top-``rank`` principal subspace of the rows of ``x``
    ([..., n, d]), batched over the leading axes (slides "Used methods. PCA": the columns of W).

    ``center=False``: the subspace of the uncentred second moment X^T X (the one that keeps raw inner products
    x_i . x_j best); ``center=True``: of the covariance (classic PCA). ``method``: ``eigh`` (exact) or
    ``lowrank`` (``torch.pca_lowrank`` with q = min(rank + oversample, n, d) and ``niter`` power iterations;
    when q < rank, i.e. fewer rows than the rank, ``eigh`` runs instead). Columns are ordered by decreasing
    variance. Returned in float32 or float64 (the caller casts). No gradient flows through the result's
    computation when called under ``torch.no_grad``; the caller decides.
    """
    d = x.shape[-1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
        raise ValueError(
            f"rank={rank!r} is invalid: it must be an integer in [1, {d}] (the feature dimension)"
        )
    if method not in PCA_SOLVERS:
        raise ValueError(f"method={method!r} is invalid: it must be one of {', '.join(PCA_SOLVERS)}")
    if method == "lowrank":
        q = min(rank + oversample, x.shape[-2], d)
        if q >= rank:
            with small_lapack_threads(x.device):
                _, _, V = torch.pca_lowrank(x.to(_work_dtype(x)), q=q, center=center, niter=niter)
            return V[..., :rank]
    _, evecs = moment_spectrum(second_moment(x, center))
    return evecs[..., :rank]


def retained_energy(eigenvalues: torch.Tensor, rank: int) -> torch.Tensor:
    """sum_{i<=rank} lambda_i / sum_i lambda_i along the last axis of descending ``eigenvalues`` ([..., d] ->
    [...]); 1 where the total is 0 (nothing to lose)."""
    ev = eigenvalues.clamp_min(0.0)
    total = ev.sum(-1)
    kept = ev[..., :rank].sum(-1)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(ev.dtype).tiny), torch.ones_like(total))


def energy_rank_of_moment(eigenvalues: torch.Tensor, energy: float) -> int:
    """Smallest r keeping ``energy`` (phi in (0, 1]) of a second moment's energy: SDRM's rule (Eqs. 2-3) on the
    singular values sqrt(lambda) of X, for one descending eigenvalue vector ``eigenvalues`` ([d])."""
    return energy_rank(eigenvalues.clamp_min(0.0).sqrt(), energy)
