"""Data-aware truncated SVD: the SVD of a weighted weight matrix, truncated there, then unweighted.

Every method here solves ``min ||L (W - W') R||_F`` over rank-r ``W'`` for fixed invertible weights ``L``
(out x out, diagonal) and ``R`` (in x in): by Eckart-Young on ``W~ = L W R`` the optimum is
``W' = L^{-1} [W~]_r R^{-1}`` (``[.]_r`` the rank-r truncation), returned as two factors ``A`` (out x r) and
``B`` (r x in) with ``W' = A B`` and sqrt(Sigma_r) split onto both, as :func:`lrk.linalg.svd.svd_factors` does.

- :func:`whitened_svd` (SVD-LLM, Wang et al. 2024, "truncation-aware data whitening"): ``R = S`` with
  ``S S^T = C = X X^T / n``, the second moment of the layer's inputs ``X`` (in x n), so that
  ``||(W - W') S||_F^2 = ||(W - W') X||_F^2 / n``: the output error on the calibration data. SVD-LLM takes ``S``
  from a Cholesky factorisation of ``X X^T`` and returns ``W' = U_r Sigma_r V_r^T S^{-1}``; the Cholesky fails
  when the activations are rank-deficient (dead ReLU channels, fewer samples than features, zero-padded
  patches). lrk reads that ``W'`` differently: ``U_r Sigma_r V_r^T = U_r U_r^T W S``, so ``W' = U_r U_r^T W``,
  with ``U_r`` the leading eigenvectors of ``W C W^T`` (out x out, ``eigh``; its eigenvalues are the squared
  singular values of ``W S``). Equal to SVD-LLM's where ``S`` is invertible, defined where it is not, and no
  inverse is formed at all (a ridge of ``eps`` times the mean eigenvalue breaks the ties where the data spans
  fewer than r directions: :class:`Whitening`): it is the Eckart-Young optimum of ``W X`` for every ``C`` (tests/test_weighted_svd.py),
  and cheaper (an out x out eigenproblem instead of an in x in one: 512 against 4608 for ResNet-18's layer4).
  :func:`whitening` gives ``S`` itself, from an eigendecomposition with an eigenvalue floor (eigenvalues below
  ``eps`` times the largest raised to it, so ``S`` is always invertible), for callers that need it.
- :func:`scaled_svd` (ASVD, Yuan et al. 2023, "activation-aware SVD"): ``R = diag(s)`` with
  ``s_j = (mean_k |x_jk|)^alpha`` (their Eq. for the scaling matrix S, alpha = 0.5 by default): columns that
  meet large inputs are kept more precisely.
- :func:`row_weighted_svd` (FWSVD, Hsu et al. 2022, "Fisher-weighted SVD"): ``L = diag(sqrt(I))`` with the row
  importance ``I_i = sum_j sum_d (dLoss_d / dW_ij)^2`` (their Eqs. 4-6, the Fisher information summed over
  a row): rows the loss is sensitive to are kept more precisely.

A :class:`Weighting` holds ``L`` and ``R``; the rank policy's ``energy`` rule applies to the weighted spectrum
(the singular values of ``W~``), which :meth:`Weighting.weigh` gives. Pure maths: float64 inside, results in
``W``'s dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lrk.linalg.svd import SVDFactors, svd_factors, thin_svd

#: default relative floor of :func:`whitening` (eigenvalues), :func:`column_scale` and :func:`row_weight`, and
#: the relative ridge of :class:`Whitening`
DEFAULT_EPS = 1e-6


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(
            f"eps={eps!r} is invalid: it must be a number in (0, 1) (relative to the largest value)"
        )


def floor_relative(values: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``max(v, eps * max(v))`` elementwise (float64); all ones when no value is positive (no information: the
    weighting becomes the identity, i.e. plain SVD)."""
    _check_eps(eps)
    v = values.detach().double()
    top = float(v.max()) if v.numel() else 0.0
    if not (math.isfinite(top) and top > 0):
        return torch.ones_like(v)
    return v.clamp_min(eps * top)


def _symmetric(second_moment: torch.Tensor) -> torch.Tensor:
    """The symmetric part of a (square, float64) second moment; ValueError for NaN or inf entries."""
    if not torch.isfinite(second_moment).all():
        raise ValueError("whitening needs a finite second-moment matrix (it has NaN or inf entries)")
    return (second_moment + second_moment.T) / 2


