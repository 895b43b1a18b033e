"""The one place that wires data, model, decomposition, Lightning and loggers.

``run(cfg)`` trains and tests one point of the grid dataset x backbone x decomposition and returns
the metrics dict; it always leaves ``<run dir>/summary.json``, also when the run fails.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lrk.config import check_model_config, resolve_checkpoint
from lrk.data import build_datamodule
from lrk.decomp import DecompReport, build_method
from lrk.errors import LrkConfigError
from lrk.lit.callbacks import MeasurementCallback, count_parameters, log_to_loggers
from lrk.lit.module import LitClassifier
from lrk.models import build_backbone
from lrk.pipeline.structure import (
    StructureCheckpoint,
    find_checkpoint,
    load_checkpoint,
    read_structure,
    restore_model,
)
from lrk.summary import RunSummary

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and test one grid point described by ``cfg``; return its metrics.

    summary.json is written when the run starts (status ``running``) and when it ends
    (``completed``, ``failed``, ``interrupted`` or ``pruned``, with the error).
    """
    summary = RunSummary(Path(cfg.paths.output_dir), config=_config_dict(cfg))
    summary.write()
    try:
        summary.metrics = _run(cfg, summary)
        summary.status = "completed"
        return summary.metrics
    except BaseException as exc:
        summary.status = _status_of(exc)
        summary.error = f"{type(exc).__name__}: {exc}"
        if summary.status == "interrupted":
            summary.error = f"interrupted (Ctrl+C or SIGTERM); resume with ckpt_path={summary.run_dir}"
        raise
    finally:
        summary.write()
        _finish_wandb(summary.status)


def _run(cfg: DictConfig, summary: RunSummary) -> dict[str, float]:
    run_dir = Path(cfg.paths.output_dir)
    # every check that can fail on bad input runs before the first training step
    check_model_config(cfg)
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
    # train=false on a checkpoint that carries its structure: test its (compressed) model as it was saved
    ckpt_path, restored = _restore_saved_model(cfg, ckpt_path, datamodule, summary)
    if restored:
        model, payload = restored
        params_dense = payload.get("params_dense") or count_parameters(model)
    else:
        model = build_backbone(
            cfg.backbone,
            num_classes=datamodule.num_classes,
            in_chans=datamodule.in_chans,
            image_size=datamodule.image_size,
        )
        params_dense = count_parameters(model)
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
    )
    lit.params_dense = params_dense
    metrics: dict[str, float] = {}

    if restored:
        # the checkpoint holds the decomposed model already: the original run's report rows, nothing applied
        report = DecompReport(
            payload.get("decomp_method") or "none", list(payload.get("decomp_layers") or [])
        )
    elif method.stage == "init":
        # factorize first, then train the factorized model from its initialisation
        report = method.apply(model, datamodule.calibration_batches(_calibration_count(cfg)))
    else:
        # stage=post: train (or load) the dense model, decompose it, then fine-tune
        if method.ckpt_path:
            dense_ckpt = resolve_checkpoint(method.ckpt_path, runs_dir, run_dir)
            _load_lit_weights(lit, dense_ckpt)
        elif cfg.train:
            dense_trainer = _make_trainer(cfg, run_dir / "dense", loggers=[])
            dense_trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
            ckpt_path = None
        metrics.update(_prefixed(_evaluate(cfg, lit, datamodule), "dense/"))
        report = method.apply(model, datamodule.calibration_batches(_calibration_count(cfg)))
    summary.decomp_layers = list(report.rows)
    lit.decomp_method, lit.decomp_layers = report.method, list(report.rows)  # kept in the checkpoints
    metrics.update(report.metrics())

    callbacks = _instantiate_callbacks(cfg)
    loggers = _instantiate_loggers(cfg)
    overrides = {"max_epochs": method.finetune_epochs} if method.stage == "post" else {}
    trainer = _make_trainer(cfg, run_dir, loggers, callbacks, **overrides)
    for logger in loggers:
        logger.log_hyperparams(_flatten(summary.config))
    log_to_loggers(trainer, report.metrics())

    # stage=post with finetune_epochs=0 only tests the decomposed model
    fits = bool(cfg.train) and trainer.max_epochs != 0
    if fits:
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_scalars(trainer.callback_metrics))
        # work the method does inside the fit's forwards, e.g. SDRM's t-SVD (time/rr_s)
        metrics.update(method.runtime_metrics(model))
    if cfg.test:
        test_ckpt = _best_checkpoint(trainer) if fits else (None if cfg.train else ckpt_path)
        trainer.test(lit, datamodule=datamodule, ckpt_path=test_ckpt)
        metrics.update(_scalars(trainer.callback_metrics))
        summary.extra["test_confusion_matrix"] = lit.test_confusion
        summary.extra["tested_checkpoint"] = str(test_ckpt) if test_ckpt else None
    for callback in trainer.callbacks:
        if isinstance(callback, MeasurementCallback):
            metrics.update(callback.metrics)
    _write_tables(run_dir, loggers, summary, lit.class_names)
    log_to_loggers(trainer, {k: v for k, v in metrics.items() if k.startswith(("model/", "time/", "mem/"))})
    if fits:
        _check_optimized_metric(cfg, metrics)
    return dict(sorted(metrics.items()))


