"""decomp=attn_svd (the slides' TransformerBlockSVD): per-image rank-r truncation of the attention output, the
batched Gram solver (lrk.linalg.batched_svd) against torch.linalg.svd, the method on a tiny ViT, and its errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from attention_fixtures import random_images, seeded_dense, tiny_vit
from omegaconf import OmegaConf

from lrk.decomp import build_method
from lrk.decomp.attention.attn_svd import (
    AttnSVDMethod,
    attn_svd_metrics,
    attn_svd_modules,
    reset_attn_svd_stats,
)
from lrk.errors import LrkConfigError
from lrk.layers.attention.attn_svd import SVDOutputAttention
from lrk.linalg.batched_svd import batched_truncation, energy_ranks, gram_spectrum, right_projector
from lrk.linalg.rank import energy_rank
from lrk.models import MultiHeadSelfAttention, attention_modules

CONF = Path(__file__).resolve().parent.parent / "conf" / "decomp" / "attn_svd.yaml"
B, T, D, H = 3, 17, 32, 2  # T < D: the solver's left (x x^T) side; the *_tall tests use T > D


def dense(dim: int = D, dtype: torch.dtype = torch.float64) -> MultiHeadSelfAttention:
    return seeded_dense(dim, H, dtype)


def tokens(
    batch: int = B, t: int = T, dim: int = D, dtype: torch.dtype = torch.float64, seed: int = 1
) -> torch.Tensor:
    """Tokens with a decaying spectrum, decaying faster for later images (so the energy rule's ranks differ),
    scaled so that the attention is not uniform (a near-uniform softmax makes every output row alike: rank 1)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    out = []
    for i in range(batch):
        scales = torch.logspace(0, -1 - i, dim, dtype=torch.float64)
        out.append((torch.randn(t, dim, generator=g, dtype=torch.float64) * 5 * scales) @ basis.T)
    return torch.stack(out).to(dtype)


def svd_projection(mat: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation of one matrix from an independent full SVD."""
    U, S, Vh = torch.linalg.svd(mat.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def vit(depth: int = 2, image_size: int = 16, sharp: bool = False) -> torch.nn.Module:
    """A tiny ViT (16 px: 8x8 patches + cls = 65 tokens). Its initial attention is near uniform (weights of std
    0.02), so each image's attention output is nearly rank 1 (every row ~ the mean value); ``sharp`` scales the
    qkv weights by 20 so that the attention, hence its output's spectrum, is not trivial."""
    model = tiny_vit(D, H, depth, image_size)
    if sharp:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(20.0)
    return model


def images(n: int = 4, seed: int = 0, size: int = 16) -> torch.Tensor:
    return random_images(n, size, seed)


# --- (1) full rank = dense --------------------------------------------------------------------------------
@pytest.mark.parametrize(("t", "dim"), [(T, D), (40, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_and_full_energy_equal_dense(t: int, dim: int, dtype: torch.dtype) -> None:
    ref, x = dense(dim, dtype), tokens(t=t, dim=dim, dtype=dtype)
    expected = ref(x)
    for kwargs in ({"rank": min(t, dim)}, {"energy": 1.0}, {"ratio": 1.0}):
        out = SVDOutputAttention.from_attention(ref, **kwargs)(x)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0, msg=str(kwargs))


# --- (2) low rank: differs, and has exactly rank r --------------------------------------------------------
@pytest.mark.parametrize(("t", "dim"), [(T, D), (40, 16)])
@torch.no_grad()
def test_low_rank_differs_and_has_exact_rank(t: int, dim: int) -> None:
    ref, x = dense(dim), tokens(t=t, dim=dim)
    expected = ref(x)
    r = 5
    out = SVDOutputAttention.from_attention(ref, rank=r)(x)
    assert float((out - expected).norm() / expected.norm()) > 1e-3
    for i in range(x.shape[0]):
        assert int(torch.linalg.matrix_rank(expected[i])) == min(t, dim)  # dense is full rank
        assert int(torch.linalg.matrix_rank(out[i], rtol=1e-8)) == r


# --- (3) the Eckart-Young optimum ---------------------------------------------------------------------------
@pytest.mark.parametrize(("t", "dim"), [(T, D), (40, 16)])
@pytest.mark.parametrize("kwargs", [{"rank": 4}, {"ratio": 0.3}, {"energy": 0.9}])
@torch.no_grad()
def test_truncation_error_is_the_eckart_young_optimum(t: int, dim: int, kwargs: dict) -> None:
    ref, x = dense(dim), tokens(t=t, dim=dim)
    attn = SVDOutputAttention.from_attention(ref, monitor=True, **kwargs)  # measures the error every forward
    out0, out = ref(x), attn(x)
    for i in range(x.shape[0]):
        s = torch.linalg.svdvals(out0[i])
        r = int(torch.linalg.matrix_rank(out[i], rtol=1e-8))
        if "ratio" in kwargs:
            assert r == math.ceil(0.3 * min(t, dim))
        optimum = float(s[r:].square().sum().sqrt())
        assert float((out0[i] - out[i]).norm()) == pytest.approx(optimum, rel=1e-5)
        torch.testing.assert_close(out[i], svd_projection(out0[i], r), atol=1e-10, rtol=0)
    measured = float((out0 - out).norm() / out0.norm())
    assert attn.stats.rel_error == pytest.approx(measured, rel=1e-9)


# --- (4) the energy rule per image ----------------------------------------------------------------------------
@pytest.mark.parametrize("phi", [0.5, 0.9, 0.99])
@torch.no_grad()
def test_energy_rule_picks_the_smallest_rank_per_image(phi: float) -> None:
    ref, x = dense(), tokens(batch=4)
    out0 = ref(x)
    _, ranks, retained = batched_truncation(out0, energy=phi)
    expected = [energy_rank(torch.linalg.svdvals(out0[i]), phi) for i in range(4)]
    assert ranks.tolist() == expected
    assert len(set(expected)) > 1  # different images, different ranks: the mask is exercised
    for i, r in enumerate(expected):
        s2 = torch.linalg.svdvals(out0[i]).square()
        assert float(s2[:r].sum() / s2.sum()) >= phi - 1e-12
        assert r == 1 or float(s2[: r - 1].sum() / s2.sum()) < phi  # smallest such r
        assert float(retained[i]) == pytest.approx(float(s2[:r].sum() / s2.sum()), rel=1e-9)
    attn = SVDOutputAttention.from_attention(ref, energy=phi)
    out = attn(x)
    for i, r in enumerate(expected):  # each image projected at its own rank inside one batch
        torch.testing.assert_close(out[i], svd_projection(out0[i], r), atol=1e-10, rtol=0)
    assert attn.stats.rank_mean == pytest.approx(sum(expected) / 4)
    assert (attn.stats.rank_min, attn.stats.rank_max) == (min(expected), max(expected))


def test_energy_ranks_equal_energy_rank_row_by_row() -> None:
    g = torch.Generator().manual_seed(5)
    values = torch.rand(6, 9, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values
    values[2] = 0.0  # a zero spectrum -> 1, as energy_rank
    values[3, 4:] = 0.0
    for phi in (0.1, 0.5, 0.8, 1.0):
        assert energy_ranks(values, phi).tolist() == [energy_rank(v, phi) for v in values]


# --- (5) batch independence --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"rank": 6}, {"energy": 0.8}])
def test_images_never_mix(kwargs: dict) -> None:
    ref, x = dense(), tokens(batch=4)
    attn = SVDOutputAttention.from_attention(ref, **kwargs)
    inside = attn(x)
    others = x.clone()
    others[[0, 2, 3]] = torch.randn(3, T, D, dtype=x.dtype, generator=torch.Generator().manual_seed(9)) * 5
    changed = attn(others)
    assert not torch.allclose(changed[0], inside[0])
    alone = attn(x[1:2])[0]
    if "rank" in kwargs:  # the same computation for image 1 whatever the others: bitwise identical
        assert torch.equal(changed[1], inside[1])
    else:  # the batch's largest rank sets the width of the (zero-padded) projection product: rounding only
        torch.testing.assert_close(changed[1], inside[1], atol=1e-14, rtol=0)
    # alone vs in a batch of 4: dense attention itself differs by rounding there (~1e-16, batched kernels)
    torch.testing.assert_close(alone, inside[1], atol=1e-14, rtol=0)


# --- (6) gradients ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("t", "dim"), [(T, D), (40, 16)])
def test_gradients_reach_qkv_and_proj_through_the_truncation(t: int, dim: int) -> None:
    """V_r is a constant: d loss / d O = g V_r V_r^T, so the weights get dense attention's gradient of
    loss(O V_r V_r^T) with V_r fixed (compared with an explicit projection from torch.linalg.svd). Both sides of
    the solver: T < D (U U^T O forward, g V V^T backward) and T > D (O V V^T)."""
    ref = dense(dim)
    attn = SVDOutputAttention.from_attention(ref, rank=5).train()
    x = tokens(t=t, dim=dim).requires_grad_(True)
    attn(x).square().sum().backward()
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
        grad = attn.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    twin = dense(dim).train()
    x2 = x.detach().clone().requires_grad_(True)
    out0 = twin(x2)
    V = torch.stack([torch.linalg.svd(o.detach(), full_matrices=False)[2][:5].T for o in out0])
    (out0 @ V @ V.transpose(1, 2)).square().sum().backward()
    for name in ("qkv.weight", "proj.weight"):
        torch.testing.assert_close(
            attn.get_parameter(name).grad, twin.get_parameter(name).grad, atol=1e-8, rtol=0
        )
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-8, rtol=0)


# --- (8) the solver, both sides ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "n"), [(10, 24), (24, 10)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_solver_matches_torch_svd_projection_on_both_sides(
    m: int, n: int, dtype: torch.dtype, tol: float
) -> None:
    g = torch.Generator().manual_seed(3)
    x = (
        torch.randn(4, m, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    ).to(dtype)
    spectrum = gram_spectrum(x)
    assert spectrum.side == ("left" if m < n else "right")
    s_ref = torch.linalg.svdvals(x.double())
    torch.testing.assert_close(spectrum.values, s_ref, atol=tol * 10 * float(s_ref.max()), rtol=0)
    for kwargs in ({"rank": 3}, {"energy": 0.9}):
        out, ranks, _ = batched_truncation(x, **kwargs)
        assert out.dtype == dtype
        for i in range(4):
            ref = svd_projection(x[i], int(ranks[i]))
            assert float((out[i].double() - ref).norm() / x[i].double().norm()) < tol, kwargs
    basis, ranks, _ = right_projector(x, energy=0.9)
    for i in range(4):  # orthonormal columns up to each matrix's rank, zeros beyond
        r = int(ranks[i])
        gram = basis[i].double().T @ basis[i].double()
        expected = torch.diag((torch.arange(basis.shape[2]) < r).double())
        torch.testing.assert_close(gram, expected, atol=10 * tol, rtol=0)


@pytest.mark.parametrize(("m", "n"), [(20, 48), (48, 20)])
def test_precision_auto_redoes_unresolved_cuts_in_float64(m: int, n: int) -> None:
    """A float32 Gram matrix cannot resolve a cut at s_r = 1e-3 s_1 (s_r^2 below 1e4 eps s_1^2): "auto" redoes
    those matrices in float64 and matches torch.linalg.svd's projection; "input" keeps the float32 route."""
    g = torch.Generator().manual_seed(6)
    k, r = min(m, n), 8
    s = torch.cat(
        [torch.logspace(0, -3, r, dtype=torch.float64), torch.logspace(-3.05, -7, k - r, dtype=torch.float64)]
    )
    mats = []
    for _ in range(3):
        U0, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V0, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        mats.append((U0 * s) @ V0.T)
    x64 = torch.stack(mats)
    x = x64.float()
    exact = torch.stack([svd_projection(x64[i], r) for i in range(3)])
    errors = {}
    for precision in ("auto", "float64", "input"):
        out, _, _ = batched_truncation(x, rank=r, precision=precision)
        errors[precision] = float((out.double() - exact).norm() / x64.norm())
    assert errors["auto"] < 1e-5 and errors["float64"] < 1e-5, errors
    assert errors["input"] > errors["auto"], errors  # the float32 Gram's own error at such a cut
    with pytest.raises(ValueError, match=r"precision='fast' is invalid"):
        batched_truncation(x, rank=r, precision="fast")


def test_solver_rank_deficient_matrix_and_bad_requests() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 3, generator=g, dtype=torch.float64) @ torch.randn(
        2, 3, 20, generator=g, dtype=torch.float64
    )
    out, ranks, retained = batched_truncation(
        x, rank=6
    )  # rank 3 matrices: the extra directions carry nothing
    torch.testing.assert_close(out, x, atol=1e-10, rtol=0)
    assert ranks.tolist() == [6, 6] and torch.allclose(retained, torch.ones(2, dtype=torch.float64))
    assert torch.isfinite(right_projector(x, rank=6)[0]).all()
    for bad, match in (
        ({"rank": 13}, r"rank=13 is invalid: .*\[1, 12\]"),
        ({"energy": 0.0}, r"energy=0.0 is invalid"),
        ({"rank": 2, "energy": 0.5}, r"exactly one"),
    ):
        with pytest.raises(ValueError, match=match):
            batched_truncation(x, **bad)
    with pytest.raises(ValueError, match=r"3-D tensor"):
        batched_truncation(x[0], rank=1)


# --- the method ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_method_swaps_every_attention_and_reports_measured_rows() -> None:
    model, x = vit(sharp=True), images()
    ref = model(x)
    calib = [images(4, 1)]
    captured: dict[str, torch.Tensor] = {}
    report = build_method({"name": "attn_svd", "rank": 8}).apply(model, calib)
    found = attention_modules(model)
    assert [n for n, _ in found] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(isinstance(m, SVDOutputAttention) for _, m in found)
    assert (model(x) - ref).abs().max() > 1e-4
    for row in report.rows:
        assert row["kind"] == "attn_svd" and row["shape"] == [65, D]
        assert row["rank"] == 8 and row["ranks"] == [8]
        assert row["params_before"] == row["params_after"] == 4 * D * D + 4 * D  # no new parameters
        assert 1e-3 < row["rel_error"] < 1 and 0 < row["energy"] < 1 and row["seconds"] > 0
    # rel_error of block 0 measured independently: its input does not depend on the swap
    model.blocks[0].attn.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    model(calib[0])
    out0 = MultiHeadSelfAttention.forward(model.blocks[0].attn, captured["x"])
    trunc = torch.stack([svd_projection(o, 8) for o in out0])
    rel = float((out0.double() - trunc).norm() / out0.double().norm())
    assert report.rows[0]["rel_error"] == pytest.approx(rel, rel=1e-3)
    metrics = report.metrics()
    assert metrics["decomp/rank_mean"] == 8 and metrics["decomp/layers"] == 2 and metrics["time/rr_s"] > 0


def test_method_full_rank_reproduces_the_dense_model_and_energy_rows() -> None:
    model, x = vit().double(), images().double()
    ref = model(x)
    report = build_method({"name": "attn_svd", "rank": D}).apply(model, [])
    torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=0)
    assert all(r["kind"] == "attn_svd_bounds" for r in report.rows)
    model = vit(sharp=True)
    report = build_method({"name": "attn_svd", "energy": 0.99}).apply(model, [images(4, 1)])
    for row in report.rows:
        assert 1 < row["rank"] < D and row["energy"] >= 0.99 - 1e-9 and row["kind"] == "attn_svd"
        assert 1e-3 < row["rel_error"] <= math.sqrt(0.01) + 1e-6


def test_metrics_reset_and_default_ratio() -> None:
    model = vit()
    assert attn_svd_metrics(model) == {}
    build_method({"name": "attn_svd"}).apply(model, [])  # default_ratio 0.5 of min(65, 32) -> 16
    m = attn_svd_metrics(model)
    assert m["decomp/truncations"] == 0 and "decomp/rank_mean" not in m
    model(images())
    m = attn_svd_metrics(model)
    assert m["decomp/truncations"] == 8 and m["decomp/rank_mean"] == 16 and m["time/rr_forward_s"] > 0
    assert 0 < m["decomp/energy"] < 1
    assert "decomp/rel_error_mean" not in m  # monitor=false: no error measured (the report has it)
    for _, module in attn_svd_modules(model):
        module.monitor = True
    model(images())
    m = attn_svd_metrics(model)
    assert 0 < m["decomp/rel_error_mean"] < 1
    reset_attn_svd_stats(model)
    assert attn_svd_metrics(model)["time/rr_s"] == 0
    assert "stats" not in str(list(model.state_dict()))  # the stats are not in the state dict


def test_config_file_and_targets() -> None:
    method = build_method(OmegaConf.load(CONF))
    assert isinstance(method, AttnSVDMethod) and method.stage == "init"
    assert method.settings == {"rank": None, "ratio": 0.5, "energy": None, "monitor": False}
    cfg = OmegaConf.merge(OmegaConf.load(CONF), {"rank": 16})
    assert build_method(cfg).settings == {"rank": 16, "ratio": None, "energy": None, "monitor": False}
    model = vit()
    build_method({"name": "attn_svd", "skip": ["blocks.0.*"]}).apply(model, [])
    assert [n for n, _ in attn_svd_modules(model)] == ["blocks.1.attn"]


# --- (7) errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"energy": 0.0}, r"decomp.energy=0.0 is invalid.*\(0, 1\]"),
        ({"energy": 1.5}, r"decomp.energy=1.5 is invalid.*\(0, 1\]"),
        ({"ratio": 0.0}, r"decomp.ratio=0.0 is invalid.*\(0, 1\]"),
        ({"ratio": 2}, r"decomp.ratio=2 is invalid.*\(0, 1\]"),
        ({"default_ratio": -1}, r"decomp.default_ratio=-1 is invalid"),
        ({"rank": 0}, r"decomp.rank=0 is invalid"),
        ({"rank": 4, "energy": 0.9}, r"rank=4, energy=0.9: set exactly one"),
        ({"ratio": 0.5, "energy": 0.9}, r"ratio=0.5, energy=0.9: set exactly one"),
        ({"solver": "gram"}, r"\['solver'\] are invalid for decomp=attn_svd"),
    ],
)
def test_bad_config_is_one_clear_error(cfg: dict, match: str) -> None:
    with pytest.raises(LrkConfigError, match=match):
        build_method({"name": "attn_svd", **cfg})


