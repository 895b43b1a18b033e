"""``decomp=sdrm``: SDRM attention (seeds/sdrm_paper.txt, sections 3-4): a truncated SVD of each batch's attention
input, low-rank Q/K/V (Eq. 14), per-head split (Algorithm 2) and block-wise attention (Eqs. 16-18, Algorithm 4).

For the input X in R^{B x T x D} of an attention module, SDRM factorizes Y = reshape(X, (b t, d)) (section 3.1,
Algorithm 1 l.2; Theorem 1's proof) in chunks of ``svd_batch_size`` images (the paper's svd_batch_size: X is
"chunked into X_i for parallel singular value decomposition"), keeps the smallest rank r with
sum_{i<=r} s_i^2 >= phi sum_i s_i^2 (Eqs. 2-3) or a fixed ``rank``, and computes

    (Q, K, V) = U_r S_r V_r^T (W^Q, W^K, W^V)                                   (Eq. 14)

cheaply as (Y V_r)(V_r^T W): U_r S_r = Y V_r for an SVD, so only the thin product Y V_r ([bt, r]) and the small
V_r^T W ([r, 3d]) are formed; cost 4 bt d r + 3 d^2 r instead of 3 bt d^2 for the dense projection. V_r is treated
as a constant (detached): the gradient reaches the input through Y V_r and the weights through V_r^T W.

``core`` (lrk's evaluation order, exactly the same numbers): Eq. 14 makes Q, K and V rank r, but the T x T
products of the attention (Q_h K_h^T and its product with V_h) still cost T^2 d_h per head when Q, K, V are formed
explicitly (``core=qkv``, the paper's Algorithm 4), so the rank reduction only shrinks the projection. With
Z' = [Y V_r, 1] and P = [W V_r, b] per head, Q_h K_h^T = Z' (P_q,h^T P_k,h) Z'^T and softmax(.) V_h =
(softmax(.) Z') P_v,h^T: the T x T products cost T^2 (r + 1) (``core=factored``). ``core=auto`` (default) takes
the factored order when r + 1 < d_h, where it is cheaper.

Heads are split from the projected Q, K, V (Algorithm 2; ``head_loop=True`` runs the heads one at a time as the
algorithm is written, with each head's columns of W: the same numbers, slower). Attention runs per image:
chunks share a *basis*, never attention.

What a chunk of several images means (``svd_batch_size`` > 1): the basis V_r is fitted to the tokens of all the
chunk's images, so image i's output depends on image j of the same chunk through the subspace it is projected
on (the paper's design: one t-SVD per chunk). Attention itself never mixes images: image i's queries only see
image i's keys. With ``svd_batch_size=1`` every image is factorized alone and its output depends on nothing else.

Block-wise attention (section 4, Eqs. 16-18, Algorithm 4), lrk's reading:

- ``block_size=b``: queries in blocks of b tokens, each block attending to all keys (Eqs. 16-17 per block, Eq. 18
  concatenating the blocks): exactly the unblocked attention, with a score block of b x T instead of T x T.
- ``block_keys=True`` also splits the keys/values into blocks of b, as Algorithm 4 l.7-11 does. Algorithm 4 as
  printed takes a softmax per key block and sums the block outputs (l.13, Z_i = Z_i (+) Z_b), which is *not* the
  attention (each block's softmax is normalised alone). lrk merges the key blocks with the running maximum and
  normaliser of the log-sum-exp (the online softmax), which makes the sum exact; score blocks are b x b.
- ``block_size=adaptive``: section 4's feedback rule ("initialize block size and monitor processing time, memory
  usage ...; if a decrease in processing speed or resource usage is detected, the size of the data block is
  automatically reduced ...; if resource usage is low, increase the block size"), see :class:`AdaptiveBlockSize`:
  start at the largest block whose score block fits ``block_budget_mb`` (resource usage low -> large block),
  halve it while the measured time per token does not get worse by more than 10 %, go back to the previous size
  and stay there when it does (speed decrease -> back off), and halve at once whenever a larger batch would push
  the score block over the budget (resource usage high -> smaller block). Every block size gives the same
  numbers, so the rule changes speed and memory, never outputs.

``subspace``: ``batch`` (the paper: a t-SVD of every batch, in training and inference) or ``calibrated`` (lrk's
option: V_r fitted once in ``apply`` on the attention inputs of the calibration batches - their Gram matrices
summed, then eigh, i.e. the exact SVD of all calibration tokens stacked - and frozen: no factorization at run
time). The calibration runs the calibration batches once through the *dense* model (every layer's inputs come
from dense layers before it). With ``stage: init`` the weights then train under a basis fitted to the untrained
model's activations; ``stage: post`` fits it to the trained model (a warning says so).

Phase timings: every forward adds the seconds of its factorizations to ``module.stats.rr_seconds`` (SDRM's RR
phase; ``time/rr_s``) and its own wall time to ``stats.forward_seconds``. lrk's PhaseTimer times whole attention
forwards as ``time/mha_s``, which therefore *includes* the t-SVD; the paper's MHA phase is ``time/mha_s`` minus
``time/rr_forward_s`` over the same forwards. :func:`sdrm_metrics` collects the figures of every SDRM module of a model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lrk.checks import is_fraction, is_int, is_number
from lrk.errors import LrkConfigError
from lrk.layers.attention.blockwise import (
    DEFAULT_BLOCK_BUDGET_MB,
    AdaptiveBlockSize,
    blockwise_attention,
)
from lrk.layers.attention.dense import MultiHeadSelfAttention, split_heads
from lrk.layers.attention.stats import ModuleStats, clock
from lrk.linalg.adamatrix import PAPER_ENERGY, AdaMatrixSolver
from lrk.linalg.adamatrix import adamatrix as adamatrix_svd
from lrk.linalg.rank import energy_rank, tsvd_compression_ratio
from lrk.linalg.svd_solvers import SOLVERS, truncated_svd
from lrk.linalg.tsvd import TruncatedSVD, gram_svd, small_lapack_threads

log = logging.getLogger(__name__)

SUBSPACES = ("batch", "calibrated")
CORES = ("auto", "qkv", "factored")
DEFAULT_SOLVER = "gram"  # benchmarks/tsvd.py: exact, and the fastest exact solver on ViT token matrices


# --- checks -----------------------------------------------------------------------------------------------
def check_settings(
    energy: float | None,
    rank: int | None,
    solver: str,
    svd_batch_size: int | None,
    block_size: int | str | None,
    subspace: str,
    block_budget_mb: float,
    core: str = "auto",
) -> None:
    """Validate SDRM's settings (each bad value -> one :class:`LrkConfigError` naming it and what is valid)."""
    if (energy is None) == (rank is None):
        raise LrkConfigError(
            f"decomp.energy={energy}, decomp.rank={rank} is invalid for decomp=sdrm: set exactly one of "
            "decomp.energy (phi in (0, 1]) or decomp.rank (an integer >= 1)"
        )
    if energy is not None and not is_fraction(energy):
        raise LrkConfigError(
            f"decomp.energy={energy!r} is invalid: phi (the energy retention of Eqs. 2-3) must lie in (0, 1]"
        )
    if rank is not None and not (is_int(rank) and rank >= 1):
        raise LrkConfigError(f"decomp.rank={rank!r} is invalid: it must be an integer >= 1")
    if solver not in SOLVERS:
        raise LrkConfigError(f"decomp.solver={solver!r} is invalid: it must be one of {', '.join(SOLVERS)}")
    if svd_batch_size is not None and not (is_int(svd_batch_size) and svd_batch_size >= 1):
        raise LrkConfigError(
            f"decomp.svd_batch_size={svd_batch_size!r} is invalid: it must be an integer >= 1 (images per "
            "t-SVD chunk) or null (the whole batch)"
        )
    if block_size is not None and block_size != "adaptive" and not (is_int(block_size) and block_size >= 1):
        raise LrkConfigError(
            f"decomp.block_size={block_size!r} is invalid: it must be an integer >= 1 (query tokens per block), "
            "'adaptive' or null (no blocking)"
        )
    if subspace not in SUBSPACES:
        raise LrkConfigError(
            f"decomp.subspace={subspace!r} is invalid: it must be one of {', '.join(SUBSPACES)}"
        )
    if core not in CORES:
        raise LrkConfigError(f"decomp.core={core!r} is invalid: it must be one of {', '.join(CORES)}")
    if not (is_number(block_budget_mb) and block_budget_mb > 0):
        raise LrkConfigError(
            f"decomp.block_budget_mb={block_budget_mb!r} is invalid: it must be a positive number"
        )


