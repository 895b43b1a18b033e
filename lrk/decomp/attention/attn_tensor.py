"""``decomp=attn_tensor``: every ViT attention becomes a :class:`~lrk.layers.attention.attn_tensor.TensorAttention`
(the attention tensor approximated by Tucker or CP; seeds/vit_nla_slides.txt, "Used methods. Tensor decomposition").
The computation and lrk's reading of the slides are documented in :mod:`lrk.layers.attention.attn_tensor`.

This module is the method: it validates the keys of conf/decomp/attn_tensor.yaml once (``decomposition``, ``scope``,
one of ``rank`` / ``ratio`` / ``energy``, ``head_rank``, HOOI/ALS iterations, ``monitor``), checks the ranks against
the model's heads and tokens before anything changes, and reports per layer the output error measured on the
calibration batches. :func:`attn_tensor_metrics` collects the figures of the decompositions inside the fit.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from lrk.checks import is_fraction, is_int
from lrk.decomp.attention.base import (
    AttentionSwapMethod,
    monitoring,
    output_errors,
    token_count,
)
from lrk.decomp.base import Built, Rows, register_method
from lrk.errors import LrkConfigError
from lrk.layers.attention.attn_tensor import (
    DECOMPOSITIONS,
    DEFAULT_CP_ITERS,
    DEFAULT_RATIO,
    SCOPES,
    TensorAttention,
)
from lrk.layers.attention.dense import AttentionBase
from lrk.measure import count_params
from lrk.models.utils import attention_modules


# --- checks (the config rules of decomp=attn_tensor; TensorAttention only refuses what it cannot run with) --
def check_settings(
    decomposition: Any,
    scope: Any,
    rank: Any,
    head_rank: Any,
    ratio: Any,
    energy: Any,
    hooi_iters: Any = 0,
    cp_iters: Any = DEFAULT_CP_ITERS,
) -> None:
    """Validate the settings that need no model (each bad value -> one :class:`LrkConfigError` naming it)."""
    if decomposition not in DECOMPOSITIONS:
        raise LrkConfigError(
            f"decomp.decomposition={decomposition!r} is invalid: it must be one of {', '.join(DECOMPOSITIONS)}"
        )
    if scope not in SCOPES:
        raise LrkConfigError(f"decomp.scope={scope!r} is invalid: it must be one of {', '.join(SCOPES)}")
    chosen = {k: v for k, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None}
    if len(chosen) > 1:
        given = ", ".join(f"decomp.{k}={v}" for k, v in chosen.items())
        raise LrkConfigError(
            f"{given} is invalid for decomp=attn_tensor: set exactly one of decomp.rank (token-mode rank, an integer "
            "in [1, T]), decomp.ratio (R_t = ceil(ratio T), ratio in (0, 1]) or decomp.energy (phi in (0, 1], tucker)"
        )
    if rank is not None and not (is_int(rank) and rank >= 1):
        raise LrkConfigError(
            f"decomp.rank={rank!r} is invalid: it must be an integer in [1, T] (tokens per image)"
        )
    if ratio is not None and not is_fraction(ratio):
        raise LrkConfigError(
            f"decomp.ratio={ratio!r} is invalid: it must lie in (0, 1] (R_t = ceil(ratio T))"
        )
    if energy is not None and not is_fraction(energy):
        raise LrkConfigError(
            f"decomp.energy={energy!r} is invalid: phi (the energy kept of each mode unfolding) must lie in (0, 1]"
        )
    if energy is not None and decomposition == "cp":
        raise LrkConfigError(
            f"decomp.energy={energy} is invalid with decomp.decomposition=cp: the energy rule reads the mode "
            "unfoldings' spectra (Tucker); for cp set decomp.rank (the CP rank, in [1, T]) or decomp.ratio"
        )
    if head_rank is not None and not (is_int(head_rank) and head_rank >= 1):
        raise LrkConfigError(
            f"decomp.head_rank={head_rank!r} is invalid: it must be an integer in [1, H] (heads) or null (= H)"
        )
    if head_rank is not None and decomposition == "cp":
        raise LrkConfigError(
            f"decomp.head_rank={head_rank} is invalid with decomp.decomposition=cp: a CP model has one rank "
            "(decomp.rank); head_rank is the Tucker head-mode rank, set it to null"
        )
    if not (is_int(hooi_iters) and hooi_iters >= 0):
        raise LrkConfigError(
            f"decomp.hooi_iters={hooi_iters!r} is invalid: it must be an integer >= 0 (0 = truncated HOSVD)"
        )
    if not (is_int(cp_iters) and cp_iters >= 1):
        raise LrkConfigError(
            f"decomp.cp_iters={cp_iters!r} is invalid: it must be an integer >= 1 (ALS sweeps)"
        )


def check_model(
    rank: int | None, head_rank: int | None, tokens: int | None, heads: int, what: str = ""
) -> None:
    """Checks that need the model: rank <= T (tokens per image) and head_rank <= H."""
    if rank is not None and tokens is not None and rank > tokens:
        raise LrkConfigError(
            f"decomp.rank={rank} is invalid for this model{what}: the attention tensor has T={tokens} tokens per "
            f"query/key mode; use a rank in [1, {tokens}]"
        )
    if head_rank is not None and head_rank > heads:
        raise LrkConfigError(
            f"decomp.head_rank={head_rank} is invalid for this model{what}: the attention has H={heads} heads; "
            f"use a head_rank in [1, {heads}]"
        )


# --- collecting the figures of a run ---------------------------------------------------------------------
def attn_tensor_modules(model: nn.Module) -> list[tuple[str, TensorAttention]]:
    """Every tensor attention module of ``model`` with its name."""
    return attention_modules(model, TensorAttention)


def attn_tensor_metrics(model: nn.Module) -> dict[str, float]:
    """The figures of the tensor attention modules of ``model`` since apply (or the last reset):
    ``time/rr_s`` (decomposition seconds inside forwards: the rank reduction), ``time/attn_tensor_attention_s``
    (their whole forwards), ``decomp/decompositions``, and, once something was decomposed, ``decomp/rank_mean``
    (token-mode rank, mean over all decompositions) and, from modules with ``monitor: true``, ``decomp/energy``
    (retained energy, mean over the measured decompositions; without it the report's energy stands). {} without
    such modules."""
    stats = [m.stats for _, m in attn_tensor_modules(model)]
    if not stats:
        return {}
    n = sum(s.decompositions for s in stats)
    out = {
        "time/rr_s": float(sum(s.decompose_seconds for s in stats)),
        "time/attn_tensor_attention_s": float(sum(s.forward_seconds for s in stats)),
        "decomp/decompositions": float(n),
    }
    if n:
        out["decomp/rank_mean"] = sum(s.query_rank_sum + s.key_rank_sum for s in stats) / (2 * n)
    measured = sum(s.measured for s in stats)
    if measured:
        out["decomp/energy"] = sum(s.energy_sum for s in stats) / measured
    return out


# --- the method ---------------------------------------------------------------------------------------------
@register_method("attn_tensor")
class AttnTensorMethod(AttentionSwapMethod):
    """``decomp=attn_tensor``: every attention module (or those matching ``targets``, minus ``skip``) becomes a
    :class:`TensorAttention` with the same weights. Keys (conf/decomp/attn_tensor.yaml): ``decomposition``
    (tucker | cp), ``scope`` (batch | image), exactly one of ``rank`` / ``ratio`` / ``energy`` (``default_ratio``
    when all are null), ``head_rank``, ``hooi_iters``, ``cp_iters``, ``monitor`` (measure the retained energy in
    every forward of the fit; default false: measured on the calibration batches at apply), plus the common ``stage``,
    ``calibration_batches`` ... The report measures every module against the dense one on the calibration batches.
    """

    extra_keys: ClassVar[dict[str, Any]] = {
        "decomposition": "tucker",
        "scope": "batch",
        "head_rank": None,
        "hooi_iters": 0,
        "cp_iters": DEFAULT_CP_ITERS,
        "monitor": False,
    }
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"ratio": 1.0},
        "lossy": {"rank": 2},
        "invalid": [{"rank": 10_000}, {"head_rank": 10_000}, {"decomposition": "tt"}, {"scope": "chunk"}],
    }
    needs_calibration = True
    needs_dense_attention = True
    calibration_use = "the report measures each swapped module against dense attention on them"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        rank, ratio, energy = c["rank"], c["ratio"], c["energy"]
        if rank is None and ratio is None and energy is None:
            ratio = DEFAULT_RATIO if c["default_ratio"] is None else c["default_ratio"]
            if not is_fraction(ratio):
                raise LrkConfigError(
                    f"decomp.default_ratio={ratio!r} is invalid: it must lie in (0, 1] (R_t = ceil(ratio T))"
                )
        check_settings(
            c["decomposition"],
            c["scope"],
            rank,
            c["head_rank"],
            ratio,
            energy,
            c["hooi_iters"],
            c["cp_iters"],
        )
        if not isinstance(c["monitor"], bool):
            raise LrkConfigError(f"decomp.monitor={c['monitor']!r} is invalid: it must be true or false")
        self.settings: dict[str, Any] = {
            "decomposition": c["decomposition"],
            "scope": c["scope"],
            "rank": rank,
            "head_rank": c["head_rank"],
            "ratio": ratio,
            "energy": energy,
            "hooi_iters": c["hooi_iters"],
            "cp_iters": c["cp_iters"],
            "monitor": c["monitor"],
        }

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, AttentionBase]], batches: list[Any]
    ) -> dict[str, Any]:
        """Model checks before any change: rank <= T and head_rank <= H (``apply`` has checked that the targets
        are dense multi-head attention and that there are calibration batches to measure the report on)."""
        tokens = token_count(model)
        for name, module in targets:
            check_model(
                self.settings["rank"], self.settings["head_rank"], tokens, module.num_heads, f" ('{name}')"
            )
        return {}

    def runtime_metrics(self, model: nn.Module) -> dict[str, float]:
        """:func:`attn_tensor_metrics`: the decompositions inside the fit's forwards (``time/rr_s``, ranks)."""
        return attn_tensor_metrics(model)

    def build_module(self, name: str, module: AttentionBase, context: dict[str, Any]) -> TensorAttention:
        return TensorAttention.from_attention(module, **self.settings, layer_name=name)

    def finish(self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]) -> Rows:
        """One row per swapped module, measured on the calibration batches run through the swapped model: each
        module's output against the dense module's output on the same input (``rel_error``), and the ranks,
        retained energy and decomposition seconds of those forwards. The statistics then restart from zero."""
        for _, _, new in built:
            assert isinstance(new, TensorAttention)
            new.stats.reset()
        # the energy is measured here (monitor on), not in the fit's forwards
        with monitoring(new for _, _, new in built):
            errors = output_errors(model, {name: old for name, old, _ in built}, batches)
        tokens = token_count(model) or 0
        rows = []
        for name, old, new in built:
            assert isinstance(new, TensorAttention)
            st = new.stats
            ranks = st.ranks_mean()
            rows.append(
                {
                    "name": name,
                    "kind": f"attn_tensor_{new.decomposition}_{new.scope}",
                    "shape": [new.num_heads, tokens, tokens],
                    "rank": float(st.rank_mean()),
                    "ranks": [round(r) for r in ranks]
                    if new.decomposition == "tucker"
                    else [round(ranks[1])],
                    "params_before": count_params(old),
                    "params_after": count_params(new),
                    "rel_error": errors[name],
                    "energy": float(st.energy_mean()),
                    "seconds": float(st.decompose_seconds),
                }
            )
            st.reset()
        return rows
