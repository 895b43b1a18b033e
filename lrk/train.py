"""The one place that wires data, model, decomposition, Lightning and loggers.

``run(cfg)`` builds the objects of one point of the grid dataset x backbone x decomposition, runs the schedule of
its stages (:mod:`lrk.pipeline.schedules`: ``stage=init``, ``stage=post``, a restored checkpoint) and returns the
metrics dict; it always leaves ``<run dir>/summary.json``, also when the run fails.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lrk.config import check_model_config
from lrk.data import build_datamodule
from lrk.decomp import build_method
from lrk.distributed import (
    RankConsistency,
    check_devices,
    dead_rank,
    end_of_run,
    is_global_zero,
    on_rank_death,
)
from lrk.errors import LrkConfigError
from lrk.lit.callbacks import MeasurementCallback, log_to_loggers
from lrk.lit.module import LitClassifier
from lrk.measure import count_params
from lrk.models import build_backbone
from lrk.pipeline.checkpoints import resolve_checkpoint, restore_for_test
from lrk.pipeline.schedules import run_schedule
from lrk.pipeline.stages import RunState
from lrk.pipeline.teacher import distillation_terms
from lrk.summary import RunSummary
from lrk.wandb_run import configure_loggers

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and test one grid point described by ``cfg``; return its metrics.

    summary.json is written when the run starts (status ``running``) and when it ends
    (``completed``, ``failed``, ``interrupted`` or ``pruned``, with the error). Under DDP only rank zero writes
    it (and the tables); a rank that dies marks it ``failed`` (:func:`lrk.distributed.on_rank_death`).
    """
    summary = RunSummary(Path(cfg.paths.output_dir), config=_config_dict(cfg))
    writer = is_global_zero()  # ranks 1.. of a DDP run (started by Lightning) write nothing
    if writer:
        summary.write()
    try:
        with on_rank_death(lambda message: _fail(summary, message)):
            summary.metrics = _run(cfg, summary)
        summary.status = "completed"
        return summary.metrics
    except BaseException as exc:
        summary.status = _status_of(exc)
        summary.error = f"{type(exc).__name__}: {exc}"
        died = dead_rank() if summary.status == "failed" else None
        if died:  # rank zero's error is the consequence (a collective without its peer)
            summary.error = f"{died}; on rank 0: {summary.error}"
        if summary.status == "interrupted":
            summary.error = f"interrupted (Ctrl+C or SIGTERM); resume with ckpt_path={summary.run_dir}"
        if not writer and summary.status == "pruned":
            return {}  # DDP: rank zero reports the pruned trial, the other ranks end quietly
        raise
    finally:
        if writer:
            summary.write()
        _finish_wandb(summary.status)
        end_of_run(wait_s=60.0 if summary.status == "completed" else 5.0)


def _fail(summary: RunSummary, message: str) -> None:
    """Another DDP rank died: summary.json says so before every process is stopped."""
    summary.status, summary.error = "failed", message
    summary.write()


def _run(cfg: DictConfig, summary: RunSummary) -> dict[str, float]:
    run_dir = Path(cfg.paths.output_dir)
    # every check that can fail on bad input runs before the first training step
    check_model_config(cfg)
    check_devices(cfg.trainer)
    runs_dir = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, runs_dir, run_dir)
    if not cfg.train and not cfg.test:
        raise LrkConfigError("train=false and test=false leaves nothing to do: set at least one to true")
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg.data)
    datamodule.prepare()
    summary.extra["data"] = {
        "class_names": list(datamodule.class_names),
        "class_weights": datamodule.class_weights.tolist(),
        "split_sizes": dict(datamodule.split_sizes),
        "stats": dict(datamodule.stats),
    }
    model, payload = None, None
    if not cfg.train and ckpt_path is not None:
        # train=false on a checkpoint that carries its structure: test its (compressed) model as it was saved
        facts = {"num_classes": datamodule.num_classes, "in_chans": datamodule.in_chans}
        facts.update(image_size=datamodule.image_size, classes=datamodule.class_names)
        ckpt_path, model, payload = restore_for_test(str(cfg.ckpt_path), ckpt_path, cfg.decomp.name, facts)
    if payload is not None:
        summary.extra["restored_from"] = {
            "checkpoint": str(ckpt_path),
            "lrk_version": payload.get("lrk_version"),
            "model_class": payload.get("model_class"),
        }
    else:
        model = build_backbone(
            cfg.backbone,
            num_classes=datamodule.num_classes,
            in_chans=datamodule.in_chans,
            image_size=datamodule.image_size,
        )
    method = build_method(cfg.decomp)
    lit = LitClassifier(
        model,
        num_classes=datamodule.num_classes,
        class_weights=datamodule.class_weights,
        class_names=datamodule.class_names,
        lr=cfg.model.lr,
        weight_decay=cfg.model.weight_decay,
        betas=tuple(cfg.model.betas),
        warmup_epochs=cfg.model.warmup_epochs,
        min_lr=cfg.model.min_lr,
        label_smoothing=cfg.model.label_smoothing,
        mixup_alpha=cfg.model.get("mixup_alpha", 0.0),
        cutmix_alpha=cfg.model.get("cutmix_alpha", 0.0),
        ema_decay=cfg.model.get("ema_decay"),
        loss_terms=distillation_terms(
            cfg, model, datamodule.num_classes, datamodule.in_chans, datamodule.image_size
        ),
    )
    lit.params_dense = (payload or {}).get("params_dense") or count_params(model)
    state = RunState(
        cfg=cfg,
        run_dir=run_dir,
        runs_dir=runs_dir,
        datamodule=datamodule,
        model=model,
        lit=lit,
        method=method,
        summary=summary,
        ckpt_path=ckpt_path,
        loggers=configure_loggers(cfg, _instantiate_group(cfg, "logger")),
        callbacks=_instantiate_callbacks(cfg),
        restored=payload,
        make_callbacks=lambda: _instantiate_callbacks(cfg),
    )
    run_schedule(state)

    metrics = state.metrics
    trainer = state.main_trainer()
    for callback in trainer.callbacks:
        if isinstance(callback, MeasurementCallback):
            metrics.update(callback.metrics)
        if isinstance(callback, RankConsistency) and callback.report:
            summary.extra["distributed"] = dict(callback.report)
    if is_global_zero():
        _write_tables(run_dir, state.loggers, summary, lit.class_names)
    log_to_loggers(trainer, {k: v for k, v in metrics.items() if k.startswith(("model/", "time/", "mem/"))})
    if state.fitted:
        _check_optimized_metric(cfg, metrics)
    return dict(sorted(metrics.items()))


def _instantiate_group(cfg: DictConfig, group: str) -> list[Any]:
    """Instantiate every non-null ``_target_`` node of a config group keyed by name (callbacks, logger)."""
    objects = []
    for key, node in (cfg.get(group) or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise LrkConfigError(f"{group}.{key} has no _target_: give the class path to instantiate")
        objects.append(instantiate(node))
    return objects


def _instantiate_callbacks(cfg: DictConfig) -> list[Callback]:
    callbacks = _instantiate_group(cfg, "callbacks")
    if not cfg.trainer.get("enable_progress_bar", True):
        # trainer.enable_progress_bar=false wins over the progress-bar callback (logs, CI)
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def _write_tables(run_dir: Path, loggers: list[Logger], summary: RunSummary, class_names: list[str]) -> None:
    """The per-layer decomposition report and the test confusion matrix, as CSV files and W&B tables."""
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    if summary.decomp_layers:
        columns = list(summary.decomp_layers[0])
        tables["decomp_layers"] = (columns, [[row.get(c) for c in columns] for row in summary.decomp_layers])
    confusion = summary.extra.get("test_confusion_matrix")
    if confusion:
        columns = ["true", *[f"pred_{name}" for name in class_names]]
        tables["confusion_matrix"] = (
            columns,
            [[name, *row] for name, row in zip(class_names, confusion, strict=True)],
        )
    for name, (columns, rows) in tables.items():
        with (run_dir / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows([[_cell(v) for v in row] for row in rows])
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=name, columns=columns, data=[[_cell(v) for v in row] for row in rows])


def _cell(value: Any) -> Any:
    return str(value) if isinstance(value, list | tuple | dict) else value


def _check_optimized_metric(cfg: DictConfig, metrics: dict[str, float]) -> None:
    for name in _metric_names(cfg.optimized_metric):
        if name not in metrics:
            raise LrkConfigError(
                f"optimized_metric={name} was not logged by this run; logged metrics: {', '.join(sorted(metrics))}"
            )


def _metric_names(value: Any) -> list[str]:
    return [str(v) for v in value] if OmegaConf.is_list(value) or isinstance(value, list) else [str(value)]


def _config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config; falls back to the unresolved one when an interpolation is broken."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _status_of(exc: BaseException) -> str:
    if type(exc).__name__ == "TrialPruned":
        return "pruned"
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return "interrupted"
    return "failed"


def _finish_wandb(status: str) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if status == "completed" else 1)