def check_tokens(
    block_size: int | str | None, rank: int | None, svd_batch_size: int | None, tokens: int, dim: int
) -> None:
    """Checks that need the token count T: block_size <= T, and rank <= min(svd_batch_size * T, d)."""
    if is_int(block_size) and block_size > tokens:  # type: ignore[operator]
        raise LrkConfigError(
            f"decomp.block_size={block_size} is invalid for this model: it must lie in [1, {tokens}] "
            f"(the attention modules see T={tokens} tokens per image), or be 'adaptive' or null"
        )
    if rank is not None:
        limit = dim if svd_batch_size is None else min(svd_batch_size * tokens, dim)
        if rank > limit:
            where = f"d={dim}" if limit == dim else f"svd_batch_size * T = {svd_batch_size} * {tokens}"
            raise LrkConfigError(
                f"decomp.rank={rank} is invalid for this model: the t-SVD of Y = reshape(X, (b t, d)) has at "
                f"most min(b t, d) = {limit} components ({where}); use a rank in [1, {limit}]"
            )


# --- statistics ---------------------------------------------------------------------------------------------
@dataclass
class SDRMStats(ModuleStats):
    """What an SDRM attention module did since it was built (or ``reset``). Not part of the state dict."""

    forwards: int = 0
    factorizations: int = 0  # t-SVDs (one per chunk per forward; one per forward for a calibrated basis)
    rank_sum: float = 0.0
    energy_sum: float = 0.0
    rel_error_sum: float = 0.0
    cr_sum: float = 0.0  # Theorem 1's compression ratio
    iterations_sum: float = 0.0  # AdaMatrix iterations
    last_rel_error: float | None = None
    fallbacks: int = 0  # AdaMatrix diverged: the exact gram solver was used
    clamped: int = 0  # a chunk had fewer rows than the fixed rank: rank cut to min(b t, d)
    rr_seconds: float = 0.0  # factorization time inside forwards (SDRM's RR phase)
    fit_seconds: float = 0.0  # calibration time in apply (subspace=calibrated)
    forward_seconds: float = 0.0  # whole forwards
    last_block: int = 0