def _restore_saved_model(
    cfg: DictConfig, ckpt_path: Path | None, datamodule: Any, summary: RunSummary
) -> tuple[Path | None, tuple[torch.nn.Module, dict[str, Any]] | None]:
    """``train=false`` with a checkpoint: the checkpoint to test (of a run dir: the one that run tested, see
    ``lrk.pipeline.structure.find_checkpoint``) and, when it carries its structure, ``(model, payload)``: the
    model restored from it (no decomposition config needed, none applied again). ``None`` instead when training
    or for a checkpoint with weights only (written before lrk stored structures): the model is built from the
    config as before."""
    if cfg.train or ckpt_path is None:
        return ckpt_path, None
    if str(cfg.ckpt_path) != "last" and Path(str(cfg.ckpt_path)).expanduser().is_dir():
        ckpt_path = find_checkpoint(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt_path)
    payload = read_structure(checkpoint)
    if payload is None:
        return ckpt_path, None
    if cfg.decomp.name != "none":
        raise LrkConfigError(
            f"ckpt_path={ckpt_path} already holds its model's structure "
            f"(decomp={payload.get('decomp_method') or 'none'}): drop decomp={cfg.decomp.name}, the checkpoint is "
            "tested as it was saved (to decompose a dense checkpoint: decomp.stage=post decomp.ckpt_path=<it>)"
        )
    facts = {"num_classes": datamodule.num_classes, "in_chans": datamodule.in_chans}
    facts.update(image_size=datamodule.image_size, classes=datamodule.class_names)
    model = restore_model(checkpoint, facts)
    summary.extra["restored_from"] = {
        "checkpoint": str(ckpt_path),
        "lrk_version": payload.get("lrk_version"),
        "model_class": payload.get("model_class"),
    }
    return ckpt_path, (model, payload)


def _calibration_count(cfg: DictConfig) -> int:
    return int(cfg.decomp.get("calibration_batches", 4))


def _make_trainer(
    cfg: DictConfig,
    run_dir: Path,
    loggers: list[Logger],
    callbacks: list[Callback] | None = None,
    **overrides: Any,
) -> L.Trainer:
    return instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=[*(callbacks or []), StructureCheckpoint()],  # checkpoints carry the model's structure
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
        **overrides,
    )


def _evaluate(cfg: DictConfig, lit: LitClassifier, datamodule: Any) -> dict[str, float]:
    """Test metrics of the model as it is now (no logging, no checkpoints)."""
    trainer = _make_trainer(cfg, Path(cfg.paths.output_dir) / "dense", loggers=[])
    trainer.test(lit, datamodule=datamodule, verbose=False)
    return _scalars(trainer.callback_metrics)


def _load_lit_weights(lit: LitClassifier, path: Path) -> None:
    """Load a dense checkpoint (an lrk Lightning checkpoint or a plain state_dict) into the module."""
    state = torch.load(path, map_location="cpu")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not any(key.startswith("model.") for key in state):
        state = {f"model.{key}": value for key, value in state.items()}
    missing, unexpected = lit.load_state_dict(state, strict=False)
    missing = [key for key in missing if key.startswith("model.")]
    if missing or unexpected:
        raise LrkConfigError(
            f"decomp.ckpt_path={path} does not fit this backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; it must come from a dense run of the same backbone and data"
        )


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


def _instantiate_loggers(cfg: DictConfig) -> list[Logger]:
    return _instantiate_group(cfg, "logger")


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint of the monitored metric (the last one when nothing is monitored)."""
    checkpoints = [
        c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.best_model_path
    ]
    monitored = [c for c in checkpoints if c.monitor]
    chosen = (monitored or checkpoints)[:1]
    return chosen[0].best_model_path if chosen else None


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


def _first_metric(value: Any) -> str:
    return _metric_names(value)[0]


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float):
            out[key] = float(value)
    return out


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def _flatten(config: dict[str, Any], parent: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{parent}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


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
