"""``decomp=pca``: PCA-projected attention (seeds/vit_nla_slides.txt, slides "Used methods. PCA").

The slides reduce "the attention matrix" with PCA: X_reduced = X W, W holding the principal components as its
columns, and a low-rank reconstruction through W^T. lrk's reading (issue #4): per head h, the queries and keys
are projected onto a rank-r principal basis B_h in R^{d_k x r} (orthonormal columns) of their joint token
features before the score product,

    scores_h = (q_h B_h)(k_h B_h)^T / sqrt(d_k) = q_h (B_h B_h^T) k_h^T / sqrt(d_k),

then softmax over the keys, times v_h, and ``proj`` as in dense attention. The score product costs O(T^2 r)
instead of O(T^2 d_k). The scale stays the dense 1/sqrt(d_k) (not 1/sqrt(r)), so that at r = d_k
(B_h B_h^T = I) the module *is* dense attention. v_h is not projected.

Which subspace: the scores are raw inner products q . k, so the subspace that keeps them best is that of the
*uncentred* second moment M_h = sum_t q_t q_t^T + k_t k_t^T (``center: false``, the default). ``center: true``
removes the mean of the joint q/k tokens before finding the directions (classic PCA, the slides' "variance");
the projection is still applied to the raw q and k.

``basis``:

- ``batch`` (default): B_h is recomputed in every forward from the detached q and k, under ``torch.no_grad`` (no
  gradient flows through the basis; it is a constant of each forward, as an SVD's factors are), *per image and
  head* ([B, H, 2T, d_k] -> [B, H, d_k, r]): tokens of different images never mix, not even through the basis.
  The solver is ``eigh`` (exact batched eigh of the d_k x d_k moment) by default; ``lowrank`` uses
  ``torch.pca_lowrank``: :mod:`lrk.linalg.pca` has the timings that made ``eigh`` the default (3-4x faster
  at head sizes, exact, deterministic).
- ``calibrated``: B_h is fitted once in ``apply`` on the calibration batches' q/k of each head (the inputs of
  the attention module in the dense model, projected by its dense ``qkv``; moments summed over all calibration
  tokens) and frozen as the buffer ``pca_basis`` ([H, d_k, r]), which travels with checkpoints; no
  factorization at run time. With ``stage: init`` the weights then train under a basis fitted to the untrained
  model (a warning says so); ``stage: post`` fits it to a trained one.

Rank rule (exactly one; ``default_ratio`` when all are null): ``rank`` (r in [1, d_k]), ``ratio``
(r = ceil(ratio d_k), ratio in (0, 1]) or ``energy`` (phi in (0, 1]: per module, the smallest r such that the top-r
principal directions of every head keep phi of that head's q/k second-moment energy on the calibration batches
(SDRM's rule, seeds/sdrm_paper.txt Eqs. 2-3, on the eigenvalues of M_h); fixed afterwards, for ``basis=batch``
too. With ``center: false`` a per-image basis keeps at least as much of each image's energy as the pooled basis
does, so the calibration images keep >= phi in total).

Report rows (one per module): ``rank`` r (``ranks``: r per head), ``rel_error`` = ||pca(x) - dense(x)||_F /
||dense(x)||_F on the calibration inputs of the module in the dense model, ``energy`` = the retained
fraction of the q/k second-moment energy at r on the calibration batches (of the frozen basis for
``calibrated``; of each image's own basis for ``batch``; centred moments with ``center: true``),
``params_before`` = ``params_after`` (the basis is a buffer, not a parameter), ``seconds`` = the fitting time
in ``apply`` (moments, eigh, rank choice; not the error measurement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lrk.layers.attention import args
from lrk.layers.attention.dense import MultiHeadSelfAttention
from lrk.layers.attention.stats import ModuleStats
from lrk.linalg.pca import (
    DEFAULT_PCA_SOLVER,
    PCA_SOLVERS,
    moment_spectrum,
    principal_basis,
)
from lrk.linalg.rank import fraction_rank
from lrk.measure import clock

BASES = ("batch", "calibrated")
DEFAULT_RATIO = 0.5


# --- the attention module -----------------------------------------------------------------------------------
@dataclass
class PCAStats(ModuleStats):
    """What a PCA attention module did since it was built (or ``reset``). Not part of the state dict."""

    forwards: int = 0
    rr_seconds: float = 0.0  # basis=batch: the per-image bases inside forwards (the method's rank reduction)
    fit_seconds: float = 0.0  # apply: moments, rank rule and calibrated basis


class PCAAttention(MultiHeadSelfAttention):
    """Multi-head self-attention with queries and keys projected on a rank-r principal basis per head (slides
    "Used methods. PCA"; see the module docstring): ``softmax((q_h B_h)(k_h B_h)^T / sqrt(d_k)) v_h``, then ``proj``.

    The parameters of :class:`~lrk.models.MultiHeadSelfAttention` (``qkv``, ``proj``), so
    ``PCAAttention.from_attention(dense, rank=4)`` copies its weights. ``basis='calibrated'`` adds the buffer
    ``pca_basis`` ([H, d_k, r]), set by :meth:`fit_basis` or by loading a state dict. The arguments are checked
    only for what the module cannot run with (ValueError); the config rules are
    :class:`lrk.decomp.attention.pca.PCAMethod`'s.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rank: int | None = None,
        basis: str = "batch",
        center: bool = False,
        solver: str = DEFAULT_PCA_SOLVER,
        niter: int = 2,
        oversample: int = 4,
        layer_name: str = "attn",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        who = f"PCAAttention '{layer_name}'"
        hd = self.head_dim
        args.integer(who, "rank", rank, 1, hd, True, f"d_k = dim / num_heads = {hd}")
        args.choice(who, "basis", basis, BASES)
        args.flag(who, "center", center)
        args.choice(who, "solver", solver, PCA_SOLVERS)
        args.integer(who, "niter", niter, 0)
        args.integer(who, "oversample", oversample, 0)
        rank = fraction_rank(DEFAULT_RATIO, hd) if rank is None else rank
        self.rank = int(rank)
        self.basis_mode = basis
        self.center = center
        self.solver = solver
        self.niter = niter
        self.oversample = oversample
        self.layer_name = layer_name
        self._fitted = False
        self.stats = PCAStats()
        if basis == "calibrated":
            self.register_buffer("pca_basis", torch.zeros(num_heads, self.head_dim, self.rank))

    def init_kwargs(self) -> dict[str, Any]:
        return {
            **super().init_kwargs(),
            "rank": self.rank,
            "basis": self.basis_mode,
            "center": self.center,
            "solver": self.solver,
            "niter": self.niter,
            "oversample": self.oversample,
            "layer_name": self.layer_name,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, rank={self.rank}/{self.head_dim}, basis={self.basis_mode}, "
            f"center={self.center}, solver={self.solver}"
        )

    # --- the calibrated basis ----------------------------------------------------------------------------
    @torch.no_grad()
    def fit_basis(self, moments: torch.Tensor) -> torch.Tensor:
        """Freeze ``pca_basis`` to the top-r eigenvectors of each head's q/k second moment ``moments``
        ([H, d_k, d_k], centred by the caller when ``center``). Returns the eigenvalues ([H, d_k], descending)."""
        if self.basis_mode != "calibrated":
            raise RuntimeError(
                f"PCA attention '{self.layer_name}' has basis='batch': it has no frozen basis to fit"
            )
        expected = (self.num_heads, self.head_dim, self.head_dim)
        if tuple(moments.shape) != expected:
            raise ValueError(f"moments of shape {tuple(moments.shape)} are invalid: expected {expected}")
        evals, evecs = moment_spectrum(moments.detach().double())
        self.pca_basis.copy_(evecs[..., : self.rank].to(self.pca_basis.dtype))
        self._fitted = True
        return evals

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.basis_mode == "calibrated" and prefix + "pca_basis" in state_dict:
            self._fitted = True  # a checkpoint carries the fitted basis

    # --- forward -------------------------------------------------------------------------------------------
    def current_basis(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The basis this forward projects on: [H, d_k, r] (calibrated) or [B, H, d_k, r] (batch: one per image
        and head, from the detached q and k, no gradient), in q's dtype."""
        if self.basis_mode == "calibrated":
            if not self._fitted:
                raise RuntimeError(
                    f"PCA attention '{self.layer_name}' has basis='calibrated' but no fitted basis: apply decomp=pca "
                    "with calibration batches, call fit_basis(), or load a state dict that holds pca_basis"
                )
            return self.pca_basis.to(q.dtype)
        sync = q.is_cuda
        start = clock(sync)
        with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
            features = torch.cat([q.detach(), k.detach()], dim=-2)  # [B, H, 2T, d_k]: one image, one head
            if not bool(torch.isfinite(features).all()):
                raise FloatingPointError(
                    f"PCA attention '{self.layer_name}' received non-finite q/k (NaN/inf): the model diverged "
                    "before this layer; lower model.lr or check the data"
                )
            basis = principal_basis(
                features, self.rank, self.center, self.solver, self.niter, self.oversample
            )
        self.stats.rr_seconds += clock(sync) - start
        return basis.to(q.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv_heads(x)
        self.stats.forwards += 1
        basis = self.current_basis(q, k)
        out = F.scaled_dot_product_attention(
            q @ basis,  # [B, H, T, r]
            k @ basis,
            v,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.head_dim**-0.5,  # the dense scale: r = d_k gives dense attention
        )
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))
