"""Data-aware SVD (lrk.linalg.weighted_svd, ``decomp=svd`` with ``weighting``): each weighting against an
independent computation of its optimum (Eckart-Young on the weighted matrix, computed here from scratch), the
rank-deficient activations a plain Cholesky cannot whiten, the calibration statistics against direct formulas,
and the method end to end against ``weighting: none``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from generic_fixtures import images, small_resnet
from torch import nn

from lrk.decomp import build_method
from lrk.decomp.weight.calibration import fisher_row_importance, input_rows, input_statistics
from lrk.errors import LrkConfigError
from lrk.linalg.rank import energy_rank
from lrk.linalg.weighted_svd import (
    column_scale,
    row_weight,
    row_weighted_svd,
    scaled_svd,
    whitened_svd,
    whitening,
)

D = torch.float64


def subspace_inputs(n: int, dim: int = 12, k: int = 5, seed: int = 0) -> torch.Tensor:
    """``X`` (dim x n): n samples in a k-dimensional subspace, with two coordinates always zero (dead inputs)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.zeros(dim, k, dtype=D)
    basis[: dim - 2] = torch.randn(dim - 2, k, generator=g, dtype=D)
    scales = torch.logspace(1, -1, k, dtype=D)
    return basis @ (scales[:, None] * torch.randn(k, n, generator=g, dtype=D))


def random_weight(out_f: int = 10, in_f: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed), dtype=D)


