"""decomp=attn_tensor: Tucker/CP approximations of the attention tensor (seeds/vit_nla_slides.txt, "Used methods.
Tensor decomposition") against dense attention and against independent torch computations; the method on a tiny
ViT; errors (issue #4)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tensorly as tl
import torch
from attention_fixtures import random_images, seeded_dense, tiny_vit
from omegaconf import OmegaConf
from tensorly.cp_tensor import cp_to_tensor

from lrk.decomp import build_method
from lrk.decomp.attention.attn_tensor import AttnTensorMethod, attn_tensor_metrics, attn_tensor_modules
from lrk.errors import LrkConfigError
from lrk.layers.attention.attn_tensor import TensorAttention
from lrk.linalg.attention_tensor import (
    cp_apply,
    cp_factors,
    cp_reconstruct,
    cp_solve_factor,
    mode_energy_ranks,
    project_core,
    tucker_apply,
    tucker_factors,
    tucker_to_tensor,
)
from lrk.linalg.tucker import unfolding
from lrk.models import MultiHeadSelfAttention

CONF = Path(__file__).resolve().parent.parent / "conf" / "decomp" / "attn_tensor.yaml"
B, T, D, H = 3, 9, 16, 2
SCOPES = ["batch", "image"]


def dense(dtype: torch.dtype = torch.float64) -> MultiHeadSelfAttention:
    return seeded_dense(D, H, dtype)


def tokens(dtype: torch.dtype = torch.float64, seed: int = 1, n: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, T, D, generator=g, dtype=torch.float64) * 2).to(dtype)


def vit(depth: int = 1) -> torch.nn.Module:
    return tiny_vit(D, H, depth, image_size=8, patch_size=2)  # 4x4 patches + cls = 17


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return random_images(n, 8, seed)


def explicit_output(module: TensorAttention, x: torch.Tensor) -> torch.Tensor:
    """proj(A_hat V) with A_hat formed densely from the module's own decomposition."""
    A, v = module.attention_probs(x)
    parts = [module.approximate_tensor(a) @ v[a.start : a.end] for a in module.decompose(A)]
    out = torch.cat(parts).transpose(1, 2).reshape(x.shape)
    return module.proj(out)


def hosvd_error(A: torch.Tensor, ranks: list[int], modes: tuple[int, ...]) -> float:
    """Relative error of the truncated HOSVD computed independently with torch.linalg.svd."""
    approx = A
    for mode, r in zip(modes, ranks, strict=True):
        U = torch.linalg.svd(unfolding(A, mode), full_matrices=False)[0][:, :r]
        approx = torch.movedim(
            torch.tensordot(U @ U.T, torch.movedim(approx, mode, 0), dims=([1], [0])), 0, mode
        )
    return float((approx - A).norm() / A.norm())


# --- (1) full ranks = dense; (2) low ranks differ ------------------------------------------------------------
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_tucker_ranks_reproduce_dense_attention(scope: str, dtype: torch.dtype) -> None:
    ref, x = dense(dtype), tokens(dtype)
    full = TensorAttention.from_attention(ref, rank=T, head_rank=H, scope=scope, monitor=True)
    out = full(x)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=0)
    assert full.stats.ranks_mean() == [H, T, T] and abs(full.stats.energy_mean() - 1) < 1e-5


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("kwargs", [{"rank": 2, "head_rank": 1}, {"energy": 0.7}, {"ratio": 0.3}])
def test_low_rank_tucker_differs_and_is_a_hat_v(scope: str, kwargs: dict) -> None:
    """The output differs from dense at low rank and is exactly proj(A_hat V) with A_hat formed explicitly:
    the factored evaluation changes no number."""
    ref, x = dense(), tokens()
    low = TensorAttention.from_attention(ref, scope=scope, monitor=True, **kwargs)
    out, want = low(x).detach(), ref(x).detach()
    assert float((out - want).norm() / want.norm()) > 1e-3
    torch.testing.assert_close(out, explicit_output(low, x), atol=1e-12, rtol=0)
    assert 0 < low.stats.energy_mean() < 1


