"""Measurement callbacks: one vocabulary of ``model/*``, ``time/*`` and ``mem/*`` metrics for every run.

Each callback keeps what it measured in ``self.metrics`` (read by ``lrk.train`` for summary.json) and
sends it to every logger of the trainer. Names follow the metric table of design.md.

Under DDP (one process per device) every rank measures; the loggers and summary.json are rank zero's, so:
``model/*`` (ModelStats) are the same on every rank (the same model); ``time/*`` (PhaseTimer, InferenceBenchmark)
are rank zero's own clocks (the ranks step in lock-step: gradients are synchronised every step; the inference
timing runs on rank zero's share of the test split); ``mem/peak_mb`` (PeakMemory) is the largest peak of all ranks.
EpochLog prints on rank zero only.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import IterableDataset

from lrk.measure import (
    ModuleTimer,
    clock,
    count_flops,
    count_params,
    measure_inference,
    module_size_mb,
    needs_sync,
    peak_memory_mb,
    reset_peak_memory,
)

log = logging.getLogger(__name__)

#: the name lrk.train and lrk.lit import (the count itself lives in lrk.measure)
count_parameters = count_params

__all__ = [
    "EpochLog",
    "InferenceBenchmark",
    "MeasurementCallback",
    "ModelStats",
    "PeakMemory",
    "PhaseTimer",
    "count_parameters",
    "log_to_loggers",
    "measure_inference",
    "peak_memory_mb",
]


def log_to_loggers(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send metrics to every logger at the current global step (hooks where ``self.log`` is refused)."""
    if trainer.sanity_checking or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class MeasurementCallback(Callback):
    """Base of lrk's measuring callbacks: ``metrics`` holds the latest values."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def _publish(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)
        log_to_loggers(trainer, metrics)


class ModelStats(MeasurementCallback):
    """Size and cost of the model, counted from the built modules at the start of the fit (or of a test-only
    run); every figure comes from :mod:`lrk.measure`:

    - ``model/params``: parameters (a tensor shared by several modules once); ``model/params_dense``: those of
      the dense model before decomposition (``pl_module.params_dense``, set by ``lrk.train``), else
      ``model/params``; ``model/compression`` = ``params_dense / params``;
    - ``model/size_mb``: bytes of parameters and buffers / 2^20;
    - ``model/flops``: FLOPs of one forward per image (eval mode, no gradients, 2 per multiply-add) of matrix
      products, convolutions, the attention products Q K^T and A V, and the factorizations inside the forward;
      not counted: elementwise ops, softmax, norms, activations, pooling (:mod:`lrk.measure.flops`);
    - ``model/flops_attention``: the part of ``model/flops`` inside ``F.scaled_dot_product_attention`` (a
      method computing its T x T products by explicit matmuls has them in ``model/flops`` only);
    - ``model/flops_factorization``: the part from eigh / SVD / QR / Cholesky / LU inside the forward, e.g.
      SDRM's t-SVD of every batch.

    Methods that factorize per batch pay by the batch, so the count runs on a real batch of the run: the
    first ``data.batch_size`` images of the datamodule's val split (train when it has none), divided by the
    number of images. Without a loader it falls back to one zero image (``in_chans`` x ``image_size``^2).
    The counting forward leaves the attention modules' run statistics (``module.stats``) as they were.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer, self.measure(pl_module, trainer.datamodule))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.metrics:  # a test-only run (train=false) still reports its model
            self._publish(trainer, self.measure(pl_module, trainer.datamodule))

    @staticmethod
    def measure(pl_module: L.LightningModule, datamodule: Any) -> dict[str, float]:
        model = pl_module.model
        params = count_params(model)
        params_dense = getattr(pl_module, "params_dense", None) or params
        metrics = {
            "model/params": float(params),
            "model/params_dense": float(params_dense),
            "model/compression": params_dense / params,
            "model/size_mb": module_size_mb(model),
        }
        example = example_batch(datamodule)
        if example is None and datamodule is not None and hasattr(datamodule, "in_chans"):
            example = torch.zeros(1, datamodule.in_chans, datamodule.image_size, datamodule.image_size)
        if example is not None:
            with _module_stats_kept(model):
                flops = count_flops(model, example.to(pl_module.device)).per_image()
            metrics["model/flops"] = flops.total
            metrics["model/flops_attention"] = flops.attention
            metrics["model/flops_factorization"] = flops.factorization
        return metrics