def plain_factors(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def tail(matrix: torch.Tensor, r: int) -> float:
    """Eckart-Young: min over rank-r M' of ||M - M'||_F = sqrt(sum_{i>r} s_i(M)^2)."""
    return float(torch.linalg.svdvals(matrix)[r:].square().sum().sqrt())


# --- the maths ----------------------------------------------------------------------------------------
def test_whitening_works_on_rank_deficient_activations_where_cholesky_fails() -> None:
    x = subspace_inputs(200)
    c = x @ x.T / x.shape[1]
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(c)
    s, s_inv = whitening(c, eps=1e-9)
    assert torch.allclose(s @ s_inv, torch.eye(12, dtype=D), atol=1e-8)
    # S S^T = C on C's range (the floor only touches the null directions: at most eps * lambda_max)
    lam_max = float(torch.linalg.eigvalsh(c).max())
    assert float((s @ s.T - c).abs().max()) <= 2e-9 * lam_max


def test_whitened_svd_reaches_the_optimal_output_error_and_beats_plain_svd() -> None:
    """min over rank-r W' of ||(W - W') X||_F is the Eckart-Young tail of W X (SVD-LLM's claim, Thm. 1), reached
    on activations whose second moment has no Cholesky factor (the previous test)."""
    x, w = subspace_inputs(300), random_weight()
    c = x @ x.T / x.shape[1]
    for r in (1, 2, 3, 4):
        first, second, spectrum = whitened_svd(w, c, r, eps=1e-13)
        ours = float(((w - first @ second) @ x).norm())
        optimum = tail(w @ x, r)
        plain = float(((w - plain_factors(w, r)) @ x).norm())
        assert ours == pytest.approx(optimum, rel=1e-8)
        # the weighted spectrum is that of W S, S S^T = C: the singular values of W X / sqrt(n) on the 5 directions
        # the data spans; beyond them only the tie-break ridge's sqrt(delta) ||W|| (delta = 1e-13 mean eigenvalue)
        expected = torch.linalg.svdvals(w @ x)[:10] / x.shape[1] ** 0.5
        assert torch.allclose(spectrum[:5], expected[:5], rtol=1e-7)
        assert float(spectrum[5:].max()) < 1e-6 * float(expected[0])
        assert plain > 1.3 * ours, (r, plain, ours)
    # beyond the subspace's dimension (5) the output error is zero, though W' != W
    first, second, _ = whitened_svd(w, c, 5, eps=1e-13)
    assert float(((w - first @ second) @ x).norm()) < 1e-6 * float((w @ x).norm())
    assert float((w - first @ second).norm()) > 0.1 * float(w.norm())


def test_whitened_svd_at_full_rank_gives_the_weight_back() -> None:
    x, w = subspace_inputs(50), random_weight()
    first, second, spectrum = whitened_svd(w, x @ x.T / 50, 10)
    assert torch.allclose(first @ second, w, atol=1e-8)
    assert first.shape == (10, 10) and second.shape == (10, 12) and spectrum.shape == (10,)
    # balanced like the sqrt(Sigma) split: each component's two factors have the same norm
    assert torch.allclose(first.norm(dim=0), second.norm(dim=1), atol=1e-10)


def test_whitened_svd_equals_svd_llm_where_the_whitening_is_invertible() -> None:
    """SVD-LLM's W' = U_r Sigma_r V_r^T S^{-1} (SVD of W S, S a square root of C) computed directly."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(12, 100, generator=g, dtype=D), random_weight()
    c = x @ x.T / 100
    s = torch.linalg.cholesky(c)
    u, sig, vh = torch.linalg.svd(w @ s, full_matrices=False)
    for r in (2, 5):
        svd_llm = (u[:, :r] * sig[:r]) @ vh[:r] @ torch.linalg.inv(s)
        first, second, _ = whitened_svd(w, c, r, eps=1e-13)
        assert torch.allclose(first @ second, svd_llm, atol=1e-9)


def test_asvd_minimises_its_column_weighted_error() -> None:
    g = torch.Generator().manual_seed(2)
    w = random_weight(16, 20)
    mean_abs = torch.rand(20, generator=g, dtype=D)
    mean_abs[:3] *= 40.0  # outlier input channels (ASVD's motivation)
    mean_abs[5] = 0.0  # a dead channel: floored, still invertible
    scale = column_scale(mean_abs, alpha=0.5)
    assert float(scale.min()) > 0 and float(scale[0]) == pytest.approx(float(mean_abs[0]) ** 0.5)
    for r in (2, 4, 6):
        first, second, _ = scaled_svd(w, scale, r)
        ours = float(((w - first @ second) * scale).norm())
        assert ours == pytest.approx(tail(w * scale, r), rel=1e-9)
        plain = float(((w - plain_factors(w, r)) * scale).norm())
        assert plain > 1.2 * ours, (r, plain, ours)


def test_fisher_minimises_its_row_weighted_error() -> None:
    g = torch.Generator().manual_seed(3)
    w = random_weight(16, 20)
    importance = torch.rand(16, generator=g, dtype=D) ** 4 * 100.0
    weights = row_weight(importance)
    assert torch.allclose(weights, importance.sqrt())
    for r in (2, 4, 6):
        first, second, _ = row_weighted_svd(w, weights, r)
        ours = float((weights[:, None] * (w - first @ second)).norm())
        assert ours == pytest.approx(tail(weights[:, None] * w, r), rel=1e-9)
        plain = float((weights[:, None] * (w - plain_factors(w, r))).norm())
        assert plain > 1.2 * ours, (r, plain, ours)


def test_a_zero_statistic_falls_back_to_plain_svd() -> None:
    w = random_weight()
    first, second, _ = whitened_svd(w, torch.zeros(12, 12, dtype=D), 3)
    assert torch.allclose(first @ second, plain_factors(w, 3), atol=1e-10)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="eps"):
        whitening(torch.eye(3, dtype=D), eps=0.0)
    with pytest.raises(ValueError, match="alpha"):
        column_scale(torch.ones(3), alpha=-1.0)
    with pytest.raises(ValueError, match="square"):
        whitening(torch.ones(2, 3, dtype=D))


# --- the calibration statistics -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, padding=1, bias=False),
        nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(3, 5, (1, 3), padding="same", padding_mode="reflect", bias=False),
    ],
    ids=["3x3", "strided-dilated", "same-reflect"],
)
def test_conv_input_rows_are_what_the_matricized_kernel_multiplies(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9)
    rows = input_rows(conv, x)  # [B L, C kh kw]
    out = conv(x)  # [B, S, H', W']
    direct = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    assert torch.allclose(rows @ conv.weight.reshape(5, -1).T, direct, atol=1e-5)


def test_input_statistics_match_direct_formulas() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    batches = [torch.randn(5, 6, dtype=D), torch.randn(7, 6, dtype=D)]
    x = torch.cat(batches)
    hidden = torch.relu(model[0](x)).detach()
    targets = [("0", model[0]), ("2", model[2])]
    second = input_statistics(model, targets, batches, second_moment=True)
    assert torch.allclose(second["0"].moment(), x.T @ x / 12)
    assert torch.allclose(second["2"].moment(), hidden.T @ hidden / 12)
    first = input_statistics(model, targets, batches, second_moment=False)
    assert torch.allclose(first["2"].mean_abs(), hidden.abs().mean(0))


def test_fisher_importance_matches_the_closed_form_gradient() -> None:
    """For logits W x (one Linear), the per-image gradient of the cross-entropy is (p - y) x^T, so row i's
    importance is sum_d (p_di - y_di)^2 ||x_d||^2; with labels given, and with the argmax as pseudo-label."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False).double()
    x = torch.randn(6, 5, dtype=D)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    p = torch.softmax(model(x), -1).detach()

    def closed(labels: torch.Tensor) -> torch.Tensor:
        return ((p - F.one_hot(labels, 3).double()).square() * x.square().sum(1, keepdim=True)).sum(0)

    sums, labelled = fisher_row_importance(model, [("w", model)], [(x[:4], y[:4]), (x[4:], y[4:])])
    assert labelled and torch.allclose(sums["w"], closed(y))
    sums, labelled = fisher_row_importance(model, [("w", model)], [x])
    assert not labelled and torch.allclose(sums["w"], closed(p.argmax(-1)))
    assert model.weight.requires_grad  # restored


# --- the method ---------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def mlp_data(n: int, seed: int) -> torch.Tensor:
    """Inputs in a 6-dimensional subspace of R^32 with decaying scales (fixed basis, fresh coefficients)."""
    basis = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    coeffs = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return (coeffs * torch.tensor([5.0, 3, 2, 1, 0.5, 0.2])) @ basis.T


def logit_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = reference(x)
        return float((model(x) - ref).norm() / ref.norm())


@pytest.mark.parametrize(
    ("make", "data", "keys", "margin"),
    [
        (mlp, lambda n, s: mlp_data(n, s), {"rank": 4}, 2.0),
        (small_resnet, lambda n, s: images(n, seed=s), {"ratio": 0.3, "skip": ["*downsample*"]}, 3.0),
    ],
    ids=["mlp", "resnet"],
)
def test_activation_weighting_lowers_the_output_error_end_to_end(make, data, keys, margin) -> None:
    calibration, held_out = [data(32, 1), data(32, 2)], data(64, 9)
    errors = {}
    for weighting in ("none", "activation"):
        model, dense = make(), make()
        report = build_method({"name": "svd", "weighting": weighting, **keys}).apply(model, calibration)
        errors[weighting] = (logit_error(model, dense, held_out), [r["ranks"] for r in report.rows])
        if weighting == "activation":
            assert all(
                r["weighting"] == "activation" and 0 <= r["weighted_rel_error"] < 1 for r in report.rows
            )
    assert errors["none"][1] == errors["activation"][1]  # same ranks: the weighting changes only the factors
    assert errors["none"][0] > margin * errors["activation"][0], errors


@pytest.mark.parametrize("weighting", ["activation", "asvd", "fisher"])
def test_every_weighting_is_exact_at_full_energy(weighting: str) -> None:
    model, dense = small_resnet(), small_resnet()
    method = build_method({"name": "svd", "energy": 1.0, "weighting": weighting})
    report = method.apply(model, [images(4, seed=1)])
    assert logit_error(model, dense, images(4, seed=2)) < 1e-4
    assert report.rows and all(
        r["weighting"] == weighting and r["weighted_rel_error"] < 1e-6 for r in report.rows
    )
    assert method.needs_labels == (weighting == "fisher")  # for the pipeline: (images, labels) batches


def test_energy_is_counted_in_the_weighted_space() -> None:
    model = mlp()
    calibration = [mlp_data(64, 1)]
    x = calibration[0]
    c = x.double().T @ x.double() / x.shape[0]
    s = torch.linalg.cholesky(c + 1e-9 * torch.eye(32, dtype=D))  # a square root of C, computed apart
    expected = energy_rank(torch.linalg.svdvals(model[0].weight.detach().double() @ s), 0.9)
    report = build_method({"name": "svd", "energy": 0.9, "weighting": "activation", "targets": ["0"]}).apply(
        model, calibration
    )
    assert report.rows[0]["ranks"] == [expected]
    plain = energy_rank(torch.linalg.svdvals(mlp()[0].weight.detach().double()), 0.9)
    assert expected < plain  # the inputs span 6 dimensions: far fewer ranks carry the output's energy


def test_weighting_needs_calibration_batches() -> None:
    with pytest.raises(LrkConfigError, match=r"decomp.weighting=activation needs calibration batches.*>= 1"):
        build_method({"name": "svd", "rank": 2, "weighting": "activation", "calibration_batches": 0})
    method = build_method({"name": "svd", "rank": 2, "weighting": "fisher"})
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LrkConfigError, match=r"decomp.weighting=fisher needs calibration batches, got none"):
        method.apply(model, [])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    build_method({"name": "svd", "rank": 2, "calibration_batches": 0})  # weighting: none needs none


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        (
            {"weighting": "whiten"},
            r"decomp.weighting='whiten' is invalid for decomp=svd: it must be one of none",
        ),
        (
            {"weighting": "asvd", "asvd_alpha": "half"},
            r"decomp.asvd_alpha='half' is invalid: it must be a number",
        ),
        ({"weighting": "asvd", "asvd_alpha": True}, r"decomp.asvd_alpha=True is invalid"),
        ({"weighting_eps": 1.5}, r"decomp.weighting_eps=1.5 is invalid: it must be a number in \(0, 1\)"),
    ],
)
def test_bad_weighting_keys_are_refused(keys: dict, match: str) -> None:
    with pytest.raises(LrkConfigError, match=match):
        build_method({"name": "svd", "rank": 2, **keys})


