"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares (tensor_methods_lecture, Algorithm 1).

``X ~= [[lambda; A_0, ..., A_{N-1}]] = sum_r lambda_r a_0r o a_1r o ... o a_(N-1)r``.

Why not ``tensorly.decomposition.parafac``: its MTTKRP forms the full Khatri-Rao product of the other
factors, (prod_{m != n} I_m) x R numbers. For a ResNet-18 kernel 512x512x9 at 2x compression (R = 1142)
that is 262144 x 1142 floats (1.2 GB) for the spatial mode, every sweep. Here the MTTKRP contracts one
mode at a time (largest first), so the biggest intermediate is I_n * (prod of the others but one) * R.
TensorLy still provides the SVD initialisation (``initialize_cp``) and the reconstruction
(``cp_to_tensor``) used by the tests.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import tensorly as tl
import torch
from tensorly.cp_tensor import cp_to_tensor as _tl_cp_to_tensor
from tensorly.decomposition._cp import initialize_cp


class CPResult(NamedTuple):
    weights: torch.Tensor  # (R,)
    factors: list[torch.Tensor]  # A_n in R^{I_n x R}
    rel_error: float  # ||X - X_hat||_F / ||X||_F, recomputed from the returned factors
    n_iter: int  # ALS sweeps run


_LETTERS = "abcdefghijklmnopqrstuvwxy"


def mttkrp(tensor: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """``X_(mode) (kr_{m != mode} A_m)`` without forming the Khatri-Rao product.

    The largest other mode is contracted first by a matrix product, the rest one by one while the rank
    index rides along as a batch index ('z').
    """
    ndim = tensor.ndim
    others = sorted((m for m in range(ndim) if m != mode), key=lambda m: -tensor.shape[m])
    first = others[0]
    t = torch.tensordot(tensor, factors[first], dims=([first], [0]))  # remaining modes in order, then R
    idx = [_LETTERS[m] for m in range(ndim) if m != first] + ["z"]
    for m in others[1:]:
        out_idx = [i for i in idx if i != _LETTERS[m]]
        t = torch.einsum(f"{''.join(idx)},{_LETTERS[m]}z->{''.join(out_idx)}", t, factors[m])
        idx = out_idx
    return t  # (I_mode, R)


def _gram_hadamard(grams: list[torch.Tensor], skip: int | None) -> torch.Tensor:
    out = None
    for m, g in enumerate(grams):
        if m == skip:
            continue
        out = g.clone() if out is None else out * g
    return out


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    n_iter_max: int = 25,
    tol: float = 1e-6,
    init: str = "svd",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> CPResult:
    """Rank-``rank`` CP of ``tensor`` by ALS (lecture Algorithm 1) with at most ``n_iter_max`` sweeps.

    ``init='svd'`` takes the leading left singular vectors of each unfolding (columns beyond the
    unfolding's rank are random, seeded); ``'random'`` draws all factors. Stops when the relative error
    changes by less than ``tol`` between sweeps. Factor columns are normalised, their norms kept in
    ``weights``. A tiny ridge (1e-9 of the Gram trace) keeps the normal equations solvable when ``rank``
    exceeds a mode's size.
    """
    if rank < 1:
        raise ValueError(f"CP rank must be a positive integer, got {rank}")
    if init not in ("svd", "random"):
        raise ValueError(f"init={init!r} is invalid: it must be 'svd' or 'random'")
    x = tensor.detach().to(dtype)
    ndim = x.ndim
    with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
        # TensorLy warns when rank exceeds a mode's size; it then pads with random columns, as documented
        warnings.simplefilter("ignore", UserWarning)
        weights, factors = initialize_cp(x, rank, init=init, random_state=seed)
    factors = [f.to(dtype).contiguous() for f in factors]
    for n in range(ndim):
        factors[n] = factors[n] / factors[n].norm(dim=0).clamp_min(1e-30)
    weights = torch.ones(rank, dtype=dtype, device=x.device)
    norm_x2 = float((x * x).sum())
    if norm_x2 == 0:
        return CPResult(
            torch.zeros(rank, dtype=tensor.dtype, device=x.device),
            [f.to(tensor.dtype) for f in factors],
            0.0,
            0,
        )
    grams = [f.T @ f for f in factors]
    eye = torch.eye(rank, dtype=dtype, device=x.device)
    prev_err = None
    n_iter = 0
    for n_iter in range(1, n_iter_max + 1):  # noqa: B007 -- n_iter is read after the loop
        for n in range(ndim):
            m = mttkrp(x, factors, n)
            v = _gram_hadamard(grams, skip=n)
            v = v + (1e-9 * float(v.diagonal().mean()) + 1e-300) * eye  # A_n = M V^-1 below
            chol, info = torch.linalg.cholesky_ex(v)  # V is symmetric positive (semi)definite: n^3/3 flops
            a = torch.cholesky_solve(m.T, chol).T if int(info) == 0 else torch.linalg.lstsq(v, m.T).solution.T
            weights = a.norm(dim=0)
            a = a / weights.clamp_min(1e-30)
            factors[n] = a
            grams[n] = a.T @ a
        # ||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2 with the last mode's MTTKRP
        inner = float((m * (a * weights)).sum())
        norm_hat2 = float(weights @ (_gram_hadamard(grams, skip=None) @ weights))
        err = max(norm_x2 - 2 * inner + norm_hat2, 0.0) ** 0.5 / norm_x2**0.5
        if prev_err is not None and abs(prev_err - err) < tol:
            break
        prev_err = err
    rebuilt = cp_to_tensor(weights, factors)
    rel_error = float((rebuilt - x).norm() / norm_x2**0.5)
    return CPResult(weights.to(tensor.dtype), [f.to(tensor.dtype) for f in factors], rel_error, n_iter)


def cp_to_tensor(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Dense tensor of a CP model (TensorLy ``cp_to_tensor``)."""
    with tl.backend_context("pytorch", local_threadsafe=True):
        return _tl_cp_to_tensor((weights, list(factors)))


def cp_params(dims: tuple[int, ...] | list[int], rank: int) -> int:
    """Parameters of a rank-R CP model without its weights vector: R * sum(I_n)."""
    return rank * sum(dims)


def cp_rank_bound(dims: tuple[int, ...] | list[int]) -> int:
    """An upper bound on the CP rank of any tensor of shape ``dims``: prod(dims) / max(dims) (a tensor is
    the sum of its fibres along the largest mode)."""
    total = 1
    for d in dims:
        total *= d
    return total // max(dims)
