"""Tensor-Train matrices (TT-matrix / MPO; tensor_methods_lecture "Tensor Train", Oseledets' TT-SVD).

A weight ``W in R^{out x in}`` with ``out = o_1 ... o_d`` and ``in = i_1 ... i_d`` is read as the tensor
``W[(o_1..o_d), (i_1..i_d)]`` (row-major) and stored as cores ``G_k in R^{r_(k-1) x o_k x i_k x r_k}``,
r_0 = r_d = 1, with ``W[o, i] = G_1[:, o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_d[:, o_d, i_d, :]``.
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix

from lrk.linalg.svd import singular_values, tensorly_svd


def _prod(values) -> int:
    return math.prod(int(v) for v in values)


@cache
def _factorizations(n: int, parts: int, smallest: int) -> list[tuple[int, ...]]:
    """All non-decreasing tuples of ``parts`` integers >= ``smallest`` whose product is ``n``."""
    if parts == 1:
        return [(n,)] if n >= smallest else []
    out = []
    for f in range(max(smallest, 1), math.isqrt(n) + 1 if parts == 2 else n + 1):
        if n % f:
            continue
        if f**parts > n:
            break
        out.extend((f, *rest) for rest in _factorizations(n // f, parts - 1, f))
    return out


def balanced_factors(n: int, parts: int) -> tuple[int, ...]:
    """The factorization of ``n`` into ``parts`` integers that is most balanced (smallest spread of
    log-factors), in descending order, e.g. 384 -> (8, 8, 6), 1536 -> (12, 16, 8) sorted (16, 12, 8).
    Factors of 1 appear when ``n`` has too few prime factors (e.g. 10 into 3 parts -> (5, 2, 1))."""
    if n < 1 or parts < 1:
        raise ValueError(f"cannot factor n={n} into parts={parts}")
    candidates = _factorizations(n, parts, 1)
    target = math.log(n) / parts
    best = min(candidates, key=lambda fs: sum((math.log(f) - target) ** 2 for f in fs))
    return tuple(sorted(best, reverse=True))


def tt_max_ranks(out_factors: tuple[int, ...], in_factors: tuple[int, ...]) -> list[int]:
    """Largest useful rank of each of the d-1 bonds: min(prod_{j<=k} o_j i_j, prod_{j>k} o_j i_j)."""
    sizes = [o * i for o, i in zip(out_factors, in_factors, strict=True)]
    return [min(_prod(sizes[: k + 1]), _prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def _interleaved(matrix: torch.Tensor, out_factors, in_factors) -> torch.Tensor:
    """W (out, in) -> tensor of shape (o_1 i_1, o_2 i_2, ..., o_d i_d)."""
    d = len(out_factors)
    t = matrix.reshape(*out_factors, *in_factors)
    perm = [j for k in range(d) for j in (k, d + k)]
    return t.permute(perm).reshape([o * i for o, i in zip(out_factors, in_factors, strict=True)])


def tt_bond_spectra(matrix: torch.Tensor, out_factors, in_factors) -> list[torch.Tensor]:
    """Singular values (float64, descending) of the k-th TT unfolding, k = 1..d-1.

    TT-SVD's error obeys ||W - W_TT||^2 <= sum_k (discarded energy of unfolding k) (Oseledets 2011,
    Thm 2.2), so the energy rule applied per unfolding bounds the total error.
    """
    t = _interleaved(matrix.detach().double(), out_factors, in_factors)
    sizes = t.shape
    return [
        singular_values(t.reshape(_prod(sizes[: k + 1]), _prod(sizes[k + 1 :])))
        for k in range(len(sizes) - 1)
    ]


def tt_matrix(matrix: torch.Tensor, out_factors, in_factors, ranks: list[int]) -> list[torch.Tensor]:
    """TT-SVD of ``matrix`` into cores (r_(k-1), o_k, i_k, r_k) with bond ranks ``ranks`` (d-1 values),
    by TensorLy ``tensor_train_matrix`` in float64; returned in ``matrix``'s dtype."""
    out_factors, in_factors = tuple(out_factors), tuple(in_factors)
    if _prod(out_factors) != matrix.shape[0] or _prod(in_factors) != matrix.shape[1]:
        raise ValueError(
            f"factors {out_factors} x {in_factors} do not multiply to the matrix shape {tuple(matrix.shape)}"
        )
    limits = tt_max_ranks(out_factors, in_factors)
    if len(ranks) != len(limits) or any(not 1 <= r <= m for r, m in zip(ranks, limits, strict=True)):
        raise ValueError(
            f"TT ranks {list(ranks)} are invalid: there are {len(limits)} bonds with maxima {limits}"
        )
    t = matrix.detach().double().reshape(*out_factors, *in_factors)
    with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cores = tensor_train_matrix(t, rank=[1, *ranks, 1], svd=tensorly_svd).factors
    return [c.to(matrix.dtype).contiguous() for c in cores]


def tt_to_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """Rebuild the dense (out, in) matrix from TT-matrix cores."""
    result = cores[0]  # (1, O, I, r)
    for core in cores[1:]:
        r0, o_acc, i_acc, _ = result.shape
        _, o, i, r = core.shape
        result = torch.einsum("aOIr,rois->aOoIis", result, core).reshape(r0, o_acc * o, i_acc * i, r)
    return result[0, :, :, 0]


def tt_matvec(cores: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for the TT-matrix W without forming W: x (N, in) -> (N, out).

    Sweeps the cores left to right; the state is (N * o_1..o_(k-1), r_(k-1), i_k, i_(k+1)..i_d).
    Cost sum_k N (prod_{j<k} o_j) r_(k-1) o_k i_k r_k (prod_{j>k} i_j) multiply-adds.
    """
    n = x.shape[0]
    rest = x.shape[1]
    state = x.reshape(n, 1, rest)  # (N*, r_(k-1), i_k..i_d)
    for core in cores:
        r0, _, i, r1 = core.shape
        rest //= i
        state = state.reshape(state.shape[0], r0, i, rest)
        state = torch.einsum("nais,aoib->nobs", state, core)  # (N*, o_k, r_k, rest)
        state = state.reshape(-1, r1, rest)
    return state.reshape(n, -1)


def tt_params(out_factors, in_factors, ranks: list[int]) -> int:
    """Parameters of the cores: sum_k r_(k-1) o_k i_k r_k."""
    full = [1, *ranks, 1]
    return sum(
        full[k] * o * i * full[k + 1] for k, (o, i) in enumerate(zip(out_factors, in_factors, strict=True))
    )
