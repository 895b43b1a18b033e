"""Config helpers shared by the entry points: resolvers and checks of top-level keys (checkpoint lookup is in
:mod:`lrk.pipeline.checkpoints`)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lrk.errors import LrkConfigError

_RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"


def config_to_dict(cfg: Any, what: str) -> dict[str, Any]:
    """A config node (DictConfig, resolved, or any mapping) as a plain dict; ``what`` names it in the error."""
    if isinstance(cfg, DictConfig):
        return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise LrkConfigError(f"{what} config {cfg!r} is invalid: it must be a mapping with a `name:` key")


def register_resolvers() -> None:
    """``${lrk_run_id:}``: process id + random suffix, fixed for the process, so that two runs started
    in the same second (or sweep workers on several machines) never share a run dir.
    ``${lrk_first:${optimized_metric}}``: the first of a list of metrics (or the metric itself)."""
    if not OmegaConf.has_resolver("lrk_run_id"):
        OmegaConf.register_new_resolver("lrk_run_id", lambda: _RUN_ID, use_cache=True)
    if not OmegaConf.has_resolver("lrk_first"):
        OmegaConf.register_new_resolver("lrk_first", _first)


def _first(value: object) -> object:
    if isinstance(value, ListConfig | list | tuple):
        return value[0] if len(value) else None
    return value


def strategy_name(trainer: Any) -> str:
    """``trainer.strategy`` as a name: the string itself, or the ``_target_`` of a strategy node ("" for none)."""
    strategy = trainer.get("strategy")
    return str(strategy if isinstance(strategy, str) else (strategy or {}).get("_target_", ""))


def check_model_config(cfg: DictConfig) -> None:
    """Optimizer settings: one clear message for a value that cannot train."""
    model = cfg.model
    if not model.lr > 0:
        raise LrkConfigError(f"model.lr={model.lr} is invalid: it must be > 0 (e.g. 1e-3)")
    if model.weight_decay < 0:
        raise LrkConfigError(f"model.weight_decay={model.weight_decay} is invalid: it must be >= 0")
    if model.warmup_epochs < 0:
        raise LrkConfigError(f"model.warmup_epochs={model.warmup_epochs} is invalid: it must be >= 0")
    if not 0.0 <= model.label_smoothing < 1.0:
        raise LrkConfigError(
            f"model.label_smoothing={model.label_smoothing} is invalid: it must be in [0, 1)"
        )
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs < 1 and max_epochs != -1:
        raise LrkConfigError(
            f"trainer.max_epochs={max_epochs} is invalid: it must be >= 1 (or -1 for no limit)"
        )
    if cfg.optimized_metric is None or not str(cfg.optimized_metric).strip():
        raise LrkConfigError("optimized_metric is empty: name a logged metric, e.g. val/bal_acc or val/acc")
    if (cfg.get("decomp") or {}).get("distributed_heads") is True and "ddp" in strategy_name(
        cfg.trainer
    ).lower():
        raise LrkConfigError(
            "decomp.distributed_heads=true with trainer.strategy=ddp is invalid: distributed heads shard one "
            "batch's heads over ranks that must all see that batch, while DDP gives each rank its own batch; "
            "use one of the two (trainer=cpu/gpu with distributed_heads, or distributed_heads=false with DDP)"
        )
