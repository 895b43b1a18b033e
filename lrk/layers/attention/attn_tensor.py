"""``decomp=attn_tensor``: attention through a Tucker or CP decomposition of the attention tensor (issue #4).

Seed: seeds/vit_nla_slides.txt, slide "Used methods. Tensor decomposition": "we use tensor decomposition to
perform a low-rank approximation of the attention tensor". The slides' code reshaped the tensor to a matrix and took
an SVD (a matrix method); lrk decomposes the tensor as a tensor and attends with the result.

Per forward, the attention probabilities A[b, h] = softmax(q_h k_h^T / sqrt(d_k)) form the tensor
A in R^{B x H x T x T} (image, head, query, key). It is approximated by

- ``decomposition: tucker`` (default): A_hat = G x_h U_h x_q U_q x_k U_k with ranks (R_h, R_q, R_k) over the head,
  query and key modes. TensorLy (``partial_tucker``: truncated HOSVD, then ``hooi_iters`` HOOI sweeps) computes
  the orthonormal factors on the *detached* tensor; the core is then recomputed in torch as the projection
  G = A x_h U_h^T x_q U_q^T x_k U_k^T (:func:`~lrk.linalg.attention_tensor.project_core`). The factors are
  constants: the gradient flows through G into A and on to the q/k weights (and through V to the v weights).
  Ranks: R_q = R_k = R_t from ``rank`` or ``ratio`` (R_t = ceil(ratio T)), R_h = ``head_rank`` (default H);
  with ``energy`` (phi) each mode's rank is the smallest keeping phi of its unfolding's energy, chosen anew every
  forward (the head mode too, unless ``head_rank`` is set).
- ``decomposition: cp``: A_hat = sum_r u_h,r o u_q,r o u_k,r of rank R = ``rank`` (or ceil(ratio T)). TensorLy's
  ``parafac`` (``cp_iters`` ALS sweeps from the SVD start) gives the head and key factors on the detached tensor;
  the query factor is then re-solved from A by linear least squares (one closed-form ALS update,
  :func:`~lrk.linalg.attention_tensor.cp_solve_factor`), which is differentiable: the gradient reaches A.

Either way A_hat is the orthogonal projection of A onto a subspace fixed by the constant factors, so the retained
energy ||A_hat||^2 / ||A||^2 = 1 - ||A - A_hat||^2 / ||A||^2 lies in [0, 1]. The output is A_hat V per head, then
``proj`` (dropout of the attention weights, if any, acts on A before the decomposition). lrk evaluates A_hat V
in factored form and never forms A_hat: Tucker out_h = U_q [(G x_h U_h)_h] (U_k^T V_h), CP
out_h = U_q diag(U_h[h]) (U_k^T V_h) (:func:`~lrk.linalg.attention_tensor.tucker_apply`, ``cp_apply``; the tests
check them against A_hat V formed explicitly). This saves nothing against dense attention: A itself is formed (the
softmax needs it) and the core projection costs about H T^2 R more; the method studies what a low multilinear rank
of the attention does to accuracy, as the slides did, not speed.

``scope``:

- ``batch`` (default): one TensorLy call per forward on the 4-way tensor [B, H, T, T]. Tucker is a partial Tucker
  over modes 1, 2, 3 with the batch mode kept at full rank: the factors U_h, U_q, U_k are shared by the images of
  the batch and every image has its own core. CP decomposes the tensor [H, B T, T] (the images' query modes side
  by side): head and key factors shared, every image its own query factor rows. The images then share a
  *subspace*, never attention: image i's output is A_hat_i V_i, with A_hat_i a projection of A_i alone onto the
  shared factors, but the factors depend on every image of the batch (as the chunks of SDRM's svd_batch_size do).
- ``image``: one decomposition per image (a Python loop over the batch): tokens of different images never mix in
  any way; image i's output does not depend on the other images.

Time (2 shared CPU cores, one thread, float32, best of 3-5 runs; A of [32, 4, 65, 65], Tucker ranks (4, 33, 33),
HOSVD): scope ``batch`` 30 ms per forward (one partial Tucker), scope ``image`` 93 ms (32 Tucker calls); CP of
rank 33 with 20 ALS sweeps: 0.34 s (batch) and 0.56-0.79 s (image); the dense product A V alone: 0.5 ms.

Statistics: every module keeps a :class:`TensorAttentionStats` in ``module.stats`` (not in the state dict):
``forwards``, ``decompositions`` (TensorLy calls: one per forward with scope=batch, one per image with
scope=image), ``head_rank_sum`` / ``query_rank_sum`` / ``key_rank_sum`` (sums over decompositions; means by
``rank_mean()``), ``energy_sum`` over the ``measured`` decompositions (``monitor: true`` only: ||A_hat||^2 and
||A||^2 are read by the host in every forward, a GPU sync; with the default ``monitor: false`` the report's energy,
measured on the calibration batches at apply, stands), ``decompose_seconds`` (TensorLy + core projection / least
squares, + the energy when monitored, inside forwards) and ``forward_seconds``. :func:`attn_tensor_metrics` turns
them into run metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from lrk.layers.attention import args
from lrk.layers.attention.dense import MultiHeadSelfAttention
from lrk.layers.attention.stats import ModuleStats
from lrk.linalg.attention_tensor import (
    cp_apply,
    cp_energy,
    cp_factors,
    cp_reconstruct,
    cp_solve_factor,
    mode_energy_ranks,
    project_core,
    stacked_query_tensor,
    tucker_apply,
    tucker_energy,
    tucker_factors,
    tucker_to_tensor,
)
from lrk.linalg.rank import fraction_rank
from lrk.measure import clock

DECOMPOSITIONS = ("tucker", "cp")
SCOPES = ("batch", "image")
DEFAULT_RATIO = 0.5
DEFAULT_CP_ITERS = 20


# --- statistics ---------------------------------------------------------------------------------------------
@dataclass
class TensorAttentionStats(ModuleStats):
    """What a tensor attention module did since it was built (or ``reset``). Not part of the state dict."""

    forwards: int = 0
    decompositions: int = 0  # TensorLy calls: one per forward (scope=batch) or per image (scope=image)
    head_rank_sum: float = 0.0
    query_rank_sum: float = 0.0
    key_rank_sum: float = 0.0
    measured: int = 0  # decompositions whose retained energy was measured (monitor=True)
    energy_sum: float = 0.0  # retained energy ||A_hat||^2 / ||A||^2, summed over the measured decompositions
    decompose_seconds: float = 0.0  # TensorLy + core projection / least squares, inside forwards
    forward_seconds: float = 0.0

    def rank_mean(self) -> float:
        """Mean token-mode rank ((R_q + R_k) / 2 for Tucker, R for CP) over the decompositions (0 before any)."""
        n = self.decompositions
        return (self.query_rank_sum + self.key_rank_sum) / (2 * n) if n else 0.0

    def ranks_mean(self) -> list[float]:
        """Mean (R_h, R_q, R_k) over the decompositions."""
        n = max(self.decompositions, 1)
        return [self.head_rank_sum / n, self.query_rank_sum / n, self.key_rank_sum / n]

    def energy_mean(self) -> float:
        """Mean retained energy over the measured decompositions (0 before any)."""
        return self.energy_sum / self.measured if self.measured else 0.0


class Approximation(NamedTuple):
    """The decomposition of the attention tensor of images [start, end).

    Tucker: ``core`` [n, R_h, R_q, R_k] (one per image), ``factors`` = (U_h, U_q, U_k) shared by the n images.
    CP: ``core`` None, ``factors`` = (U_h [H, R], U_q [n, T, R] (per image), U_k [T, R]).
    """

    kind: str
    start: int
    end: int
    core: torch.Tensor | None
    factors: tuple[torch.Tensor, ...]
    ranks: tuple[int, int, int]
    energy: float | None  # ||A_hat||^2 / ||A||^2; None when not measured (monitor=False)


# --- the attention module -----------------------------------------------------------------------------------
class TensorAttention(MultiHeadSelfAttention):
    """Multi-head self-attention whose probability tensor A (heads x tokens x tokens) is replaced by a Tucker or CP
    approximation A_hat every forward; the output is A_hat V per head, then ``proj`` (module docstring).

    Same parameters as :class:`~lrk.models.MultiHeadSelfAttention`: ``from_attention(dense, rank=16)`` copies them.

    ``monitor`` (default False): also measure the retained energy ||A_hat||^2 / ||A||^2 of every decomposition
    (norms read by the host inside the forward: a synchronisation on a GPU). Off, the forward records the ranks
    and the seconds only (``Approximation.energy`` is None); ``decomp=attn_tensor`` measures the energy on the
    calibration batches at apply. The arguments are checked only for what the module cannot run with
    (ValueError); the config rules are :class:`lrk.decomp.attention.attn_tensor.AttnTensorMethod`'s.
    """

    monitor: bool = False  # default of an attribute newer than some checkpoints (unpickled skeletons)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        decomposition: str = "tucker",
        scope: str = "batch",
        rank: int | None = None,
        head_rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        hooi_iters: int = 0,
        cp_iters: int = DEFAULT_CP_ITERS,
        monitor: bool = False,
        layer_name: str = "attn",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        who = f"TensorAttention '{layer_name}'"
        args.choice(who, "decomposition", decomposition, DECOMPOSITIONS)
        args.choice(who, "scope", scope, SCOPES)
        args.at_most_one(who, rank=rank, ratio=ratio, energy=energy)
        if rank is None and ratio is None and energy is None:
            ratio = DEFAULT_RATIO
        args.integer(who, "rank", rank, 1, optional=True)  # <= T: checked against each input's T
        args.fraction(who, "ratio", ratio)
        args.fraction(who, "energy", energy)
        args.integer(
            who, "head_rank", head_rank, 1, num_heads, True, f"the attention has H = {num_heads} heads"
        )
        if decomposition == "cp" and (energy is not None or head_rank is not None):
            raise ValueError(
                f"{who}: decomposition='cp' takes neither energy nor head_rank (a CP model has one rank: rank "
                "or ratio)"
            )
        args.integer(who, "hooi_iters", hooi_iters, 0)
        args.integer(who, "cp_iters", cp_iters, 1)
        args.flag(who, "monitor", monitor)
        self.decomposition = decomposition
        self.scope = scope
        self.rank = rank
        self.head_rank = head_rank
        self.ratio = None if ratio is None else float(ratio)
        self.energy = None if energy is None else float(energy)
        self.hooi_iters = hooi_iters
        self.cp_iters = cp_iters
        self.monitor = monitor
        self.layer_name = layer_name
        self.stats = TensorAttentionStats()

    def init_kwargs(self) -> dict[str, Any]:
        return {
            **super().init_kwargs(),
            "decomposition": self.decomposition,
            "scope": self.scope,
            "rank": self.rank,
            "head_rank": self.head_rank,
            "ratio": self.ratio,
            "energy": self.energy,
            "hooi_iters": self.hooi_iters,
            "cp_iters": self.cp_iters,
            "monitor": self.monitor,
            "layer_name": self.layer_name,
        }

    def extra_repr(self) -> str:
        policy = (
            f"rank={self.rank}"
            if self.rank is not None
            else (f"ratio={self.ratio}" if self.ratio is not None else f"energy={self.energy}")
        )
        head = "" if self.decomposition == "cp" else f", head_rank={self.head_rank or self.num_heads}"
        return (
            f"dim={self.dim}, heads={self.num_heads}, decomposition={self.decomposition}, scope={self.scope}, "
            f"{policy}{head}"
        )

    # --- pieces ------------------------------------------------------------------------------------------
    def attention_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention tensor A = softmax(q k^T / sqrt(d_k)) ([B, H, T, T]) and the values V ([B, H, T, d_h])."""
        q, k, v = self.qkv_heads(x)
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        return scores.softmax(dim=-1), v

    def token_rank(self, tokens: int) -> int:
        """R_t from ``rank`` or ``ratio`` for T = ``tokens`` (ValueError when rank > T)."""
        if self.rank is not None:
            if self.rank > tokens:
                raise ValueError(
                    f"TensorAttention '{self.layer_name}': rank={self.rank} is invalid for inputs of T={tokens} "
                    f"tokens: the attention tensor's query/key modes have T entries; it must lie in [1, {tokens}]"
                )
            return self.rank
        assert self.ratio is not None
        return fraction_rank(self.ratio, tokens)

    def _tucker(self, A: torch.Tensor, start: int) -> Approximation:
        """Partial Tucker of A ([n, H, T, T]) over modes 1, 2, 3 (the images keep their own cores)."""
        modes = (1, 2, 3)
        tokens = A.shape[-1]
        if self.energy is not None:
            ranks = mode_energy_ranks(A, self.energy, modes)
            if self.head_rank is not None:
                ranks[0] = self.head_rank
        else:
            r = self.token_rank(tokens)
            ranks = [self.head_rank or self.num_heads, r, r]
        factors = tucker_factors(A, ranks, modes, n_iter_max=self.hooi_iters)
        core = project_core(A, factors, modes)
        energy = tucker_energy(core, A) if self.monitor else None
        return Approximation("tucker", start, start + A.shape[0], core, tuple(factors), tuple(ranks), energy)

    def _cp(self, A: torch.Tensor, start: int) -> Approximation:
        """CP of the stacked tensor [H, n T, T]; the query factor re-solved from A by least squares."""
        n, _, tokens, _ = A.shape
        r = self.token_rank(tokens)
        stacked = stacked_query_tensor(A)
        factors = cp_factors(stacked, r, n_iter_max=self.cp_iters)
        query = cp_solve_factor(stacked, factors, 1)  # differentiable in A (head and key factors constant)
        energy = cp_energy([factors[0], query, factors[2]], stacked) if self.monitor else None
        return Approximation(
            "cp",
            start,
            start + n,
            None,
            (factors[0], query.reshape(n, tokens, r), factors[2]),
            (r, r, r),
            energy,
        )

    def decompose(self, A: torch.Tensor) -> list[Approximation]:
        """The approximations of A ([B, H, T, T]): one for the batch (scope=batch) or one per image (scope=image)."""
        build = self._tucker if self.decomposition == "tucker" else self._cp
        images = range(A.shape[0]) if self.scope == "image" else []
        groups = [(b, A[b : b + 1]) for b in images] or [(0, A)]
        out = []
        for start, group in groups:
            approx = build(group, start)
            st = self.stats
            st.decompositions += 1
            st.head_rank_sum += approx.ranks[0]
            st.query_rank_sum += approx.ranks[1]
            st.key_rank_sum += approx.ranks[2]
            if approx.energy is not None:
                st.measured += 1
                st.energy_sum += approx.energy
            out.append(approx)
        return out

    @staticmethod
    def approximate_tensor(approx: Approximation) -> torch.Tensor:
        """A_hat of the approximation's images ([n, H, T, T]) formed explicitly (tests and diagnostics)."""
        if approx.kind == "tucker":
            assert approx.core is not None
            return tucker_to_tensor(approx.core, approx.factors, (1, 2, 3))
        head, query, key = approx.factors
        return torch.stack([cp_reconstruct([head, q, key]) for q in query])

    @staticmethod
    def apply_approximation(approx: Approximation, values: torch.Tensor) -> torch.Tensor:
        """A_hat V ([n, H, T, d_h]) in factored form for the approximation's images (``values`` [n, H, T, d_h])."""
        if approx.kind == "tucker":
            assert approx.core is not None
            return tucker_apply(approx.core, approx.factors, values)
        head, query, key = approx.factors
        return cp_apply(head, query, key, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        sync = x.is_cuda
        start = clock(sync)
        A, v = self.attention_probs(x)
        if self.training and self.attn_drop > 0:
            A = F.dropout(A, self.attn_drop)
        begin = clock(sync)
        approxs = self.decompose(A)
        self.stats.decompose_seconds += clock(sync) - begin
        parts = [self.apply_approximation(a, v[a.start : a.end]) for a in approxs]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        out = self.proj_drop(self.proj(out))
        self.stats.forwards += 1
        self.stats.forward_seconds += clock(sync) - start
        return out