# --- (3) a genuine Tucker decomposition --------------------------------------------------------------------
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("hooi", [0, 3])
@torch.no_grad()
def test_tucker_has_the_requested_multilinear_ranks_and_hosvd_error(scope: str, hooi: int) -> None:
    module = TensorAttention.from_attention(
        dense(), rank=4, head_rank=1, scope=scope, hooi_iters=hooi, monitor=True
    )
    A, _ = module.attention_probs(tokens())
    approxs = module.decompose(A)
    assert len(approxs) == (1 if scope == "batch" else B)
    for a in approxs:
        A_hat = module.approximate_tensor(a)  # [n, H, T, T]
        A_part = A[a.start : a.end]
        for mode, r in zip((1, 2, 3), (1, 4, 4), strict=True):  # the ranks of the three mode unfoldings
            assert int(torch.linalg.matrix_rank(unfolding(A_hat, mode))) == r
        err = float((A_hat - A_part).norm() / A_part.norm())
        assert err <= hosvd_error(A_part, [1, 4, 4], (1, 2, 3)) + 1e-4
        # the core is the projection of A on the factors, and the factors are orthonormal
        for U in a.factors:
            torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-10, rtol=0)
        # A_hat is an orthogonal projection of A: retained energy = 1 - relative error^2
        assert abs(a.energy - (1 - err**2)) < 1e-8


@torch.no_grad()
def test_energy_rule_reads_each_mode_unfolding() -> None:
    module = TensorAttention.from_attention(dense(), energy=0.8, monitor=True)
    A, _ = module.attention_probs(tokens())
    (a,) = module.decompose(A)
    want = []
    for mode in (1, 2, 3):
        s = torch.linalg.svdvals(unfolding(A, mode))
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        want.append(int((share < 0.8 - 1e-12).sum()) + 1)
    assert list(a.ranks) == want == mode_energy_ranks(A, 0.8, (1, 2, 3))
    # the retained energy is that of the truncated HOSVD at these ranks, computed independently (torch SVDs of
    # the unfoldings): A_hat is an orthogonal projection, so ||A_hat||^2 / ||A||^2 = 1 - rel_error^2
    exact = 1 - hosvd_error(A, want, (1, 2, 3)) ** 2
    assert a.energy == pytest.approx(exact, abs=1e-9)
    assert exact < 1 - 1e-6  # phi = 0.8 cut something: the comparison is not 1 == 1


def test_tucker_apply_matches_the_dense_product_linalg() -> None:
    g = torch.Generator().manual_seed(5)
    A = torch.rand(2, 3, 7, 7, generator=g, dtype=torch.float64)
    V = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64)
    factors = tucker_factors(A, [2, 3, 4], (1, 2, 3))
    core = project_core(A, factors, (1, 2, 3))
    assert core.shape == (2, 2, 3, 4)
    torch.testing.assert_close(tucker_apply(core, factors, V), tucker_to_tensor(core, factors, (1, 2, 3)) @ V)


# --- (4) CP ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", SCOPES)
@torch.no_grad()
def test_cp_output_is_a_hat_v_with_a_hat_in_cp_form(scope: str) -> None:
    ref, x = dense(), tokens()
    cp = TensorAttention.from_attention(ref, decomposition="cp", rank=3, scope=scope, monitor=True)
    out, want = cp(x), ref(x)
    assert float((out - want).norm() / want.norm()) > 1e-3
    torch.testing.assert_close(out, explicit_output(cp, x), atol=1e-12, rtol=0)
    A, _ = cp.attention_probs(x)
    for a in cp.decompose(A):
        head, query, key = a.factors
        assert head.shape == (H, 3) and key.shape == (T, 3) and query.shape == (a.end - a.start, T, 3)
        with tl.backend_context("pytorch"):  # TensorLy's own reconstruction of the CP model, image by image
            rebuilt = torch.stack(
                [cp_to_tensor((torch.ones(3, dtype=q.dtype), [head, q, key])) for q in query]
            )
        torch.testing.assert_close(cp.approximate_tensor(a), rebuilt, atol=1e-12, rtol=0)
        err = float((rebuilt - A[a.start : a.end]).norm() / A[a.start : a.end].norm())
        assert (
            abs(a.energy - (1 - err**2)) < 1e-8
        )  # least squares in the query mode: an orthogonal projection


@pytest.mark.parametrize("rank", [3, 4])
def test_cp_recovers_a_tensor_of_known_cp_rank(rank: int) -> None:
    g = torch.Generator().manual_seed(7)
    true = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 10, 10)]
    X = cp_reconstruct(true)  # CP rank 3
    factors = cp_factors(X, rank, n_iter_max=200, tol=1e-14)
    query = cp_solve_factor(X, factors, 1)
    X_hat = cp_reconstruct([factors[0], query, factors[2]])
    assert float((X_hat - X).norm() / X.norm()) < 1e-6
    V = torch.randn(4, 10, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cp_apply(factors[0], query, factors[2], V), X_hat @ V)
    low = cp_factors(X, 1, n_iter_max=50)
    X_low = cp_reconstruct([low[0], cp_solve_factor(X, low, 1), low[2]])
    assert float((X_low - X).norm() / X.norm()) > 1e-3  # rank 1 cannot hold it


