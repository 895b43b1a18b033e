"""decomp=pca: PCA-projected attention (seeds/vit_nla_slides.txt, "Used methods. PCA") against dense attention and
independent computations: full rank is dense, low rank is the projection it claims, an exact subspace is kept
exactly, images never mix, no gradient through the basis, the energy rule, errors, checkpoints (issue #4)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from attention_fixtures import random_images, seeded_dense, tiny_vit
from omegaconf import OmegaConf

from lrk.decomp import build_method
from lrk.decomp.attention.pca import PCAMethod, pca_modules
from lrk.errors import LrkConfigError
from lrk.layers.attention.pca import PCAAttention
from lrk.linalg.pca import (
    energy_rank_of_moment,
    moment_spectrum,
    principal_basis,
    retained_energy,
    second_moment,
)
from lrk.linalg.rank import energy_rank
from lrk.models import MultiHeadSelfAttention, attention_modules

CONF = Path(__file__).resolve().parent.parent / "conf" / "decomp" / "pca.yaml"
B, T, D, H = 3, 9, 32, 2
HD = D // H


def dense(dtype: torch.dtype = torch.float64) -> MultiHeadSelfAttention:
    return seeded_dense(D, H, dtype)


def tokens(n: int = B, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    # scaled up so that the softmax is far from uniform and the scores matter
    g = torch.Generator().manual_seed(seed)
    return (4.0 * torch.randn(n, T, D, generator=g, dtype=torch.float64)).to(dtype)


def qk_features(module: MultiHeadSelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v per head ([B, H, T, d_k]) from the dense weights, computed here, not by the module under test."""
    qkv = (x @ module.qkv.weight.T + module.qkv.bias).reshape(x.shape[0], x.shape[1], 3, H, HD)
    return tuple(qkv.permute(2, 0, 3, 1, 4).unbind(0))


def manual_attention(module: MultiHeadSelfAttention, x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """softmax(q P k^T / sqrt(d_k)) v, then proj, with the projector P ([..., d_k, d_k]) given."""
    q, k, v = qk_features(module, x)
    scores = q @ P @ k.mT / math.sqrt(HD)
    out = torch.softmax(scores, dim=-1) @ v
    return module.proj(out.transpose(1, 2).reshape(x.shape))


def calibrated(ref: MultiHeadSelfAttention, rank: int, x: torch.Tensor, center: bool = False) -> PCAAttention:
    """A calibrated module fitted on x's q/k (moments summed over images, centred when asked)."""
    m = PCAAttention.from_attention(ref, rank=rank, basis="calibrated", center=center)
    q, k, _ = qk_features(ref, x)
    feats = torch.cat([q, k], dim=-2).transpose(0, 1).reshape(H, -1, HD)  # all tokens of each head
    m.fit_basis(second_moment(feats.detach(), center))
    return m


def vit(depth: int = 1) -> torch.nn.Module:
    return tiny_vit(D, H, depth)  # 8x8 patches + cls = 65


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return random_images(n, seed=seed)


# --- lrk.linalg.pca ------------------------------------------------------------------------------------------
def test_principal_basis_is_the_top_eigenspace_batched() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 20, 8, generator=g, dtype=torch.float64) * torch.logspace(
        0, -1, 8, dtype=torch.float64
    )
    for center in (False, True):
        basis = principal_basis(x, 3, center=center)
        assert basis.shape == (3, 2, 8, 3)
        torch.testing.assert_close(basis.mT @ basis, torch.eye(3, dtype=x.dtype).expand(3, 2, 3, 3))
        for i in range(3):
            for h in range(2):
                y = x[i, h] - (x[i, h].mean(0) if center else 0)
                _, _, Vh = torch.linalg.svd(y, full_matrices=False)
                torch.testing.assert_close(basis[i, h] @ basis[i, h].T, Vh[:3].T @ Vh[:3], atol=1e-10, rtol=0)
    # the randomized solver spans the same subspace when q = rank + oversample covers all d columns
    low = principal_basis(x, 3, method="lowrank", oversample=5, niter=4)
    exact = principal_basis(x, 3)
    torch.testing.assert_close(low @ low.mT, exact @ exact.mT, atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match=r"rank=9 is invalid.*\[1, 8\]"):
        principal_basis(x, 9)
    with pytest.raises(ValueError, match=r"method='qr' is invalid"):
        principal_basis(x, 2, method="qr")