def example_batch(datamodule: Any) -> torch.Tensor | None:
    """The first ``datamodule.batch_size`` images of its val loader (else train loader), collated from the
    dataset without starting the loader's workers; None when the datamodule has no usable loader."""
    if datamodule is None:
        return None
    limit = getattr(datamodule, "batch_size", None)
    for name in ("val_dataloader", "train_dataloader"):
        make = getattr(datamodule, name, None)
        if make is None:
            continue
        try:
            images = _first_images(make(), limit)
        except Exception as err:  # not set up, not implemented, empty: try the next split
            log.debug("ModelStats: no example batch from %s (%s)", name, err)
            continue
        if images is not None:
            return images
    return None


def _first_images(loader: Any, limit: int | None) -> torch.Tensor | None:
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    size = limit or getattr(loader, "batch_size", None) or 1
    if dataset is not None and collate is not None and not isinstance(dataset, IterableDataset):
        n = min(len(dataset), size)
        if n == 0:
            return None
        batch = collate([dataset[i] for i in range(n)])
    else:
        batch = next(iter(loader), None)
    if batch is None:
        return None
    images = batch[0] if isinstance(batch, list | tuple) else batch
    return images[:size] if isinstance(images, torch.Tensor) and images.dim() > 0 else None


@contextmanager
def _module_stats_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``stats`` (run statistics of the attention modules) after the block."""
    saved = [(m, copy.deepcopy(m.stats)) for m in model.modules() if getattr(m, "stats", None) is not None]
    try:
        yield
    finally:
        for module, stats in saved:
            module.stats = stats


class PhaseTimer(MeasurementCallback):
    """Wall time of the fit's phases: ``time/train_s`` (training steps, validation excluded),
    ``time/val_s`` (validation loops), ``time/epoch_s`` (mean wall time of one epoch, train + val),
    ``time/fit_s`` (the whole fit) and ``time/mha_s``: forward time inside attention modules during
    the fit (training and validation steps), from a :class:`lrk.measure.ModuleTimer` on every module of
    ``attention_class`` (a nested attention module is timed once, inside the outer one).

    On CUDA the hooks and phase boundaries synchronize the device so the times are real.
    """

    def __init__(self, attention_class: str | None = "lrk.models.AttentionBase") -> None:
        super().__init__()
        self.attention_class = attention_class
        self._mha: ModuleTimer | None = None
        self._mha_before = 0.0  # attention seconds of an interrupted fit this one resumes
        self._sync = False
        self.train_s = self.val_s = 0.0
        self.epochs = 0
        self._epoch_start = self._val_start = self._fit_start = 0.0
        self._val_in_epoch = 0.0

    @property
    def mha_s(self) -> float:
        return self._mha_before + (self._mha.seconds if self._mha is not None else 0.0)

    @mha_s.setter
    def mha_s(self, seconds: float) -> None:
        self._mha_before = seconds
        if self._mha is not None:
            self._mha.reset()

    def _now(self) -> float:
        return clock(self._sync)

    def _attention_modules(self, model: nn.Module) -> list[nn.Module]:
        if not self.attention_class:
            return []
        try:
            cls = get_class(self.attention_class)
        except Exception:  # the class's package is not there: no attention timing
            return []
        return [m for m in model.modules() if isinstance(m, cls)]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync = needs_sync(pl_module.device)
        self._fit_start = self._now()
        self._remove_hooks()
        before = self.mha_s
        self._mha = ModuleTimer(self._attention_modules(pl_module), sync=self._sync)
        self._mha_before = before

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._now()
        self._val_in_epoch = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = self._now()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        elapsed = self._now() - self._val_start
        self.val_s += elapsed
        self._val_in_epoch += elapsed

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_s = self._now() - self._epoch_start
        self.train_s += epoch_s - self._val_in_epoch
        self.epochs += 1
        self._publish(trainer, self._summary(epoch_s))

    def _summary(self, last_epoch_s: float) -> dict[str, float]:
        return {
            "time/train_s": self.train_s,
            "time/val_s": self.val_s,
            "time/epoch_s": (self.train_s + self.val_s) / max(1, self.epochs),
            "time/last_epoch_s": last_epoch_s,
            "time/mha_s": self.mha_s,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        self.metrics["time/fit_s"] = self._now() - self._fit_start

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        if self._mha is not None:
            self._mha.remove()

    def state_dict(self) -> dict[str, float]:
        # a resumed fit continues the totals of the interrupted one
        return {"train_s": self.train_s, "val_s": self.val_s, "mha_s": self.mha_s, "epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.train_s = state_dict["train_s"]
        self.val_s = state_dict["val_s"]
        self.mha_s = state_dict["mha_s"]
        self.epochs = int(state_dict["epochs"])


class PeakMemory(MeasurementCallback):
    """``mem/peak_mb``: peak device memory of the fit (:func:`lrk.measure.peak_memory_mb`: CUDA max allocated
    since the fit started, or the process's peak RSS on the CPU); under DDP the largest of all ranks' peaks."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reset_peak_memory(pl_module.device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer, {"mem/peak_mb": self._peak(trainer, pl_module)})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics["mem/peak_mb"] = self._peak(trainer, pl_module)

    @staticmethod
    def _peak(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        peak = peak_memory_mb(pl_module.device)
        if trainer.world_size > 1:  # a collective: every rank calls this hook
            peak = float(pl_module.all_gather(torch.tensor(peak, dtype=torch.float64)).max())
        return peak


class InferenceBenchmark(MeasurementCallback):
    """``time/infer_ms`` (mean latency of one test batch) and ``time/throughput_ips`` (images/s),
    timed after the test loop on up to ``max_batches`` test batches in eval mode, after warm-up
    (:func:`lrk.measure.measure_inference`)."""

    def __init__(self, max_batches: int = 20, warmup_batches: int = 2) -> None:
        super().__init__()
        if max_batches < 1 or warmup_batches < 0:
            raise ValueError(
                f"InferenceBenchmark(max_batches={max_batches}, warmup_batches={warmup_batches}) is invalid: "
                "max_batches must be >= 1 and warmup_batches >= 0"
            )
        self.max_batches = max_batches
        self.warmup_batches = warmup_batches

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        if loader is None:
            return
        max_batches, warmup = self.max_batches, self.warmup_batches
        limited = trainer.limit_test_batches not in (None, 1.0)
        limits = [n for n in (trainer.num_test_batches or []) if n != float("inf")] if limited else []
        if limits:  # trainer.limit_test_batches also bounds the timing (quick runs stay quick)
            max_batches, warmup = min(max_batches, int(limits[0])), min(warmup, 1)
        metrics = measure_inference(pl_module, loader, max_batches, warmup)
        if metrics:
            self._publish(trainer, metrics)


class EpochLog(Callback):
    """One log line per epoch (``epoch 3/30: train/loss 0.41 val/acc 0.83 ... 12.1 s``), for log files and
    terminals without a live progress bar; on rank zero only under DDP (the metrics are already reduced)."""

    def __init__(self, keys: tuple[str, ...] = ("train/loss", "val/loss", "val/acc", "val/bal_acc")) -> None:
        self.keys = tuple(keys)
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on every rank: reading them reduces the sync_dist metrics (a collective)
        values = trainer.callback_metrics
        if not trainer.is_global_zero:
            return
        shown = " ".join(f"{key} {float(values[key]):.4f}" for key in self.keys if key in values)
        elapsed = time.perf_counter() - self._start
        log.info("epoch %d/%s: %s (%.1f s)", trainer.current_epoch + 1, trainer.max_epochs, shown, elapsed)
