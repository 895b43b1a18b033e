import pytest
import torch

from lrk.linalg.rank import energy_rank, fraction_rank, retained_energy, tsvd_compression_ratio


def test_energy_rank_picks_smallest_rank_meeting_phi():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert energy_rank(s, 9 / 14.25) == 1
    assert energy_rank(s, 9 / 14.25 + 1e-6) == 2
    assert energy_rank(s, 13 / 14.25) == 2
    assert energy_rank(s, 0.99) == 4
    assert energy_rank(s, 1.0) == 4
    for phi in torch.linspace(0.05, 1.0, 40).tolist():
        r = energy_rank(s, phi)
        assert retained_energy(s, r) >= phi - 1e-9
        assert r == 1 or retained_energy(s, r - 1) < phi


@pytest.mark.parametrize("phi", [0.0, -0.1, 1.01])
def test_energy_rank_rejects_phi_outside_unit_interval(phi):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        energy_rank(torch.ones(3), phi)


def test_tsvd_compression_ratio_theorem_1():
    assert tsvd_compression_ratio(2, 3, 4, 1) == pytest.approx(24 / (6 + 1 + 4))
    assert tsvd_compression_ratio(8, 65, 192, 192) < 1  # no truncation costs storage (r = d)


def test_fraction_rank_rounds_up_but_not_on_float_noise():
    assert fraction_rank(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert fraction_rank(0.31, 10) == 4
    assert fraction_rank(0.5, 65) == 33
    assert fraction_rank(1e-6, 10) == 1 and fraction_rank(1.0, 10) == 10
