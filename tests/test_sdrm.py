"""decomp=sdrm: SDRM attention (Eq. 14, Algorithms 2 and 4) against dense attention, the method on a tiny ViT,
errors, AdaMatrix fallback, the calibrated basis and the run figures (issue #5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from attention_fixtures import random_images, seeded_dense, tiny_vit
from omegaconf import OmegaConf

from lrk.decomp import build_method
from lrk.decomp.attention.sdrm import SDRMMethod, reset_sdrm_stats, sdrm_metrics, sdrm_modules
from lrk.errors import LrkConfigError
from lrk.layers.attention.blockwise import AdaptiveBlockSize, blockwise_attention
from lrk.layers.attention.sdrm import SDRMAttention
from lrk.models import MultiHeadSelfAttention, attention_modules

CONF = Path(__file__).resolve().parent.parent / "conf" / "decomp" / "sdrm.yaml"
B, T, D, H = 3, 17, 32, 2
SOLVERS = ["gram", "svd", "lowrank", "adamatrix"]


def dense(dtype: torch.dtype = torch.float64) -> MultiHeadSelfAttention:
    return seeded_dense(D, H, dtype)


def tokens(dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum, as real tokens have, so that phi < 1 cuts real components
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -2, D, dtype=torch.float64)
    return ((torch.randn(B, T, D, generator=g, dtype=torch.float64) * scales) @ basis.T).to(dtype)


def vit(depth: int = 2) -> torch.nn.Module:
    return tiny_vit(D, H, depth)  # 8x8 patches + cls = 65


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return random_images(n, seed=seed)


# --- the attention module ------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_full_energy_equals_dense(solver: str, chunk: int | None) -> None:
    """phi = 1 keeps every component: Y V V^T = Y, so Eq. 14 is the dense projection (float64, 1e-10).
    chunk=1: each Y is 17 x 32 (wide, rank 17): V spans its rows, still exact."""
    ref, x = dense(), tokens()
    sdrm = SDRMAttention.from_attention(ref, energy=1.0, solver=solver, svd_batch_size=chunk)
    torch.testing.assert_close(sdrm(x), ref(x), atol=1e-10, rtol=0)


def test_full_rank_equals_dense_float32() -> None:
    ref, x = dense(torch.float32), tokens(torch.float32)
    sdrm = SDRMAttention.from_attention(ref, rank=D)
    torch.testing.assert_close(sdrm(x), ref(x), atol=2e-5, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_low_energy_differs_and_is_the_projection(solver: str) -> None:
    """phi < 1 changes the output, and the result is dense attention on Y V_r V_r^T (Eq. 14)."""
    ref, x = dense(), tokens()
    sdrm = SDRMAttention.from_attention(ref, energy=0.7, solver=solver, svd_batch_size=None)
    out = sdrm(x)
    assert (out - ref(x)).abs().max() > 1e-3
    Y = x.reshape(-1, D)
    _, _, Vh = torch.linalg.svd(Y, full_matrices=False)
    r = round(sdrm.stats.rank_sum)
    assert 1 <= r < D
    Vr = Vh[:r].T
    projected = (Y @ Vr @ Vr.T).reshape(B, T, D)
    torch.testing.assert_close(out, ref(projected), atol=1e-6, rtol=0)


def test_blocks_equal_unblocked_for_every_size() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, T, 16, generator=g) for _ in range(3))
    full = blockwise_attention(q, k, v)
    naive = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v
    torch.testing.assert_close(full, naive, atol=1e-6, rtol=0)
    for b in range(1, T + 1):
        for key_blocks in (False, True):
            out = blockwise_attention(q, k, v, b, key_blocks)
            torch.testing.assert_close(
                out, full, atol=1e-6, rtol=0, msg=f"block {b}, key_blocks {key_blocks}"
            )


@pytest.mark.parametrize("block", [1, 4, 16, T, "adaptive"])
@pytest.mark.parametrize("key_blocks", [False, True])
def test_module_blocks_equal_unblocked(block: int | str, key_blocks: bool) -> None:
    ref, x = dense(torch.float32), tokens(torch.float32)
    plain = SDRMAttention.from_attention(ref, energy=0.8)
    blocked = SDRMAttention.from_attention(ref, energy=0.8, block_size=block, block_keys=key_blocks)
    torch.testing.assert_close(blocked(x), plain(x), atol=1e-6, rtol=0)


def test_per_head_loop_equals_batched_heads() -> None:
    """Algorithm 2 run one head at a time (its own columns of W^Q, W^K, W^V) = the batched split."""
    ref, x = dense(), tokens()
    for kwargs in ({"energy": 0.8}, {"energy": 0.8, "block_size": 5}):
        batched = SDRMAttention.from_attention(ref, **kwargs)
        looped = SDRMAttention.from_attention(ref, head_loop=True, **kwargs)
        torch.testing.assert_close(looped(x), batched(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"energy": 0.5},
        {"energy": 0.8, "block_size": 5},
        {"energy": 0.8, "block_size": 5, "block_keys": True},
        {"rank": 20, "svd_batch_size": 1},
        {"energy": 1.0, "svd_batch_size": 2},
    ],
)
def test_factored_core_equals_explicit_qkv(kwargs: dict) -> None:
    """core=factored (Q K^T = Z' M_h Z'^T, softmax(.) V = (softmax(.) Z') P_v^T) gives Eq. 14's numbers and
    gradients; auto takes it when r + 1 < d_h."""
    ref = dense()
    explicit = SDRMAttention.from_attention(ref, core="qkv", **kwargs).train()
    factored = SDRMAttention.from_attention(ref, core="factored", **kwargs).train()
    x1, x2 = tokens().requires_grad_(True), tokens().requires_grad_(True)
    out1, out2 = explicit(x1), factored(x2)
    torch.testing.assert_close(out2, out1, atol=1e-12, rtol=0)
    out1.square().sum().backward()
    out2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(factored.qkv.weight.grad, explicit.qkv.weight.grad, atol=1e-10, rtol=0)
    auto = SDRMAttention.from_attention(ref, energy=0.5)
    bases = auto._bases(tokens())
    assert auto._use_factored(bases) == (bases[0][2].shape[1] + 1 < D // H)


def test_images_never_mix_with_one_image_per_chunk() -> None:
    ref, x = dense(), tokens()
    sdrm = SDRMAttention.from_attention(ref, energy=0.8, svd_batch_size=1, block_size=4, block_keys=True)
    before = sdrm(x)
    x2 = x.clone()
    x2[1] = torch.randn(T, D, dtype=x.dtype) * 5
    after = sdrm(x2)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


def test_shared_chunk_couples_images_only_through_the_basis() -> None:
    """svd_batch_size > 1 (the paper's chunks): one basis for the chunk, so image 0 depends on image 1 through
    V_r. Attention never mixes: with the basis held fixed, image 0's output ignores image 1."""
    ref, x = dense(), tokens()
    chunked = SDRMAttention.from_attention(ref, energy=0.8, svd_batch_size=B)
    x2 = x.clone()
    x2[1] = torch.randn(T, D, dtype=x.dtype) * 5
    assert not torch.allclose(chunked(x2)[0], chunked(x)[0])  # the basis moved
    # the same basis for both inputs (a calibrated, frozen one): image 0 is untouched by image 1
    frozen = SDRMAttention.from_attention(ref, energy=0.8, subspace="calibrated")
    Y = x.reshape(-1, D)
    frozen.fit_basis(Y.T @ Y, Y.shape[0])
    assert torch.equal(frozen(x2)[0], frozen(x)[0])
    # the attention core alone: perturbing image 1's q, k, v leaves image 0's output unchanged
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, 16, generator=g, dtype=torch.float64) for _ in range(3))
    k2 = k.clone()
    k2[1] += 1.0
    for block in (None, 3):
        assert torch.equal(blockwise_attention(q, k2, v, block)[0], blockwise_attention(q, k, v, block)[0])


def test_gradients_reach_weights_and_input_through_the_projection() -> None:
    """The subspace is a constant: d out / d x is that of dense attention on x V_r V_r^T (chain rule through
    the projection), and every weight gets a gradient."""
    ref = dense()
    sdrm = SDRMAttention.from_attention(ref, energy=0.8).train()
    x = tokens().requires_grad_(True)
    sdrm(x).square().sum().backward()
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
        grad = sdrm.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the same gradient from the explicit projection with V_r fixed
    Y = x.detach().reshape(-1, D)
    _, _, Vh = torch.linalg.svd(Y, full_matrices=False)
    Vr = Vh[: round(sdrm.stats.rank_sum)].T
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2 @ Vr @ Vr.T).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-8, rtol=0)


