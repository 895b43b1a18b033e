"""Empirical variational Bayesian matrix factorization (EVBMF): the global analytic solution of Nakajima,
Sugiyama, Babacan and Tomioka (2013), "Global analytic solution of fully-observed variational Bayesian matrix
factorization", JMLR 14, and MUSCO's weakening of the EVBMF rank (Gusak et al. 2019; tensor_methods_lecture).

Model: ``V = B A^T + E`` (V is L x M with L <= M; a wider-than-tall V is transposed), Gaussian priors on the
columns of A and B whose variances are estimated (empirical Bayes), i.i.d. Gaussian noise of variance sigma^2.
With alpha = L / M and gamma_h the singular values of V, the paper's EVB theorem gives, per component:

- the **threshold** ``gamma_EVB = sigma sqrt(M (1 + tau_) (1 + alpha / tau_))``, where tau_ is the positive zero
  of ``Psi1(tau) = log(tau + 1) + alpha log(tau / alpha + 1) - tau`` (about 2.5129 sqrt(alpha)); a component
  with gamma_h below it is estimated as zero;
- the **estimator** above it: ``gamma_hat = gamma/2 (1 - (L+M) sigma^2/gamma^2
  + sqrt((1 - (L+M) sigma^2/gamma^2)^2 - 4 L M sigma^4/gamma^4))``;
- the **noise variance**, when unknown: the minimiser of ``Omega(sigma^2) = sum_h psi(gamma_h^2 / (M sigma^2))``
  with ``psi(x) = x - log x + [x > x_] psi1(x)``, ``psi1(x) = log(tau(x) + 1) + alpha log(tau(x)/alpha + 1)
  - tau(x)``, ``tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2`` and
  ``x_ = (1 + tau_)(1 + alpha / tau_)``; the paper bounds it between
  ``max(gamma_{H_+1}^2 / (M x_), sum_{h > H_} gamma_h^2 / (M (L - H_)))`` and ``sum_h gamma_h^2 / (L M)``, with
  ``H_ = ceil(L / (1 + alpha)) - 1`` the largest rank EVB can estimate.

Where lrk reads the paper differently: the equation numbers are not quoted (the paper is not among the seeds; the
formulas above are its theorem's statements); tau_ is solved to machine precision instead of the bound 2.5129
sqrt(alpha); Omega is minimised by a log-spaced grid over the paper's bounds refined by a bounded scalar search
(the objective can have several local minima).

MUSCO's weakening factor w in [0, 1] moves the EVBMF rank back towards the full rank R of the matrix, so that
one compression step does not cut too deep: ``rank = ceil(R - w (R - R_EVBMF))`` (w = 1: the EVBMF rank,
w = 0: no compression), at least 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from lrk.errors import LrkConfigError


@dataclass(frozen=True)
class EVBMFResult:
    """``rank``: number of components above the threshold; ``values``: their EVB estimates (descending);
    ``sigma2``: the noise variance used (estimated or given); ``threshold``: gamma_EVB at that sigma^2;
    ``shape``: (L, M) of the (possibly transposed) matrix, L <= M."""

    rank: int
    values: torch.Tensor
    sigma2: float
    threshold: float
    shape: tuple[int, int]


def tau_lower(alpha: float) -> float:
    """tau_: the positive zero of log(tau + 1) + alpha log(tau / alpha + 1) - tau (alpha = L / M in (0, 1])."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is invalid: it must lie in (0, 1]")

    def psi1(tau: float) -> float:
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    # psi1 > 0 just above 0 (slope 1 + 1 - 1 = 1 at 0) and -> -inf: bracket with sqrt(alpha) and 4 sqrt(alpha)
    return float(brentq(psi1, 1e-6 * math.sqrt(alpha), 10.0 * math.sqrt(alpha) + 10.0, xtol=1e-14))


def evb_threshold(sigma2: float, L: int, M: int) -> float:
    """gamma_EVB = sigma sqrt(M (1 + tau_)(1 + alpha / tau_)) for an L x M matrix (L <= M after transposing)."""
    L, M = sorted((int(L), int(M)))
    alpha = L / M
    t = tau_lower(alpha)
    return math.sqrt(sigma2 * M * (1.0 + t) * (1.0 + alpha / t))


def evb_estimate(gamma: np.ndarray, sigma2: float, L: int, M: int) -> np.ndarray:
    """The EVB estimate of components with singular values ``gamma`` (all above the threshold)."""
    L, M = sorted((int(L), int(M)))
    g2 = np.asarray(gamma, dtype=np.float64) ** 2
    a = 1.0 - (L + M) * sigma2 / g2
    disc = np.maximum(a * a - 4.0 * L * M * sigma2 * sigma2 / (g2 * g2), 0.0)
    return np.sqrt(g2) / 2.0 * (a + np.sqrt(disc))


