"""``decomp=attn_svd``: the slides' TransformerBlockSVD (seeds/vit_nla_slides.txt, "Used methods. SVD").

The slide: "TransformerBlockSVD: Multi-Head Self-Attention ... SVD Decomposition: Applies SVD to the attention
output, retaining only the top singular values and vectors for a low-rank approximation". lrk's reading: in every
forward (training and inference), each image's attention output O_i (T x D, after ``proj``) is replaced by its
best rank-r approximation

    O_i  ->  O_i V_r V_r^T = U_r S_r V_r^T              (the slide's W ~ U_r S_r V_r^T, Eckart-Young)

where V_r holds the top-r right singular vectors of O_i. Per image: tokens of different images never mix, and an
image's output does not depend on the other images of the batch.

Where it sits: lrk's ViT block (``lrk.models.vit.Block.forward``) is ``x = x + drop_path(attn(norm1(x)))``, so the
output of the attention module is exactly what enters the residual add; :class:`SVDOutputAttention` truncates its
own output (after ``proj`` and ``proj_drop``), i.e. the attention branch is rank r *before the residual add*, as in
TransformerBlockSVD. The MLP, the norms and the residual stream itself are untouched.

The factorisation: not a full ``torch.linalg.svd`` per step, but :func:`lrk.linalg.batched_svd.batched_truncation`
(the smaller Gram matrix of every image, one batched ``eigh``, the energy rule per image with a mask so that
variable ranks stay batched, float32 with a float64 redo of the images whose cut float32 cannot resolve; its
docstring has the cost and the measured speed: 0.44-0.51 of a batched ``torch.linalg.svd`` on one thread). V_r is
a constant in the backward pass (no gradient through the subspace): the gradient reaches O, hence ``qkv`` and
``proj``, as g V_r V_r^T.

What to expect: at initialisation (weights of std 0.02) a ViT's attention is near uniform, so every row of O_i is
close to the mean value row and O_i is nearly rank 1; the truncation then changes little (rel_error ~1e-5 at
r = 8 on the tiny synthetic run) until training sharpens the attention.

Rank rule, exactly one of (the shared policy keys, read per image and per forward):

- ``rank``: r in [1, min(T, D)] for every image (checked against T from ``patch_embed`` before training);
- ``ratio``: r = ceil(ratio * min(T, D)) (a fraction of the largest possible rank, *not* of parameters: the
  method has no new parameters);
- ``energy``: phi, per image the smallest r with sum_{i<=r} s_i^2 >= phi sum_i s_i^2 (SDRM paper, Eqs. 2-3);
- none of them: ``default_ratio`` (0.5).

The slides claim the truncation "reduces the number of parameters and operations from O(m^2) to O(m*r)": it does
neither here (nor in the slides' code, whose timings with and without SVD are identical): the dense attention runs
as before and the truncation adds its own cost. Parameters are unchanged; what changes is the computation (a rank
r attention branch), which the report and the tests show.

Statistics (``module.stats``, an :class:`AttnSVDStats`, not in the state dict): ``rank_mean`` / ``energy_mean`` per
image (accumulated on the device: no host synchronisation per forward), ``rel_error`` (measured ||O - O_r||_F /
||O||_F over the forwards, only with ``monitor: true``: two norms read by the host in every forward, a GPU sync),
``rr_seconds`` (truncation time inside forwards; part of PhaseTimer's ``time/mha_s``) and ``fit_seconds`` (the
calibration forwards' truncation time in apply). :func:`attn_svd_metrics` sums them over a model (``time/rr_s``,
``time/rr_forward_s``, ``decomp/*``). With ``monitor: false`` (the default) the report rows still hold the measured
rel_error: ``apply`` measures it on the calibration batches, outside the fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lrk.layers.attention import args
from lrk.layers.attention.dense import MultiHeadSelfAttention
from lrk.layers.attention.stats import ModuleStats, as_float, relative_error
from lrk.linalg.batched_svd import batched_truncation
from lrk.linalg.rank import fraction_rank
from lrk.measure import clock

DEFAULT_RATIO = 0.5


@dataclass
class AttnSVDStats(ModuleStats):
    """What an :class:`SVDOutputAttention` did since it was built (or ``reset``). Not part of the state dict.

    Sums over images (one truncation per image per forward) and forwards; the means are properties. ``rank_sum``,
    ``energy_sum``, ``rank_min`` and ``rank_max`` are accumulated on the device (0-d tensors once a forward ran:
    no host synchronisation per forward; the properties read them). ``error_sq`` / ``norm_sq`` are measured only
    by a module with ``monitor=True`` (``monitored`` forwards).
    """

    forwards: int = 0
    images: int = 0
    rank_sum: Any = 0.0
    energy_sum: Any = 0.0  # retained sum_{i<=r} s_i^2 / ||O_i||^2 (from the spectrum), summed over images
    rank_min: Any = 0
    rank_max: Any = 0
    monitored: int = 0  # forwards that measured error_sq / norm_sq
    error_sq: float = 0.0  # measured ||O - O_r||_F^2, summed over the monitored forwards
    norm_sq: float = 0.0  # ||O||_F^2, summed over the monitored forwards
    rr_seconds: float = 0.0  # truncation time inside forwards
    fit_seconds: float = 0.0  # truncation time of the calibration forwards in apply

    @property
    def rank_mean(self) -> float:
        return as_float(self.rank_sum) / self.images if self.images else 0.0

    @property
    def energy_mean(self) -> float:
        return as_float(self.energy_sum) / self.images if self.images else 0.0

    @property
    def rank_range(self) -> tuple[int, int]:
        """(smallest, largest) rank of an image since the last reset ((0, 0) before any)."""
        return int(self.rank_min), int(self.rank_max)

    @property
    def rel_error(self) -> float:
        """||O - O_r||_F / ||O||_F over the monitored forwards since the last reset (measured, not from the
        spectrum; 0.0 when none was monitored)."""
        return relative_error(self.error_sq, self.norm_sq)


class SVDOutputAttention(MultiHeadSelfAttention):
    """Multi-head self-attention whose output is truncated to rank r per image (TransformerBlockSVD, slides
    "Used methods. SVD"): ``forward(x) = trunc_r(MHSA(x))`` with trunc_r(O_i) = O_i V_r V_r^T, V_r detached.

    The parameters of :class:`~lrk.models.MultiHeadSelfAttention` and no others, so
    ``SVDOutputAttention.from_attention(dense, rank=16)`` copies the dense weights and checkpoints load both ways.
    At most one of ``rank`` / ``ratio`` / ``energy`` (none: ratio 0.5). See the module docstring.

    ``monitor`` (default False): also measure ||O - O_r||_F and ||O||_F in every forward (host reads inside the
    forward: a synchronisation on a GPU), for ``stats.rel_error``. Off, the forward records ranks and retained
    energies on the device only; ``decomp=attn_svd`` measures the error on the calibration batches at apply.
    The arguments are checked only for what the module cannot run with (ValueError); the config rules are
    :class:`lrk.decomp.attention.attn_svd.AttnSVDMethod`'s.
    """

    monitor: bool = False  # default of an attribute newer than some checkpoints (unpickled skeletons)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        monitor: bool = False,
        layer_name: str = "attn",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        who = f"SVDOutputAttention '{layer_name}'"
        args.at_most_one(who, rank=rank, ratio=ratio, energy=energy)
        if rank is None and ratio is None and energy is None:
            ratio = DEFAULT_RATIO
        args.integer(who, "rank", rank, 1, dim, True, f"each image's output is T x D, D = dim = {dim}")
        args.fraction(who, "ratio", ratio)
        args.fraction(who, "energy", energy)
        args.flag(who, "monitor", monitor)
        self.rank = rank
        self.ratio = None if ratio is None else float(ratio)
        self.energy = None if energy is None else float(energy)
        self.monitor = monitor
        self.layer_name = layer_name
        self.stats = AttnSVDStats()

    def init_kwargs(self) -> dict[str, Any]:
        return {
            **super().init_kwargs(),
            "rank": self.rank,
            "ratio": self.ratio,
            "energy": self.energy,
            "monitor": self.monitor,
            "layer_name": self.layer_name,
        }

    def extra_repr(self) -> str:
        rule = (
            f"rank={self.rank}"
            if self.rank is not None
            else f"ratio={self.ratio}"
            if self.ratio is not None
            else f"energy={self.energy}"
        )
        return f"dim={self.dim}, heads={self.num_heads}, {rule}"

    def fixed_rank(self, tokens: int) -> int | None:
        """The rank of every image for T = ``tokens`` (None under the energy rule, which picks it per image);
        ValueError when a fixed rank exceeds min(T, D)."""
        limit = min(tokens, self.dim)
        if self.rank is not None:
            if self.rank > limit:
                raise ValueError(
                    f"SVDOutputAttention '{self.layer_name}': rank={self.rank} is invalid for inputs of T={tokens} "
                    f"tokens: each image's output is T x D = {tokens} x {self.dim}, of rank at most {limit}"
                )
            return self.rank
        if self.ratio is not None:
            return fraction_rank(self.ratio, limit)
        return None

    def truncate(self, out: torch.Tensor) -> torch.Tensor:
        """Each image's O_i ([T, D] of ``out`` [B, T, D]) -> its best rank-r approximation; records the stats
        (on the device; the measured error only with ``monitor``)."""
        batch, tokens, _ = out.shape
        rank = self.fixed_rank(tokens)
        sync = out.is_cuda
        start = clock(sync)
        projected, ranks, retained = batched_truncation(
            out, rank=rank, energy=self.energy if rank is None else None
        )
        seconds = clock(sync) - start
        st = self.stats
        with torch.no_grad():
            low, high = ranks.min(), ranks.max()
            st.rank_min = low if st.images == 0 else torch.minimum(torch.as_tensor(st.rank_min), low)
            st.rank_max = high if st.images == 0 else torch.maximum(torch.as_tensor(st.rank_max), high)
            st.rank_sum = st.rank_sum + ranks.sum().double()
            st.energy_sum = st.energy_sum + retained.sum()
            if self.monitor:
                st.monitored += 1
                st.error_sq += float(
                    torch.linalg.vector_norm((out - projected).detach(), dtype=torch.float64) ** 2
                )
                st.norm_sq += float(torch.linalg.vector_norm(out.detach(), dtype=torch.float64) ** 2)
        st.forwards += 1
        st.images += batch
        st.rr_seconds += seconds
        return projected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.truncate(super().forward(x))
