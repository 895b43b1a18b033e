"""decomp=sdrm, issue #14: the paper's per-head input split (Algorithm 2, Section 3.2: X_i in R^{b x t x d/h},
``head_split=input``) and attention computed from the rank-r factors (``factored``), each against an independent
computation (formed Q, K, V; per-head torch.linalg.svd; the block-diagonal dense attention; the paper's
parameter formula)."""

from __future__ import annotations

import math

import pytest
import torch
from attention_fixtures import random_images, seeded_dense, tiny_vit

from lrk.decomp import build_method
from lrk.decomp.attention.sdrm import sdrm_modules
from lrk.errors import LrkConfigError
from lrk.layers.attention.sdrm import SDRMAttention
from lrk.linalg.tsvd import head_gram_svd
from lrk.measure import count_params
from lrk.models import MultiHeadSelfAttention

B, T, D, H = 3, 17, 32, 2
HD = D // H


def tokens(seed: int = 1, batch: int = B) -> torch.Tensor:
    """float64 tokens with a decaying spectrum (so that phi < 1 cuts real components)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -2, D, dtype=torch.float64)
    return (torch.randn(batch, T, D, generator=g, dtype=torch.float64) * scales) @ basis.T


def built(ref: MultiHeadSelfAttention, x: torch.Tensor, **kwargs: object) -> SDRMAttention:
    module = SDRMAttention.from_attention(ref, **kwargs)
    if kwargs.get("subspace") == "calibrated":
        Y = x.reshape(-1, D)
        module.fit_basis(Y.T @ Y, Y.shape[0])
    return module.train()


def energy_rank(s: torch.Tensor, phi: float) -> int:
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    return int((share < phi - 1e-12).sum()) + 1


# --- factored == formed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["projected", "input"])
@pytest.mark.parametrize("subspace", ["batch", "calibrated"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"energy": 0.8},
        {"energy": 0.8, "block_size": 5},
        {"energy": 0.8, "block_size": 4, "block_keys": True},
        {"rank": 3, "svd_batch_size": 1},
        {"energy": 1.0, "svd_batch_size": 2},
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_factored_equals_formed_outputs_and_gradients(
    split: str, subspace: str, kwargs: dict, bias: bool
) -> None:
    """factored=True (scores (Z M_h + 1 u_h) Z^T, values (softmax Z) R_h, W^O folded in) gives the numbers and
    every gradient of the formed order (Q, K, V explicit, then W^O), for both head splits and both subspaces."""
    ref, x = seeded_dense(D, H, bias=bias), tokens()
    formed = built(ref, x, head_split=split, subspace=subspace, factored=False, **kwargs)
    fact = built(ref, x, head_split=split, subspace=subspace, factored=True, **kwargs)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out1, out2 = formed(x1), fact(x2)
    torch.testing.assert_close(out2, out1, atol=1e-12, rtol=0)
    (out1.square().sum() + out1.sum()).backward()
    (out2.square().sum() + out2.sum()).backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-11, rtol=0)
    for (name, p1), (_, p2) in zip(formed.named_parameters(), fact.named_parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-10, rtol=0, msg=name)


def test_factored_with_attention_dropout_keeps_the_bias_path() -> None:
    """With attention dropout the rows of softmax(.) no longer sum to 1: the factored order carries b_v through
    [Z, 1]. Dropout p -> 0 in training gives the formed numbers; at p > 0 the output stays finite and differs."""
    ref, x = seeded_dense(D, H), tokens()
    ref.attn_drop = 1e-12  # dropout path taken, (almost) nothing dropped
    formed = built(ref, x, energy=0.8, factored=False)
    fact = built(ref, x, energy=0.8, factored=True)
    torch.testing.assert_close(fact(x), formed(x), atol=1e-9, rtol=0)


def test_auto_rule_is_rank_below_head_dim() -> None:
    """factored='auto' takes the factored order exactly when r < d_h (fewer flops: T^2 r vs T^2 d_h per head);
    True / False force it; head_loop runs the formed per-head loop."""
    ref = seeded_dense(D, H)
    auto = SDRMAttention.from_attention(ref)
    assert [auto.use_factored(r) for r in (1, HD - 1, HD, D)] == [True, True, False, False]
    assert SDRMAttention.from_attention(ref, factored=True).use_factored(D)
    assert not SDRMAttention.from_attention(ref, factored=False).use_factored(1)
    assert not SDRMAttention.from_attention(ref, factored=True, head_loop=True).use_factored(1)


def test_factored_order_counts_fewer_flops_at_low_rank() -> None:
    """lrk.measure.count_flops (attention products included) sees the cheaper order at r = 2 of d_h = 16."""
    from lrk.measure import count_flops

    ref, x = seeded_dense(D, H, torch.float32), tokens().float()
    formed = SDRMAttention.from_attention(ref, rank=2, factored=False).eval()
    fact = SDRMAttention.from_attention(ref, rank=2, factored=True).eval()
    f_formed, f_fact = count_flops(formed, x), count_flops(fact, x)
    assert f_fact.total < f_formed.total
    assert f_fact.attention < f_formed.attention


# --- head_split=input: the paper's Algorithm 2 -------------------------------------------------------------
def test_input_split_at_full_energy_is_the_block_diagonal_dense_attention() -> None:
    """phi = 1 keeps every component of every X_i: the input split is then the dense attention whose qkv keeps
    only its per-head diagonal blocks (head i's q/k/v from head i's d/h input features)."""
    ref, x = seeded_dense(D, H), tokens()
    sdrm = SDRMAttention.from_attention(ref, energy=1.0, head_split="input")
    masked = seeded_dense(D, H)
    with torch.no_grad():
        keep = torch.zeros(3 * D, D, dtype=torch.float64)
        for h in range(H):
            for part in range(3):
                keep[part * D + h * HD : part * D + (h + 1) * HD, h * HD : (h + 1) * HD] = 1.0
        masked.qkv.weight.mul_(keep)
    torch.testing.assert_close(sdrm(x), masked(x), atol=1e-12, rtol=0)
    assert (sdrm(x) - ref(x)).abs().max() > 1e-3  # not the dense attention: the off-diagonal blocks are gone


@pytest.mark.parametrize("factored", [False, True])
def test_input_split_is_a_per_head_tsvd(factored: bool) -> None:
    """Every head's own t-SVD (torch.linalg.svd of Y_i = reshape(X_i, (b t, d/h)), the energy rule per head),
    then Eq. 14 per head, softmax attention per head and image, concatenation and W^O (Eq. 19)."""
    ref, x = seeded_dense(D, H), tokens()
    sdrm = SDRMAttention.from_attention(
        ref, energy=0.8, head_split="input", svd_batch_size=None, factored=factored
    )
    out = sdrm(x)
    W, b = ref.qkv.weight.reshape(3, H, HD, D), ref.qkv.bias.reshape(3, H, HD)
    heads, ranks = [], []
    for h in range(H):
        Xi = x[..., h * HD : (h + 1) * HD].reshape(-1, HD)
        _, s, Vh = torch.linalg.svd(Xi, full_matrices=False)
        r = energy_rank(s, 0.8)
        ranks.append(r)
        Xp = (Xi @ Vh[:r].T @ Vh[:r]).reshape(B, T, HD)
        q, k, v = (Xp @ W[p, h, :, h * HD : (h + 1) * HD].T + b[p, h] for p in range(3))
        heads.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HD), -1) @ v)
    expected = ref.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    assert sdrm.stats.factorizations == H and sdrm.stats.rank_sum == sum(ranks) and len(set(ranks)) >= 1
    assert all(r < HD for r in ranks)


@pytest.mark.parametrize("solver", ["svd", "lowrank", "adamatrix"])
def test_input_split_other_solvers_match_gram(solver: str) -> None:
    """The non-gram solvers run head by head (AdaMatrix one warm-started solver per head): at a fixed rank they
    span the same per-head subspaces as the batched gram route (to the solver's tolerance)."""
    ref, x = seeded_dense(D, H), tokens()
    gram = SDRMAttention.from_attention(ref, rank=4, head_split="input")
    other = SDRMAttention.from_attention(ref, rank=4, head_split="input", solver=solver)
    torch.testing.assert_close(other(x), gram(x), atol=2e-3, rtol=0)
    assert len(other._ada_heads) == (H if solver == "adamatrix" else 0)


def test_head_loop_equals_batched_heads_for_the_input_split() -> None:
    ref, x = seeded_dense(D, H), tokens()
    batched = SDRMAttention.from_attention(ref, energy=0.8, head_split="input", factored=False)
    looped = SDRMAttention.from_attention(ref, energy=0.8, head_split="input", head_loop=True)
    torch.testing.assert_close(looped(x), batched(x), atol=1e-12, rtol=0)


def test_head_gram_svd_matches_per_head_svd() -> None:
    Y = tokens(batch=2).reshape(-1, H, HD).transpose(0, 1).contiguous()  # [H, 34, 16]
    res = head_gram_svd(Y, energy=0.9)
    for h in range(H):
        _, s, Vh = torch.linalg.svd(Y[h], full_matrices=False)
        r = energy_rank(s, 0.9)
        assert res.ranks[h] == r
        Vr = res.V[h, :, :r]
        torch.testing.assert_close(Vr @ Vr.T, Vh[:r].T @ Vh[:r], atol=1e-10, rtol=0)  # same subspace
        assert torch.all(res.V[h, :, r:] == 0)  # zero-padded beyond the head's rank
        assert res.energies[h] == pytest.approx(float((s[:r] ** 2).sum() / (s**2).sum()), rel=1e-10)
    with pytest.raises(ValueError, match="needs m >= n"):
        head_gram_svd(Y[:, :10], rank=2)


def test_input_split_parameters_are_the_papers_per_head_count() -> None:
    """count_params of the built module: per head W^Q_i, W^K_i, W^V_i of (d/h) x (d/h) plus their biases, i.e.
    3 (d/h)^2 + 3 d/h (the dense/projected head has 3 d (d/h) + 3 d/h), plus W^O (d^2 + d) unchanged."""
    for dim, heads in ((32, 2), (128, 4), (384, 6)):
        ref = MultiHeadSelfAttention(dim, heads)
        sdrm = SDRMAttention.from_attention(ref, head_split="input")
        hd = dim // heads
        per_head = 3 * hd * hd + 3 * hd
        assert count_params(sdrm.qkv) == heads * per_head
        assert count_params(sdrm) == heads * per_head + dim * dim + dim
        assert (
            count_params(SDRMAttention.from_attention(ref))
            == count_params(ref)
            == 3 * dim * dim + 3 * dim + dim * dim + dim
        )
        assert count_params(ref.qkv) - count_params(sdrm.qkv) == 3 * dim * dim * (heads - 1) // heads


def test_input_split_calibrated_basis_round_trips() -> None:
    ref, x = seeded_dense(D, H), tokens()
    a = built(ref, x, energy=0.8, head_split="input", subspace="calibrated").eval()
    b = SDRMAttention.from_attention(ref, energy=0.8, head_split="input", subspace="calibrated").eval()
    b.load_state_dict(a.state_dict())
    assert a.basis.shape == (H, HD, HD) and a.basis_rank.shape == (H,)
    assert b._basis_ranks == a._basis_ranks and all(1 <= r < HD for r in a._basis_ranks)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


# --- the method ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("subspace", ["batch", "calibrated"])
def test_method_input_split_swaps_and_reports(subspace: str) -> None:
    model = tiny_vit(D, H, 2)
    dense_params = count_params(model)
    method = build_method({"name": "sdrm", "head_split": "input", "subspace": subspace, "energy": 0.9})
    rows = method.apply(model, [random_images(4)]).rows
    mods = sdrm_modules(model)
    assert len(mods) == 2 and all(m.head_split == "input" for _, m in mods)
    assert count_params(model) == dense_params - 2 * 3 * D * D * (H - 1) // H
    assert all(r["kind"] == f"sdrm_{subspace}_input" and 1 <= r["rank"] <= HD for r in rows)
    assert all(r["params_after"] < r["params_before"] for r in rows)
    assert torch.isfinite(model(random_images(2, seed=3))).all()


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (
            {"head_split": "heads"},
            r"decomp.head_split='heads' is invalid: it must be one of projected, input",
        ),
        (
            {"factored": "sometimes"},
            r"decomp.factored='sometimes' is invalid: it must be auto, true or false",
        ),
        ({"factored": None}, r"decomp.factored=None is invalid"),
    ],
)
def test_bad_options_are_one_clear_error(cfg: dict, match: str) -> None:
    with pytest.raises(LrkConfigError, match=match):
        build_method({"name": "sdrm", **cfg})


def test_input_split_errors_that_need_the_model() -> None:
    """rank > d/h, and a d that does not divide into the heads: LrkConfigError in prepare, model unchanged."""
    model = tiny_vit(D, H, 1)
    with pytest.raises(
        LrkConfigError, match=r"decomp.rank=17 is invalid for decomp.head_split=input .*\[1, 16\]"
    ):
        build_method({"name": "sdrm", "head_split": "input", "rank": 17}).apply(model, [])
    odd = tiny_vit(D, H, 1)
    odd.blocks[0].attn.num_heads = 3  # a module whose d = 32 does not split into 3 heads
    with pytest.raises(
        LrkConfigError, match=r"d=32 does not divide into num_heads h=3 .*\[1, 2, 4, 8, 16, 32\]"
    ):
        build_method({"name": "sdrm", "head_split": "input"}).apply(odd, [])
    assert not sdrm_modules(model) and not sdrm_modules(odd)
