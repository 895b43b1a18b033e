"""Backbones by registered name (timm-style): ``@register_backbone("vit")`` at definition, and
``build_backbone(cfg.backbone, ...)`` that validates the config node and builds the model."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from lrk.checks import boolean, positive_int
from lrk.config import config_to_dict
from lrk.errors import LrkConfigError
from lrk.models.checkpoint import load_checkpoint

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])

#: name -> builder (a class or function called with num_classes, in_chans, image_size and the config's
#: hyper-parameters as keyword arguments).
BACKBONES: dict[str, Callable[..., nn.Module]] = {}

# set from the data module, never from conf/backbone
_DATA_ARGS = ("num_classes", "in_chans", "image_size")
# handled by build_backbone itself, for every backbone
_COMMON_KEYS = ("name", "checkpoint_path", "checkpoint_skip_mismatched_head")


def register_backbone(name: str) -> Callable[[BuilderT], BuilderT]:
    """Class/function decorator: make ``name`` buildable with ``build_backbone``."""

    def decorator(builder: BuilderT) -> BuilderT:
        if name in BACKBONES and BACKBONES[name] is not builder:
            raise ValueError(f"backbone name {name!r} is already registered by {BACKBONES[name]!r}")
        BACKBONES[name] = builder
        return builder

    return decorator


def _builder_options(builder: Callable[..., nn.Module]) -> list[str]:
    target = builder.__init__ if inspect.isclass(builder) else builder
    params = inspect.signature(target).parameters
    return [p for p in params if p not in ("self", *_DATA_ARGS)]


def build_backbone(cfg: Any, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """Build the backbone described by ``cfg`` (the node of ``conf/backbone/<preset>.yaml``).

    ``cfg.name`` picks the registered builder; every other key except ``checkpoint_path`` and
    ``checkpoint_skip_mismatched_head`` is passed to it as a keyword argument. Unknown names or
    options raise :class:`LrkConfigError` listing what is valid. With ``checkpoint_path`` set, local
    weights are loaded by :func:`lrk.models.checkpoint.load_checkpoint`.
    """
    options = config_to_dict(cfg, "backbone")
    name = options.pop("name", None)
    valid_names = ", ".join(sorted(BACKBONES))
    if name not in BACKBONES:
        raise LrkConfigError(f"backbone.name={name!r} is invalid: valid backbones are {valid_names}")
    num_classes = positive_int("num_classes", num_classes)
    in_chans = positive_int("in_chans", in_chans)
    image_size = positive_int("image_size", image_size)

    checkpoint_path = options.pop("checkpoint_path", None)
    skip_head = options.pop("checkpoint_skip_mismatched_head", True)
    boolean("backbone.checkpoint_skip_mismatched_head", skip_head)
    builder = BACKBONES[name]
    accepted = _builder_options(builder)
    for key in options:
        if key in _DATA_ARGS:
            raise LrkConfigError(
                f"backbone.{key}={options[key]!r} is invalid: {key} is set from the data, not the backbone config"
            )
        if key == "distilled" and key not in accepted:
            capable = sorted(n for n, b in BACKBONES.items() if "distilled" in _builder_options(b))
            raise LrkConfigError(
                f"backbone.distilled={options[key]!r} is invalid for backbone {name!r}: it has no distillation "
                f"token; backbones with one: {', '.join(capable)} (e.g. backbone=deit_small or vit_hybrid)"
            )
        if key not in accepted:
            raise LrkConfigError(
                f"backbone.{key} is not an option of backbone {name!r}: valid options are "
                f"{', '.join([*_COMMON_KEYS, *accepted])}"
            )
    model = builder(num_classes=num_classes, in_chans=in_chans, image_size=image_size, **options)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, skip_mismatched_head=skip_head)
    return model
