"""Datasets by name: ``DATASETS[name]`` builds the datamodule of ``conf/data/<name>.yaml``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig

from lrk.data.datamodule import LrkDataModule
from lrk.data.options import to_plain_dict
from lrk.errors import LrkConfigError

DATASETS: dict[str, Callable[[dict[str, Any]], LrkDataModule]] = {}

T = TypeVar("T", bound=type[LrkDataModule])


def register_dataset(name: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`LrkDataModule` subclass under ``name`` (the config's ``name:``)."""

    def wrap(cls: T) -> T:
        if name in DATASETS:
            raise ValueError(f"dataset name {name!r} is registered twice")
        cls.name = name
        DATASETS[name] = cls
        return cls

    return wrap


def build_datamodule(cfg: DictConfig | Mapping[str, Any]) -> LrkDataModule:
    """The datamodule for ``cfg`` (the ``data`` node: ``conf/data/<name>.yaml``), dispatched on ``cfg.name``.

    Checks the cheap things (option names and types, image_size, fractions, source, label_mode) and raises
    :class:`LrkConfigError`; files are only touched by ``dm.prepare()``.
    """
    values = to_plain_dict(cfg)
    name = values.get("name")
    valid = ", ".join(sorted(DATASETS))
    if name is None:
        raise LrkConfigError(f"data.name is missing: set it to one of {valid}")
    if name not in DATASETS:
        raise LrkConfigError(f"data.name={name!r} is not a known dataset; valid names: {valid}")
    return DATASETS[name](values)
