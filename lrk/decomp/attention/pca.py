"""``decomp=pca``: every ViT attention becomes a :class:`~lrk.layers.attention.pca.PCAAttention` (queries and keys
projected on a rank-r principal basis per head; seeds/vit_nla_slides.txt, "Used methods. PCA"). The computation and
lrk's reading of the slides are documented in :mod:`lrk.layers.attention.pca`.

This module is the method: it validates the keys of conf/decomp/pca.yaml once (``basis: batch | calibrated``, one
of ``rank`` / ``ratio`` / ``energy``, ``center``, ``solver``), picks an energy rank or fits the calibrated basis on
the calibration batches' queries and keys (through the dense model), and reports per layer the output error on the
calibration batches. :func:`pca_metrics` collects the per-forward basis time (``time/rr_s``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lrk.checks import is_fraction, is_int
from lrk.decomp.attention.base import (
    AttentionSwapMethod,
    collect_attention_inputs,
    output_errors,
)
from lrk.decomp.base import Built, Rows, register_method
from lrk.errors import LrkConfigError
from lrk.layers.attention.dense import AttentionBase, MultiHeadSelfAttention, split_heads
from lrk.layers.attention.pca import (
    BASES,
    DEFAULT_RATIO,
    PCAAttention,
)
from lrk.linalg.pca import (
    DEFAULT_PCA_SOLVER,
    PCA_SOLVERS,
    energy_rank_of_moment,
    moment_spectrum,
    second_moment,
)
from lrk.linalg.rank import fraction_rank
from lrk.measure import count_params
from lrk.models.utils import attention_modules

log = logging.getLogger(__name__)


# --- checks (the config rules of decomp=pca; PCAAttention only refuses what it cannot run with) ------------
def check_settings(
    rank: int | None,
    ratio: float | None,
    energy: float | None,
    basis: str,
    center: bool,
    solver: str,
    niter: int,
    oversample: int,
) -> None:
    """Validate the PCA settings (each bad value -> one :class:`LrkConfigError` naming it and what is valid).
    At most one of rank / ratio / energy may be set; the rank's upper bound d_k is checked with the model."""
    given = {k: v for k, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None}
    if len(given) > 1:
        shown = ", ".join(f"decomp.{k}={v}" for k, v in given.items())
        raise LrkConfigError(
            f"{shown} is invalid for decomp=pca: set exactly one of decomp.rank (an integer in [1, d_k]), "
            "decomp.ratio (a fraction of d_k in (0, 1]) or decomp.energy (phi in (0, 1]), or none of them "
            "(decomp.default_ratio applies)"
        )
    if rank is not None and not (is_int(rank) and rank >= 1):
        raise LrkConfigError(
            f"decomp.rank={rank!r} is invalid: it must be an integer in [1, d_k] (d_k = dim / num_heads)"
        )
    if ratio is not None and not is_fraction(ratio):
        raise LrkConfigError(f"decomp.ratio={ratio!r} is invalid: the fraction of d_k must lie in (0, 1]")
    if energy is not None and not is_fraction(energy):
        raise LrkConfigError(
            f"decomp.energy={energy!r} is invalid: phi (the retained q/k second-moment energy) must lie in (0, 1]"
        )
    if basis not in BASES:
        raise LrkConfigError(f"decomp.basis={basis!r} is invalid: it must be one of {', '.join(BASES)}")
    if not isinstance(center, bool):
        raise LrkConfigError(f"decomp.center={center!r} is invalid: it must be true or false")
    if solver not in PCA_SOLVERS:
        raise LrkConfigError(
            f"decomp.solver={solver!r} is invalid: it must be one of {', '.join(PCA_SOLVERS)}"
        )
    if not (is_int(niter) and niter >= 0):
        raise LrkConfigError(f"decomp.niter={niter!r} is invalid: it must be an integer >= 0")
    if not (is_int(oversample) and oversample >= 0):
        raise LrkConfigError(f"decomp.oversample={oversample!r} is invalid: it must be an integer >= 0")