def test_tucker_refuses_data_aware_weighting_and_names_svd() -> None:
    with pytest.raises(
        LrkConfigError, match=r"decomp.weighting='asvd' is invalid for decomp=tucker.*decomp=svd"
    ):
        build_method({"name": "tucker", "rank": 2, "weighting": "asvd"})
    build_method({"name": "tucker", "rank": 2, "weighting": "none"})


def test_latency_rank_search_works_with_a_weighting() -> None:
    model, dense = mlp(), mlp()
    keys = {
        "rank_search": "latency",
        "rank_search_repeats": 1,
        "rank_search_warmup": 0,
        "rank_search_cache": None,
    }
    report = build_method({"name": "svd", "rank": 4, "weighting": "activation", **keys}).apply(
        model, [mlp_data(32, 1)]
    )
    assert [r["rank_policy"] for r in report.rows] == [[4], [4]]
    for row in report.rows:  # each layer either stayed dense or was built, whitened, at the searched rank
        if row["rank_chosen"] == "dense":
            assert "weighting" not in row
        else:
            assert row["weighting"] == "activation" and row["ranks"] == row["rank_chosen"]
    assert logit_error(model, dense, mlp_data(32, 2)) < 1.0


def test_fisher_runs_get_labelled_calibration_batches(tiny_cfg, monkeypatch):
    """stage compress hands (images, labels) pairs to a method that needs labels (fisher), images otherwise;
    the labels are the train split's, in split order."""
    from lrk.data import build_datamodule
    from lrk.decomp.weight import calibration
    from lrk.train import run

    cfg = tiny_cfg("decomp=svd", "decomp.weighting=fisher", "decomp.ratio=0.5", "trainer.max_epochs=1")
    dm = build_datamodule(cfg.data)
    dm.prepare()
    pairs, plain = dm.calibration_batches(2, labels=True), dm.calibration_batches(2)
    assert all(isinstance(b, tuple) and len(b) == 2 for b in pairs)
    torch.testing.assert_close(torch.cat([b[0] for b in pairs]), torch.cat(plain))
    expected = torch.as_tensor(dm.split_labels["train"][: sum(len(b) for b in plain)])
    torch.testing.assert_close(torch.cat([b[1] for b in pairs]), expected)

    seen = []
    original = calibration.fisher_row_importance

    def spy(model, targets, batches):
        sums, labelled = original(model, targets, batches)
        seen.append(labelled)
        return sums, labelled

    monkeypatch.setattr(calibration, "fisher_row_importance", spy)
    run(cfg)
    assert seen == [True]