def test_errors_that_need_the_model_leave_it_untouched() -> None:
    model = vit(image_size=8)  # 4x4 patches + cls = 17 tokens < D = 32: min(T, D) = 17
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LrkConfigError, match=r"decomp.rank=18 is invalid for this model.*17 x 32.*\[1, 17\]"):
        build_method({"name": "attn_svd", "rank": 18}).apply(model, [])
    with pytest.raises(LrkConfigError, match=r"decomp.rank=33 is invalid.*\[1, 32\]"):
        build_method({"name": "attn_svd", "rank": 33}).apply(vit(), [])
    assert not attn_svd_modules(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    build_method({"name": "attn_svd", "rank": 17}).apply(model, [])  # the largest valid rank
    with pytest.raises(LrkConfigError, match=r"matches no attention module"):
        build_method({"name": "attn_svd", "targets": ["blocks.*.mlp"]}).apply(vit(), [])


def test_module_errors() -> None:
    """A module is built without config: impossible arguments are ValueErrors naming the argument (the config
    errors, LrkConfigError naming decomp.<key>, are the method's: test_bad_config_is_one_clear_error)."""
    ref = dense()
    with pytest.raises(ValueError, match=r"rank=40 is invalid: .*\[1, 32\].*D = dim = 32"):
        SVDOutputAttention.from_attention(ref, rank=40)
    with pytest.raises(ValueError, match=r"energy=1.2 is invalid: .*\(0, 1\]"):
        SVDOutputAttention.from_attention(ref, energy=1.2)
    with pytest.raises(
        ValueError, match=r"rank=3, energy=0.5 is invalid: give at most one of rank, ratio, energy"
    ):
        SVDOutputAttention.from_attention(ref, rank=3, energy=0.5)
    attn = SVDOutputAttention.from_attention(ref, rank=20, layer_name="blocks.0.attn")
    with pytest.raises(
        ValueError, match=r"'blocks.0.attn': rank=20 is invalid for inputs of T=17 .*at most 17"
    ):
        attn(tokens())  # T = 17 known only at run time for a model without patch_embed


def test_stats_stay_on_the_device_and_pickle_as_numbers() -> None:
    """The ranks and energies are summed on the device (no host read per forward); a copy or pickle of the
    module (a checkpoint's skeleton) holds plain numbers instead of those tensors, with the same values."""
    import copy
    import pickle

    attn = SVDOutputAttention.from_attention(dense(), energy=0.9)
    attn(tokens())
    attn(tokens())
    st = attn.stats
    assert isinstance(st.rank_sum, torch.Tensor) and isinstance(st.energy_sum, torch.Tensor)
    for clone in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn))):
        cs = clone.stats
        assert not any(isinstance(v, torch.Tensor) for v in vars(cs).values())
        assert cs.rank_mean == st.rank_mean and cs.energy_mean == st.energy_mean
        assert cs.rank_range == st.rank_range and isinstance(cs.rank_range[0], int)
