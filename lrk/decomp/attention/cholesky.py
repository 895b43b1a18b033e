"""``decomp=cholesky``: every ViT attention becomes a :class:`~lrk.layers.attention.cholesky.CholeskyAttention`
(symmetric query-key scores from one shared projection and a packed lower-triangular factor per head;
seeds/vit_nla_slides.txt, "Cholesky-Based Symmetric Attention"). The computation, the initialisation from a dense
attention and lrk's reading of the slides are documented in :mod:`lrk.layers.attention.cholesky`.

This module is the method: it validates ``init`` and ``eps`` once, builds each replacement from the dense module
(``stage=post``: nearest positive-definite form of each head's W_Q W_K^T; ``stage=init``: W = W_Q, L = I), and
reports per layer the output error measured on the calibration batches and the weight error of forcing symmetry.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

from torch import nn

from lrk.checks import is_number
from lrk.decomp.attention.base import (
    AttentionSwapMethod,
    output_errors,
)
from lrk.decomp.base import Built, Rows, register_method
from lrk.errors import LrkConfigError
from lrk.layers.attention.cholesky import (
    DEFAULT_EPS,
    INITS,
    CholeskyAttention,
    dense_qkv,
    qk_rel_errors,
)
from lrk.layers.attention.dense import AttentionBase
from lrk.measure import count_params


# --- checks (the config rules of decomp=cholesky; CholeskyAttention only refuses what it cannot run with) --
def check_init(init: Any, allow_auto: bool = True) -> None:
    """``init`` must be one of auto|dense|identity (auto only at the config level)."""
    valid = INITS if allow_auto else INITS[1:]
    if init not in valid:
        raise LrkConfigError(f"decomp.init={init!r} is invalid: it must be one of {', '.join(valid)}")


def check_eps(eps: Any) -> None:
    """``eps`` (the positive-definite shift, relative to the largest |eigenvalue|) must lie in (0, 1)."""
    if not (is_number(eps) and 0 < eps < 1):
        raise LrkConfigError(
            f"decomp.eps={eps!r} is invalid: it must be a number in (0, 1) (the shift that makes W_QK positive "
            "definite, relative to its largest |eigenvalue|; default 1e-6)"
        )


# --- the method ---------------------------------------------------------------------------------------------
@register_method("cholesky")
class CholeskyMethod(AttentionSwapMethod):
    """``decomp=cholesky``: every attention module (or those matching ``targets``, minus ``skip``) becomes a
    :class:`CholeskyAttention`. Keys (conf/decomp/cholesky.yaml): ``init`` (auto|dense|identity; auto = dense
    with ``stage=post``, identity with ``stage=init``), ``eps``, plus the common ``stage``, ``finetune_epochs``,
    ``ckpt_path``, ``calibration_batches``, ``targets``, ``skip``. There is no rank: L_h is full d_k x d_k, so
    ``rank``, ``ratio``, ``energy`` (and ``default_ratio``) must stay null.
    """

    supported = "the attention modules (lrk.models.MultiHeadSelfAttention) of a ViT/DeiT backbone"
    extra_keys: ClassVar[dict[str, Any]] = {"init": "auto", "eps": DEFAULT_EPS}
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {"init": "dense", "eps": 1e-9},
        "exact_model": "symmetric_qk",
        "exact_reason": (
            "the scores of a symmetric L L^T form reproduce dense attention only where every head's W_Q W_K^T is "
            "already symmetric positive (semi-)definite; a generic dense head is changed (the lossy case)"
        ),
        "lossy": {"init": "dense"},
        "invalid": [
            {"rank": 4},
            {"init": "random"},
            {"eps": 0},
            {"min_rank": 2},
            {"targets": ["blocks.*.mlp"]},
        ],
    }
    no_rank_rounding_reason = "there is no rank to round (L_h is full d_k x d_k)"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        c = self.cfg
        for key in ("rank", "ratio", "energy", "default_ratio"):
            if c[key] is not None:
                raise LrkConfigError(
                    f"decomp.{key}={c[key]!r} is invalid for decomp=cholesky: the Cholesky factor L_h is full "
                    "d_k x d_k (d_k(d_k+1)/2 parameters per head), there is no rank to choose; leave decomp.rank, "
                    "decomp.ratio and decomp.energy null"
                )
        check_init(c["init"])
        check_eps(c["eps"])
        self.init: str = (
            c["init"] if c["init"] != "auto" else ("dense" if self.stage == "post" else "identity")
        )
        self.eps: float = float(c["eps"])

    def prepare(
        self, model: nn.Module, targets: list[tuple[str, AttentionBase]], batches: list[Any]
    ) -> dict[str, Any]:
        """Every target must be a dense attention with a ``qkv`` (checked before any change)."""
        for name, module in targets:
            try:
                dense_qkv(module)
            except ValueError as exc:
                raise LrkConfigError(
                    f"decomp=cholesky cannot swap attention module '{name}': {exc}"
                ) from None
        return {"seconds": {}}

    def build_module(self, name: str, module: AttentionBase, context: dict[str, Any]) -> CholeskyAttention:
        start = time.perf_counter()
        new = CholeskyAttention.from_attention(module, init=self.init, eps=self.eps)
        context["seconds"][name] = time.perf_counter() - start
        return new

    def finish(self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]) -> Rows:
        """One row per swapped module: output error on the calibration batches (``rel_error``; the weight error
        ``qk_rel_error`` stands in, with kind ``cholesky_qk``, when there is no calibration batch)."""
        errors = output_errors(model, {name: old for name, old, _ in built}, batches)
        rows = []
        for name, old, new in built:
            assert isinstance(new, CholeskyAttention)
            qk_err = float(qk_rel_errors(old, new).mean())
            if batches:
                rel, kind = errors[name], f"cholesky_{self.init}"
            else:
                rel, kind = qk_err, "cholesky_qk"
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "shape": [new.dim, new.dim],  # W_QK^h
                    "rank": float(new.head_dim),
                    "ranks": [new.head_dim] * new.num_heads,
                    "params_before": count_params(old),
                    "params_after": count_params(new),
                    "rel_error": float(rel),
                    "energy": max(0.0, 1.0 - rel * rel) if math.isfinite(rel) else 0.0,
                    "seconds": float(context["seconds"].get(name, 0.0)),
                    "qk_rel_error": qk_err,
                }
            )
        return rows