def test_short_final_chunk_clamps_a_fixed_rank() -> None:
    ref = dense()
    sdrm = SDRMAttention.from_attention(
        ref, rank=20, svd_batch_size=2
    )  # chunks of 2 images (34 rows) and 1 (17)
    out = sdrm(tokens())
    assert torch.isfinite(out).all()
    assert sdrm.stats.clamped == 1 and sdrm.stats.rank_sum == 20 + 17


def test_non_finite_input_is_a_clear_error() -> None:
    sdrm = SDRMAttention.from_attention(dense(), energy=0.9)
    x = tokens()
    x[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite inputs"):
        sdrm(x)


def test_adamatrix_divergence_falls_back_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    import lrk.linalg.adamatrix as ada

    def diverge(*args, **kwargs):
        raise ada._Diverged("forced by the test")

    monkeypatch.setattr(ada, "_run", diverge)
    ref, x = dense(), tokens()
    sdrm = SDRMAttention.from_attention(ref, energy=0.8, solver="adamatrix", svd_batch_size=1)
    gram = SDRMAttention.from_attention(ref, energy=0.8, solver="gram", svd_batch_size=1)
    out = sdrm(x)
    torch.testing.assert_close(out, gram(x), atol=1e-10, rtol=0)
    assert sdrm.stats.fallbacks == B
    metrics = sdrm_metrics(torch.nn.Sequential(sdrm))
    assert metrics["decomp/fallbacks"] == B
    assert all(math.isfinite(v) for v in metrics.values())


def test_adamatrix_reports_iterations_and_error() -> None:
    sdrm = SDRMAttention.from_attention(dense(), energy=0.8, solver="adamatrix", svd_batch_size=1)
    x = tokens()
    sdrm(x)
    m = sdrm_metrics(torch.nn.Sequential(sdrm))
    assert m["decomp/adamatrix_iterations_mean"] >= 0 and 0 < m["decomp/adamatrix_rel_error"] < 1
    assert m["decomp/energy"] >= 0.8 - 1e-9 and m["decomp/factorizations"] == B


def test_adaptive_block_rule() -> None:
    """Section 4: start at the largest block within the memory budget, halve while not slower, go back to
    the larger block when speed drops, halve at once when the memory budget is exceeded."""
    rule = AdaptiveBlockSize(budget_mb=1.0, tolerance=0.1, warmup=0)
    # score row of batch 2 x heads 2 x 64 keys x 4 bytes = 1 KiB: a 1 MiB budget holds 1024 rows -> T = 64
    assert rule.choose(2, 2, 64, 64, 4) == 64
    rule.update(64, 1.0, 100)  # 0.01 s per token
    assert rule.choose(2, 2, 64, 64, 4) == 32
    rule.update(32, 1.05, 100)  # within 10 %: keep going down
    assert rule.choose(2, 2, 64, 64, 4) == 16
    rule.update(16, 1.3, 100)  # > 10 % slower than 32: back to 32 and stay
    assert rule.choose(2, 2, 64, 64, 4) == 32 and rule.settled
    rule.update(32, 9.0, 100)
    assert rule.choose(2, 2, 64, 64, 4) == 32
    assert rule.choose(256, 2, 64, 64, 4) == 8  # a 128x larger batch: 1 MiB holds 8 rows -> 32 halved to 8
    assert AdaptiveBlockSize(budget_mb=1e-6).choose(2, 2, 64, 64, 4) == 1


# --- the method ------------------------------------------------------------------------------------------
def test_method_swaps_every_attention_and_changes_the_output() -> None:
    model, x = vit(), images()
    ref = model(x)
    report = build_method({"name": "sdrm", "energy": 0.5}).apply(model, [images(4, 1)])
    found = attention_modules(model)
    assert [n for n, _ in found] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(isinstance(m, SDRMAttention) for _, m in found)
    assert [r["name"] for r in report.rows] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(1 <= r["rank"] <= D and r["energy"] >= 0.5 - 1e-9 for r in report.rows)
    assert report.metrics()["decomp/layers"] == 2
    assert (model(x) - ref).abs().max() > 1e-4
    m = sdrm_metrics(model)
    assert (
        m["decomp/factorizations"] == 2 and m["time/rr_s"] > 0
    )  # the forward above (stats reset after apply)


def test_method_full_energy_reproduces_the_dense_model() -> None:
    model = vit().double()
    x = images().double()
    ref = model(x)
    build_method({"name": "sdrm", "energy": 1.0, "svd_batch_size": 1}).apply(model, [])
    torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=0)