def test_energy_helpers_match_the_singular_values() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 8, dtype=torch.float64)
    evals, _ = moment_spectrum(second_moment(x))
    s = torch.linalg.svdvals(x)
    torch.testing.assert_close(evals, s**2)
    for phi in (0.3, 0.8, 0.99, 1.0):
        assert energy_rank_of_moment(evals, phi) == energy_rank(s, phi)
    assert float(retained_energy(evals, 3)) == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()))


# --- the attention module ------------------------------------------------------------------------------------
MODES = [("batch", False), ("batch", True), ("calibrated", False), ("calibrated", True)]


@pytest.mark.parametrize(("basis", "center"), MODES)
def test_full_rank_equals_dense(basis: str, center: bool) -> None:
    """r = d_k: B B^T = I, and the scale is the dense 1/sqrt(d_k), so the module is dense attention."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ref, x = dense(dtype), tokens(dtype=dtype)
        if basis == "batch":
            pca = PCAAttention.from_attention(ref, rank=HD, center=center)
        else:
            pca = calibrated(ref, HD, tokens(dtype=dtype, seed=5), center)
        torch.testing.assert_close(pca(x), ref(x), atol=tol, rtol=0)
    low = PCAAttention.from_attention(dense(), rank=HD, solver="lowrank", center=center)
    torch.testing.assert_close(low(tokens()), dense()(tokens()), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("basis", "center"), MODES)
def test_low_rank_differs_and_is_the_projection(basis: str, center: bool) -> None:
    """r = 2 < d_k changes the output by > 1e-3 (relative), and the output is dense attention with q k^T replaced by
    q P k^T, P the projector on the top-r right singular vectors of [q_h; k_h] (an independent SVD)."""
    ref, x = dense(), tokens()
    r = 2
    fit_x = tokens(seed=5)
    pca = (
        PCAAttention.from_attention(ref, rank=r, center=center)
        if basis == "batch"
        else calibrated(ref, r, fit_x, center)
    )
    with torch.no_grad():
        out, want = pca(x), ref(x)
    assert float((out - want).norm() / want.norm()) > 1e-3
    source = x if basis == "batch" else fit_x
    q, k, _ = qk_features(ref, source)
    feats = torch.cat([q, k], dim=-2).detach()  # [B, H, 2T, d_k]
    if basis == "calibrated":
        feats = feats.transpose(0, 1).reshape(H, -1, HD)  # pooled over the images
    if center:
        feats = feats - feats.mean(dim=-2, keepdim=True)
    _, _, Vh = torch.linalg.svd(feats, full_matrices=False)
    P = Vh[..., :r, :].mT @ Vh[..., :r, :]
    with torch.no_grad():
        torch.testing.assert_close(out, manual_attention(ref, x, P), atol=1e-10, rtol=0)


def subspace_attention(r: int) -> tuple[MultiHeadSelfAttention, torch.Tensor]:
    """A dense module whose q and k of head h lie exactly in span(U_h), U_h a random r-dim subspace of R^{d_k}."""
    ref = dense()
    g = torch.Generator().manual_seed(7)
    U = torch.linalg.qr(torch.randn(H, HD, r, generator=g, dtype=torch.float64))[0]  # [H, d_k, r]
    with torch.no_grad():
        for part in (0, 1):  # q, then k rows of qkv (each split into heads)
            A = torch.randn(H, r, D, generator=g, dtype=torch.float64) / math.sqrt(D)
            b = torch.randn(H, r, 1, generator=g, dtype=torch.float64)
            rows = slice(part * D, (part + 1) * D)
            ref.qkv.weight[rows] = (U @ A).reshape(D, D)
            ref.qkv.bias[rows] = (U @ b).reshape(D)
    return ref, U


@pytest.mark.parametrize(("basis", "center"), MODES)
def test_exact_subspace_is_kept_exactly(basis: str, center: bool) -> None:
    """q and k in an r-dim subspace per head: rank r reproduces dense attention (the basis is that subspace: the
    projection is exact on it); rank r - 1 does not."""
    r = 5
    ref, U = subspace_attention(r)
    x = tokens()
    want = ref(x)
    outs = {}
    for rank in (r, r - 1):
        if basis == "batch":
            pca = PCAAttention.from_attention(ref, rank=rank, center=center)
        else:
            pca = calibrated(ref, rank, tokens(seed=5), center)
        outs[rank] = pca(x)
        if rank == r and basis == "calibrated":
            P = pca.pca_basis @ pca.pca_basis.mT
            torch.testing.assert_close(P, U @ U.mT, atol=1e-8, rtol=0)
    torch.testing.assert_close(outs[r], want, atol=1e-5, rtol=0)
    assert float((outs[r - 1] - want).detach().norm() / want.detach().norm()) > 1e-3


@pytest.mark.parametrize("basis", ["batch", "calibrated"])
def test_images_never_mix(basis: str) -> None:
    """Image i's output is the same alone and inside a batch of other random images (the batch basis is
    computed per image and head)."""
    ref, x = dense(), tokens(4)
    pca = PCAAttention.from_attention(ref, rank=3) if basis == "batch" else calibrated(ref, 3, tokens(seed=5))
    together = pca(x)
    for i in range(4):
        torch.testing.assert_close(pca(x[i : i + 1])[0], together[i], atol=1e-12, rtol=0)
    others = x.clone()
    others[1:] = tokens(3, seed=9)
    torch.testing.assert_close(pca(others)[0], together[0], atol=1e-12, rtol=0)
    assert not torch.allclose(pca(others)[1], together[1])


def test_no_gradient_through_the_basis_but_the_weights_learn() -> None:
    """basis=batch: the gradient is that of the computation with B held constant (not the one through eigh), and
    qkv / proj get gradients."""
    ref, x = dense(), tokens()
    r = 3
    pca = PCAAttention.from_attention(ref, rank=r).train()
    xg = x.clone().requires_grad_(True)
    pca(xg).square().sum().backward()
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
        grad = pca.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    def gradients(differentiable_basis: bool) -> tuple[torch.Tensor, torch.Tensor]:
        m = copy.deepcopy(ref).train()
        xi = x.clone().requires_grad_(True)
        q, k, _ = qk_features(m, xi)
        feats = torch.cat([q, k], dim=-2)
        if not differentiable_basis:
            feats = feats.detach()
        _, evecs = torch.linalg.eigh(feats.mT @ feats)
        Bs = evecs.flip(-1)[..., :r]
        manual_attention(m, xi, Bs @ Bs.mT).square().sum().backward()
        return m.qkv.weight.grad, xi.grad

    const_w, const_x = gradients(False)
    torch.testing.assert_close(pca.qkv.weight.grad, const_w, atol=1e-9, rtol=0)
    torch.testing.assert_close(xg.grad, const_x, atol=1e-9, rtol=0)
    through_w, _ = gradients(True)
    assert (through_w - const_w).abs().max() > 1e-6  # the test would see a gradient through the basis
    # a calibrated basis is a buffer: not a parameter, no gradient
    cal = calibrated(ref, r, tokens(seed=5)).train()
    cal(x).sum().backward()
    assert "pca_basis" not in dict(cal.named_parameters()) and cal.pca_basis.grad is None
    assert cal.qkv.weight.grad is not None and cal.qkv.weight.grad.abs().sum() > 0


def test_calibrated_basis_survives_a_state_dict_round_trip() -> None:
    ref, x = dense(), tokens()
    fitted = calibrated(ref, 4, tokens(seed=5))
    fresh = PCAAttention(D, H, rank=4, basis="calibrated").double().eval()
    with pytest.raises(RuntimeError, match="no fitted basis"):
        fresh(x)
    fresh.load_state_dict(fitted.state_dict())
    assert "pca_basis" in fitted.state_dict() and fitted.state_dict()["pca_basis"].shape == (H, HD, 4)
    torch.testing.assert_close(fresh.pca_basis, fitted.pca_basis, atol=0, rtol=0)
    torch.testing.assert_close(fresh(x), fitted(x), atol=0, rtol=0)
    # from_attention copies the basis too (same name and shape)
    torch.testing.assert_close(PCAAttention.from_attention(fitted)(x), fitted(x), atol=0, rtol=0)


# --- the method ----------------------------------------------------------------------------------------------
def captured_inputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    attn = model.blocks[0].attn
    seen: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return seen


@pytest.mark.parametrize("basis", ["batch", "calibrated"])
@pytest.mark.parametrize("phi", [0.5, 0.9, 0.99])
def test_energy_rule_picks_the_smallest_rank(basis: str, phi: float) -> None:
    """r = max over heads of energy_rank(singular values of all calibration q/k tokens of the head), computed
    here by an SVD; the report's energy and rel_error are the independently measured figures."""
    model = vit()
    calib = [images(4, 1), images(4, 2)]
    inputs = captured_inputs(model, calib)
    dense_attn = copy.deepcopy(model.blocks[0].attn)
    report = build_method({"name": "pca", "energy": phi, "basis": basis}).apply(model, calib)
    attn = model.blocks[0].attn
    assert isinstance(attn, PCAAttention)
    dense64 = copy.deepcopy(dense_attn).double()
    with torch.no_grad():
        feats = [torch.cat(qk_features(dense64, x.double())[:2], dim=-2) for x in inputs]  # [N, H, 2T, d_k]
    stacked = torch.cat(feats).transpose(0, 1).reshape(H, -1, HD)
    s = torch.linalg.svdvals(stacked)  # [H, d_k]
    want = max(energy_rank(s[h], phi) for h in range(H))
    assert attn.rank == want == report.rows[0]["rank"] and report.rows[0]["ranks"] == [want] * H
    if want > 1:  # smallest: one rank less loses phi in some head
        assert min(float((s[h, : want - 1] ** 2).sum() / (s[h] ** 2).sum()) for h in range(H)) < phi
    if basis == "calibrated":
        energy = float((s[:, :want] ** 2).sum() / (s**2).sum())
    else:  # each image's own basis
        per = torch.linalg.svdvals(torch.cat(feats))  # [N, H, d_k]
        energy = float((per[..., :want] ** 2).sum() / (per**2).sum())
    assert report.rows[0]["energy"] == pytest.approx(energy, rel=1e-9) and energy >= phi - 1e-9
    with torch.no_grad():
        diff = sum(float((attn(x) - dense_attn(x)).square().sum()) for x in inputs)
        norm = sum(float(dense_attn(x).square().sum()) for x in inputs)
    assert report.rows[0]["rel_error"] == pytest.approx(math.sqrt(diff / norm), rel=1e-4)
    assert report.rows[0]["params_before"] == report.rows[0]["params_after"]


