"""EVBMF (lrk.linalg.evbmf): the closed-form threshold and estimator against a direct minimisation of the VB free
energy, the paper's constant, rank recovery with an estimated noise variance, MUSCO's weakening factor."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lrk.errors import LrkConfigError
from lrk.linalg.evbmf import evb_estimate, evb_threshold, evbmf, evbmf_spectrum, tau_lower, weakened_rank


def free_energy_rank1(params: np.ndarray, gamma: float, sigma2: float, L: int, M: int) -> float:
    """2F of VBMF with one component, V = gamma b_dir a_dir^T, Gaussian posteriors N(a, s_a I_M), N(b, s_b I_L)
    and priors N(0, c_a I_M), N(0, c_b I_L) (the hyper-parameters c are free: empirical Bayes), written from
    the model, not from the closed form; the constant LM log(2 pi sigma^2) is left out."""
    a, b, log_sa, log_sb, log_ca, log_cb = params
    sa, sb, ca, cb = np.exp([log_sa, log_sb, log_ca, log_cb])
    fit = gamma**2 - 2 * gamma * a * b + (a * a + M * sa) * (b * b + L * sb)
    kl_a = M * (log_ca - log_sa) + (a * a + M * sa) / ca - M
    kl_b = L * (log_cb - log_sb) + (b * b + L * sb) / cb - L
    return fit / sigma2 + kl_a + kl_b


def minimise(gamma: float, sigma2: float, L: int, M: int) -> tuple[float, float]:
    """The lowest 2F found from a few non-zero starts, and its estimate a b."""
    best = None
    for scale in (1.0, 0.5, 2.0):
        start = np.array([math.sqrt(gamma) * scale, math.sqrt(gamma) / scale, -3.0, -3.0, 0.0, 0.0])
        found = minimize(free_energy_rank1, start, args=(gamma, sigma2, L, M), method="BFGS", tol=1e-12)
        if best is None or found.fun < best.fun:
            best = found
    return float(best.fun), float(best.x[0] * best.x[1])


def test_tau_is_the_papers_constant_for_a_square_matrix() -> None:
    # alpha = 1: 2 log(1 + tau) = tau, tau = 2.5129 (the constant quoted with the EVB threshold)
    assert tau_lower(1.0) == pytest.approx(2.5129, abs=1e-4)
    for alpha in (0.1, 0.5, 1.0):
        t = tau_lower(alpha)
        assert math.log1p(t) + alpha * math.log1p(t / alpha) - t == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize(("L", "M"), [(4, 6), (5, 5)])
def test_threshold_and_estimator_match_a_direct_minimisation_of_the_free_energy(L: int, M: int) -> None:
    sigma2 = 1.0
    threshold = evb_threshold(sigma2, L, M)
    above, below = 1.05 * threshold, 0.95 * threshold
    energy, estimate = minimise(above, sigma2, L, M)
    null = above**2 / sigma2
    assert energy < null - 1e-4  # above the threshold a non-zero solution beats the zero one
    assert estimate == pytest.approx(float(evb_estimate(np.array([above]), sigma2, L, M)[0]), rel=1e-4)
    energy, _ = minimise(below, sigma2, L, M)
    assert energy >= below**2 / sigma2 - 1e-6  # below it nothing beats the zero solution
    # and the EVBMF of such a matrix keeps exactly the components above the threshold
    rng = np.random.default_rng(0)
    q_l, _ = np.linalg.qr(rng.standard_normal((L, 2)))
    q_m, _ = np.linalg.qr(rng.standard_normal((M, 2)))
    matrix = torch.from_numpy(q_l @ np.diag([above, below]) @ q_m.T)
    result = evbmf(matrix, sigma2=sigma2)
    assert result.rank == 1 and result.threshold == pytest.approx(threshold)


def test_low_rank_plus_noise_rank_and_noise_are_recovered() -> None:
    torch.manual_seed(0)
    L, M, r, noise = 60, 100, 5, 0.3
    signal = torch.randn(L, r, dtype=torch.float64) @ torch.randn(r, M, dtype=torch.float64) * 0.5
    matrix = signal + noise * torch.randn(L, M, dtype=torch.float64)
    for m in (matrix, matrix.T):
        result = evbmf(m)
        assert result.rank == r
        assert result.sigma2 == pytest.approx(noise**2, rel=0.1)
        assert result.shape == (L, M)
        # the EVB estimates shrink the observed singular values, never grow them
        observed = torch.linalg.svdvals(m)[:r]
        assert torch.all(result.values < observed) and torch.all(result.values > 0.8 * observed)
    assert evbmf(torch.randn(30, 40, dtype=torch.float64)).rank == 0  # pure noise: nothing kept


def test_weakening_factor() -> None:
    assert weakened_rank(10, 100, 1.0) == 10
    assert weakened_rank(10, 100, 0.0) == 100
    assert weakened_rank(10, 100, 0.5) == 55
    assert weakened_rank(10, 101, 0.5) == 56  # ceil(101 - 45.5)
    assert weakened_rank(0, 100, 1.0) == 1
    with pytest.raises(ValueError, match="weakening"):
        weakened_rank(1, 2, 1.5)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 1)])
def test_a_matrix_smaller_than_2x2_is_refused(shape: tuple[int, int]) -> None:
    with pytest.raises(LrkConfigError, match=rf"EVBMF is invalid .* shape \[{shape[0]}, {shape[1]}\]"):
        evbmf(torch.ones(shape))


# --- decomp.rank_selector=evbmf (lrk.decomp.rank.evbmf) ------------------------------------------------------
def planted(shape: tuple[int, int], rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(shape[0], rank, generator=g)
    right = torch.randn(rank, shape[1], generator=g)
    return left @ right / math.sqrt(rank) + noise * torch.randn(*shape, generator=g)


def test_svd_with_evbmf_ranks_keeps_the_planted_rank_and_weakens_towards_full() -> None:
    from torch import nn

    from lrk.decomp import build_method

    layer = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3))
    with torch.no_grad():
        layer[0].weight.copy_(planted((40, 48), 4, 0.05))
    for weakening, expected in ((1.0, 4), (0.5, math.ceil(40 - 0.5 * (40 - 4)))):
        model = copy.deepcopy(layer)
        method = build_method({"name": "svd", "rank_selector": "evbmf", "evbmf_weakening": weakening})
        (row,) = method.apply(model, []).rows
        assert evbmf(layer[0].weight.detach()).rank == 4
        assert row["name"] == "0" and row["ranks"] == [expected]
    # compressing the compressed layer again: EVBMF of its R x R core (its R non-zero singular values)
    model = copy.deepcopy(layer)
    build_method({"name": "svd", "rank_selector": "evbmf", "evbmf_weakening": 0.5}).apply(model, [])
    folded = model[0].fold()
    s = torch.linalg.svdvals(folded.weight.detach().double())
    core = evbmf_spectrum(s[:22], (22, 22)).rank
    model[0] = folded
    (row,) = (
        build_method({"name": "svd", "rank_selector": "evbmf", "evbmf_weakening": 1.0}).apply(model, []).rows
    )
    assert row["ranks"] == [max(core, 1)] and row["ranks"][0] < 22


def test_tucker_with_evbmf_ranks_per_mode_unfolding() -> None:
    from torch import nn

    from lrk.decomp import build_method

    conv = nn.Conv2d(12, 16, 3)
    g = torch.Generator().manual_seed(1)
    core = torch.randn(3, 5, 3, 3, generator=g)  # R2 = 3 (output mode), R1 = 5 (input mode)
    out_f, in_f = (
        torch.linalg.qr(torch.randn(16, 3, generator=g))[0],
        torch.linalg.qr(torch.randn(12, 5, generator=g))[0],
    )
    weight = torch.einsum("abij,sa,cb->scij", core, out_f, in_f) * 4 + 0.01 * torch.randn(
        16, 12, 3, 3, generator=g
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
    model = nn.Sequential(nn.Conv2d(1, 12, 1), conv)
    method = build_method(
        {"name": "tucker", "rank_selector": "evbmf", "evbmf_weakening": 1.0, "targets": ["1"]}
    )
    (row,) = method.apply(model, []).rows
    expected = [evbmf(weight.reshape(16, -1)).rank, evbmf(weight.transpose(0, 1).reshape(12, -1)).rank]
    assert expected == [3, 5] and row["ranks"] == expected


def test_evbmf_on_a_layer_smaller_than_2x2_is_refused() -> None:
    from torch import nn

    from lrk.decomp import build_method

    model = nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 3))
    method = build_method({"name": "svd", "rank_selector": "evbmf", "targets": ["0"]})
    with pytest.raises(
        LrkConfigError, match=r"layer '0' .*unfolding has shape \[4, 1\], EVBMF needs at least 2 x 2"
    ):
        method.apply(model, [])
