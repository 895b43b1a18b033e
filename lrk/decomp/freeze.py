"""Layer freezing (accelerating_lrd_paper Sec. 2.2): some factors of the decomposed layers are not fine-tuned.

"We freeze the weights of the first 1x1 convolutional layer in Fig. 1a and the first and last 1x1
convolutional layer in Fig. 1b": of an SVD pair (Fig. 1a, FC / 1x1 conv -> two layers) the first factor is
frozen and the second trained; of a Tucker triple (Fig. 1b, k x k conv -> 1x1, core, 1x1) both 1x1 factors are
frozen and only the core is trained. Frozen factors get ``requires_grad=False``: no weight gradient is computed
for them, and :meth:`lrk.lit.module.LitClassifier.configure_optimizers` gives the optimizer only parameters that
require grad, so they hold no optimizer state (and AdamW's weight decay does not touch them). Biases are not
factors (the bias of the last factor stays trainable). The flag travels in the checkpoint's structure skeleton
(:mod:`lrk.pipeline.structure` keeps ``requires_grad``), so a resumed or reloaded model is frozen the same way.

The one place where factor names (``FactorizedLayer.factors()``) map to roles, :data:`LAYER_ROLES`:

=========================  ==========================================  ======================
layer                      roles (factor name)                         ``paper`` freezes
=========================  ==========================================  ======================
SVDLinear, SVDConv2d       first (``w0``: in -> r), last (``w1``)      first
TuckerConv2d               first (1x1), core (k x k), last (1x1)       first, last
BranchedTuckerConv2d       first (1x1), core (grouped k x k), last     first, last
CPConv2d                   first (``pointwise_in``), core              first, last
                           (``depthwise``), last (``pointwise_out``)
=========================  ==========================================  ======================

For an SVDConv2d of a k x k conv (``decomp=svd`` on a 3x3) the first factor is the k x k conv, not a 1x1: the
paper decomposes k x k convs by Tucker, so ``paper`` there applies the same rule by role (first frozen), a choice
outside the paper. TT, CPLinear and TRAWL layers have no roles (their factors are not a first/core/last chain).

``freeze`` (config key of the methods that declare roles, ``decomp=svd`` and ``decomp=tucker``): ``none``
(default), ``paper`` (the table's last column), or a list of roles (``[first]``, ``[first, last]``, ...): every
factor of those roles in every decomposed layer that has them (a Tucker method's SVD layers have no ``core``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from lrk.errors import LrkConfigError

ROLES = ("first", "core", "last")
FREEZE_CHOICES = ("none", "paper")

_PAIR = {"w0": "first", "w1": "last"}
_TRIPLE = {"first": "first", "core": "core", "last": "last"}
_CP = {"pointwise_in": "first", "depthwise": "core", "pointwise_out": "last"}

#: layer class name -> ({factor name: role}, roles that ``freeze: paper`` freezes); looked up along the MRO
LAYER_ROLES: dict[str, tuple[dict[str, str], frozenset[str]]] = {
    "SVDLinear": (_PAIR, frozenset({"first"})),
    "SVDConv2d": (_PAIR, frozenset({"first"})),
    "TuckerConv2d": (_TRIPLE, frozenset({"first", "last"})),
    "BranchedTuckerConv2d": (_TRIPLE, frozenset({"first", "last"})),
    "CPConv2d": (_CP, frozenset({"first", "last"})),
}


def layer_roles(layer: nn.Module) -> tuple[dict[str, str], frozenset[str]] | None:
    """``({factor name: role}, paper roles)`` of a factorized layer, or None for a layer without roles."""
    for cls in type(layer).__mro__:
        if cls.__name__ in LAYER_ROLES:
            return LAYER_ROLES[cls.__name__]
    return None


def parse_freeze(value: Any, method: str, roles: Sequence[str]) -> str | tuple[str, ...]:
    """The ``freeze`` key of ``decomp=<method>`` whose layers have ``roles``: ``"none"``, ``"paper"`` or a tuple
    of roles. Anything else, or a role the method's layers do not have, is one :class:`LrkConfigError` naming it
    and the valid roles."""
    if value is None or value is False:
        return "none"
    if isinstance(value, str):
        if value in FREEZE_CHOICES:
            return value
        value = [value]  # a single role, e.g. freeze=core on the command line
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise LrkConfigError(
            f"decomp.freeze={value!r} is invalid for decomp={method}: it must be 'none', 'paper' or a non-empty "
            f"list of factor roles from {list(roles)}"
        )
    unknown = [v for v in value if v not in roles]
    if unknown:
        raise LrkConfigError(
            f"decomp.freeze={list(value)!r} is invalid for decomp={method}: role(s) {unknown} are not roles of its "
            f"layers; the valid roles are {list(roles)} (or freeze: none / paper)"
        )
    return tuple(dict.fromkeys(value))


def roles_to_freeze(layer: nn.Module, freeze: str | tuple[str, ...]) -> list[str]:
    """The roles of ``layer`` that ``freeze`` freezes (``[]`` for ``none`` or a layer without roles)."""
    found = layer_roles(layer)
    if freeze == "none" or found is None:
        return []
    names, paper = found
    wanted = paper if freeze == "paper" else set(freeze)
    return [role for role in ROLES if role in wanted and role in names.values()]


def freeze_layer(layer: nn.Module, freeze: str | tuple[str, ...]) -> dict[str, Any]:
    """Set ``requires_grad=False`` on the factors of ``layer`` whose roles ``freeze`` names. Returns
    ``{"frozen": [roles], "frozen_params": count}`` (the keys a report row gets)."""
    roles = roles_to_freeze(layer, freeze)
    if not roles:
        return {"frozen": [], "frozen_params": 0}
    names, _ = layer_roles(layer)  # type: ignore[misc]
    count = 0
    for name, param in layer.factors().items():  # type: ignore[operator]
        if names.get(name) in roles:
            param.requires_grad_(False)
            count += param.numel()
    return {"frozen": roles, "frozen_params": count}


def freeze_model(
    model: nn.Module, freeze: str | tuple[str, ...], names: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`freeze_layer` on every factorized layer of ``model`` with roles (or only on the modules ``names``):
    ``{module name: {"frozen", "frozen_params"}}`` for the layers that got something frozen."""
    wanted = None if names is None else set(names)
    out = {}
    for name, module in model.named_modules():
        if (wanted is None or name in wanted) and layer_roles(module) is not None:
            info = freeze_layer(module, freeze)
            if info["frozen"]:
                out[name] = info
    return out


def trainable_params(model: nn.Module) -> int:
    """Parameters of ``model`` that require grad (shared ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
