"""Attention heads spread over the ranks of a ``torch.distributed`` process group (SDRM's homogeneous distributed
multi-head attention, seeds/sdrm_paper.txt section 4: "the attention head is allocated to different devices ... the
attention score of each head is calculated in parallel using multiple devices", Algorithm 2's per-head loop run on
W devices at once, Algorithm 3 l.21-28's "reconstruction of results").

Rank k of W computes heads [k h/W, (k+1) h/W) of every sharded attention on the *same* input X (every rank holds
the whole model and sees the same batch: this is tensor parallelism over the heads, not data parallelism), then
the ranks exchange their per-head outputs and every rank applies W^O (Eq. 19) to the concatenation. Two autograd
functions carry it, the pair Megatron-LM calls f and g:

- :func:`copy_to_heads` (f): identity forward; backward all-reduces (sums) the input gradient, because each rank's
  heads contribute only their part of dL/dX;
- :func:`gather_heads` (g): forward all-gathers the [B, T, d/W] slices into [B, T, d]; backward hands each rank
  the slice of the output gradient that belongs to its heads, without communication: everything after the gather
  (W^O, the rest of the model, the loss) runs replicated, so every rank already holds the whole dL/dY.

``torch.distributed.nn.functional.all_gather`` is not used: its backward sums the output gradients of all ranks
(a reduce-scatter), which is right when each rank has its own loss, but gives W times the gradient here, where
the W replicated losses are one loss.

Bytes sent by each rank per sharded attention layer (s = bytes per element, W > 1; the bandwidth-optimal ring
algorithms, which gloo uses; measured for W = 2 in benchmarks/sdrm_distributed.py):

    forward:  all_gather of B T d/W elements to W - 1 peers:   (W - 1) / W * B T d * s
    backward: all_reduce of dL/dX (B T d elements):          2 (W - 1) / W * B T d * s

:class:`CommCounter` counts them per call (``stats`` of the module). The weight gradients of W^Q, W^K, W^V are
sharded like the heads (a rank's backward fills its heads' rows only); :func:`all_reduce_head_grads` sums them
so that a replicated optimizer step keeps every rank's copy of the weights equal (another all-reduce of the qkv
gradient per layer and step; or gather the weights before saving instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


# --- the process group -----------------------------------------------------------------------------------
def group_ready() -> bool:
    """Whether torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (None: the default group); 1 without an initialised process group."""
    return dist.get_world_size(group) if group_ready() else 1


def rank_of(group: Any = None) -> int:
    """This process's rank in ``group``; 0 without an initialised process group."""
    return dist.get_rank(group) if group_ready() else 0


def valid_world_sizes(heads: int) -> list[int]:
    """The world sizes that split ``heads`` evenly: the divisors of h."""
    return [w for w in range(1, heads + 1) if heads % w == 0]


def head_range(heads: int, rank: int, world: int) -> slice:
    """Heads [k h/W, (k+1) h/W) of rank k out of W (ValueError when W does not divide h)."""
    if world < 1 or heads % world:
        raise ValueError(
            f"{heads} heads do not split evenly over a world of {world} ranks: valid world sizes are the "
            f"divisors of h={heads}: {valid_world_sizes(heads)}"
        )
    per = heads // world
    return slice(rank * per, (rank + 1) * per)


# --- byte counting ----------------------------------------------------------------------------------------
@dataclass
class CommCounter:
    """Bytes one rank sends in the collectives of a sharded module (ring algorithms; the module docstring):
    ``gathers`` / ``gather_bytes`` in forwards, ``reduces`` / ``reduce_bytes`` in backwards. SDRM's module
    statistics have the same four fields, and either can be handed to :func:`copy_to_heads` and
    :func:`gather_heads`."""

    gathers: int = 0
    gather_bytes: int = 0
    reduces: int = 0
    reduce_bytes: int = 0


def all_gather_bytes(local: torch.Tensor, world: int) -> int:
    """Bytes one rank sends to all-gather ``local``: its block to each of the W - 1 others."""
    return (world - 1) * local.numel() * local.element_size()


def all_reduce_bytes(tensor: torch.Tensor, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``tensor``: 2 (W - 1) / W of it (reduce-scatter + all-gather;
    W divides the element count here, else the ring's chunks round up)."""
    return 2 * (world - 1) * tensor.numel() * tensor.element_size() // world


def sharded_layer_bytes(batch: int, tokens: int, dim: int, world: int, element_size: int) -> dict[str, int]:
    """The formula: bytes each rank sends per sharded attention layer, forward and backward."""
    n = batch * tokens * dim * element_size
    return {"forward": (world - 1) * n // world, "backward": 2 * (world - 1) * n // world}


# --- the autograd functions -------------------------------------------------------------------------------
class _CopyToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, counter: Any) -> torch.Tensor:
        ctx.group, ctx.counter = group, counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.counter is not None:
            ctx.counter.reduces += 1
            ctx.counter.reduce_bytes += all_reduce_bytes(grad, dist.get_world_size(ctx.group))
        return grad, None, None


class _GatherHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any, counter: Any) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        if counter is not None:
            counter.gathers += 1
            counter.gather_bytes += all_gather_bytes(local, world)
        ctx.rank, ctx.width = rank, local.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        start = ctx.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None, None


def copy_to_heads(x: torch.Tensor, group: Any = None, counter: Any = None) -> torch.Tensor:
    """Identity forward; backward sums the gradient over the ranks of ``group`` (each rank's heads give a part)."""
    return _CopyToHeads.apply(x, group, counter)


def gather_heads(local: torch.Tensor, group: Any = None, counter: Any = None) -> torch.Tensor:
    """Concatenate every rank's last-axis block ``local`` ([..., d/W]) in rank order ([..., d]); backward returns
    this rank's block of the (replicated) output gradient."""
    return _GatherHeads.apply(local, group, counter)


# --- keeping replicated weights equal ---------------------------------------------------------------------
def all_reduce_head_grads(model: nn.Module, group: Any = None) -> int:
    """Sum the head-sharded gradients (``qkv``: W^Q, W^K, W^V and their biases) of every SDRM attention of
    ``model`` that sharded its heads over ``group``, so that every rank holds the gradient of one process
    (each rank's backward fills its own heads' rows; the others are zero). Call it after ``backward()`` and
    before the optimizer step. Returns the bytes this rank sent (ring all-reduce)."""
    world = world_size(group)
    if world == 1:
        return 0
    sent = 0
    for module in model.modules():
        if not getattr(module, "distributed_heads", False):
            continue
        for param in module.qkv.parameters():  # the same parameters on every rank: no rank skips a call
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
            sent += all_reduce_bytes(param.grad, world)
    return sent
