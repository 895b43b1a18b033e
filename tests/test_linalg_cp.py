import pytest
import tensorly as tl
import torch
from tensorly.tenalg.core_tenalg.mttkrp import unfolding_dot_khatri_rao

from lrk.linalg.cp import cp_als, cp_params, cp_rank_bound, cp_to_tensor, mttkrp


def test_mttkrp_matches_tensorly_without_forming_the_khatri_rao_product():
    torch.manual_seed(0)
    x = torch.randn(5, 6, 7, 4, dtype=torch.float64)
    factors = [torch.randn(d, 3, dtype=torch.float64) for d in x.shape]
    with tl.backend_context("pytorch", local_threadsafe=True):
        for mode in range(4):
            expected = unfolding_dot_khatri_rao(x, (None, factors), mode)
            assert torch.allclose(mttkrp(x, factors, mode), expected, atol=1e-10)


def test_als_recovers_a_tensor_of_exact_cp_rank():
    torch.manual_seed(1)
    x = cp_to_tensor(
        torch.ones(4, dtype=torch.float64), [torch.randn(d, 4, dtype=torch.float64) for d in (12, 8, 9)]
    )
    exact = cp_als(x, 4, n_iter_max=300, tol=1e-12)
    assert exact.rel_error < 1e-5
    assert torch.allclose(cp_to_tensor(exact.weights, exact.factors), x, atol=1e-4 * float(x.abs().max()))
    low = cp_als(x, 2, n_iter_max=50)
    assert low.rel_error > 0.05  # rank 2 cannot hold a generic rank-4 tensor
    assert low.n_iter <= 50


def test_iteration_cap_is_respected_and_rank_may_exceed_a_mode():
    torch.manual_seed(2)
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    result = cp_als(x, 9, n_iter_max=3, tol=0.0)  # rank 9 > every mode: random columns pad the SVD init
    assert result.n_iter == 3
    assert [f.shape for f in result.factors] == [(6, 9), (5, 9), (4, 9)]
    assert 0.0 <= result.rel_error < 1.0


def test_counts_and_rank_bound():
    assert cp_params((8, 12, 9), 5) == 5 * 29
    assert cp_rank_bound((8, 12, 9)) == 72  # prod / max


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        cp_als(torch.randn(2, 2, 2), 0)
    with pytest.raises(ValueError, match="init"):
        cp_als(torch.randn(2, 2, 2), 1, init="nope")