def test_rank_and_ratio_rules_and_the_default() -> None:
    calib = [images(2, 1)]
    for cfg, want in (({"rank": 3}, 3), ({"ratio": 0.3}, 5), ({"ratio": 1.0}, HD), ({}, 8)):
        model = vit()
        report = build_method({"name": "pca", **cfg}).apply(model, calib)
        assert model.blocks[0].attn.rank == want == report.rows[0]["rank"], cfg


def test_method_swaps_every_attention_and_changes_the_output() -> None:
    model, x = vit(depth=2), images()
    ref = model(x)
    report = build_method({"name": "pca", "rank": 2}).apply(model, [images(4, 1)])
    assert [n for n, _ in pca_modules(model)] == ["blocks.0.attn", "blocks.1.attn"]
    assert [n for n, _ in attention_modules(model)] == [r["name"] for r in report.rows]
    assert all(
        r["kind"] == "pca_batch" and r["shape"] == [130, HD] and r["rel_error"] > 0 for r in report.rows
    )
    assert (model(x) - ref).abs().max() > 1e-5
    m = report.metrics()
    assert m["decomp/layers"] == 2 and m["decomp/rank_mean"] == 2 and m["decomp/layer_compression"] == 1.0
    full = vit(depth=2).double()
    want = full(x.double())
    build_method({"name": "pca", "rank": HD, "basis": "calibrated"}).apply(full, [images(4, 1).double()])
    torch.testing.assert_close(full(x.double()), want, atol=1e-10, rtol=0)
    assert "blocks.0.attn.pca_basis" in full.state_dict()


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"rank": 0}, r"decomp.rank=0 is invalid: .*\[1, d_k\]"),
        ({"rank": 2.5}, r"decomp.rank=2.5 is invalid"),
        ({"rank": 4, "energy": 0.9}, r"decomp.rank=4, decomp.energy=0.9 is invalid.*exactly one"),
        ({"ratio": 0.5, "energy": 0.9}, r"decomp.ratio=0.5, decomp.energy=0.9 is invalid"),
        ({"energy": 0.0}, r"decomp.energy=0.0 is invalid: .*\(0, 1\]"),
        ({"energy": 1.5}, r"decomp.energy=1.5 is invalid: .*\(0, 1\]"),
        ({"ratio": 0.0}, r"decomp.ratio=0.0 is invalid: .*\(0, 1\]"),
        ({"ratio": 1.2}, r"decomp.ratio=1.2 is invalid: .*\(0, 1\]"),
        ({"default_ratio": 2.0}, r"decomp.default_ratio=2.0 is invalid"),
        ({"basis": "global"}, r"decomp.basis='global' is invalid: .*batch, calibrated"),
        ({"center": "yes"}, r"decomp.center='yes' is invalid"),
        ({"solver": "qr"}, r"decomp.solver='qr' is invalid: .*eigh, lowrank"),
        ({"niter": -1}, r"decomp.niter=-1 is invalid"),
        ({"subspace": "batch"}, r"decomp key\(s\) \['subspace'\] are invalid"),
    ],
)
def test_bad_config_is_one_clear_error(cfg: dict, match: str) -> None:
    with pytest.raises(LrkConfigError, match=match):
        build_method({"name": "pca", **cfg})


