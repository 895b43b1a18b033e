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

``factored`` (lrk's evaluation order, exactly the same numbers): Eq. 14 makes Q, K and V rank r, but the T x T
products of the attention (Q_h K_h^T and its product with V_h) still cost T^2 d_h per head when Q, K, V are formed
explicitly (``factored=false``, the paper's Algorithm 4), so the rank reduction only shrinks the projection. With
Z = Y V_r and P_h = W_h V_r per head, Q_h K_h^T / sqrt(d_k) = (Z M_h + 1 u_h) Z^T up to terms constant along the
keys, which the softmax removes (M_h = P_q,h^T P_k,h / sqrt(d_k), u_h = b_q,h^T P_k,h / sqrt(d_k)), and
softmax(.) V_h W^O_h^T = (softmax(.) Z) R_h + 1 b_v,h^T W^O_h^T with R_h = P_v,h^T W^O_h^T: the T x T products
cost T^2 r per head instead of T^2 d_h, W^O is folded in (h r d per token instead of d^2), and Q, K, V are never
formed at full width; the r x r and r x d matrices are formed once per chunk (``factored=true``). ``auto``
(default) takes the factored order when r < d_h (the per-head rank r_max for the input split), where it needs fewer
flops. All heads share the keys and values Z, so the projected split runs them as one
``scaled_dot_product_attention`` over h T queries.

``head_split`` (which split of Algorithm 2 / Section 3.2): ``projected`` (default) factorizes Y with all d
features once per chunk and splits the heads from the projected Q, K, V (head h: output columns h d/h ...
(h+1) d/h - 1 of W^Q, W^K, W^V, each on all d input features): the parameters of the dense attention. ``input`` is
the paper's reading: "X is divided into X_i in R^{b x t x d/h}" and "U_r, S_r, V_r^T is segmentation for U_{r,i},
S_{r,i}, V_{r,i}^T": every head has its own t-SVD of Y_i = reshape(X_i, (b t, d/h)) (its own rank r_i by the energy
rule, zero-padded to the largest so the heads stay batched; the gram solver does all heads in one batched Gram
product and eigh, H times fewer flops than the d x d Gram matrix) and its own W^Q_i, W^K_i, W^V_i of (d/h) x (d/h)
(:class:`HeadQKV`): 3 (d/h)^2 + 3 d/h parameters per head instead of 3 d (d/h) + 3 d/h, W^O (Eq. 19) unchanged.
From a dense model the input split keeps the diagonal blocks of its qkv (the off-diagonal blocks have no place in
it), so at phi = 1 it equals that block-diagonal attention, not the dense one. The paper's "parameter scale of each
head is reduced from O(d^2) to O((r/h)^2)" is not what lrk stores: the stored per-head weights are (d/h)^2 each;
what depends on r is the per-forward product V_{r,i}^T W_i (r_i x d/h). ``head_loop=True`` runs the heads one at
a time (Algorithm 2 l.3-7's loop) in whichever split is chosen: with ``projected`` head h uses the shared t-SVD of
all d features and its own rows of W (the same numbers as the batched heads, slower); it is not the paper's input
split, which is ``head_split=input``. Attention runs per image: chunks share a *basis*, never attention.

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

``solver``: ``gram`` (default: eigh of Y^T Y, exact; Theorem 2's own proof route) or ``adamatrix``
(:mod:`lrk.linalg.adamatrix`): lrk's AdaMatrix is, with its defaults, a warm-started block subspace iteration (U and
S in closed form by Rayleigh-Ritz, V updated with lr 1, no momentum, betas (0, 0): the step lands on one block power
iteration V <- orth(Y^T U S^-T), started from the previous batch's block), not the paper's Adam with momentum
(``adamatrix.variant=paper`` is Algorithm 1 as printed, which does not converge).

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

``distributed_heads=True`` (section 4: heads on different devices): with an initialised ``torch.distributed``
group of W > 1 ranks, rank k computes heads [k h/W, (k+1) h/W) (the input split: their own X_i and t-SVDs; the
projected split's shared t-SVD on every rank), the per-head outputs are all-gathered and W^O applied on every rank
(:mod:`lrk.layers.attention.distributed`: the autograd functions, the bytes sent). The factored order's folded W^O
is not used there (the gather carries the d/W head outputs). Without a group it runs as one process.

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
from torch import nn

from lrk.layers.attention import args
from lrk.layers.attention.blockwise import (
    DEFAULT_BLOCK_BUDGET_MB,
    AdaptiveBlockSize,
    blockwise_attention,
)
from lrk.layers.attention.dense import MultiHeadSelfAttention, split_heads
from lrk.layers.attention.distributed import copy_to_heads, gather_heads, head_range, rank_of, world_size
from lrk.layers.attention.stats import ModuleStats
from lrk.linalg.adamatrix import PAPER_ENERGY, AdaMatrixSolver
from lrk.linalg.adamatrix import adamatrix as adamatrix_svd
from lrk.linalg.rank import energy_rank, tsvd_compression_ratio
from lrk.linalg.svd_solvers import SOLVERS, truncated_svd
from lrk.linalg.tsvd import TruncatedSVD, gram_svd, head_gram_svd, small_lapack_threads
from lrk.measure import clock

log = logging.getLogger(__name__)

SUBSPACES = ("batch", "calibrated")
HEAD_SPLITS = ("projected", "input")
FACTORED = ("auto", True, False)
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
    gathers: int = 0  # distributed_heads: all-gathers of the head outputs (forwards) ...
    gather_bytes: int = 0  # ... and the bytes this rank sent in them
    reduces: int = 0  # distributed_heads: all-reduces of the input gradient (backwards) ...
    reduce_bytes: int = 0  # ... and the bytes this rank sent in them (ring all-reduce)
    fit_seconds: float = 0.0  # calibration time in apply (subspace=calibrated)
    forward_seconds: float = 0.0  # whole forwards
    last_block: int = 0


# --- per-head projections of head_split=input ----------------------------------------------------------------
class HeadQKV(nn.Module):
    """W^Q_i, W^K_i, W^V_i of every head i on its own d/h input features (Section 3.2, Eq. 14 per head):
    ``weight`` [h, 3 d/h, d/h] (rows: q_i | k_i | v_i), ``bias`` [h, 3 d/h]. ``forward(x [..., d])`` returns
    [..., 3 d] laid out [q | k | v], each split into heads like ``MultiHeadSelfAttention.qkv`` (the block-diagonal
    Linear(d, 3 d) whose diagonal blocks these are): 3 d^2 / h weights instead of 3 d^2."""

    def __init__(self, num_heads: int, head_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.weight = nn.Parameter(torch.empty(num_heads, 3 * head_dim, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, 3 * head_dim)) if bias else None
        bound = head_dim**-0.5  # nn.Linear's default init for fan_in = d/h
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def copy_diagonal_blocks(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take the per-head diagonal blocks of a dense ``qkv`` (weight [3d, d], bias [3d]): head i's q/k/v rows
        on head i's input columns (what the input split keeps of a dense attention)."""
        h, hd = self.num_heads, self.head_dim
        blocks = weight.reshape(3, h, hd, h, hd)
        idx = torch.arange(h, device=weight.device)
        diag = blocks[:, idx, :, idx, :]  # [h, 3, hd, hd]
        self.weight.copy_(diag.reshape(h, 3 * hd, hd))
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias.reshape(3, h, hd).transpose(0, 1).reshape(h, 3 * hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, hd = self.num_heads, self.head_dim
        xh = x.reshape(*x.shape[:-1], h, hd)
        out = torch.einsum("...hi,hoi->...ho", xh, self.weight)
        if self.bias is not None:
            out = out + self.bias
        out = out.reshape(*x.shape[:-1], h, 3, hd).transpose(-3, -2)
        return out.reshape(*x.shape[:-1], 3 * h * hd)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, in={self.head_dim}, out=3x{self.head_dim}, bias={self.bias is not None}"
        )


# --- the attention module -----------------------------------------------------------------------------------
BASIS_BUFFERS = ("basis", "basis_rank", "basis_energy")


class SDRMAttention(MultiHeadSelfAttention):
    """Multi-head self-attention on a rank-r t-SVD of its input (SDRM Eq. 14, Algorithms 2 and 4).

    The parameters of :class:`~lrk.models.MultiHeadSelfAttention` (``qkv``: Linear(dim, 3 dim) laid out
    [q | k | v], ``proj``), so ``SDRMAttention.from_attention(dense, energy=0.9, ...)`` copies its weights.
    ``head_split='input'`` replaces ``qkv`` by a :class:`HeadQKV` (h blocks of 3 d/h x d/h: the paper's per-head
    projections on d/h input features), taken from the dense ``qkv``'s diagonal blocks by ``from_attention``.
    ``subspace='calibrated'`` adds the buffers ``basis`` ([dim, dim]; [h, d/h, d/h] for the input split),
    ``basis_rank`` ([] or [h]) and ``basis_energy``: the frozen basis set by :meth:`fit_basis`, which travels with
    checkpoints. ``subspace='batch'`` has no buffer of its own (its state dict is that of the dense attention;
    the unused zero basis that batch-mode checkpoints written before carried is ignored on loading).

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
    head_split: str = "projected"
    factored: str | bool = "auto"
    distributed_heads: bool = False
    _basis_r: int = 0
    _basis_e: float = 0.0
    _basis_ranks: tuple[int, ...] = ()

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
        head_split: str = "projected",
        factored: str | bool = "auto",
        monitor: bool = False,
        distributed_heads: bool = False,
        layer_name: str = "attn",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        who = f"SDRMAttention '{layer_name}'"
        args.at_most_one(who, energy=energy, rank=rank)
        if energy is None and rank is None:
            energy = PAPER_ENERGY  # the paper's phi (Fig. 6 caption)
        args.fraction(who, "energy", energy)
        args.choice(who, "head_split", head_split, HEAD_SPLITS)
        width = dim if head_split == "projected" else dim // num_heads  # features of one t-SVD
        args.integer(
            who,
            "rank",
            rank,
            1,
            width,
            True,
            f"a t-SVD of tokens of {width} features has <= {width} components",
        )
        args.choice(who, "solver", solver, SOLVERS)
        args.integer(who, "svd_batch_size", svd_batch_size, 1, optional=True)
        if block_size != "adaptive":
            args.integer(who, "block_size", block_size, 1, optional=True)
        args.choice(who, "subspace", subspace, SUBSPACES)
        if not (factored == "auto" or isinstance(factored, bool)):
            raise ValueError(f"{who}: factored={factored!r} is invalid: it must be 'auto', True or False")
        args.positive(who, "block_budget_mb", block_budget_mb)
        args.flag(who, "monitor", monitor)
        args.flag(who, "distributed_heads", distributed_heads)
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
        self.head_split = head_split
        self.factored = factored
        self.monitor = monitor
        self.distributed_heads = distributed_heads
        self.layer_name = layer_name
        heads, hd = self.num_heads, self.head_dim
        if head_split == "input":  # the paper's per-head projections on d/h input features
            self.qkv = HeadQKV(heads, hd, qkv_bias)  # type: ignore[assignment]
        if subspace == "calibrated":
            shape = (dim, dim) if head_split == "projected" else (heads, hd, hd)
            self.register_buffer("basis", torch.zeros(shape))
            self.register_buffer(
                "basis_rank", torch.zeros(() if head_split == "projected" else (heads,), dtype=torch.long)
            )
            self.register_buffer("basis_energy", torch.zeros((), dtype=torch.float64))
        self._basis_r, self._basis_e = 0, 0.0  # basis_rank / basis_energy on the host (no sync per forward)
        self._basis_ranks = ()  # input split: the per-head ranks on the host
        self.stats = SDRMStats()
        self._ada: AdaMatrixSolver | None = None  # its solver (warm-started across batches)
        self._ada_heads: list[AdaMatrixSolver] = []  # input split: one per head
        if solver == "adamatrix":
            try:
                self._ada = AdaMatrixSolver(rank, self.energy, **self.adamatrix_options)
                if head_split == "input":
                    self._ada_heads = [
                        AdaMatrixSolver(rank, self.energy, **self.adamatrix_options) for _ in range(heads)
                    ]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{who}: adamatrix={self.adamatrix_options} is invalid: {exc}") from exc
        self.block_control = AdaptiveBlockSize(block_budget_mb) if block_size == "adaptive" else None

    @classmethod
    def from_attention(cls, other: Any, **overrides: Any) -> SDRMAttention:  # type: ignore[override]
        """As :meth:`AttentionBase.from_attention`; with ``head_split='input'`` from a dense-layout ``qkv``
        (Linear(d, 3 d)), the per-head projections are its diagonal blocks (head i's q/k/v rows on head i's
        input columns; the off-diagonal blocks have no place in the input split)."""
        new = super().from_attention(other, **overrides)
        src = getattr(other, "qkv", None)
        if isinstance(new.qkv, HeadQKV) and isinstance(src, nn.Linear):
            new.qkv.copy_diagonal_blocks(src.weight.detach(), None if src.bias is None else src.bias.detach())
        return new

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
            "head_split": self.head_split,
            "factored": self.factored,
            "monitor": self.monitor,
            "distributed_heads": self.distributed_heads,
            "layer_name": self.layer_name,
        }

    def extra_repr(self) -> str:
        policy = f"energy={self.energy}" if self.rank is None else f"rank={self.rank}"
        return (
            f"dim={self.dim}, heads={self.num_heads}, {policy}, solver={self.solver}, "
            f"svd_batch_size={self.svd_batch_size}, block_size={self.block_size}, subspace={self.subspace}, "
            f"head_split={self.head_split}, factored={self.factored}"
            + (", distributed_heads=True" if self.distributed_heads else "")
        )

    # --- the calibrated basis ----------------------------------------------------------------------------
    @torch.no_grad()
    def fit_basis(self, gram: torch.Tensor, tokens: int) -> None:
        """Freeze the basis of ``subspace='calibrated'``: the leading eigenvectors of ``gram`` = sum of Y^T Y
        over the calibration batches (= the right singular vectors of all their tokens stacked), rank r by the
        energy rule (Eqs. 2-3) or the fixed ``rank`` (which must not exceed min(tokens, d): ValueError). With
        ``head_split='input'`` every head gets the eigenvectors of its diagonal d/h x d/h block of ``gram`` (the
        Gram matrix of its own input features X_i) and its own rank."""
        if self.subspace != "calibrated":
            raise RuntimeError(
                f"SDRM attention '{self.layer_name}' has subspace='batch': it has no frozen basis to fit"
            )
        start = time.perf_counter()
        gram = gram.detach().double()
        heads, hd = self.num_heads, self.head_dim
        if self.head_split == "input":
            idx = torch.arange(heads, device=gram.device)
            gram = gram.reshape(heads, hd, heads, hd)[idx, :, idx, :]  # [h, hd, hd]: each head's own block
        with small_lapack_threads(gram.device):
            evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(-1).clamp_min(0.0), evecs.flip(-1)
        width = gram.shape[-1]
        limit = min(tokens, width)
        if self.rank is not None and self.rank > limit:
            raise ValueError(
                f"SDRMAttention '{self.layer_name}': rank={self.rank} is invalid for its calibration tokens "
                f"({tokens} x {width}): they have at most {limit} components"
            )
        spectra = evals.reshape(-1, width)
        ranks = [
            self.rank if self.rank is not None else min(energy_rank(e.sqrt(), self.energy), limit)  # type: ignore[arg-type]
            for e in spectra
        ]
        total = float(spectra.sum())
        kept = sum(float(e[:r].sum()) for e, r in zip(spectra, ranks, strict=True))
        self.basis.copy_(evecs.to(self.basis.dtype))
        self.basis_rank.copy_(torch.tensor(ranks if self.head_split == "input" else ranks[0]))
        self.basis_energy.fill_(kept / total if total > 0 else 1.0)
        self._sync_basis()
        self.stats.fit_seconds += time.perf_counter() - start

    def _sync_basis(self) -> None:
        """Read the basis rank(s) and energy to the host once (after fitting or loading)."""
        ranks = self.basis_rank.flatten().tolist()
        self._basis_ranks = tuple(int(r) for r in ranks)
        self._basis_r = int(max(ranks)) if ranks else 0
        self._basis_e = float(self.basis_energy)

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
            self._sync_basis()
        else:  # batch-mode checkpoints written before the basis became calibrated-only carry a zero basis
            stale = {prefix + name for name in BASIS_BUFFERS}
            unexpected_keys[:] = [k for k in unexpected_keys if k not in stale]

    # --- rank reduction ------------------------------------------------------------------------------------
    def _factorize(self, Y: torch.Tensor, head: int | None = None) -> TruncatedSVD:
        """t-SVD of one chunk Y ([m, n]) by the configured solver; AdaMatrix divergence -> exact gram.
        ``head``: the head whose features Y holds (head_split=input: its own warm-started AdaMatrix)."""
        limit = min(Y.shape)
        rank = self.rank
        if rank is not None and rank > limit:  # a short final chunk: keep every component it has
            rank = limit
            self.stats.clamped += 1
        ada = self._ada if head is None else (self._ada_heads[head] if self._ada_heads else None)
        try:
            if self.solver == "adamatrix":
                if rank == self.rank and ada is not None:
                    result = ada(Y)  # warm start across chunks and batches
                else:
                    result = adamatrix_svd(Y, rank=rank, **self.adamatrix_options)
                if not bool(torch.isfinite(result.V).all() and torch.isfinite(result.S).all()):
                    log.warning("SDRM %s: AdaMatrix returned non-finite factors; using gram", self.layer_name)
                    exact = gram_svd(Y, rank, None if rank is not None else self.energy, compute_u=False)
                    exact.fell_back = True
                    result = exact
                    if ada is not None:
                        ada.reset()
            else:  # V_r and S only: _bases forms Y V_r itself (with the gradient), once per chunk
                energy = None if rank is not None else self.energy
                result = truncated_svd(Y, rank=rank, energy=energy, solver=self.solver, compute_u=False)
        except ValueError as exc:
            if "not finite" in str(exc):
                raise self._non_finite() from exc
            raise
        if result.fell_back:
            self.stats.fallbacks += 1
        return result

    def _non_finite(self) -> FloatingPointError:
        return FloatingPointError(
            f"SDRM attention '{self.layer_name}' received non-finite inputs (NaN/inf): the model diverged "
            "before this layer; lower model.lr or check the data"
        )

    def _bases(
        self, x: torch.Tensor, heads: slice = slice(None)
    ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Per chunk: (first image, end image, V_r, Z = X_chunk V_r), recording the statistics (Algorithm 1,
        Eqs. 2-3). ``head_split='projected'``: V_r [d, r], Z [c, T, r]; ``'input'``: V [h, d/h, r_max] (head i's
        columns zero beyond its rank r_i), Z [c, h, T, r_max] = X_i V_{r,i} per head. Z = U_r S_r of Eq. 14
        (exactly, for an SVD) and carries the gradient to x. It is the only product of a chunk's tokens with V_r
        in the forward: the solvers return V_r and S without U (``compute_u=False``), and Eq. 14 reuses Z.
        ``heads`` (input split): the t-SVDs of these heads only (a rank's heads with ``distributed_heads``); the
        projected split's one t-SVD of all d features serves every head."""
        if self.head_split == "input":
            return self._head_bases(x, heads)
        batch, tokens, dim = x.shape
        st = self.stats
        if self.subspace == "calibrated":
            r = self._basis_r
            if r == 0:
                raise self._no_basis()
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

    def _no_basis(self) -> RuntimeError:
        return RuntimeError(
            f"SDRM attention '{self.layer_name}' has subspace='calibrated' but no basis: apply decomp=sdrm "
            "with calibration batches (decomp.calibration_batches >= 1) or call fit_basis()"
        )

    def _head_bases(
        self, x: torch.Tensor, heads_slice: slice = slice(None)
    ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """:meth:`_bases` of ``head_split='input'`` (Section 3.2: X divided into X_i in R^{b x t x d/h}, a t-SVD
        of every head's own features): the gram solver factorizes all heads at once
        (:func:`~lrk.linalg.tsvd.head_gram_svd`), the other solvers head by head; ranks differ per head and are
        zero-padded to the largest (zero columns of V add nothing to any product). ``heads_slice``: only these
        heads (their features X_i, their t-SVDs, their statistics)."""
        batch, tokens, _ = x.shape
        first = range(self.num_heads)[heads_slice].start
        hd = self.head_dim
        st = self.stats
        xh = x.reshape(batch, tokens, self.num_heads, hd)[:, :, heads_slice]
        heads = xh.shape[2]
        if self.subspace == "calibrated":
            if not self._basis_ranks:
                raise self._no_basis()
            ranks = self._basis_ranks[heads_slice]
            r_max = max(ranks)
            keep = torch.arange(r_max, device=x.device) < torch.tensor(ranks, device=x.device)[:, None]
            V = self.basis[heads_slice, :, :r_max].to(x.dtype) * keep[:, None, :].to(x.dtype)
            Z = torch.einsum("bthi,hir->bhtr", xh, V)
            energies: list[float | None] = [None] * heads
            if self.monitor:
                with torch.no_grad():
                    totals = xh.detach().square().sum((0, 1)).sum(-1).double().cpu()
                    kept = Z.detach().square().sum((0, 2, 3)).double().cpu()
                energies = [
                    min(float(k / t), 1.0) if t > 0 else 1.0 for k, t in zip(kept, totals, strict=True)
                ]
            for h in range(heads):
                e_h = energies[h]
                err = None if e_h is None else math.sqrt(max(1.0 - e_h, 0.0))
                self._record(ranks[h], batch, tokens, 0, e_h, err, width=hd)
            return [(0, batch, V, Z)]
        chunk = self.svd_batch_size or batch
        out = []
        sync = x.is_cuda
        for s in range(0, batch, chunk):
            e = min(batch, s + chunk)
            Yh = xh[s:e].detach().reshape(-1, heads, hd).transpose(0, 1)  # [h, b t, d/h]: Y_i per head
            start = clock(sync)
            m = Yh.shape[1]
            if self.solver == "gram" and m >= hd:
                rank = self.rank if self.rank is None or self.rank <= m else m
                try:
                    res = head_gram_svd(Yh, rank, None if rank is not None else self.energy)
                except ValueError as exc:
                    if "not finite" in str(exc):
                        raise self._non_finite() from exc
                    raise
                V = res.V
                rows = [(res.ranks[h], 0, res.energies[h], res.rel_errors[h]) for h in range(heads)]
            else:
                results = [self._factorize(Yh[h], head=first + h) for h in range(heads)]
                r_max = max(t.rank for t in results)
                V = Yh.new_zeros(heads, hd, r_max)
                for h, t in enumerate(results):
                    V[h, :, : t.rank] = t.V
                rows = [(t.rank, t.iterations, t.energy, t.rel_error) for t in results]
            st.rr_seconds += clock(sync) - start
            for r_h, its, en, err in rows:
                self._record(r_h, e - s, tokens, its, en, err, width=hd)
            V = V.detach().to(x.dtype)
            out.append((s, e, V, torch.einsum("bthi,hir->bhtr", xh[s:e], V)))
        return out

    def _record(
        self,
        rank: int,
        images: int,
        tokens: int,
        iterations: int,
        energy: float | None = None,
        rel_error: float | None = None,
        width: int | None = None,
    ) -> None:
        st = self.stats
        st.factorizations += 1
        st.rank_sum += rank
        st.cr_sum += tsvd_compression_ratio(images, tokens, width or self.dim, rank)
        st.iterations_sum += iterations
        if energy is not None and rel_error is not None:
            st.measured += 1
            st.energy_sum += energy
            st.rel_error_sum += rel_error
            st.last_rel_error = rel_error

    # --- attention from the factors ----------------------------------------------------------------------
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
        """Attention *and* W^O of one chunk from Eq. 14's rank-r factors, Q, K, V never formed (exact). With
        Z = X V_r ([c, T, r]) and P_h = W_h V_r ([d_h, r]) per head of q, k, v (biases b_q,h, b_k,h, b_v,h):

            Q_h K_h^T / sqrt(d_k) = Z M_h Z^T + 1 u_h Z^T + (terms constant along the keys),
            M_h = P_q,h^T P_k,h / sqrt(d_k) ([r, r]),  u_h = b_q,h^T P_k,h / sqrt(d_k) ([r]);

        the softmax over the keys does not see terms constant along them (Z P_q^T b_k, b_q^T b_k), so the scores
        are (Z M_h + 1 u_h) Z^T: T^2 r per head instead of T^2 d_h. Values: softmax(.) V_h = (softmax(.) Z) P_v,h^T
        + 1 b_v,h^T (the rows of softmax(.) sum to 1), and Eq. 19's concat_h(.) W^O = sum_h (softmax_h(.) Z) R_h
        + W^O b_v + b_O with R_h = P_v,h^T W^O_h^T ([r, d]): h r d per token instead of d^2. The small matrices
        are formed once per chunk. All heads share the keys and values Z, so they run as one
        scaled_dot_product_attention over h T queries (no per-head copies). With attention dropout the rows no
        longer sum to 1: the values are then [Z, 1] and R_h gets the row b_v,h^T W^O_h^T."""
        c, tokens, r = Z.shape
        heads, hd, dim = self.num_heads, self.head_dim, self.dim
        P = self.qkv.weight @ V  # [3d, r]: V_r^T W of Eq. 14 for q, k and v
        Pq, Pk, Pv = P.reshape(3, heads, hd, r).unbind(0)  # rows of W: [q | k | v], each split into heads
        scale = hd**-0.5
        Wo = self.proj.weight.reshape(dim, heads, hd).permute(1, 2, 0)  # [H, hd, d]: W^O_h^T
        M = Pq.transpose(1, 2) @ Pk * scale  # [H, r, r]
        R = Pv.transpose(1, 2) @ Wo  # [H, r, d]
        q = (Z @ M.transpose(0, 1).reshape(r, heads * r)).reshape(c, tokens, heads, r)
        bias = self.qkv.bias
        const = self.proj.bias
        values = Z
        if bias is not None:
            bq, _, bv = bias.reshape(3, heads, 1, hd).unbind(0)
            q = q + (bq @ Pk).reshape(heads, r) * scale  # u_h
            b_out = bv @ Wo  # [H, 1, d]: b_v,h^T W^O_h^T
            if drop > 0:  # dropped rows do not sum to 1: carry the bias through the values
                values = torch.cat([Z, Z.new_ones(c, tokens, 1)], dim=-1)
                R = torch.cat([R, b_out], dim=1)
            else:
                const = b_out.sum(0).reshape(dim) if const is None else const + b_out.sum(0).reshape(dim)
        k = values.shape[-1]
        if block is None:  # one attention over the h T queries (shared keys/values)
            q = q.permute(0, 2, 1, 3).reshape(c, 1, heads * tokens, r)
            A = F.scaled_dot_product_attention(q, Z[:, None], values[:, None], dropout_p=drop, scale=1.0)
            A = A.reshape(c, heads, tokens, k).transpose(1, 2)  # [c, T, H, k]
        else:
            keys = Z[:, None].expand(c, heads, tokens, r)
            vals = values[:, None].expand(c, heads, tokens, k)
            A = blockwise_attention(q.transpose(1, 2), keys, vals, block, self.block_keys, drop, scale=1.0)
            A = A.transpose(1, 2)
        return F.linear(A.reshape(c, tokens, heads * k), R.reshape(heads * k, dim).T, const)

    def _head_qkv(
        self, Z: torch.Tensor, V: torch.Tensor, heads: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """head_split=input, formed: (Q_i, K_i, V_i) = (X_i V_{r,i})(V_{r,i}^T W_i) + b_i (Eq. 14 per head),
        each [c, h, T, d/h], from Z [c, h, T, r] and V [h, d/h, r] of the ``heads`` (a slice of all heads)."""
        hd = self.head_dim
        P = self.qkv.weight[heads] @ V  # [h, 3 hd, r]
        out = Z @ P.transpose(1, 2)  # [c, h, T, 3 hd]
        if self.qkv.bias is not None:
            out = out + self.qkv.bias[heads, None, :]
        q, k, v = out.split(hd, dim=-1)
        return q, k, v

    def _head_factored(
        self, Z: torch.Tensor, V: torch.Tensor, block: int | None, drop: float
    ) -> torch.Tensor:
        """head_split=input, factored: :meth:`_factored` with every head's own Z_i = X_i V_{r,i} ([c, h, T, r])
        and P_i = W_i V_{r,i}: scores (Z_i M_i + 1 u_i) Z_i^T, values (softmax Z_i) R_i + W^O b_v + b_O."""
        c, heads, tokens, _ = Z.shape
        hd, dim = self.head_dim, self.dim
        P = self.qkv.weight @ V  # [h, 3 hd, r]
        Pq, Pk, Pv = P.split(hd, dim=1)  # [h, hd, r] each
        scale = hd**-0.5
        Wo = self.proj.weight.reshape(dim, heads, hd).permute(1, 2, 0)  # [h, hd, d]
        M = Pq.transpose(1, 2) @ Pk * scale  # [h, r, r]
        R = Pv.transpose(1, 2) @ Wo  # [h, r, d]
        q = Z @ M
        const = self.proj.bias
        values = Z
        if self.qkv.bias is not None:
            bq, _, bv = self.qkv.bias.reshape(heads, 3, 1, hd).unbind(1)  # [h, 1, hd] each
            q = q + (bq @ Pk)[None] * scale  # u_i
            b_out = bv @ Wo  # [h, 1, d]
            if drop > 0:
                values = torch.cat([Z, Z.new_ones(c, heads, tokens, 1)], dim=-1)
                R = torch.cat([R, b_out], dim=1)
            else:
                const = b_out.sum(0).reshape(dim) if const is None else const + b_out.sum(0).reshape(dim)
        k = values.shape[-1]
        A = blockwise_attention(q, Z, values, block, self.block_keys, drop, scale=1.0)  # [c, h, T, k]
        return F.linear(A.transpose(1, 2).reshape(c, tokens, heads * k), R.reshape(heads * k, dim).T, const)

    def use_factored(self, rank: int) -> bool:
        """Whether a forward at (largest per-head) rank r takes the factored order: ``factored`` True/False, or
        with 'auto' when r < d_h, where it needs fewer flops: the T x T products cost T^2 r per head instead of
        T^2 d_h, and the output h r d per token instead of W^O's d^2 (h d_h = d), at the price of the small
        h r^2 and h r d matrices per chunk (and r + 1 value columns with attention dropout and a qkv bias)."""
        legacy = self.__dict__.get("core")  # a skeleton pickled before ``factored`` replaced ``core``
        if self.head_loop or legacy == "qkv" or self.factored is False:
            return False
        if self.factored is True or legacy == "factored":
            return True
        return rank < self.head_dim

    def _use_factored(self, bases: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> bool:
        return self.use_factored(max(V.shape[-1] for _, _, V, _ in bases))

    def _block(self, batch: int, tokens: int, x: torch.Tensor) -> int | None:
        if self.block_control is not None:
            return self.block_control.choose(batch, self.num_heads, tokens, tokens, x.element_size())
        if self.block_size is not None and self.block_size > tokens:  # type: ignore[operator]
            raise ValueError(
                f"SDRMAttention '{self.layer_name}': block_size={self.block_size} is invalid for inputs of T={tokens} "
                f"tokens per image: it must lie in [1, {tokens}] (query tokens per block)"
            )
        return self.block_size  # type: ignore[return-value]

    # --- heads spread over the ranks of a process group (distributed_heads) ----------------------------------
    def shard(self) -> tuple[int, int] | None:
        """(rank, world size) of the default process group when this module shards its heads over it
        (``distributed_heads`` and an initialised group of W > 1 ranks), None when it runs all heads itself.
        ValueError when W does not divide the head count."""
        world = world_size() if self.distributed_heads else 1
        if world == 1:
            return None
        rank = rank_of()
        try:
            head_range(self.num_heads, rank, world)
        except ValueError as exc:
            raise ValueError(f"SDRMAttention '{self.layer_name}' (distributed_heads): {exc}") from exc
        return rank, world

    def _forward_sharded(self, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """Heads [k h/W, (k+1) h/W) on rank k, their outputs all-gathered, then W^O on every rank (section 4's
        heads on different devices; :mod:`lrk.layers.attention.distributed`). The projected split's t-SVD of
        all d features is computed on every rank: every rank needs V_r for its heads, the t-SVD is on the
        critical path either way (a broadcast from one rank would make the others wait for it, then send d r
        numbers per chunk), and ranks that disagree in the last bits still produce consistent outputs (each rank
        uses its own V_r for its own heads). The input split computes only the rank's own heads' t-SVDs."""
        batch, tokens, _ = x.shape
        sync = x.is_cuda
        start = clock(sync)
        local = head_range(self.num_heads, rank, world)
        x = copy_to_heads(x, None, self.stats)  # backward: dL/dX summed over the ranks' heads
        bases = self._bases(x, local)
        per = local.stop - local.start
        if self.block_control is not None:
            block = self.block_control.choose(batch, per, tokens, tokens, x.element_size())
        else:
            block = self._block(batch, tokens, x)
        drop = self.attn_drop if self.training else 0.0
        core_start = clock(sync)
        out = self._local_heads(bases, local, block, drop, tokens)
        if self.block_control is not None:
            self.block_control.update(block or tokens, clock(sync) - core_start, batch * tokens)
        out = gather_heads(out, None, self.stats)  # [B, T, d]: every rank's heads, in rank order
        out = self.proj_drop(self.proj(out))  # Eq. 19 on every rank (replicated)
        self.stats.forwards += 1
        self.stats.last_block = block or tokens
        self.stats.forward_seconds += clock(sync) - start
        return out

    def _local_heads(
        self,
        bases: list[tuple[int, int, torch.Tensor, torch.Tensor]],
        heads: slice,
        block: int | None,
        drop: float,
        tokens: int,
    ) -> torch.Tensor:
        """The outputs of ``heads`` (n consecutive heads) before W^O, [B, T, n d/h], in the order the module is
        configured for (factored or formed, batched or one head at a time). The factored order does not fold
        W^O in here (it is applied after the gather): head i's output is (softmax(.) Z_i) P_v,i^T + b_v,i."""
        n, hd, dim = heads.stop - heads.start, self.head_dim, self.dim
        factored = self._use_factored(bases)
        scale = hd**-0.5
        W, b = self.qkv.weight, self.qkv.bias
        cols = torch.arange(heads.start * hd, heads.stop * hd, device=W.device)
        parts = []
        for _, _, V, Z in bases:
            c = Z.shape[0]
            if self.head_split == "input":  # Z [c, n, T, r], V [n, d/h, r]
                if factored:
                    P = W[heads] @ V  # [n, 3 hd, r]
                    Pq, Pk, Pv = P.split(hd, dim=1)
                    q = Z @ (Pq.transpose(1, 2) @ Pk * scale)
                    values, Pv_t, bv = Z, Pv.transpose(1, 2), None  # Pv_t [n, r, hd]
                    if b is not None:
                        bq, _, bv = b[heads].reshape(n, 3, 1, hd).unbind(1)
                        q = q + (bq @ Pk)[None] * scale
                        if drop > 0:  # dropped rows do not sum to 1: carry b_v through the values
                            values = torch.cat([Z, Z.new_ones(*Z.shape[:-1], 1)], dim=-1)
                            Pv_t, bv = torch.cat([Pv_t, bv], dim=1), None
                    A = blockwise_attention(q, Z, values, block, self.block_keys, drop, scale=1.0)
                    o = A @ Pv_t if bv is None else A @ Pv_t + bv  # [c, n, T, hd]
                elif self.head_loop:
                    outs = []
                    for i in range(n):
                        h = slice(heads.start + i, heads.start + i + 1)
                        q, k, v = self._head_qkv(Z[:, i : i + 1], V[i : i + 1], h)
                        outs.append(blockwise_attention(q, k, v, block, self.block_keys, drop))
                    o = torch.cat(outs, dim=1)
                else:
                    q, k, v = self._head_qkv(Z, V, heads)
                    o = blockwise_attention(q, k, v, block, self.block_keys, drop)
                parts.append(o.transpose(1, 2).reshape(c, tokens, n * hd))
                continue
            # projected split: Z [c, T, r], V [d, r]; the heads' rows of W^Q, W^K, W^V
            rows = torch.cat([cols, cols + dim, cols + 2 * dim])
            Wl, bl = W.index_select(0, rows), None if b is None else b.index_select(0, rows)
            if factored:
                r = Z.shape[-1]
                Pq, Pk, Pv = (Wl @ V).reshape(3, n, hd, r).unbind(0)
                M = Pq.transpose(1, 2) @ Pk * scale  # [n, r, r]
                q = (Z @ M.transpose(0, 1).reshape(r, n * r)).reshape(c, tokens, n, r).transpose(1, 2)
                values, Pv_t, bv = Z, Pv.transpose(1, 2), None  # Pv_t [n, r, hd]
                if bl is not None:
                    bq, _, bv = bl.reshape(3, n, 1, hd).unbind(0)
                    q = q + (bq @ Pk).reshape(n, 1, r) * scale
                    if drop > 0:
                        values = torch.cat([Z, Z.new_ones(c, tokens, 1)], dim=-1)
                        Pv_t, bv = torch.cat([Pv_t, bv], dim=1), None
                k = values.shape[-1]
                if block is None:  # one attention over the n T queries (shared keys/values)
                    A = F.scaled_dot_product_attention(
                        q.reshape(c, 1, n * tokens, r), Z[:, None], values[:, None], dropout_p=drop, scale=1.0
                    ).reshape(c, n, tokens, k)
                else:
                    keys = Z[:, None].expand(c, n, tokens, r)
                    vals = values[:, None].expand(c, n, tokens, k)
                    A = blockwise_attention(q, keys, vals, block, self.block_keys, drop, scale=1.0)
                o = A @ Pv_t if bv is None else A @ Pv_t + bv  # [c, n, T, hd]
                parts.append(o.transpose(1, 2).reshape(c, tokens, n * hd))
            elif self.head_loop:
                outs = []
                for i in range(n):
                    one = torch.arange(i * hd, (i + 1) * hd, device=W.device)
                    idx = torch.cat([one, one + n * hd, one + 2 * n * hd])
                    qkv = F.linear(Z, Wl[idx] @ V, None if bl is None else bl[idx])
                    q, k, v = qkv.split(hd, dim=-1)
                    outs.append(blockwise_attention(q, k, v, block, self.block_keys, drop))
                parts.append(torch.cat(outs, dim=-1))
            else:
                q, k, v = split_heads(F.linear(Z, Wl @ V, bl), n)
                o = blockwise_attention(q, k, v, block, self.block_keys, drop)
                parts.append(o.transpose(1, 2).reshape(c, tokens, n * hd))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shard = self.shard()
        if shard is not None:
            return self._forward_sharded(x, *shard)
        batch, tokens, dim = x.shape
        sync = x.is_cuda
        start = clock(sync)
        heads, hd = self.num_heads, self.head_dim
        bases = self._bases(x)
        block = self._block(batch, tokens, x)
        drop = self.attn_drop if self.training else 0.0
        core_start = clock(sync)
        projected = False  # whether W^O is already applied (the factored order folds it in)
        if self._use_factored(bases):
            run = self._head_factored if self.head_split == "input" else self._factored
            outs = [run(Z, V, block, drop) for _, _, V, Z in bases]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
            projected = True
        elif self.head_split == "input":
            parts = []
            for _, _, V, Z in bases:
                if self.head_loop:  # Algorithm 2 l.3-7: head i on its own features, one at a time
                    heads_out = []
                    for h in range(heads):
                        q, k, v = self._head_qkv(Z[:, h : h + 1], V[h : h + 1], slice(h, h + 1))
                        heads_out.append(blockwise_attention(q, k, v, block, self.block_keys, drop))
                    o = torch.cat(heads_out, dim=1)
                else:
                    q, k, v = self._head_qkv(Z, V)
                    o = blockwise_attention(q, k, v, block, self.block_keys, drop)
                parts.append(o.transpose(1, 2).reshape(o.shape[0], tokens, dim))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        elif not self.head_loop:
            # the projected split: heads split by the output columns of Q, K, V
            q, k, v = split_heads(self._project(bases, None), heads)
            out = blockwise_attention(q, k, v, block, self.block_keys, drop).transpose(1, 2)
            out = out.reshape(batch, tokens, dim)
        else:  # the projected split one head at a time, on its own rows of W^Q, W^K, W^V (same numbers)
            outs = []
            for h in range(heads):
                cols = torch.arange(h * hd, (h + 1) * hd, device=x.device)
                rows = torch.cat([cols, cols + dim, cols + 2 * dim])
                q, k, v = self._project(bases, rows).split(hd, dim=-1)
                outs.append(blockwise_attention(q, k, v, block, self.block_keys, drop))
            out = torch.cat(outs, dim=-1)  # Algorithm 2 l.8 / Eq. 18: concatenate the heads
        if self.block_control is not None:
            self.block_control.update(block or tokens, clock(sync) - core_start, batch * tokens)
        out = self.proj_drop(out if projected else self.proj(out))  # Eq. 19: W^O
        self.stats.forwards += 1
        self.stats.last_block = block or tokens
        self.stats.forward_seconds += clock(sync) - start
        return out
