"""decomp=sdrm: SDRM attention (Eq. 14, Algorithms 2 and 4) against dense attention, the method on a tiny ViT,
errors, AdaMatrix fallback, the calibrated basis and the run figures (issue #5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from attention_fixtures import random_images, seeded_dense, tiny_vit
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from lrk.decomp import build_method
from lrk.decomp.attention.sdrm import SDRMMethod, reset_sdrm_stats, sdrm_metrics, sdrm_modules
from lrk.errors import LrkConfigError
from lrk.layers.attention.blockwise import AdaptiveBlockSize, blockwise_attention
from lrk.layers.attention.sdrm import SDRMAttention
from lrk.linalg.adamatrix import AdaMatrixSolver
from lrk.linalg.tsvd import optimal_rank_error
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
    """factored=True (Q K^T = Z' M_h Z'^T, softmax(.) V = (softmax(.) Z') P_v^T) gives Eq. 14's numbers and
    gradients; auto takes it when r + 1 < d_h."""
    ref = dense()
    explicit = SDRMAttention.from_attention(ref, factored=False, **kwargs).train()
    factored = SDRMAttention.from_attention(ref, factored=True, **kwargs).train()
    x1, x2 = tokens().requires_grad_(True), tokens().requires_grad_(True)
    out1, out2 = explicit(x1), factored(x2)
    torch.testing.assert_close(out2, out1, atol=1e-12, rtol=0)
    out1.square().sum().backward()
    out2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(factored.qkv.weight.grad, explicit.qkv.weight.grad, atol=1e-10, rtol=0)
    auto = SDRMAttention.from_attention(ref, energy=0.5)
    bases = auto._bases(tokens())
    assert auto._use_factored(bases) == (bases[0][2].shape[1] < D // H)


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
    """The figures are those of the solver itself: the same AdaMatrix run by hand on the same chunks (one image
    each, in order, warm-started from chunk to chunk as the module does), its error measured from its factors."""
    sdrm = SDRMAttention.from_attention(dense(), energy=0.8, solver="adamatrix", svd_batch_size=1)
    x = tokens()
    sdrm(x)
    m = sdrm_metrics(torch.nn.Sequential(sdrm))
    solver = AdaMatrixSolver(energy=0.8)
    chunks = [x[i].reshape(-1, D) for i in range(B)]
    results = [solver(Y) for Y in chunks]
    assert m["decomp/factorizations"] == B
    assert m["decomp/adamatrix_iterations_mean"] == pytest.approx(sum(r.iterations for r in results) / B)
    assert m["decomp/rank_mean"] == pytest.approx(sum(r.rank for r in results) / B)
    assert m["decomp/energy"] == pytest.approx(sum(r.energy for r in results) / B, rel=1e-12)
    assert min(r.energy for r in results) >= 0.8 - 1e-9
    # the reported error (the last chunk's) is ||Y - U S V^T|| / ||Y|| of the factors, within 1 % of the
    # Eckart-Young optimum at that rank (torch.linalg.svd)
    Y, last = chunks[-1], results[-1]
    actual = float(torch.linalg.norm(Y - last.reconstruct()) / torch.linalg.norm(Y))
    assert m["decomp/adamatrix_rel_error"] == pytest.approx(actual, rel=1e-6)
    optimum = optimal_rank_error(torch.linalg.svdvals(Y), last.rank)
    assert optimum <= actual * (1 + 1e-9) and actual <= 1.01 * optimum


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
        (
            {"head_split": "output"},
            r"decomp.head_split='output' is invalid: it must be one of projected, input",
        ),
        ({"factored": "maybe"}, r"decomp.factored='maybe' is invalid: it must be auto, true or false"),
        ({"factored": 1}, r"decomp.factored=1 is invalid"),
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


# --- no hidden work: buffers, U, Y V_r, host reads -----------------------------------------------------------
def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def test_batch_mode_has_the_dense_attentions_buffers_only() -> None:
    """subspace=batch keeps no basis: its state dict holds exactly the dense attention's tensors (names and
    sizes); subspace=calibrated adds the D x D basis and its rank and energy (D^2 + 2 numbers)."""
    ref = dense()
    dense_state = ref.state_dict()
    batch = SDRMAttention.from_attention(ref, energy=0.8)
    assert list(batch.buffers()) == [] and list(ref.buffers()) == []
    assert batch.state_dict().keys() == dense_state.keys()
    assert (
        _numel(batch.state_dict().values()) == _numel(dense_state.values()) == 3 * D * D + 3 * D + D * D + D
    )
    calibrated = SDRMAttention.from_attention(ref, energy=0.8, subspace="calibrated")
    extra = set(calibrated.state_dict()) - set(dense_state)
    assert extra == {"basis", "basis_rank", "basis_energy"}
    assert _numel(calibrated.state_dict().values()) == _numel(dense_state.values()) + D * D + 2
    with pytest.raises(RuntimeError, match="subspace='batch'"):
        batch.fit_basis(torch.eye(D, dtype=torch.float64), 100)


def test_batch_mode_loads_a_state_dict_written_with_the_unused_basis() -> None:
    """Batch-mode checkpoints written before carried a zero D x D basis: they still load (strict), into a module
    that has none, and give the same outputs."""
    ref, x = dense(), tokens()
    batch = SDRMAttention.from_attention(ref, energy=0.8)
    old = {
        **batch.state_dict(),
        "basis": torch.zeros(D, D),
        "basis_rank": torch.zeros((), dtype=torch.long),
        "basis_energy": torch.zeros((), dtype=torch.float64),
    }
    fresh = SDRMAttention(D, H, energy=0.8).double()
    fresh.load_state_dict(old, strict=True)
    assert not hasattr(fresh, "basis")
    torch.testing.assert_close(fresh(x), batch(x), atol=0, rtol=0)


def test_calibrated_basis_round_trips_through_the_state_dict() -> None:
    """A loaded calibrated basis: its rank (kept on the host for the forward) comes from the checkpoint."""
    ref, x = dense(), tokens()
    fitted = SDRMAttention.from_attention(ref, energy=0.8, subspace="calibrated")
    Y = x.reshape(-1, D)
    fitted.fit_basis(Y.T @ Y, Y.shape[0])
    loaded = SDRMAttention(D, H, energy=0.8, subspace="calibrated").double()
    loaded.load_state_dict(fitted.state_dict(), strict=True)
    assert loaded._basis_r == int(fitted.basis_rank) > 0
    torch.testing.assert_close(loaded(x), fitted(x), atol=0, rtol=0)


class _Calls(TorchDispatchMode):
    """Records the matrix products (name, input shapes, output shape) and the host reads of tensors
    (``aten._local_scalar_dense``: float(t), int(t), bool(t), t.item()) of the code run inside it."""

    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self) -> None:
        super().__init__()
        self.products: list[tuple[str, list[tuple[int, ...]], tuple[int, ...]]] = []
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.products.append((name, shapes, tuple(out.shape)))
        elif name == "_local_scalar_dense":
            self.host_reads += 1
        return out


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("factored", [False, True])
def test_one_y_v_product_per_chunk_and_eq14_unchanged(chunk: int | None, factored: bool) -> None:
    """The forward forms Y V_r ([m, d] x [d, r]) once per chunk (the solver returns V and S without U), and the
    output is Eq. 14 formed explicitly: Q, K, V from Y V_r V_r^T (V_r from torch.linalg.svd of each chunk, the
    energy rule on its singular values), softmax(Q_h K_h^T / sqrt(d_h)) V_h per head and image, then W^O."""
    ref, x = dense(), tokens()
    sdrm = SDRMAttention.from_attention(ref, energy=0.8, svd_batch_size=chunk, factored=factored)
    with _Calls() as calls:
        out = sdrm(x)
    size = chunk or B
    parts, chunks = [], []
    for s in range(0, B, size):  # the reference, with formed Q, K, V
        Y = x[s : s + size].reshape(-1, D)
        _, sv, Vh = torch.linalg.svd(Y, full_matrices=False)
        share = torch.cumsum(sv**2, 0) / (sv**2).sum()
        r = int((share < 0.8 - 1e-12).sum()) + 1
        chunks.append((Y.shape[0], r))
        Yp = Y @ Vh[:r].T @ Vh[:r]
        q, k, v = (Yp @ ref.qkv.weight.T + ref.qkv.bias).reshape(-1, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // H), dim=-1) @ v
        parts.append(ref.proj(attn.transpose(1, 2).reshape(-1, T, D)))
    torch.testing.assert_close(out, torch.cat(parts), atol=1e-10, rtol=0)
    assert len(chunks) == (1 if chunk is None else 2) and all(r < D for _, r in chunks)
    for m, r in chunks:  # chunk rows m: 51, or 34 (tall) and 17 (wide)
        y_v = [c for c in calls.products if c[1] == [(m, D), (D, r)] and c[2] == (m, r)]
        assert len(y_v) == 1, calls.products  # Y V_r, once
        # every product with Y (m x D, or its transpose) as an operand: the Gram matrix and Y V_r (tall); a wide Y
        # also needs V = Y^T U / S, from the Gram matrix Y Y^T. With U formed there would be one more
        passes = [c for c in calls.products if c[0] == "mm" and ((m, D) in c[1] or (D, m) in c[1])]
        assert len(passes) == (2 if m >= D else 3), passes


def test_calibrated_forward_reads_nothing_from_the_device_unless_monitored() -> None:
    """subspace=calibrated: the basis's rank is on the host and the energy monitor is off by default, so the
    forward does no host read at all; monitor=True measures the energy (two norms read) and records it."""
    ref, x = dense(), tokens()
    Y = x.reshape(-1, D)
    quiet = SDRMAttention.from_attention(ref, energy=0.8, subspace="calibrated")
    loud = SDRMAttention.from_attention(ref, energy=0.8, subspace="calibrated", monitor=True)
    for module in (quiet, loud):
        module.fit_basis(Y.T @ Y, Y.shape[0])
    with _Calls() as off:
        out = quiet(x)
    with _Calls() as on:
        monitored = loud(x)
    torch.testing.assert_close(monitored, out, atol=0, rtol=0)
    assert (off.host_reads, on.host_reads) == (0, 2)
    assert (
        quiet.stats.factorizations == 1
        and quiet.stats.measured == 0
        and quiet.stats.rank_sum == quiet._basis_r
    )
    r = loud._basis_r
    kept = float((x @ loud.basis[:, :r]).square().sum() / x.square().sum())  # ||X V_r||^2 / ||X||^2
    assert loud.stats.measured == 1 and loud.stats.energy_sum == pytest.approx(kept, rel=1e-12)
    assert "decomp/energy" not in sdrm_metrics(torch.nn.Sequential(quiet))
    assert sdrm_metrics(torch.nn.Sequential(loud))["decomp/energy"] == pytest.approx(kept, rel=1e-12)


def test_module_argument_errors_are_value_errors() -> None:
    """Built without config, the module refuses impossible arguments with a ValueError naming the argument (the
    config errors, LrkConfigError naming decomp.<key>, are the method's: test_bad_config_is_one_clear_error)."""
    ref = dense()
    for kwargs, match in [
        ({"rank": 33}, r"rank=33 is invalid: .*\[1, 32\]"),
        ({"rank": 4, "energy": 0.5}, r"energy=0.5, rank=4 is invalid: give at most one"),
        ({"energy": 1.5}, r"energy=1.5 is invalid"),
        ({"subspace": "global"}, r"subspace='global' is invalid: it must be one of batch, calibrated"),
        ({"factored": "fast"}, r"factored='fast' is invalid"),
        ({"head_split": "output"}, r"head_split='output' is invalid"),
        ({"head_split": "input", "rank": 17}, r"rank=17 is invalid: .*\[1, 16\]"),
        ({"svd_batch_size": 0}, r"svd_batch_size=0 is invalid"),
        ({"block_size": "big"}, r"block_size='big' is invalid"),
        ({"solver": "adamatrix", "adamatrix": {"lr": -1}}, r"adamatrix=.* is invalid: lr=-1"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            SDRMAttention.from_attention(ref, **kwargs)
        assert not isinstance(info.value, LrkConfigError)
    with pytest.raises(ValueError, match=r"block_size=18 is invalid for inputs of T=17"):
        SDRMAttention.from_attention(ref, block_size=18)(tokens())  # T known at run time only
