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

from lrk.linalg.svd import singular_values, tensorly_svd


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


def tucker2_rank_eq7(out_channels: int, in_channels: int, kernel: int, alpha: float, beta: float) -> float:
    """Real-valued R1 of accelerating_lrd_paper Eq. 7 for compression ratio ``alpha`` (dense / decomposed)
    with R2 = beta R1; ``kernel`` is k^2 = kh kw.

    Solves C R1 + beta R1^2 k^2 + beta R1 S = C S k^2 / alpha:
    R1 = ( -(C + beta S)/(beta k^2) + sqrt((C + beta S)^2/(beta^2 k^4) + 4 C S/(beta alpha)) ) / 2.
    """
    c, s, k2 = float(in_channels), float(out_channels), float(kernel)
    b = (c + beta * s) / (beta * k2)
    return (-b + math.sqrt(b * b + 4.0 * c * s / (beta * alpha))) / 2.0
