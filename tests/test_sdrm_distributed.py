"""decomp.distributed_heads (issue #14 item 3): SDRM's heads spread over the ranks of a torch.distributed group.

Two (or four) CPU processes on gloo (127.0.0.1, a free port) each run the sharded module and, beside it, the same
module in one process (same weights, same input) and compare outputs and every gradient; the bytes each rank sent
(/proc/self/io, the kernel's count of the process's writes: gloo's sockets) against the formula of
lrk.layers.attention.distributed. The config errors run without a process group.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from attention_fixtures import random_images, tiny_vit

from lrk.decomp import build_method
from lrk.decomp.attention import sdrm as sdrm_method
from lrk.errors import LrkConfigError
from lrk.layers.attention.distributed import all_reduce_head_grads, head_range, sharded_layer_bytes
from lrk.layers.attention.sdrm import SDRMAttention
from lrk.models import MultiHeadSelfAttention

T, D = 17, 32
PROC_IO = "/proc/self/io"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def written_bytes() -> int | None:
    """Bytes this process has written (files and sockets: gloo's sends); None where /proc is missing."""
    if not os.path.exists(PROC_IO):
        return None
    with open(PROC_IO) as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def tokens(batch: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """Tokens with a decaying spectrum (phi < 1 cuts real components)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -2, D, dtype=torch.float64)
    return ((torch.randn(batch, T, D, generator=g, dtype=torch.float64) * scales) @ basis.T).to(dtype)


def run_case(case: dict[str, Any], rank: int, world: int) -> None:
    """One configuration on this rank: sharded module vs the one-process module, outputs and gradients."""
    case = dict(case)
    dtype = case.pop("dtype", torch.float64)
    heads, batch, bias = case.pop("heads", 2), case.pop("batch", 3), case.pop("bias", True)
    atol = 1e-10 if dtype == torch.float64 else 1e-5
    rtol = 0.0 if dtype == torch.float64 else 1e-5  # float32 gradients of ~60 differ in the 7th digit
    torch.manual_seed(0)
    ref = MultiHeadSelfAttention(D, heads, qkv_bias=bias).to(dtype)
    one = SDRMAttention.from_attention(ref, **case).train()
    shard = SDRMAttention.from_attention(ref, distributed_heads=True, **case).train()
    x = tokens(batch, dtype)
    if case.get("subspace") == "calibrated":
        Y = x.reshape(-1, D)
        for m in (one, shard):
            m.fit_basis(Y.T @ Y, Y.shape[0])
    assert shard.shard() == (rank, world) and one.shard() is None
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out1 = one(x1)
    before = written_bytes()
    out2 = shard(x2)
    sent_fwd = None if before is None else written_bytes() - before
    where = f"rank {rank}: {case}, {dtype}"

    def msg(detail: str) -> str:
        return f"{where}: {detail}"

    torch.testing.assert_close(out2, out1, atol=atol, rtol=rtol, msg=msg)
    (out1.square().sum() + out1.sum()).backward()
    before = written_bytes()
    (out2.square().sum() + out2.sum()).backward()
    sent_bwd = None if before is None else written_bytes() - before
    torch.testing.assert_close(x2.grad, x1.grad, atol=atol, rtol=rtol, msg=msg)
    torch.testing.assert_close(shard.proj.weight.grad, one.proj.weight.grad, atol=atol, rtol=rtol, msg=msg)
    # W^Q, W^K, W^V: this rank's heads' rows are exact, the other heads' rows untouched (they ran elsewhere)
    mine = head_range(heads, rank, world)
    hd = D // heads
    g1, g2 = one.qkv.weight.grad, shard.qkv.weight.grad
    if case.get("head_split") == "input":  # [h, 3 hd, hd]
        g1, g2 = g1.reshape(heads, -1), g2.reshape(heads, -1)
    else:  # [3 d, d], rows [q | k | v], each split into heads
        g1, g2 = g1.reshape(3, heads, hd, D).transpose(0, 1), g2.reshape(3, heads, hd, D).transpose(0, 1)
    owned = torch.zeros(heads, dtype=torch.bool)
    owned[mine] = True
    torch.testing.assert_close(g2[owned], g1[owned], atol=atol, rtol=rtol, msg=msg)
    assert not g2[~owned].any(), where
    all_reduce_head_grads(shard)  # the gradient of one process on every rank
    for (name, p1), (_, p2) in zip(one.named_parameters(), shard.named_parameters(), strict=True):
        torch.testing.assert_close(
            p2.grad, p1.grad, atol=atol, rtol=rtol, msg=lambda d, name=name: f"{where}, {name}: {d}"
        )
    # bytes: the counter per call, and what the kernel saw this process write (gloo adds small headers)
    expect = sharded_layer_bytes(batch, T, D, world, x.element_size())
    st = shard.stats
    assert (st.gathers, st.gather_bytes, st.reduces, st.reduce_bytes) == (
        1,
        expect["forward"],
        1,
        expect["backward"],
    ), where
    if (
        world == 2 and sent_fwd is not None
    ):  # a ring all-reduce of W = 2 sends B T d s: the formula's 2 (W-1)/W
        assert expect["forward"] <= sent_fwd <= expect["forward"] + 4096, (where, sent_fwd, expect)
        assert expect["backward"] <= sent_bwd <= expect["backward"] + 4096, (where, sent_bwd, expect)


def worker(rank: int, world: int, port: int, cases: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a failing rank must not leave the other waiting for long
    )
    try:
        for case in cases:
            run_case(case, rank, world)
    finally:
        dist.destroy_process_group()


def spawn(cases: list[dict[str, Any]], world: int = 2) -> None:
    mp.spawn(worker, args=(world, free_port(), cases), nprocs=world, join=True)


# --- two processes against one --------------------------------------------------------------------------
def test_two_ranks_equal_one_process_for_both_head_splits() -> None:
    """Heads sharded over 2 gloo ranks == one process: outputs, dL/dX, W^O's and W^Q,K,V's gradients (each rank
    only its own heads' rows, the others zero; all of them after all_reduce_head_grads), in float64 and float32,
    and the bytes sent per rank (counter and kernel count) as the formula says."""
    spawn(
        [
            {"energy": 0.8},  # projected split, factored (r < d/h)
            {"energy": 0.8, "head_split": "input"},
            {"rank": 3, "head_split": "input", "factored": False, "dtype": torch.float32},
        ]
    )


SLOW_CASES = [
    {"energy": 0.8, "factored": False, "heads": 4},
    {"energy": 0.8, "factored": True, "heads": 4, "bias": False},
    {"energy": 0.9, "head_loop": True, "heads": 4},
    {"energy": 0.9, "head_loop": True, "head_split": "input", "heads": 4},
    {"energy": 0.8, "block_size": 5, "heads": 4},
    {"energy": 0.8, "block_size": 4, "block_keys": True, "head_split": "input", "heads": 4},
    {"energy": 0.8, "svd_batch_size": 1, "heads": 4},
    {"energy": 0.8, "svd_batch_size": 2, "head_split": "input", "factored": True, "heads": 4},
    {"energy": 0.8, "subspace": "calibrated", "heads": 4},
    {"energy": 0.8, "subspace": "calibrated", "head_split": "input", "heads": 4},
    {"energy": 0.8, "solver": "svd", "head_split": "input", "heads": 4},
    {"energy": 0.9, "heads": 4, "dtype": torch.float32},
    {"energy": 0.9, "heads": 4, "head_split": "input", "dtype": torch.float32, "block_size": "adaptive"},
]


@pytest.mark.slow
def test_two_ranks_equal_one_process_across_options() -> None:
    """The same comparison for every order (formed, factored, one head at a time), blocks, chunks, solvers and
    both subspaces, with 2 heads per rank."""
    spawn(SLOW_CASES)


@pytest.mark.slow
def test_four_ranks_equal_one_process() -> None:
    """Four ranks (one head each, 4 processes on 2 cores): the same numbers and the formula's (W-1)/W bytes."""
    spawn([{"energy": 0.8, "heads": 4}, {"energy": 0.8, "heads": 4, "head_split": "input"}], world=4)


# --- the formula ----------------------------------------------------------------------------------------
def test_bytes_formula_by_hand() -> None:
    """B=2, T=3, d=4 in float32 (96 bytes of output): W=2 sends 48 forward, 96 backward; W=4 sends 72 and 144."""
    assert sharded_layer_bytes(2, 3, 4, 2, 4) == {"forward": 48, "backward": 96}
    assert sharded_layer_bytes(2, 3, 4, 4, 4) == {"forward": 72, "backward": 144}
    assert sharded_layer_bytes(2, 3, 4, 1, 4) == {"forward": 0, "backward": 0}


def test_head_ranges_cover_the_heads_once() -> None:
    assert [head_range(6, k, 3) for k in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(ValueError, match=r"divisors of h=6: \[1, 2, 3, 6\]"):
        head_range(6, 0, 4)


# --- bad input, before training -------------------------------------------------------------------------
def method_cfg(**keys: Any) -> dict[str, Any]:
    return {"name": "sdrm", "energy": 0.9, "calibration_batches": 0, **keys}


def test_unknown_value_is_a_config_error() -> None:
    with pytest.raises(
        LrkConfigError, match=r"decomp.distributed_heads='yes' is invalid: it must be true or false"
    ):
        build_method(method_cfg(distributed_heads="yes"))


def test_world_size_without_a_process_group_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LrkConfigError, match=r"WORLD_SIZE=2 but no torch.distributed process group"):
        build_method(method_cfg(distributed_heads=True))


def test_heads_not_divisible_by_the_world_size_name_the_valid_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """h = 4 heads on a (pretended) group of 3 ranks: refused at apply, the model unchanged."""
    method = build_method(method_cfg(distributed_heads=True))
    monkeypatch.setattr(sdrm_method, "group_ready", lambda: True)
    monkeypatch.setattr(sdrm_method, "world_size", lambda group=None: 3)
    model = tiny_vit(32, 4, 1)
    with pytest.raises(LrkConfigError, match=r"h=4 heads do not split evenly over 3 ranks.*\[1, 2, 4\]"):
        method.apply(model, [])
    assert type(model.blocks[0].attn) is MultiHeadSelfAttention


def test_without_a_group_it_runs_as_one_process_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, plain = tiny_vit(32, 2, 1), tiny_vit(32, 2, 1)
    with caplog.at_level(logging.INFO, logger="lrk.decomp.attention.sdrm"):
        build_method(method_cfg(distributed_heads=True)).apply(model, [])
    build_method(method_cfg()).apply(plain, [])
    assert "runs all its heads in this one process" in caplog.text
    attn = model.blocks[0].attn
    assert isinstance(attn, SDRMAttention) and attn.distributed_heads and attn.shard() is None
    images = random_images(2)
    torch.testing.assert_close(model(images), plain(images), atol=0, rtol=0)