def test_errors_that_need_the_model() -> None:
    model = vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LrkConfigError, match=r"decomp.rank=17 is invalid for this model: .*\[1, 16\]"):
        build_method({"name": "pca", "rank": 17}).apply(model, [images(2)])
    assert not pca_modules(model)  # nothing was swapped
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a module is built without config: an impossible argument is a ValueError naming it
    with pytest.raises(ValueError, match=r"rank=17 is invalid: .*\[1, 16\].*d_k"):
        PCAAttention(D, H, rank=17)


def test_config_file_builds_the_defaults() -> None:
    cfg = OmegaConf.load(CONF)
    method = build_method(cfg)
    assert isinstance(method, PCAMethod) and method.stage == "init"
    s = method.settings
    assert s["ratio"] == 0.5 and s["rank"] is None and s["energy"] is None
    assert s["basis"] == "batch" and s["center"] is False and s["solver"] == "eigh"
    assert build_method(OmegaConf.merge(cfg, {"energy": 0.9})).settings["ratio"] is None


def test_batch_basis_time_is_counted_as_rank_reduction():
    from lrk.decomp.attention.pca import pca_metrics

    torch.manual_seed(0)
    dense = MultiHeadSelfAttention(16, 2)
    x = torch.randn(3, 5, 16)
    batch = PCAAttention.from_attention(dense, rank=4, basis="batch")
    model = torch.nn.Sequential(batch)
    assert pca_metrics(model) == {"time/rr_s": 0.0, "time/rr_forward_s": 0.0}
    batch(x)
    batch(x)
    metrics = pca_metrics(model)
    assert batch.stats.forwards == 2
    assert metrics["time/rr_forward_s"] > 0 and metrics["time/rr_s"] == metrics["time/rr_forward_s"]
    assert pca_metrics(torch.nn.Sequential(dense)) == {}
