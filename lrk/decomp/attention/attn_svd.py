"""``decomp=attn_svd``: every ViT attention becomes an :class:`~lrk.layers.attention.attn_svd.SVDOutputAttention`
(the slides' TransformerBlockSVD: each image's attention output truncated to rank r; seeds/vit_nla_slides.txt, "Used
methods. SVD"). The computation and lrk's reading of the slides are documented in
:mod:`lrk.layers.attention.attn_svd`.

This module is the method: it validates exactly one of ``rank`` / ``ratio`` (of min(T, D)) / ``energy`` once (with
``default_ratio`` when none is set), checks a fixed rank against min(T, D) before anything changes, and reports per
layer the ranks, energy and error of the truncations on the calibration batches. :func:`attn_svd_metrics` collects
the figures of the truncations inside the fit (``time/rr_s``, ranks, energy).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from torch import nn

from lrk.checks import is_fraction, is_int
from lrk.decomp.attention.base import (
    AttentionSwapMethod,
    monitoring,
    run_batches,
    token_count,
)
from lrk.decomp.base import Built, Rows, register_method
from lrk.decomp.rank.policy import RankPolicy
from lrk.errors import LrkConfigError
from lrk.layers.attention.attn_svd import (
    DEFAULT_RATIO,
    SVDOutputAttention,
)
from lrk.layers.attention.dense import AttentionBase
from lrk.layers.attention.stats import as_float
from lrk.measure import count_params
from lrk.models.utils import attention_modules


# --- checks (the config rules of decomp=attn_svd; SVDOutputAttention only refuses what it cannot run with) ----
def check_rule(rank: int | None, ratio: float | None, energy: float | None) -> None:
    """Exactly one of rank (an integer >= 1), ratio or energy (fractions in (0, 1]); LrkConfigError otherwise."""
    given = {k: v for k, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None}
    if len(given) != 1:
        listed = ", ".join(f"decomp.{k}={v}" for k, v in given.items()) or "none of them"
        raise LrkConfigError(
            f"decomp=attn_svd rank rule sets {listed}: set exactly one of decomp.rank (an integer in [1, min(T, D)]), "
            "decomp.ratio (a fraction of min(T, D) in (0, 1]) or decomp.energy (phi in (0, 1])"
        )
    if rank is not None and not (is_int(rank) and rank >= 1):
        raise LrkConfigError(f"decomp.rank={rank!r} is invalid: it must be an integer in [1, min(T, D)]")
    if ratio is not None and not is_fraction(ratio):
        raise LrkConfigError(
            f"decomp.ratio={ratio!r} is invalid: it must be a number in (0, 1] (a fraction of min(T, D))"
        )
    if energy is not None and not is_fraction(energy):
        raise LrkConfigError(
            f"decomp.energy={energy!r} is invalid: phi (Eqs. 2-3) must be a number in (0, 1]"
        )


def rank_limit_error(rank: int, tokens: int, dim: int, where: str) -> LrkConfigError:
    limit = min(tokens, dim)
    return LrkConfigError(
        f"decomp.rank={rank} is invalid for {where}: each image's attention output is T x D = {tokens} x {dim}, "
        f"whose rank is at most min(T, D) = {limit}; use a rank in [1, {limit}]"
    )


# --- collecting the figures of a run ---------------------------------------------------------------------
def attn_svd_modules(model: nn.Module) -> list[tuple[str, SVDOutputAttention]]:
    """Every :class:`SVDOutputAttention` of ``model`` with its name."""
    return attention_modules(model, SVDOutputAttention)


def reset_attn_svd_stats(model: nn.Module) -> None:
    """Zero the statistics of every attn_svd module (e.g. before a fit)."""
    for _, module in attn_svd_modules(model):
        module.stats.reset()


def attn_svd_metrics(model: nn.Module) -> dict[str, float]:
    """The attn_svd figures of ``model`` since apply (or the last reset); {} without attn_svd modules.

    ``time/rr_s``: truncation seconds inside forwards + those of the calibration forwards in apply;
    ``time/rr_forward_s``: the part inside forwards (inside PhaseTimer's ``time/mha_s``);
    ``decomp/truncations``: images truncated (one per image, forward and layer); ``decomp/rank_mean`` and
    ``decomp/energy``: means over those truncations; ``decomp/rel_error_mean``: mean over layers of the measured
    ||O - O_r||_F / ||O||_F, only from modules with ``monitor: true`` (otherwise the report's figure, measured on
    the calibration batches at apply, stands). The averages are left out while nothing has been truncated (no
    NaN). Reading them synchronises once with the device (the sums are accumulated there).
    """
    stats = [m.stats for _, m in attn_svd_modules(model)]
    if not stats:
        return {}
    images = sum(s.images for s in stats)
    out: dict[str, float] = {
        "time/rr_s": float(sum(s.rr_seconds + s.fit_seconds for s in stats)),
        "time/rr_forward_s": float(sum(s.rr_seconds for s in stats)),
        "decomp/truncations": float(images),
    }
    if images:
        out["decomp/rank_mean"] = sum(as_float(s.rank_sum) for s in stats) / images
        out["decomp/energy"] = sum(as_float(s.energy_sum) for s in stats) / images
    used = [s for s in stats if s.monitored]
    if used:
        out["decomp/rel_error_mean"] = sum(s.rel_error for s in used) / len(used)
    return out


# --- the method ---------------------------------------------------------------------------------------------
@register_method("attn_svd")
class AttnSVDMethod(AttentionSwapMethod):
    """``decomp=attn_svd``: every attention module (or those matching ``targets``, minus ``skip``) becomes an
    :class:`SVDOutputAttention` with the same weights. Keys (conf/decomp/attn_svd.yaml): exactly one of ``rank``,
    ``ratio`` (of min(T, D)) or ``energy``, ``default_ratio`` when none is set, ``monitor`` (measure the error in
    every forward of the fit; default false: measured on the calibration batches at apply), plus the common ``stage``,
    ``calibration_batches``, ``targets``, ``skip`` ... (``rank_multiple`` / ``min_rank``: only 1).
    """

    needs_dense_attention = True
    extra_keys: ClassVar[dict[str, Any]] = {"default_ratio": DEFAULT_RATIO, "monitor": False}
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"ratio": 1.0},
        "lossy": {"rank": 1},
        "invalid": [{"rank": 10_000}, {"rank": 2, "energy": 0.9}, {"energy": 1.5}, {"skip": ["blocks.*"]}],
    }

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        policy = RankPolicy.from_config(self.cfg)  # validates rank / ratio / energy / default_ratio
        self.settings: dict[str, Any] = {"rank": None, "ratio": None, "energy": None}
        self.settings[policy.kind] = policy.rank if policy.kind == "rank" else policy.value
        check_rule(**self.settings)
        monitor = self.cfg["monitor"]
        if not isinstance(monitor, bool):
            raise LrkConfigError(f"decomp.monitor={monitor!r} is invalid: it must be true or false")
        self.settings["monitor"] = monitor

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, AttentionBase]], batches: list[Any]
    ) -> dict[str, Any]:
        """Before any change: a fixed ``rank`` fits min(T, D) (T from the model's patch embedding; D when T is
        unknown). That every target is a standard multi-head attention is checked by ``apply``."""
        tokens = token_count(model)
        for name, module in targets:
            rank = self.settings["rank"]
            if rank is not None and rank > min(tokens or module.dim, module.dim):
                raise rank_limit_error(rank, tokens or module.dim, module.dim, f"this model ('{name}')")
        return {}

    def runtime_metrics(self, model: nn.Module) -> dict[str, float]:
        """:func:`attn_svd_metrics`: the truncations inside the fit's forwards (``time/rr_s``, ranks, energy)."""
        return attn_svd_metrics(model)

    def build_module(self, name: str, module: AttentionBase, context: dict[str, Any]) -> SVDOutputAttention:
        return SVDOutputAttention.from_attention(module, **self.settings, layer_name=name)

    def finish(self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]) -> Rows:
        """One row per swapped module, measured on the calibration batches run through the swapped model:
        mean rank and retained energy per image, rel_error = ||O - O_r||_F / ||O||_F of the module's own output
        (O its untruncated output on its inputs there), truncation seconds. The statistics then start from zero;
        the calibration seconds stay in ``stats.fit_seconds`` (part of ``time/rr_s``)."""
        if batches:
            with monitoring(new for _, _, new in built):  # the measured error, outside the fit's forwards
                run_batches(model, batches)  # runs them through the new modules
        tokens = token_count(model) or 0
        rows = []
        for name, old, new in built:
            assert isinstance(new, SVDOutputAttention)
            st = new.stats
            kind = self.name
            if st.images:
                rank, energy, rel = st.rank_mean, st.energy_mean, st.rel_error
            else:  # no calibration batch: what the configuration promises (rank r or <= min(T, D), energy >= phi)
                kind += "_bounds"
                limit = min(tokens, new.dim) if tokens else new.dim
                fixed = new.fixed_rank(tokens) if tokens else new.rank
                rank = float(fixed if fixed is not None else limit)
                energy = new.energy if new.energy is not None else 0.0
                rel = math.sqrt(max(1.0 - energy, 0.0))
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "shape": [tokens, new.dim],
                    "rank": float(rank),
                    "ranks": [round(rank)],
                    "params_before": count_params(old),
                    "params_after": count_params(new),
                    "rel_error": float(rel),
                    "energy": float(energy),
                    "seconds": float(st.rr_seconds),
                }
            )
            fit = st.fit_seconds + st.rr_seconds
            st.reset()
            st.fit_seconds = fit
        return rows