def test_method_targets_and_skip_globs() -> None:
    model = vit()
    build_method({"name": "sdrm", "skip": ["blocks.0.*"]}).apply(model, [])
    assert [n for n, _ in sdrm_modules(model)] == ["blocks.1.attn"]
    with pytest.raises(LrkConfigError, match=r"matches no attention module"):
        build_method({"name": "sdrm", "targets": ["blocks.*.mlp"]}).apply(vit(), [])


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"energy": 0.0}, r"decomp.energy=0.0 is invalid"),
        ({"energy": 1.5}, r"decomp.energy=1.5 is invalid"),
        ({"energy": 0.9, "rank": 4}, r"set exactly one"),
        ({"rank": 0}, r"decomp.rank=0 is invalid"),
        ({"ratio": 0.5}, r"decomp.ratio=0.5 is invalid"),
        ({"block_size": 0}, r"decomp.block_size=0 is invalid"),
        ({"block_size": "big"}, r"decomp.block_size='big' is invalid"),
        ({"svd_batch_size": 0}, r"decomp.svd_batch_size=0 is invalid"),
        ({"solver": "qr"}, r"decomp.solver='qr' is invalid"),
        ({"subspace": "global"}, r"decomp.subspace='global' is invalid"),
        ({"adamatrix": {"lr": -1}}, r"decomp.adamatrix=.* is invalid"),
        ({"adamatrix": {"speed": 2}}, r"decomp.adamatrix=.* is invalid"),
        ({"subspace": "calibrated", "calibration_batches": 0}, r"calibration_batches=0 is invalid"),
    ],
)
def test_bad_config_is_one_clear_error(cfg: dict, match: str) -> None:
    with pytest.raises(LrkConfigError, match=match):
        build_method({"name": "sdrm", **cfg})


