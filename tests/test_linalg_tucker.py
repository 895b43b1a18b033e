import pytest
import torch

from lrk.linalg.tucker import (
    mode_singular_values,
    tucker2,
    tucker2_params,
    tucker2_rank_eq7,
    tucker2_to_tensor,
    unfolding,
)


def test_full_rank_tucker2_is_exact_and_truncation_is_not():
    torch.manual_seed(0)
    w = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    full = tucker2(w, (12, 8))
    assert torch.allclose(tucker2_to_tensor(full), w, atol=1e-10)
    assert torch.allclose(full.out_factor.T @ full.out_factor, torch.eye(12, dtype=torch.float64), atol=1e-10)
    low = tucker2(w, (6, 4))
    err = float((tucker2_to_tensor(low) - w).norm() / w.norm())
    assert 0.1 < err < 1.0
    refined = tucker2(w, (6, 4), n_iter_max=5)  # HOOI sweeps never increase the HOSVD error
    assert float((tucker2_to_tensor(refined) - w).norm() / w.norm()) <= err + 1e-9


def test_tucker2_of_a_stack_shares_the_channel_factors():
    torch.manual_seed(1)
    stack = torch.randn(3, 6, 5, 2, 2, dtype=torch.float64)
    t = tucker2(stack, (6, 5), modes=(1, 2))
    assert t.core.shape == (3, 6, 5, 2, 2)
    assert torch.allclose(tucker2_to_tensor(t, modes=(1, 2)), stack, atol=1e-10)


def test_mode_singular_values_are_those_of_the_unfolding():
    torch.manual_seed(2)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    assert unfolding(w, 1).shape == (4, 45)
    assert torch.allclose(mode_singular_values(w, 1), torch.linalg.svdvals(unfolding(w, 1)))


def test_eq7_reproduces_the_paper_example_and_the_requested_ratio():
    # accelerating_lrd_paper section 2.1: [512, 512, 3, 3] at 2x compression -> ranks 309
    r1 = tucker2_rank_eq7(512, 512, 9, alpha=2.0, beta=1.0)
    assert int(r1) == 309
    assert tucker2_params(512, 512, 9, (r1, r1)) == pytest.approx(512 * 512 * 9 / 2, rel=1e-9)
    r1 = tucker2_rank_eq7(256, 128, 9, alpha=3.0, beta=2.0)  # R2 = 2 R1
    assert tucker2_params(256, 128, 9, (2 * r1, r1)) == pytest.approx(256 * 128 * 9 / 3, rel=1e-9)
