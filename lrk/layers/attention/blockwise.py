"""Block-wise attention of SDRM section 4 (Eqs. 16-18, Algorithm 4) and its adaptive block size, lrk's reading
(see lrk.layers.attention.sdrm)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_BLOCK_BUDGET_MB = 32.0


# --- block-wise attention (section 4) -----------------------------------------------------------------------
def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int | None = None,
    key_blocks: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_k)) v over the last two axes ([..., T, d_h]), in blocks (Eqs. 16-18, Algorithm 4).

    Queries are taken ``block_size`` tokens at a time (each block attends to all keys: exact). ``key_blocks``
    also splits keys/values into blocks of ``block_size`` and merges them with the online softmax (running
    maximum and normaliser), which makes Algorithm 4's sum over key blocks exact. ``dropout_p`` drops
    attention weights (training only; pass 0 in eval). ``scale`` replaces 1 / sqrt(d_k) (q's last dimension).
    """
    tokens = q.shape[-2]
    if block_size is None or (block_size >= tokens and not key_blocks):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if not key_blocks:
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[..., s : s + block_size, :], k, v, dropout_p=dropout_p, scale=scale
                )
                for s in range(0, tokens, block_size)
            ],
            dim=-2,
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = k.shape[-2]
    outs = []
    for s in range(0, tokens, block_size):
        qb = q[..., s : s + block_size, :] * scale
        run_max = qb.new_full((*qb.shape[:-1], 1), -math.inf)
        norm = qb.new_zeros((*qb.shape[:-1], 1))
        acc = qb.new_zeros((*qb.shape[:-1], v.shape[-1]))
        for t in range(0, keys, block_size):
            scores = qb @ k[..., t : t + block_size, :].transpose(-2, -1)  # Eq. 16's Q_b K_b^T / sqrt(d_k)
            new_max = torch.maximum(run_max, scores.amax(dim=-1, keepdim=True))
            weights = torch.exp(scores - new_max)
            rescale = torch.exp(run_max - new_max)  # earlier blocks were normalised against a smaller maximum
            norm = norm * rescale + weights.sum(dim=-1, keepdim=True)
            if dropout_p > 0:
                weights = F.dropout(weights, dropout_p)
            acc = acc * rescale + weights @ v[..., t : t + block_size, :]  # Eq. 17, summed over key blocks
            run_max = new_max
        outs.append(acc / norm)
    return torch.cat(outs, dim=-2)  # Eq. 18: the query blocks side by side


class AdaptiveBlockSize:
    """The adaptive block size of section 4 (lrk's reading; see the module docstring).

    ``choose(batch, heads, tokens, key_tokens, element_bytes)`` returns the block for the next forward;
    ``update(block, seconds, query_tokens)`` feeds back the measured time of the attention core. Candidates are
    b = ceil(T / 2^k). The search starts at the largest candidate whose score block (batch x heads x b x keys
    elements) fits ``budget_mb``, halves while the time per token stays within ``1 + tolerance`` of the larger
    block's, then settles on the faster of the last two. The first ``warmup`` measurements are ignored.
    """

    def __init__(
        self, budget_mb: float = DEFAULT_BLOCK_BUDGET_MB, tolerance: float = 0.1, warmup: int = 1
    ) -> None:
        self.budget_bytes = budget_mb * 2**20
        self.tolerance = tolerance
        self.warmup = warmup
        self.block: int | None = None
        self.settled = False
        self.times: dict[int, float] = {}  # block -> seconds per query token (last measurement)
        self._previous: int | None = None  # the larger block measured before the current one
        self._seen = 0

    def cap(self, batch: int, heads: int, tokens: int, key_tokens: int, element_bytes: int) -> int:
        """Largest block whose score block fits the memory budget (at least 1, at most T)."""
        per_row = max(1, batch * heads * key_tokens * element_bytes)
        return max(1, min(tokens, int(self.budget_bytes // per_row)))

    def choose(self, batch: int, heads: int, tokens: int, key_tokens: int, element_bytes: int) -> int:
        """Block size for the next forward (memory first: a block over the budget is halved at once)."""
        cap = self.cap(batch, heads, tokens, key_tokens, element_bytes)
        if self.block is None:
            self.block = cap
        while self.block > cap:  # resource usage high -> reduce
            self.block = math.ceil(self.block / 2)
        return min(self.block, tokens)

    def update(self, block: int, seconds: float, query_tokens: int) -> None:
        """Feed back the attention-core time of a forward that used ``block``."""
        self._seen += 1
        if self._seen <= self.warmup or self.settled or query_tokens <= 0:
            return
        per_token = seconds / query_tokens
        self.times[block] = per_token
        prev = self._previous
        if prev is not None and prev in self.times and per_token > (1 + self.tolerance) * self.times[prev]:
            self.block, self.settled = prev, True  # speed decreased -> back to the larger block, stay
            return
        if block <= 1:
            self.settled = True
            return
        self._previous = block
        self.block = math.ceil(block / 2)  # not slower: try a smaller block (less memory)

    def state(self) -> dict[str, Any]:
        return {"block": self.block, "settled": self.settled, "times": dict(self.times)}