def _omega(sigma2: float, g2: np.ndarray, L: int, M: int, x_lower: float) -> float:
    """Omega(sigma^2) = sum_h psi(gamma_h^2 / (M sigma^2)) (the EVB free energy in sigma^2, up to constants)."""
    alpha = L / M
    x = g2 / (M * sigma2)
    x = np.maximum(x, 1e-300)
    out = float(np.sum(x - np.log(x)))
    big = x[x > x_lower]
    if big.size:
        d = big - (1.0 + alpha)
        tau = 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))
        out += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))
    return out


def estimate_sigma2(singular_values: np.ndarray, L: int, M: int) -> float:
    """The EVB noise variance: the minimiser of Omega over the paper's bounds (module docstring)."""
    L, M = sorted((int(L), int(M)))
    alpha = L / M
    g2 = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)[::-1][:L]
    if g2.size < L:  # a thin spectrum: the missing values are zero
        g2 = np.concatenate([g2, np.zeros(L - g2.size)])
    total = float(g2.sum())
    if total <= 0:
        return 0.0
    t = tau_lower(alpha)
    x_lower = (1.0 + t) * (1.0 + alpha / t)
    upper = total / (L * M)
    h_max = min(math.ceil(L / (1.0 + alpha)) - 1, L - 1)
    h_max = max(h_max, 0)
    lower = max(g2[h_max] / (M * x_lower), float(g2[h_max:].sum()) / (M * (L - h_max)))
    lower = max(lower, upper * 1e-12)  # an exactly low-rank matrix: the tail is zero
    if lower >= upper:
        return upper
    # floor the zero singular values (log x of Omega) at the lower bound's scale
    g2 = np.maximum(g2, lower * M * 1e-12)
    grid = np.exp(np.linspace(math.log(lower), math.log(upper), 200))
    values = [_omega(s, g2, L, M, x_lower) for s in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    if hi <= lo:
        return float(grid[i])
    found = minimize_scalar(
        lambda log_s: _omega(math.exp(log_s), g2, L, M, x_lower),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    best = math.exp(found.x)
    return best if _omega(best, g2, L, M, x_lower) <= values[i] else float(grid[i])


def check_matrix_shape(shape: tuple[int, ...], what: str = "matrix") -> tuple[int, int]:
    """(L, M) of a matrix EVBMF can work on: both sides >= 2 (a 1 x M matrix has no noise to estimate)."""
    if len(shape) != 2 or min(shape) < 2:
        raise LrkConfigError(
            f"EVBMF is invalid for the {what} of shape {list(shape)}: it needs a matrix of at least 2 x 2 "
            "(the noise variance is estimated from the spectrum); skip the layer or use another rank selector"
        )
    return int(shape[0]), int(shape[1])


def evbmf_spectrum(
    singular_values: torch.Tensor | np.ndarray, shape: tuple[int, int], sigma2: float | None = None
) -> EVBMFResult:
    """EVBMF of an L x M matrix given by its singular values (descending, at most min(L, M) of them; missing
    ones are zero). ``sigma2``: the noise variance, estimated (EVB) when None."""
    L, M = sorted(check_matrix_shape(tuple(shape)))
    s = np.asarray(
        singular_values.detach().double().cpu().numpy()
        if isinstance(singular_values, torch.Tensor)
        else singular_values,
        dtype=np.float64,
    )
    s = np.sort(s)[::-1][:L]
    noise = estimate_sigma2(s, L, M) if sigma2 is None else float(sigma2)
    if noise <= 0:
        return EVBMFResult(0, torch.zeros(0, dtype=torch.float64), 0.0, 0.0, (L, M))
    threshold = evb_threshold(noise, L, M)
    kept = s[s > threshold]
    values = evb_estimate(kept, noise, L, M) if kept.size else np.zeros(0)
    return EVBMFResult(int(kept.size), torch.from_numpy(values.copy()), noise, threshold, (L, M))


def evbmf(matrix: torch.Tensor, sigma2: float | None = None) -> EVBMFResult:
    """EVBMF of ``matrix`` (L x M, both >= 2): estimated rank, EVB singular values, noise variance."""
    check_matrix_shape(tuple(matrix.shape))
    s = torch.linalg.svdvals(matrix.detach().double())
    return evbmf_spectrum(s, (matrix.shape[0], matrix.shape[1]), sigma2)


def weakened_rank(evbmf_rank: int, full_rank: int, weakening: float) -> int:
    """MUSCO's weakened rank ceil(R - w (R - R_EVBMF)), at least 1 (w = 1: the EVBMF rank; w = 0: R)."""
    if not 0.0 <= weakening <= 1.0:
        raise ValueError(f"weakening={weakening} is invalid: it must lie in [0, 1]")
    full_rank, evbmf_rank = int(full_rank), min(int(evbmf_rank), int(full_rank))
    return max(1, math.ceil(full_rank - weakening * (full_rank - evbmf_rank) - 1e-9))
