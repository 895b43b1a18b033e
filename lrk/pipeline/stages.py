"""The stages a run is made of, each acting on one :class:`RunState`: train the dense model (or load it),
evaluate it, compress it, fit (train or fine-tune), test. The schedules (:mod:`lrk.pipeline.schedules`) order them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from torch import nn

from lrk.decomp import DecompMethod, DecompReport
from lrk.distributed import RankConsistency
from lrk.layers.attention.stats import reduced_stats
from lrk.lit.callbacks import log_to_loggers
from lrk.lit.module import LitClassifier
from lrk.pipeline.checkpoints import best_checkpoint, load_dense_weights, resolve_checkpoint
from lrk.pipeline.structure import StructureCheckpoint
from lrk.summary import RunSummary


def make_trainer(
    cfg: DictConfig,
    run_dir: Path,
    loggers: list[Logger] | None = None,
    callbacks: list[Callback] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer from ``cfg.trainer``; every checkpoint it writes carries the model's structure; under DDP every
    fit and test starts with the same model on every rank (:class:`lrk.distributed.RankConsistency`)."""
    callbacks = list(callbacks or [])
    return instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=[*callbacks, StructureCheckpoint(), RankConsistency()],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **overrides,
    )


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of ``trainer.callback_metrics`` as floats."""
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float):
            out[key] = float(value)
    return out


@dataclass
class RunState:
    """What the stages of one run share. ``ckpt_path``: the checkpoint to resume (train) or test (train=false);
    ``loggers`` / ``callbacks``: those of the main fit; ``restored``: the structure payload when the model came
    from a checkpoint that carries its structure (then nothing is decomposed again)."""

    cfg: DictConfig
    run_dir: Path
    runs_dir: Path
    datamodule: Any
    model: nn.Module
    lit: LitClassifier
    method: DecompMethod
    summary: RunSummary
    ckpt_path: Path | None
    loggers: list[Logger]
    callbacks: list[Callback]
    restored: dict[str, Any] | None = None
    #: fresh callbacks from the config, for every further fit of a schedule with several (:func:`fit_phase`)
    make_callbacks: Callable[[], list[Callback]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    report: DecompReport | None = None
    trainer: L.Trainer | None = None
    fitted: bool = False

    def main_trainer(self) -> L.Trainer:
        """The trainer of the main fit and test (loggers, callbacks), made once; ``stage=post`` fine-tunes for
        ``finetune_epochs``. Its loggers get the config and the decomposition report when it is made."""
        if self.trainer is None:
            overrides = {"max_epochs": self.method.finetune_epochs} if self.method.stage == "post" else {}
            self.trainer = make_trainer(self.cfg, self.run_dir, self.loggers, self.callbacks, **overrides)
            for logger in self.loggers:
                logger.log_hyperparams(flatten(self.summary.config))
            if self.report is not None:
                log_to_loggers(self.trainer, self.report.metrics())
        return self.trainer


Stage = Callable[[RunState], None]


# --- the stages --------------------------------------------------------------------------------------------
def dense_weights(state: RunState) -> None:
    """``stage=post``: load the dense checkpoint ``decomp.ckpt_path``, or train the dense model (no loggers, into
    ``<run dir>/dense``; it resumes from ``ckpt_path`` if given)."""
    if state.method.ckpt_path:
        path = resolve_checkpoint(state.method.ckpt_path, state.runs_dir, state.run_dir)
        load_dense_weights(state.lit, path)
    elif state.cfg.train:
        trainer = make_trainer(state.cfg, state.run_dir / "dense")
        trainer.fit(state.lit, datamodule=state.datamodule, ckpt_path=state.ckpt_path)
        state.ckpt_path = None


def evaluate_dense(state: RunState) -> None:
    """Test metrics of the dense model as it is now, as ``dense/test/*`` (no logging, no checkpoints)."""
    trainer = make_trainer(state.cfg, state.run_dir / "dense")
    trainer.test(state.lit, datamodule=state.datamodule, verbose=False)
    state.metrics.update({f"dense/{k}": v for k, v in scalars(trainer.callback_metrics).items()})


def compress(state: RunState) -> None:
    """``method.apply(model, calibration batches)``; the report goes to summary.json, the metrics and the
    checkpoints (it rides in their structure payload)."""
    count = state.cfg.decomp.get("calibration_batches")
    count = 4 if count is None else int(count)  # decomp.calibration_batches: null -> 4
    # the methods that need labels (fisher-weighted SVD) get (images, labels) pairs
    batches = state.datamodule.calibration_batches(
        count, labels=bool(getattr(state.method, "needs_labels", False))
    )
    record_report(state, state.method.apply(state.model, batches))


def restored_report(state: RunState) -> None:
    """A model restored with its structure: the report of the run that decomposed it (nothing applied again)."""
    payload = state.restored or {}
    report = DecompReport(payload.get("decomp_method") or "none", list(payload.get("decomp_layers") or []))
    record_report(state, report)


def record_report(state: RunState, report: DecompReport) -> None:
    state.report = report
    state.summary.decomp_layers = list(report.rows)
    state.lit.decomp_method, state.lit.decomp_layers = report.method, list(report.rows)
    state.metrics.update(report.metrics())


def fit(state: RunState) -> None:
    """Train (``stage=init``) or fine-tune (``stage=post``) with the run's loggers and callbacks; nothing with
    ``train=false`` or ``max_epochs=0``. Adds the method's in-fit figures (e.g. SDRM's t-SVD, ``time/rr_s``)."""
    trainer = state.main_trainer()
    if not state.cfg.train or trainer.max_epochs == 0:
        return
    trainer.fit(state.lit, datamodule=state.datamodule, ckpt_path=state.ckpt_path)
    state.fitted = True
    state.metrics.update(scalars(trainer.callback_metrics))
    with reduced_stats(state.model):  # DDP: the statistics of every rank's forwards
        state.metrics.update(state.method.runtime_metrics(state.model))


def test(state: RunState) -> None:
    """Test the best checkpoint of the fit (or, without a fit, the model as it is / ``ckpt_path``)."""
    if not state.cfg.test:
        return
    trainer = state.main_trainer()
    ckpt = best_checkpoint(trainer) if state.fitted else (None if state.cfg.train else state.ckpt_path)
    trainer.test(state.lit, datamodule=state.datamodule, ckpt_path=ckpt)
    state.metrics.update(scalars(trainer.callback_metrics))
    state.summary.extra["test_confusion_matrix"] = state.lit.test_confusion
    state.summary.extra["tested_checkpoint"] = str(ckpt) if ckpt else None


def fit_phase(state: RunState, phase: str, max_epochs: int) -> dict[str, float]:
    """One more fit of a schedule with several (multi-stage compression, SVD training's fine-tuning after
    pruning): ``state.lit`` as it is now (a new optimizer for its current parameters) trained ``max_epochs`` by
    a new Trainer with fresh callbacks (their checkpoints under ``checkpoints/<phase>/``). The run's loggers
    continue: the new fit's steps start where the last fit's stopped. It becomes the main trainer, so
    :func:`test` tests its best checkpoint. Returns the ``callback_metrics`` of its end (``{}`` when nothing
    trains: ``train=false`` or ``max_epochs=0``)."""
    if not state.cfg.train or max_epochs == 0:
        return {}
    steps_before = 0 if state.trainer is None else state.trainer.fit_loop.epoch_loop._batches_that_stepped
    callbacks = state.make_callbacks() if state.make_callbacks is not None else []
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            callback.dirpath = str(Path(callback.dirpath) / phase)
    trainer = make_trainer(
        state.cfg,
        state.run_dir,
        state.loggers,
        [*callbacks, _ContinueSteps(steps_before)],
        max_epochs=max_epochs,
    )
    state.trainer = trainer
    trainer.fit(state.lit, datamodule=state.datamodule)
    state.fitted = True
    values = scalars(trainer.callback_metrics)
    state.metrics.update(values)
    with reduced_stats(state.model):
        state.metrics.update(state.method.runtime_metrics(state.model))
    return values


class _ContinueSteps(Callback):
    """Start a fit's logging step where the previous fit of the run stopped, so that CSV/W&B curves continue
    across the fits of one schedule instead of restarting at step 0 (Lightning has no public knob for it)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped += self.offset


def flatten(config: dict[str, Any], parent: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (hyper-parameters for the loggers)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{parent}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat
