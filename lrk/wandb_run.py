"""Weights & Biases as a dashboard source (issue 13, item 3): every run arrives organised so that a workspace groups
and compares runs without hand work.

What each run sets (:func:`wandb_settings`, the extra ``wandb.init`` keyword arguments, and :func:`define_summaries`):

- ``group``: the experiment or sweep the run belongs to: the Optuna study name (``optuna.study``, set by the lrk
  sweeper for every trial) in a sweep, otherwise the logger node's ``group`` (conf/logger/wandb.yaml:
  ``${task_name}``); a sweep's trials are thereby grouped under their study;
- ``job_type``: the decomposition (``decomp.name``, set in conf/logger/wandb.yaml);
- ``tags``: ``data:<name>``, ``backbone:<choice>``, ``decomp:<name>``, ``stage:<init|post>`` (and ``trial:<n>`` in a
  sweep) followed by the run's free ``tags`` (conf/train.yaml), without duplicates, each cut to W&B's 64 characters;
- ``config``: the resolved config flattened with ``/`` (``decomp/energy``, ``model/lr``): the same keys
  :mod:`lrk.pipeline.stages` logs as hyper-parameters, given at ``wandb.init`` so that a run that fails before its
  first fit has them too;
- summaries (``define_metric``, :data:`SUMMARIES`): the best (``max``) of ``val/acc``, ``val/bal_acc``, ``val/f1``
  (W&B shows them as ``val/acc.max``), the lowest ``val/loss`` (``val/loss.min``); the last value (plain key) of
  ``val/acc_best``, ``test/*``, ``time/*``, ``model/*``, ``mem/*``, ``decomp/*``; each still plotted against
  Lightning's ``trainer/global_step``.

The per-layer report and the test confusion matrix go to W&B as tables (``lrk.train._write_tables``).
Offline runs (the default) land in ``<run dir>/wandb/offline-run-*``; ``wandb sync <that dir>`` uploads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lrk.pipeline.stages import flatten

#: W&B refuses tags longer than this
TAG_MAX = 64
#: the step axis Lightning's WandbLogger plots every metric against
STEP_METRIC = "trainer/global_step"
#: metric name (or ``prefix/*`` glob) -> W&B summary aggregation; None: W&B's default, the last value under the
#: plain key (an explicit ``summary="last"`` nests it as ``{"last": v}``, only for some keys: measured on wandb 0.31,
#: which would make a dashboard address ``time/rr_s.last`` beside ``time/train_s``)
SUMMARIES: dict[str, str | None] = {
    "val/acc": "max",
    "val/bal_acc": "max",
    "val/f1": "max",
    "val/loss": "min",
    "val/acc_best": None,  # lrk's running best already: its last value is the best
    "test/*": None,
    "time/*": None,
    "model/*": None,
    "mem/*": None,
    "decomp/*": None,
}


def _plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except Exception:  # a broken interpolation: the unresolved text
            return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]
    return dict(cfg)


def _backbone_choice(cfg: Mapping[str, Any]) -> str:
    """The backbone's config choice (``vit_edge``) where Hydra knows it, else ``backbone.name``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("backbone")
        if choice:
            return str(choice)
    except Exception:  # outside a Hydra job (tests, notebooks)
        pass
    return str((cfg.get("backbone") or {}).get("name", "unknown"))


def run_tags(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """``data:<name>``, ``backbone:<choice>``, ``decomp:<name>``, ``stage:<stage>`` (``trial:<n>`` in a sweep), then
    ``cfg.tags``; duplicates dropped, order kept, each at most :data:`TAG_MAX` characters."""
    plain = _plain(cfg)
    decomp = plain.get("decomp") or {}
    tags = [
        f"data:{(plain.get('data') or {}).get('name', 'unknown')}",
        f"backbone:{_backbone_choice(plain)}",
        f"decomp:{decomp.get('name', 'none')}",
        f"stage:{decomp.get('stage', 'init')}",
    ]
    trial = (plain.get("optuna") or {}).get("trial")
    if trial is not None:
        tags.append(f"trial:{trial}")
    extra = plain.get("tags") or []
    tags += [str(t) for t in (extra if isinstance(extra, list | tuple) else [extra])]
    return list(dict.fromkeys(t[:TAG_MAX] for t in tags if t))


def wandb_settings(
    cfg: DictConfig | Mapping[str, Any], node: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``wandb.init`` keyword arguments of one run: ``group``, ``job_type``, ``tags``, ``config`` (module
    docstring). ``node``: the logger's own settings (its ``group``, ``job_type`` and ``tags`` are kept where this
    module has nothing better: a sweep's study name wins over ``group``; the grid tags come first)."""
    plain = _plain(cfg)
    node = dict(node or {})
    study = (plain.get("optuna") or {}).get("study")
    group = study or node.get("group") or plain.get("task_name") or "train"
    decomp = (plain.get("decomp") or {}).get("name", "none")
    job_type = node.get("job_type") or decomp
    own = node.get("tags") or []
    tags = list(dict.fromkeys([*run_tags(plain), *(str(t)[:TAG_MAX] for t in own)]))
    return {"group": str(group), "job_type": str(job_type), "tags": tags, "config": flatten(plain)}


def define_summaries(logger: WandbLogger, summaries: Mapping[str, str | None] | None = None) -> None:
    """``define_metric`` of every entry of :data:`SUMMARIES` (or ``summaries``) on the logger's run (starts it:
    ``wandb.init``), each against :data:`STEP_METRIC` as Lightning's own definitions are."""
    run = logger.experiment
    if not hasattr(run, "define_metric"):  # a disabled run (WANDB_MODE=disabled)
        return
    for name, how in (summaries or SUMMARIES).items():
        run.define_metric(name, step_metric=STEP_METRIC, step_sync=True, summary=how)


def configure_loggers(cfg: DictConfig | Mapping[str, Any], loggers: Iterable[Logger]) -> list[Logger]:
    """Give every not yet started :class:`WandbLogger` of ``loggers`` the run's :func:`wandb_settings`, then start
    it and :func:`define_summaries`. Other loggers pass unchanged. Returns the loggers as a list.

    Lightning's WandbLogger keeps its ``wandb.init`` arguments in ``_wandb_init`` until its run starts; a logger
    whose run already started keeps its group and job type (W&B fixes them at init) and gets the tags and config."""
    loggers = list(loggers)
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        init = getattr(logger, "_wandb_init", None)
        started = getattr(logger, "_experiment", None) is not None
        settings = wandb_settings(cfg, init if isinstance(init, dict) else None)
        if isinstance(init, dict) and not started:
            init.update(settings)
        else:
            run = logger.experiment
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *settings["tags"]]))
            run.config.update(settings["config"], allow_val_change=True)
        define_summaries(logger)
    return loggers
