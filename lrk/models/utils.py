"""Finding and swapping modules by qualified name (``blocks.3.attn``)."""

from __future__ import annotations

from torch import nn

from lrk.errors import LrkConfigError
from lrk.layers.attention.dense import AttentionBase, AttentionT
from lrk.measure import count_params


def attention_modules(
    model: nn.Module,
    kind: type[AttentionT] = AttentionBase,  # type: ignore[assignment]
) -> list[tuple[str, AttentionT]]:
    """Every attention module of ``model`` (of class ``kind``: any :class:`AttentionBase` by default, or e.g. only
    the SDRM ones) with its qualified name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kind)]


def replace_module(model: nn.Module, qualified_name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` at ``qualified_name`` (e.g. ``blocks.3.attn``) in ``model``; return the old one.

    Raises :class:`LrkConfigError` when no module has that name.
    """
    if not qualified_name:
        raise LrkConfigError("replace_module needs a submodule name; '' is the model itself")
    parent_name, _, child = qualified_name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    if parent is None or child not in parent._modules:
        raise LrkConfigError(f"module name {qualified_name!r} is invalid: the model has no such submodule")
    old = parent._modules[child]
    setattr(parent, child, new_module)
    return old  # type: ignore[return-value]


#: number of parameters of the built model (shared tensors once): :func:`lrk.measure.count_params`
count_parameters = count_params