def whitening(second_moment: torch.Tensor, eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^{-1})`` with ``S S^T = C_eps``, the second moment ``C`` (in x in, symmetric PSD) with its
    eigenvalues floored at ``eps`` times the largest: ``C = Q diag(lambda) Q^T`` (``eigh``),
    ``S = Q diag(sqrt(lambda'))``, ``S^{-1} = diag(1 / sqrt(lambda')) Q^T``.

    Works where ``torch.linalg.cholesky(C)`` raises (rank-deficient ``C``). A zero ``C`` gives ``S = I``.
    """
    _check_eps(eps)
    c = second_moment.detach().double()
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"whitening needs a square second-moment matrix, got shape {tuple(c.shape)}")
    evals, evecs = torch.linalg.eigh(_symmetric(c))
    root = floor_relative(evals, eps).sqrt()
    return evecs * root, evecs.T / root[:, None]


def column_scale(mean_abs: torch.Tensor, alpha: float = 0.5, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """ASVD's column scales ``s_j = mean|x_j| ^ alpha`` (float64), floored at ``eps`` times the largest so that
    a column whose input is always zero (a dead channel) keeps an invertible scale."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha={alpha!r} is invalid: it must be a number >= 0")
    return floor_relative(mean_abs.detach().double().abs() ** float(alpha), eps)