# --- the attention module -----------------------------------------------------------------------------------
class SDRMAttention(MultiHeadSelfAttention):
    """Multi-head self-attention on a rank-r t-SVD of its input (SDRM Eq. 14, Algorithms 2 and 4).

    The parameters of :class:`~lrk.models.MultiHeadSelfAttention` (``qkv``: Linear(dim, 3 dim) laid out
    [q | k | v], ``proj``), so ``SDRMAttention.from_attention(dense, energy=0.9, ...)`` copies its weights.
    Buffers ``basis`` ([dim, dim]), ``basis_rank`` and ``basis_energy`` hold the frozen basis of
    ``subspace='calibrated'`` (set by :meth:`fit_basis`); they travel with checkpoints.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        energy: float | None = None,
        rank: int | None = None,
        solver: str = DEFAULT_SOLVER,
        svd_batch_size: int | None = None,
        block_size: int | str | None = None,
        subspace: str = "batch",
        adamatrix: dict[str, Any] | None = None,
        head_loop: bool = False,
        block_keys: bool = False,
        block_budget_mb: float = DEFAULT_BLOCK_BUDGET_MB,
        core: str = "auto",
        layer_name: str = "attn",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        if energy is None and rank is None:
            energy = PAPER_ENERGY  # the paper's phi (Fig. 6 caption)
        check_settings(energy, rank, solver, svd_batch_size, block_size, subspace, block_budget_mb, core)
        if rank is not None and rank > dim:
            raise LrkConfigError(
                f"decomp.rank={rank} is invalid for attention of dim {dim}: it must lie in [1, {dim}] (min(b t, d))"
            )
        self.energy = None if energy is None else float(energy)
        self.rank = rank
        self.solver = solver
        self.svd_batch_size = svd_batch_size
        self.block_size = block_size
        self.subspace = subspace
        self.adamatrix_options = dict(adamatrix or {})
        self.head_loop = bool(head_loop)
        self.block_keys = bool(block_keys)
        self.block_budget_mb = float(block_budget_mb)
        self.core = core
        self.layer_name = layer_name
        self.register_buffer("basis", torch.zeros(dim, dim))
        self.register_buffer("basis_rank", torch.zeros((), dtype=torch.long))
        self.register_buffer("basis_energy", torch.zeros((), dtype=torch.float64))
        self.stats = SDRMStats()
        self._ada: AdaMatrixSolver | None = None
        if solver == "adamatrix":
            try:
                self._ada = AdaMatrixSolver(rank=rank, energy=self.energy, **self.adamatrix_options)
            except (TypeError, ValueError) as exc:
                raise LrkConfigError(f"decomp.adamatrix={self.adamatrix_options} is invalid: {exc}") from exc
        self.block_control = AdaptiveBlockSize(block_budget_mb) if block_size == "adaptive" else None

    def init_kwargs(self) -> dict[str, Any]:
        return {
            **super().init_kwargs(),
            "energy": self.energy,
            "rank": self.rank,
            "solver": self.solver,
            "svd_batch_size": self.svd_batch_size,
            "block_size": self.block_size,
            "subspace": self.subspace,
            "adamatrix": dict(self.adamatrix_options),
            "head_loop": self.head_loop,
            "block_keys": self.block_keys,
            "block_budget_mb": self.block_budget_mb,
            "core": self.core,
            "layer_name": self.layer_name,
        }

    def extra_repr(self) -> str:
        policy = f"energy={self.energy}" if self.rank is None else f"rank={self.rank}"
        return (
            f"dim={self.dim}, heads={self.num_heads}, {policy}, solver={self.solver}, "
            f"svd_batch_size={self.svd_batch_size}, block_size={self.block_size}, subspace={self.subspace}, "
            f"core={self.core}"
        )

    # --- the calibrated basis ----------------------------------------------------------------------------
    @torch.no_grad()
    def fit_basis(self, gram: torch.Tensor, tokens: int) -> None:
        """Freeze the basis of ``subspace='calibrated'``: the leading eigenvectors of ``gram`` = sum of Y^T Y
        over the calibration batches (= the right singular vectors of all their tokens stacked), rank r by the
        energy rule (Eqs. 2-3) or the fixed ``rank`` (which must not exceed min(tokens, d))."""
        start = time.perf_counter()
        gram = gram.detach().double()
        with small_lapack_threads(gram.device):
            evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        limit = min(tokens, self.dim)
        if self.rank is not None:
            if self.rank > limit:
                raise LrkConfigError(
                    f"decomp.rank={self.rank} is invalid: the calibration tokens of '{self.layer_name}' "
                    f"({tokens} x {self.dim}) have at most {limit} components"
                )
            r = self.rank
        else:
            r = min(energy_rank(evals.sqrt(), self.energy), limit)  # type: ignore[arg-type]
        total = float(evals.sum())
        self.basis.copy_(evecs.to(self.basis.dtype))
        self.basis_rank.fill_(r)
        self.basis_energy.fill_(float(evals[:r].sum()) / total if total > 0 else 1.0)
        self.stats.fit_seconds += time.perf_counter() - start

    # --- rank reduction ------------------------------------------------------------------------------------
    def _factorize(self, Y: torch.Tensor) -> TruncatedSVD:
        """t-SVD of one chunk Y ([m, d]) by the configured solver; AdaMatrix divergence -> exact gram."""
        limit = min(Y.shape)
        rank = self.rank
        if rank is not None and rank > limit:  # a short final chunk: keep every component it has
            rank = limit
            self.stats.clamped += 1
        try:
            if self.solver == "adamatrix":
                if rank == self.rank:
                    result = self._ada(Y)  # type: ignore[misc]  (warm start across chunks and batches)
                else:
                    result = adamatrix_svd(Y, rank=rank, **self.adamatrix_options)
                if not bool(torch.isfinite(result.V).all() and torch.isfinite(result.S).all()):
                    log.warning("SDRM %s: AdaMatrix returned non-finite factors; using gram", self.layer_name)
                    exact = gram_svd(Y, rank, None if rank is not None else self.energy)
                    exact.fell_back = True
                    result = exact
                    if self._ada is not None:
                        self._ada.reset()
            else:
                result = truncated_svd(
                    Y, rank=rank, energy=None if rank is not None else self.energy, solver=self.solver
                )
        except ValueError as exc:
            if "not finite" in str(exc):
                raise FloatingPointError(
                    f"SDRM attention '{self.layer_name}' received non-finite inputs (NaN/inf): the model diverged "
                    "before this layer; lower model.lr or check the data"
                ) from exc
            raise
        if result.fell_back:
            self.stats.fallbacks += 1
        return result

    def _bases(self, x: torch.Tensor) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Per chunk: (first image, end image, V_r [d, r], Z = X_chunk V_r [c, T, r]), recording the statistics
        (Algorithm 1, Eqs. 2-3). Z = U_r S_r of Eq. 14 (exactly, for an SVD) and carries the gradient to x."""
        batch, tokens, dim = x.shape
        st = self.stats
        if self.subspace == "calibrated":
            r = int(self.basis_rank)
            if r == 0:
                raise RuntimeError(
                    f"SDRM attention '{self.layer_name}' has subspace='calibrated' but no basis: apply decomp=sdrm "
                    "with calibration batches (decomp.calibration_batches >= 1) or call fit_basis()"
                )
            V = self.basis[:, :r].to(x.dtype)
            Z = x @ V
            with torch.no_grad():  # the frozen basis's energy on this batch: ||X V||^2 / ||X||^2 (monitoring)
                total = float(torch.linalg.vector_norm(x.detach())) ** 2
                kept = float(torch.linalg.vector_norm(Z.detach())) ** 2
            energy = min(kept / total, 1.0) if total > 0 else 1.0
            self._record(r, energy, math.sqrt(max(1.0 - energy, 0.0)), batch, tokens, 0)
            return [(0, batch, V, Z)]
        chunk = self.svd_batch_size or batch
        out = []
        sync = x.is_cuda
        for s in range(0, batch, chunk):
            e = min(batch, s + chunk)
            Y = x[s:e].detach().reshape(-1, dim)  # Algorithm 1 l.2: Y = reshape(X_i, (b t, d))
            start = clock(sync)
            result = self._factorize(Y)
            st.rr_seconds += clock(sync) - start
            self._record(result.rank, result.energy, result.rel_error, e - s, tokens, result.iterations)
            V = result.V.detach().to(x.dtype)
            out.append((s, e, V, x[s:e] @ V))
        return out

    def _record(
        self, rank: int, energy: float, rel_error: float, images: int, tokens: int, iterations: int
    ) -> None:
        st = self.stats
        st.factorizations += 1
        st.rank_sum += rank
        st.energy_sum += energy
        st.rel_error_sum += rel_error
        st.cr_sum += tsvd_compression_ratio(images, tokens, self.dim, rank)
        st.iterations_sum += iterations
        st.last_rel_error = rel_error

    def _project(
        self, bases: list[tuple[int, int, torch.Tensor, torch.Tensor]], rows: torch.Tensor | None
    ) -> torch.Tensor:
        """Eq. 14 evaluated as (Y V_r)(V_r^T W) (+ bias) for the output ``rows`` of qkv (all when None)."""
        W, b = self.qkv.weight, self.qkv.bias
        if rows is not None:
            W = W.index_select(0, rows)
            b = None if b is None else b.index_select(0, rows)
        parts = [F.linear(Z, W @ V, b) for _, _, V, Z in bases]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _factored(self, Z: torch.Tensor, V: torch.Tensor, block: int | None, drop: float) -> torch.Tensor:
        """Attention of one chunk with Eq. 14's rank-r factors kept factored (lrk's evaluation order, exact):
        with Z' = [X V_r, 1] ([c, T, r+1]) and P_h = [W_h V_r, b_h] per head, Q_h K_h^T = Z' (P_q^T P_k) Z'^T and
        softmax(.) V_h = (softmax(.) Z') P_v^T, so the T x T products cost T^2 (r+1) instead of T^2 d_h."""
        c, tokens, _ = Z.shape
        heads, hd = self.num_heads, self.head_dim
        P = self.qkv.weight @ V  # [3d, r]: V_r^T W of Eq. 14 for q, k and v
        if self.qkv.bias is not None:
            P = torch.cat([P, self.qkv.bias[:, None]], dim=1)
            Z = torch.cat([Z, Z.new_ones(c, tokens, 1)], dim=-1)
        k1 = P.shape[1]
        Pq, Pk, Pv = P.reshape(3, heads, hd, k1).unbind(0)  # rows of W: [q | k | v], each split into heads
        M = Pq.transpose(1, 2) @ Pk * hd**-0.5  # [H, r+1, r+1]: Q_h K_h^T / sqrt(d_k) = Z' M_h Z'^T
        Zh = Z[:, None]  # [c, 1, T, r+1]
        q = Zh @ M  # [c, H, T, r+1]
        kv = Zh.expand(c, heads, tokens, k1)
        A = blockwise_attention(q, kv, kv, block, self.block_keys, drop, scale=1.0)  # softmax(.) Z'
        out = A @ Pv.transpose(1, 2)  # [c, H, T, d_h]
        return out.transpose(1, 2).reshape(c, tokens, self.dim)

    def _use_factored(self, bases: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> bool:
        if self.head_loop or self.core == "qkv":
            return False
        bias = int(self.qkv.bias is not None)
        return self.core == "factored" or max(V.shape[1] for _, _, V, _ in bases) + bias < self.head_dim

    def _block(self, batch: int, tokens: int, x: torch.Tensor) -> int | None:
        if self.block_control is not None:
            return self.block_control.choose(batch, self.num_heads, tokens, tokens, x.element_size())
        if self.block_size is not None and self.block_size > tokens:  # type: ignore[operator]
            check_tokens(self.block_size, None, None, tokens, self.dim)
        return self.block_size  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        sync = x.is_cuda
        start = clock(sync)
        heads, hd = self.num_heads, self.head_dim
        bases = self._bases(x)
        block = self._block(batch, tokens, x)
        drop = self.attn_drop if self.training else 0.0
        core_start = clock(sync)
        if self._use_factored(bases):
            outs = [self._factored(Z, V, block, drop) for _, _, V, Z in bases]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        elif not self.head_loop:
            # Algorithm 2: heads split by feature columns
            q, k, v = split_heads(self._project(bases, None), heads)
            out = blockwise_attention(q, k, v, block, self.block_keys, drop).transpose(1, 2)
            out = out.reshape(batch, tokens, dim)
        else:  # Algorithm 2 as written: one head at a time, on its own columns of W^Q, W^K, W^V
            outs = []
            for h in range(heads):
                cols = torch.arange(h * hd, (h + 1) * hd, device=x.device)
                rows = torch.cat([cols, cols + dim, cols + 2 * dim])
                q, k, v = self._project(bases, rows).split(hd, dim=-1)
                outs.append(blockwise_attention(q, k, v, block, self.block_keys, drop))
            out = torch.cat(outs, dim=-1)  # Algorithm 2 l.8 / Eq. 18: concatenate the heads
        if self.block_control is not None:
            self.block_control.update(block or tokens, clock(sync) - core_start, batch * tokens)
        out = self.proj_drop(self.proj(out))  # Eq. 19: W^O
        self.stats.forwards += 1
        self.stats.last_block = block or tokens
        self.stats.forward_seconds += clock(sync) - start
        return out
