import pytest
import torch

from lrk.linalg.tt import (
    balanced_factors,
    tt_bond_spectra,
    tt_matrix,
    tt_matvec,
    tt_max_ranks,
    tt_params,
    tt_to_matrix,
)


def test_balanced_factors():
    assert balanced_factors(384, 3) == (8, 8, 6)
    assert balanced_factors(1536, 3) == (16, 12, 8)
    assert balanced_factors(10, 3) == (5, 2, 1)
    assert balanced_factors(16, 2) == (4, 4)
    for n, d in [(1152, 3), (7, 2), (96, 4)]:
        fs = balanced_factors(n, d)
        assert len(fs) == d and torch.tensor(fs).prod().item() == n


def test_full_rank_tt_is_exact_and_matvec_never_needs_the_matrix():
    torch.manual_seed(0)
    w = torch.randn(24, 16, dtype=torch.float64)
    out_f, in_f = (4, 3, 2), (2, 4, 2)
    limits = tt_max_ranks(out_f, in_f)
    assert limits == [8, 4]
    cores = tt_matrix(w, out_f, in_f, limits)
    assert [tuple(c.shape) for c in cores] == [(1, 4, 2, 8), (8, 3, 4, 4), (4, 2, 2, 1)]
    assert torch.allclose(tt_to_matrix(cores), w, atol=1e-10)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.allclose(tt_matvec(cores, x), x @ w.T, atol=1e-10)
    assert tt_params(out_f, in_f, limits) == sum(c.numel() for c in cores)


def test_truncated_tt_error_obeys_the_tt_svd_bound():
    torch.manual_seed(1)
    w = torch.randn(24, 16, dtype=torch.float64)
    out_f, in_f, ranks = (4, 3, 2), (2, 4, 2), [3, 2]
    cores = tt_matrix(w, out_f, in_f, ranks)
    rebuilt = tt_to_matrix(cores)
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(tt_matvec(cores, x), x @ rebuilt.T, atol=1e-10)
    err2 = float(((rebuilt - w) ** 2).sum())
    bound = sum(
        float((s[r:] ** 2).sum()) for s, r in zip(tt_bond_spectra(w, out_f, in_f), ranks, strict=True)
    )
    assert 0 < err2 <= bound * (1 + 1e-9)


def test_bad_ranks_and_factors():
    w = torch.randn(24, 16)
    with pytest.raises(ValueError, match="maxima"):
        tt_matrix(w, (4, 3, 2), (2, 4, 2), [9, 2])
    with pytest.raises(ValueError, match="multiply"):
        tt_matrix(w, (5, 5), (4, 4), [4])