def row_weight(importance: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """FWSVD's row weights ``sqrt(I_i)`` (float64) from the row importances ``I_i`` (sums of squared
    gradients), the importances floored at ``eps`` times the largest first."""
    return floor_relative(importance.detach().double().abs(), eps).sqrt()


USV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def balanced_usv(first: torch.Tensor, second: torch.Tensor) -> USV:
    """``(u, s, vh)`` with ``u[:, :r] sqrt(s[:r])`` and ``sqrt(s[:r]) vh[:r]`` (:func:`lrk.linalg.svd.svd_factors`)
    multiplying to ``first[:, :r] @ second[:r]`` for every r, for ``first`` with orthonormal columns: ``s_i`` is
    the norm of row i of ``second`` (so both factors of a component get the same norm, as the sqrt(Sigma) split
    gives a plain SVD's)."""
    norms = second.norm(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return first, norms, second / safe[:, None]


@dataclass(frozen=True)
class Whitening:
    """SVD-LLM's truncation-aware whitening by the input second moment ``C`` (in x in), as ``W' = U_r U_r^T W``
    (module docstring): no inverse. ``eps``: the ridge ``C + delta I`` with ``delta = eps * trace(C) / in`` (eps
    times the mean eigenvalue), a tie-break where the data says nothing: directions ``C`` does not span cost
    ``delta ||W - W'||^2``, so they are kept as a plain SVD would keep them (a zero ``C`` gives the plain SVD)
    rather than arbitrarily. It changes the optimum by O(eps)."""

    second_moment: torch.Tensor
    eps: float = DEFAULT_EPS

    def decompose(self, matrix: torch.Tensor) -> tuple[USV, torch.Tensor]:
        """``(usv, spectrum)``: factors for :func:`lrk.linalg.svd.svd_factors` (any leading r of them give the
        rank-r minimiser of ``||(W - W') S||_F``, ``S S^T = C + delta I``), and the singular values of ``W S``
        (descending; square roots of eigenvalues of ``W (C + delta I) W^T``, so accurate to about sqrt(machine eps)
        times the largest: their squares, which the energy rule sums, to machine eps)."""
        _check_eps(self.eps)
        w = matrix.detach().double()
        c = self.second_moment.detach().double()
        if c.dim() != 2 or c.shape != (w.shape[1], w.shape[1]):
            raise ValueError(
                f"a second moment of shape {tuple(c.shape)} does not fit a {w.shape[0]} x {w.shape[1]} matrix"
            )
        c = _symmetric(c)
        mean_eig = float(torch.diagonal(c).sum()) / c.shape[0]
        delta = self.eps * mean_eig if mean_eig > 0 else 1.0
        m = w @ c @ w.T + delta * (w @ w.T)
        evals, evecs = torch.linalg.eigh((m + m.T) / 2)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        keep = min(w.shape)  # rank(W S) <= min(out, in)
        u = evecs[:, :keep]
        return balanced_usv(u, u.T @ w), evals[:keep].sqrt()


@dataclass(frozen=True)
class Weighting:
    """``W~ = diag(left) W right`` and back. ``left``: (out,) positive row weights or None (identity);
    ``right``: (in, in), or (in,) for a diagonal, or None; ``right_inv`` its inverse (same form)."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    right_inv: torch.Tensor | None = None

    @classmethod
    def columns(cls, scale: torch.Tensor) -> Weighting:
        """ASVD's column scaling by positive ``scale`` (in,) (:func:`column_scale`)."""
        s = scale.detach().double()
        if (s <= 0).any():
            raise ValueError("column scales must be positive")
        return cls(right=s, right_inv=1.0 / s)

    @classmethod
    def rows(cls, weight: torch.Tensor) -> Weighting:
        """FWSVD's row weighting by positive ``weight`` (out,) (:func:`row_weight`)."""
        w = weight.detach().double()
        if (w <= 0).any():
            raise ValueError("row weights must be positive")
        return cls(left=w)

    def weigh(self, matrix: torch.Tensor) -> torch.Tensor:
        """``diag(left) W right`` in float64."""
        m = matrix.detach().double()
        self._check(m)
        if self.left is not None:
            m = self.left[:, None] * m
        if self.right is not None:
            m = m * self.right if self.right.dim() == 1 else m @ self.right
        return m

    def unweigh(
        self, usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(diag(left)^{-1} U, Sigma, V^T right^{-1})`` from the thin SVD of ``W~``: any leading r columns /
        rows of it multiply (:func:`lrk.linalg.svd.svd_factors`) to the weighted-optimal rank-r ``W'``."""
        u, s, vh = usv
        if self.left is not None:
            u = u / self.left[:, None]
        if self.right_inv is not None:
            vh = vh * self.right_inv if self.right_inv.dim() == 1 else vh @ self.right_inv
        return u, s, vh

    def _check(self, m: torch.Tensor) -> None:
        out_f, in_f = m.shape
        if self.left is not None and self.left.shape != (out_f,):
            raise ValueError(
                f"row weights of shape {tuple(self.left.shape)} do not fit a {out_f} x {in_f} matrix"
            )
        if self.right is not None and self.right.shape[0] != in_f:
            raise ValueError(
                f"column weighting of shape {tuple(self.right.shape)} does not fit a {out_f} x {in_f} matrix"
            )

    def decompose(self, matrix: torch.Tensor) -> tuple[USV, torch.Tensor]:
        """``(usv, spectrum)``: :meth:`unweigh` of the thin SVD of ``W~`` (for :func:`lrk.linalg.svd.svd_factors`)
        and the singular values of ``W~``."""
        usv = thin_svd(self.weigh(matrix))
        return self.unweigh(usv), usv[1]


def weighted_factors(weighting: Weighting | Whitening, matrix: torch.Tensor, rank: int) -> SVDFactors:
    """``A`` (out x r), ``B`` (r x in) with ``A B`` the rank-r minimiser of the weighting's objective, in
    ``matrix``'s dtype; ``singular_values`` is the weighted spectrum."""
    usv, spectrum = weighting.decompose(matrix)
    first, second, _ = svd_factors(matrix, rank, usv)
    return SVDFactors(first, second, spectrum)


def whitened_svd(
    weight: torch.Tensor, second_moment: torch.Tensor, rank: int, eps: float = DEFAULT_EPS
) -> SVDFactors:
    """SVD-LLM: the rank-r ``A B`` minimising ``||(W - A B) S||_F`` with ``S S^T`` the input second moment
    ``C = X X^T / n`` (in x in, any PSD: rank-deficient too) plus the tie-break ridge ``eps`` (:class:`Whitening`),
    i.e. the output error ``||(W - A B) X||_F`` on the calibration data."""
    return weighted_factors(Whitening(second_moment, eps), weight, rank)


def scaled_svd(weight: torch.Tensor, column_scale: torch.Tensor, rank: int) -> SVDFactors:
    """ASVD: the rank-r ``A B`` minimising ``||(W - A B) diag(s)||_F`` for positive column scales ``s`` (in,),
    e.g. :func:`column_scale` of the inputs' mean absolute values."""
    return weighted_factors(Weighting.columns(column_scale), weight, rank)


def row_weighted_svd(weight: torch.Tensor, row_weight: torch.Tensor, rank: int) -> SVDFactors:
    """FWSVD: the rank-r ``A B`` minimising ``||diag(w) (W - A B)||_F`` for positive row weights ``w`` (out,),
    e.g. :func:`row_weight` of the rows' Fisher importances."""
    return weighted_factors(Weighting.rows(row_weight), weight, rank)