# --- (5) images never mix with scope=image ------------------------------------------------------------------
@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
def test_scope_image_output_does_not_depend_on_other_images(decomposition: str) -> None:
    ref = dense()
    module = TensorAttention.from_attention(ref, rank=3, decomposition=decomposition, scope="image")
    x = tokens(n=4)
    alone = module(x[1:2])
    others = torch.randn(4, T, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3
    others[2] = x[1]
    batched = module(others)
    torch.testing.assert_close(batched[2], alone[0], atol=1e-12, rtol=0)
    x2 = x.clone()
    x2[0] = torch.randn(T, D, dtype=x.dtype) * 5
    assert torch.equal(module(x2)[1:], module(x)[1:])  # same batch size: bit-identical


def test_scope_batch_couples_images_only_through_the_shared_factors() -> None:
    """scope=batch shares factors: image 0 depends on image 1 through them at low rank, not at full rank."""
    ref, x = dense(), tokens()
    x2 = x.clone()
    x2[1] = torch.randn(T, D, dtype=x.dtype) * 5
    low = TensorAttention.from_attention(ref, rank=3, scope="batch")
    assert not torch.allclose(low(x2)[0], low(x)[0], atol=1e-6)
    full = TensorAttention.from_attention(ref, rank=T, scope="batch")
    torch.testing.assert_close(full(x2)[0], full(x)[0], atol=1e-10, rtol=0)


# --- (6) gradients ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"rank": 3}, {"energy": 0.7, "scope": "image"}, {"decomposition": "cp"}])
def test_gradients_reach_the_query_and_key_weights(kwargs: dict) -> None:
    module = TensorAttention.from_attention(dense(), **kwargs).train()
    module(tokens()).square().sum().backward()
    grad = module.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    for part, rows in (("q", slice(0, D)), ("k", slice(D, 2 * D)), ("v", slice(2 * D, 3 * D))):
        assert grad[rows].abs().sum() > 0, part
    assert module.proj.weight.grad is not None


def test_full_rank_gradients_equal_dense_gradients() -> None:
    ref = dense()
    full = TensorAttention.from_attention(ref, rank=T)
    x = tokens()
    ref(x).square().sum().backward()
    full(x).square().sum().backward()
    torch.testing.assert_close(full.qkv.weight.grad, ref.qkv.weight.grad, atol=1e-8, rtol=0)


# --- the method on a tiny ViT --------------------------------------------------------------------------------
def test_method_swaps_and_reports_measured_errors() -> None:
    model, calib = vit(), [images(3, 1)]
    captured = []
    dense_attn = model.blocks[0].attn
    handle = dense_attn.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        ref = model(images())
        model(calib[0])
    handle.remove()
    report = build_method({"name": "attn_tensor", "rank": 4, "head_rank": 1}).apply(model, calib)
    (name, new), *_ = attn_tensor_modules(model)
    assert name == "blocks.0.attn" and isinstance(new, TensorAttention)
    (row,) = report.rows
    with torch.no_grad():  # the honest number: this module against the dense one on the calibration input
        x = captured[1]
        want = float((new(x) - dense_attn(x)).norm() / dense_attn(x).norm())
    assert row["rel_error"] == pytest.approx(want, rel=1e-4) and row["rel_error"] > 1e-3
    assert row["ranks"] == [1, 4, 4] and row["rank"] == 4 and row["shape"] == [H, 17, 17]
    assert row["params_before"] == row["params_after"] and 0 < row["energy"] < 1 and row["seconds"] > 0
    with torch.no_grad():
        assert (model(images()) - ref).abs().max() > 1e-6  # float32 rounding is ~1e-8 here; the change 3e-5
    metrics = attn_tensor_metrics(model)
    assert (
        metrics["decomp/decompositions"] == 2
        and metrics["decomp/rank_mean"] == 4
        and metrics["time/rr_s"] > 0
    )


def test_method_full_ranks_reproduce_the_dense_model() -> None:
    model = vit(depth=2).double()
    x = images().double()
    with torch.no_grad():
        ref = model(x)
        report = build_method({"name": "attn_tensor", "ratio": 1.0, "scope": "image"}).apply(model, [x])
        torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=0)
    assert [r["name"] for r in report.rows] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(r["rel_error"] < 1e-10 and r["ranks"] == [H, 17, 17] for r in report.rows)


def test_config_file_builds_the_defaults() -> None:
    method = build_method(OmegaConf.load(CONF))
    assert isinstance(method, AttnTensorMethod)
    s = method.settings
    assert s["decomposition"] == "tucker" and s["scope"] == "batch" and s["ratio"] == 0.5
    assert s["rank"] is None and s["energy"] is None and s["head_rank"] is None


# --- (7) errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"energy": 0.0}, r"decomp.energy=0.0 is invalid: .*\(0, 1\]"),
        ({"energy": 1.5}, r"decomp.energy=1.5 is invalid: .*\(0, 1\]"),
        ({"ratio": 0}, r"decomp.ratio=0 is invalid: .*\(0, 1\]"),
        ({"ratio": 1.2}, r"decomp.ratio=1.2 is invalid: .*\(0, 1\]"),
        ({"rank": 4, "energy": 0.9}, r"decomp.rank=4, decomp.energy=0.9 is invalid.*exactly one"),
        ({"rank": 4, "ratio": 0.5}, r"decomp.rank=4, decomp.ratio=0.5 is invalid.*exactly one"),
        ({"rank": 0}, r"decomp.rank=0 is invalid: .*\[1, T\]"),
        ({"head_rank": 0}, r"decomp.head_rank=0 is invalid: .*\[1, H\]"),
        ({"decomposition": "tt"}, r"decomp.decomposition='tt' is invalid: .*tucker, cp"),
        ({"scope": "chunk"}, r"decomp.scope='chunk' is invalid: .*batch, image"),
        (
            {"decomposition": "cp", "energy": 0.9},
            r"decomp.energy=0.9 is invalid with decomp.decomposition=cp",
        ),
        (
            {"decomposition": "cp", "head_rank": 1},
            r"decomp.head_rank=1 is invalid with decomp.decomposition=cp",
        ),
        ({"hooi_iters": -1}, r"decomp.hooi_iters=-1 is invalid"),
        ({"cp_iters": 0}, r"decomp.cp_iters=0 is invalid"),
        ({"default_ratio": 2.0}, r"decomp.default_ratio=2.0 is invalid: .*\(0, 1\]"),
    ],
)
def test_bad_config_is_one_clear_error(cfg: dict, match: str) -> None:
    with pytest.raises(LrkConfigError, match=match):
        build_method({"name": "attn_tensor", **cfg})


def test_errors_that_need_the_model_leave_it_unchanged() -> None:
    model = vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LrkConfigError, match=r"decomp.rank=18 is invalid for this model.*T=17.*\[1, 17\]"):
        build_method({"name": "attn_tensor", "rank": 18}).apply(model, [images()])
    with pytest.raises(LrkConfigError, match=r"decomp.rank=18 is invalid for this model.*\[1, 17\]"):
        build_method({"name": "attn_tensor", "rank": 18, "decomposition": "cp"}).apply(model, [images()])
    with pytest.raises(LrkConfigError, match=r"decomp.head_rank=3 is invalid for this model.*H=2.*\[1, 2\]"):
        build_method({"name": "attn_tensor", "head_rank": 3}).apply(model, [images()])
    assert not attn_tensor_modules(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a module is built without config: impossible arguments are ValueErrors naming the argument
    with pytest.raises(ValueError, match=r"head_rank=3 is invalid: .*\[1, 2\].*H = 2 heads"):
        TensorAttention.from_attention(dense(), head_rank=3)
    with pytest.raises(ValueError, match=r"rank=10 is invalid for inputs of T=9 .*\[1, 9\]"):  # T at run time
        TensorAttention.from_attention(dense(), rank=10)(tokens())


def test_metrics_are_empty_without_modules_and_finite() -> None:
    assert attn_tensor_metrics(vit()) == {}
    module = TensorAttention.from_attention(dense())
    m = attn_tensor_metrics(torch.nn.Sequential(module))
    assert m["decomp/decompositions"] == 0 and "decomp/rank_mean" not in m
    module(tokens())
    m = attn_tensor_metrics(torch.nn.Sequential(module))
    assert m["decomp/rank_mean"] == math.ceil(0.5 * T) and all(math.isfinite(v) for v in m.values())
