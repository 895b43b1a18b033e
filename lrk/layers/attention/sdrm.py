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

No hidden work in the forward: the solvers return V_r and S without U (``compute_u=False``: the Gram solver then
forms no m x r product), so X V_r is formed once per chunk (it is U_r S_r, and carries the gradient); a batch-mode
module has no buffer beyond the dense attention's (the basis buffers exist for ``subspace=calibrated`` only); the
calibrated basis's rank is kept on the host, and its per-batch energy ||X V_r||^2 / ||X||^2 (two norms read by the
host: a synchronisation on a GPU) is measured only with ``monitor: true`` (default false; the report rows give the
basis's energy on the calibration tokens). A batch-mode t-SVD yields its energy and error with the factorization.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lrk.layers.attention import args
from lrk.layers.attention.blockwise import (
    DEFAULT_BLOCK_BUDGET_MB,
    AdaptiveBlockSize,
    blockwise_attention,
)
from lrk.layers.attention.dense import MultiHeadSelfAttention, split_heads
from lrk.layers.attention.stats import ModuleStats
from lrk.linalg.adamatrix import PAPER_ENERGY, AdaMatrixSolver
from lrk.linalg.adamatrix import adamatrix as adamatrix_svd
from lrk.linalg.rank import energy_rank, tsvd_compression_ratio
from lrk.linalg.svd_solvers import SOLVERS, truncated_svd
from lrk.linalg.tsvd import TruncatedSVD, gram_svd, small_lapack_threads
from lrk.measure import clock

log = logging.getLogger(__name__)

SUBSPACES = ("batch", "calibrated")
CORES = ("auto", "qkv", "factored")
DEFAULT_SOLVER = "gram"  # benchmarks/tsvd.py: exact, and the fastest exact solver on ViT token matrices


# --- statistics ---------------------------------------------------------------------------------------------
@dataclass
class SDRMStats(ModuleStats):
    """What an SDRM attention module did since it was built (or ``reset``). Not part of the state dict."""

    forwards: int = 0
    factorizations: int = 0  # t-SVDs (one per chunk per forward; one per forward for a calibrated basis)
    measured: int = 0  # factorizations that recorded energy / rel_error (batch: all; calibrated: monitor)
    rank_sum: float = 0.0
    energy_sum: float = 0.0  # over the ``measured`` factorizations
    rel_error_sum: float = 0.0  # over the ``measured`` factorizations
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
BASIS_BUFFERS = ("basis", "basis_rank", "basis_energy")


class SDRMAttention(MultiHeadSelfAttention):
    """Multi-head self-attention on a rank-r t-SVD of its input (SDRM Eq. 14, Algorithms 2 and 4).

    The parameters of :class:`~lrk.models.MultiHeadSelfAttention` (``qkv``: Linear(dim, 3 dim) laid out
    [q | k | v], ``proj``), so ``SDRMAttention.from_attention(dense, energy=0.9, ...)`` copies its weights.
    ``subspace='calibrated'`` adds the buffers ``basis`` ([dim, dim]), ``basis_rank`` and ``basis_energy``: the
    frozen basis set by :meth:`fit_basis`, which travels with checkpoints. ``subspace='batch'`` has no buffer of
    its own (its state dict is that of the dense attention; the unused zero basis that batch-mode checkpoints
    written before carried is ignored on loading).

    ``monitor`` (default False): with a calibrated basis, also measure every forward's retained energy
    ||X V_r||^2 / ||X||^2 (two norms read by the host inside the forward: a synchronisation on a GPU). Off, the
    forward records the rank and the seconds only and ``stats.measured`` stays 0; the report rows of
    ``decomp=sdrm`` give the basis's energy on the calibration tokens. A batch-mode t-SVD yields its energy and
    error with the factorization (from the eigenvalues), so they are recorded either way.

    The arguments are checked only for what the module cannot run with (ValueError); the config rules are
    :class:`lrk.decomp.attention.sdrm.SDRMMethod`'s.
    """

    #: defaults of attributes added after checkpoints were written (an unpickled skeleton has no __init__ run)
    monitor: bool = False
    _basis_r: int = 0
    _basis_e: float = 0.0

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
        monitor: bool = False,
        layer_name: str = "attn",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        who = f"SDRMAttention '{layer_name}'"
        args.at_most_one(who, energy=energy, rank=rank)
        if energy is None and rank is None:
            energy = PAPER_ENERGY  # the paper's phi (Fig. 6 caption)
        args.fraction(who, "energy", energy)
        args.integer(
            who, "rank", rank, 1, dim, True, f"a t-SVD of tokens of dim d = {dim} has <= d components"
        )
        args.choice(who, "solver", solver, SOLVERS)
        args.integer(who, "svd_batch_size", svd_batch_size, 1, optional=True)
        if block_size != "adaptive":
            args.integer(who, "block_size", block_size, 1, optional=True)
        args.choice(who, "subspace", subspace, SUBSPACES)
        args.choice(who, "core", core, CORES)
        args.positive(who, "block_budget_mb", block_budget_mb)
        args.flag(who, "monitor", monitor)
        self.energy = None if rank is not None else float(energy)  # type: ignore[arg-type]
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
        self.monitor = monitor
        self.layer_name = layer_name
        if subspace == "calibrated":
            self.register_buffer("basis", torch.zeros(dim, dim))
            self.register_buffer("basis_rank", torch.zeros((), dtype=torch.long))
            self.register_buffer("basis_energy", torch.zeros((), dtype=torch.float64))
        self._basis_r, self._basis_e = 0, 0.0  # basis_rank / basis_energy on the host (no sync per forward)
        self.stats = SDRMStats()
        self._ada: AdaMatrixSolver | None = None  # its solver (warm-started across batches)
        if solver == "adamatrix":
            try:
                self._ada = AdaMatrixSolver(rank, self.energy, **self.adamatrix_options)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{who}: adamatrix={self.adamatrix_options} is invalid: {exc}") from exc
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
            "monitor": self.monitor,
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
        energy rule (Eqs. 2-3) or the fixed ``rank`` (which must not exceed min(tokens, d): ValueError)."""
        if self.subspace != "calibrated":
            raise RuntimeError(
                f"SDRM attention '{self.layer_name}' has subspace='batch': it has no frozen basis to fit"
            )
        start = time.perf_counter()
        gram = gram.detach().double()
        with small_lapack_threads(gram.device):
            evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        limit = min(tokens, self.dim)
        if self.rank is not None:
            if self.rank > limit:
                raise ValueError(
                    f"SDRMAttention '{self.layer_name}': rank={self.rank} is invalid for its calibration tokens "
                    f"({tokens} x {self.dim}): they have at most {limit} components"
                )
            r = self.rank
        else:
            r = min(energy_rank(evals.sqrt(), self.energy), limit)  # type: ignore[arg-type]
        total = float(evals.sum())
        self.basis.copy_(evecs.to(self.basis.dtype))
        self.basis_rank.fill_(r)
        self.basis_energy.fill_(float(evals[:r].sum()) / total if total > 0 else 1.0)
        self._basis_r, self._basis_e = r, float(self.basis_energy)
        self.stats.fit_seconds += time.perf_counter() - start

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.subspace == "calibrated":  # the loaded basis: its rank and energy read once, here
            self._basis_r, self._basis_e = int(self.basis_rank), float(self.basis_energy)
        else:  # batch-mode checkpoints written before the basis became calibrated-only carry a zero basis
            stale = {prefix + name for name in BASIS_BUFFERS}
            unexpected_keys[:] = [k for k in unexpected_keys if k not in stale]

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
                    exact = gram_svd(Y, rank, None if rank is not None else self.energy, compute_u=False)
                    exact.fell_back = True
                    result = exact
                    if self._ada is not None:
                        self._ada.reset()
            else:  # V_r and S only: _bases forms Y V_r itself (with the gradient), once per chunk
                energy = None if rank is not None else self.energy
                result = truncated_svd(Y, rank=rank, energy=energy, solver=self.solver, compute_u=False)
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
        (Algorithm 1, Eqs. 2-3). Z = U_r S_r of Eq. 14 (exactly, for an SVD) and carries the gradient to x. It is
        the only product of a chunk's tokens with V_r in the forward: the solvers return V_r and S without U
        (``compute_u=False``), and Eq. 14's projections reuse Z."""
        batch, tokens, dim = x.shape
        st = self.stats
        if self.subspace == "calibrated":
            r = self._basis_r
            if r == 0:
                raise RuntimeError(
                    f"SDRM attention '{self.layer_name}' has subspace='calibrated' but no basis: apply decomp=sdrm "
                    "with calibration batches (decomp.calibration_batches >= 1) or call fit_basis()"
                )
            V = self.basis[:, :r].to(x.dtype)
            Z = x @ V
            if self.monitor:  # the frozen basis's energy on this batch: ||X V||^2 / ||X||^2 (two host reads)
                with torch.no_grad():
                    total = float(torch.linalg.vector_norm(x.detach())) ** 2
                    kept = float(torch.linalg.vector_norm(Z.detach())) ** 2
                energy = min(kept / total, 1.0) if total > 0 else 1.0
                self._record(r, batch, tokens, 0, energy, math.sqrt(max(1.0 - energy, 0.0)))
            else:
                self._record(r, batch, tokens, 0)
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
            self._record(result.rank, e - s, tokens, result.iterations, result.energy, result.rel_error)
            V = result.V.detach().to(x.dtype)
            out.append((s, e, V, x[s:e] @ V))
        return out

    def _record(
        self,
        rank: int,
        images: int,
        tokens: int,
        iterations: int,
        energy: float | None = None,
        rel_error: float | None = None,
    ) -> None:
        st = self.stats
        st.factorizations += 1
        st.rank_sum += rank
        st.cr_sum += tsvd_compression_ratio(images, tokens, self.dim, rank)
        st.iterations_sum += iterations
        if energy is not None and rel_error is not None:
            st.measured += 1
            st.energy_sum += energy
            st.rel_error_sum += rel_error
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
            raise ValueError(
                f"SDRMAttention '{self.layer_name}': block_size={self.block_size} is invalid for inputs of T={tokens} "
                f"tokens per image: it must lie in [1, {tokens}] (query tokens per block)"
            )
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
