import pytest
import torch

from lrk.linalg.svd import (
    eckart_young_error,
    singular_values,
    svd_factors,
    svd_params,
    svd_rank_for_ratio,
    thin_svd,
    truncated_svd,
)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_truncation_error_is_the_eckart_young_optimum(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    s = torch.linalg.svdvals(w)  # reference spectrum, independent of lrk
    for rank in (1, 5, 11, 16):
        first, second, _ = svd_factors(w, rank)
        error = float((w - first @ second).norm() / w.norm())
        optimum = float((s[rank:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        assert error == pytest.approx(optimum, rel=1e-5, abs=1e-12)
        assert eckart_young_error(s, rank) == pytest.approx(optimum, rel=1e-12, abs=1e-15)
    assert eckart_young_error(s, 3, relative=False) == pytest.approx(float((s[3:] ** 2).sum().sqrt()))


def test_factors_split_sqrt_sigma_onto_both_sides():
    torch.manual_seed(1)
    w = torch.randn(12, 9, dtype=torch.float64)
    u, s, vh = truncated_svd(w, 4)
    first, second, spectrum = svd_factors(w, 4)
    assert torch.allclose(first.norm(dim=0) ** 2, s)  # |U' sqrt(S')|_col^2 = s_i (Eq. 3)
    assert torch.allclose(second.norm(dim=1) ** 2, s)
    assert torch.allclose(first @ second, u @ torch.diag(s) @ vh)
    assert torch.allclose(spectrum, torch.linalg.svdvals(w))


def test_thin_svd_of_a_wide_matrix_matches_torch():
    torch.manual_seed(2)
    w = torch.randn(5, 30, dtype=torch.float64)
    u, s, vh = thin_svd(w)
    assert u.shape == (5, 5) and vh.shape == (5, 30)
    assert torch.allclose(u @ torch.diag(s) @ vh, w)
    assert torch.allclose(s, singular_values(w))


def test_rank_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        svd_factors(torch.randn(4, 6), 5)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        truncated_svd(torch.randn(4, 6), 0)


def test_ratio_rank_is_the_nearest_parameter_count():
    out_f, in_f = 1536, 384
    r = svd_rank_for_ratio(out_f, in_f, 0.5, bias=True)
    dense = out_f * in_f + out_f
    assert abs(svd_params(out_f, in_f, r, bias=True) / dense - 0.5) < 0.002
    for other in (r - 1, r + 1):
        assert abs(svd_params(out_f, in_f, other, True) - 0.5 * dense) >= abs(
            svd_params(out_f, in_f, r, True) - 0.5 * dense
        )