def test_errors_that_need_the_model() -> None:
    model = vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LrkConfigError, match=r"decomp.block_size=66 is invalid for this model: .*\[1, 65\]"):
        build_method({"name": "sdrm", "block_size": 66}).apply(model, [])
    with pytest.raises(
        LrkConfigError, match=r"decomp.rank=33 is invalid for this model: .*min\(b t, d\) = 32"
    ):
        build_method({"name": "sdrm", "rank": 33}).apply(model, [])
    with pytest.raises(LrkConfigError, match=r"decomp.rank=20 is invalid.*17"):
        SDRMMethod({"name": "sdrm", "rank": 20, "svd_batch_size": 1}).apply(_FakeTokens(17), [])
    assert not sdrm_modules(model)  # nothing was swapped
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _FakeTokens(torch.nn.Module):
    """A model whose attention sees 17 tokens (patch_embed.num_patches = 16, one class token)."""

    def __init__(self, patches: int) -> None:
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.num_patches = patches - 1
        self.num_prefix_tokens = 1
        self.attn = MultiHeadSelfAttention(D, H)


def test_calibrated_basis_is_fitted_once_and_frozen() -> None:
    model = vit(depth=1)
    calib = [images(4, 1), images(4, 2)]
    captured = []
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        for batch in calib:
            model(batch)
    handle.remove()
    report = build_method({"name": "sdrm", "subspace": "calibrated", "energy": 0.9}).apply(model, calib)
    attn = model.blocks[0].attn
    r = int(attn.basis_rank)
    Y = torch.cat(captured).reshape(-1, D).double()
    _, s, Vh = torch.linalg.svd(Y, full_matrices=False)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    assert r == int((energy < 0.9 - 1e-12).sum()) + 1 == report.rows[0]["rank"]
    # the basis spans the leading right singular vectors of all calibration tokens
    P = attn.basis[:, :r].double()
    torch.testing.assert_close(P @ P.T, Vh[:r].T @ Vh[:r], atol=1e-4, rtol=0)
    frozen = attn.basis.clone()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in (3, 4):
        model(images(4, seed)).sum().backward()
        opt.step()
    assert torch.equal(attn.basis, frozen) and int(attn.basis_rank) == r
    assert "basis" in attn.state_dict() and sdrm_metrics(model)["time/rr_s"] > 0  # the calibration time


def test_metrics_and_reset() -> None:
    model = vit()
    assert sdrm_metrics(model) == {}
    build_method({"name": "sdrm", "block_size": "adaptive"}).apply(model, [])
    m = sdrm_metrics(model)
    assert m["decomp/factorizations"] == 0 and "decomp/rank_mean" not in m  # nothing factorized: no NaN
    model(images())
    m = sdrm_metrics(model)
    assert m["decomp/factorizations"] == 2 and m["decomp/cr"] > 1 and 1 <= m["decomp/block_size"] <= 65
    reset_sdrm_stats(model)
    assert sdrm_metrics(model)["time/rr_s"] == 0


def test_config_file_builds_the_paper_defaults() -> None:
    cfg = OmegaConf.load(CONF)
    method = build_method(cfg)
    assert isinstance(method, SDRMMethod) and method.stage == "init"
    s = method.settings
    assert s["energy"] == 0.9 and s["rank"] is None and s["solver"] == "gram" and s["subspace"] == "batch"
    assert s["adamatrix"]["lambdas"] == (1e-3, 1e-4, 1e-4)
    # a rank alone (energy left null) replaces the default phi, as the sweep configs set them
    assert build_method(OmegaConf.merge(cfg, {"rank": 4})).settings["energy"] is None