def check_rank(rank: int, head_dim: int, what: str = "decomp.rank") -> None:
    if not (is_int(rank) and 1 <= rank <= head_dim):
        raise LrkConfigError(
            f"{what}={rank!r} is invalid for this model: it must be an integer in [1, {head_dim}] "
            f"(d_k = dim / num_heads = {head_dim})"
        )


def pca_modules(model: nn.Module) -> list[tuple[str, PCAAttention]]:
    """Every PCA attention module of ``model`` with its name."""
    return attention_modules(model, PCAAttention)


def pca_metrics(model: nn.Module) -> dict[str, float]:
    """``time/rr_s`` of the PCA modules of ``model`` since apply: fitting in apply + the per-image bases inside
    forwards (``basis=batch``); ``time/rr_forward_s``: the part inside forwards (inside ``time/mha_s``)."""
    stats = [m.stats for _, m in pca_modules(model)]
    if not stats:
        return {}
    return {
        "time/rr_s": float(sum(s.rr_seconds + s.fit_seconds for s in stats)),
        "time/rr_forward_s": float(sum(s.rr_seconds for s in stats)),
    }


# --- the method ---------------------------------------------------------------------------------------------
@register_method("pca")
class PCAMethod(AttentionSwapMethod):
    """``decomp=pca``: every attention module (or those matching ``targets``, minus ``skip``) becomes a
    :class:`PCAAttention` with the same weights. Keys (conf/decomp/pca.yaml): ``rank`` | ``ratio`` | ``energy``
    (``default_ratio`` when all are null), ``basis``, ``center``, ``solver``, ``niter``, ``oversample``, plus
    the common ``stage``, ``calibration_batches`` ...
    """

    extra_keys: ClassVar[dict[str, Any]] = {
        "default_ratio": DEFAULT_RATIO,
        "basis": "batch",
        "center": False,
        "solver": DEFAULT_PCA_SOLVER,
        "niter": 2,
        "oversample": 4,
    }
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"ratio": 1.0},
        "lossy": {"rank": 1},
        "invalid": [{"rank": 10_000}, {"ratio": 1.5}, {"basis": "bogus"}, {"calibration_batches": 0}],
    }
    needs_calibration = True
    needs_dense_attention = True
    calibration_use = (
        "the energy rule and the calibrated basis are fitted on them, and the report's rel_error/energy are "
        "measured on them"
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        rank, ratio, energy = c["rank"], c["ratio"], c["energy"]
        check_settings(rank, ratio, energy, c["basis"], c["center"], c["solver"], c["niter"], c["oversample"])
        if rank is None and ratio is None and energy is None:
            ratio = c["default_ratio"]
            if not is_fraction(ratio):
                raise LrkConfigError(
                    f"decomp.default_ratio={ratio!r} is invalid: the fraction of d_k must lie in (0, 1]"
                )
        self.settings: dict[str, Any] = {
            "rank": rank,
            "ratio": None if ratio is None else float(ratio),
            "energy": None if energy is None else float(energy),
            "basis": c["basis"],
            "center": c["center"],
            "solver": c["solver"],
            "niter": c["niter"],
            "oversample": c["oversample"],
        }

    def module_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {k: s[k] for k in ("basis", "center", "solver", "niter", "oversample")}

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, AttentionBase]], batches: list[Any]
    ) -> dict[str, Any]:
        """Rank checks, then one pass of the calibration batches through the dense model: each target's q/k
        second moments per head (pooled: rank rule, calibrated basis) and per image (the batch basis's energy);
        the replacements are built here, and a second pass measures their output error against the dense
        modules on the same inputs."""
        s = self.settings
        for _, module in targets:
            if s["rank"] is not None:
                check_rank(s["rank"], module.head_dim)
        if s["basis"] == "calibrated" and self.stage == "init":
            log.warning(
                "decomp=pca basis=calibrated with stage=init: the basis is fitted to the untrained model's q/k and "
                "stays frozen while the weights train; stage=post fits it to a trained model"
            )
        modules = dict(targets)
        stats: dict[str, dict[str, Any]] = {
            n: {"raw": None, "sum": None, "count": 0, "images": []} for n in modules
        }
        seconds = dict.fromkeys(modules, 0.0)
        token_counts: dict[str, int] = {}

        def accumulate(name: str, x: torch.Tensor) -> None:
            start = time.perf_counter()
            module = modules[name]
            assert isinstance(module, MultiHeadSelfAttention)
            b = module.qkv.bias
            qkv = F.linear(x.double(), module.qkv.weight.double(), None if b is None else b.double())
            batch, tokens, _ = x.shape
            q, k, _ = split_heads(qkv, module.num_heads)
            features = torch.cat([q, k], dim=-2)  # [B, H, 2T, d_k]
            st = stats[name]
            raw = second_moment(features).sum(0)  # [H, d_k, d_k]
            total = features.sum(dim=(0, 2))  # [H, d_k]
            st["raw"] = raw if st["raw"] is None else st["raw"] + raw
            st["sum"] = total if st["sum"] is None else st["sum"] + total
            st["count"] += batch * 2 * tokens
            if s["basis"] == "batch":
                st["images"].append(moment_spectrum(second_moment(features, s["center"]))[0])  # [B, H, d_k]
            token_counts[name] = tokens
            seconds[name] += time.perf_counter() - start

        collect_attention_inputs(model, list(modules), batches, accumulate)

        built: dict[str, PCAAttention] = {}
        energies: dict[str, float] = {}
        for name, module in targets:
            start = time.perf_counter()
            st = stats[name]
            moments = st["raw"]
            if s["center"]:  # sum (x - mu)(x - mu)^T = sum x x^T - n mu mu^T, mu over all calibration tokens
                mean = st["sum"] / st["count"]
                moments = moments - st["count"] * mean[:, :, None] * mean[:, None, :]
            evals, _ = moment_spectrum(moments)  # [H, d_k]
            head_dim = module.head_dim
            if s["rank"] is not None:
                rank = s["rank"]
            elif s["ratio"] is not None:
                rank = fraction_rank(s["ratio"], head_dim)
            else:  # the smallest r with which every head keeps phi (Eqs. 2-3 per head)
                rank = max(energy_rank_of_moment(evals[h], s["energy"]) for h in range(module.num_heads))
            new = PCAAttention.from_attention(module, rank=rank, layer_name=name, **self.module_kwargs())
            if s["basis"] == "calibrated":
                new.fit_basis(moments)
                kept, whole = evals[:, :rank].sum(), evals.sum()
            else:
                per_image = torch.cat(st["images"])  # [N, H, d_k]: each image's own spectrum
                kept, whole = per_image[..., :rank].sum(), per_image.sum()
            energies[name] = float(kept / whole) if whole > 0 else 1.0
            built[name] = new
            seconds[name] += time.perf_counter() - start
            st["images"].clear()

        errors = output_errors(model, built, batches, swapped=False)  # on the dense model's inputs
        return {
            "built": built,
            "energy": energies,
            "rel_error": errors,
            "seconds": seconds,
            "tokens": token_counts,
        }

    def runtime_metrics(self, model: nn.Module) -> dict[str, float]:
        """:func:`pca_metrics`: the bases computed inside the fit's forwards (``time/rr_s``)."""
        return pca_metrics(model)

    def build_module(self, name: str, module: AttentionBase, context: dict[str, Any]) -> PCAAttention:
        new = context["built"][name]
        new.stats.reset()  # the error measurement in prepare ran forwards: start the run's figures at zero
        new.stats.fit_seconds = context["seconds"][name]
        return new

    def finish(self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]) -> Rows:
        """One row per swapped module: r, the measured output error and retained energy, the fitting time."""
        rows = []
        for name, old, new in built:
            assert isinstance(new, PCAAttention)
            rows.append(
                {
                    "name": name,
                    "kind": f"pca_{new.basis_mode}",
                    "shape": [2 * context["tokens"][name], new.head_dim],  # per head: joint q/k tokens x d_k
                    "rank": float(new.rank),
                    "ranks": [new.rank] * new.num_heads,
                    "params_before": count_params(old),
                    "params_after": count_params(new),
                    "rel_error": float(context["rel_error"][name]),
                    "energy": float(context["energy"][name]),
                    "seconds": float(context["seconds"][name]),
                }
            )
        return rows
