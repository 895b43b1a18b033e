"""Measurement callbacks: one vocabulary of ``model/*``, ``time/*`` and ``mem/*`` metrics for every run.

Each callback keeps what it measured in ``self.metrics`` (read by ``lrk.train`` for summary.json) and
sends it to every logger of the trainer. Names follow the metric table of design.md.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

MIB = 2**20
log = logging.getLogger(__name__)


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


def count_parameters(module: nn.Module) -> int:
    """Parameters of the built module (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def module_size_mb(module: nn.Module) -> float:
    """Bytes of parameters and buffers, in MiB."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def forward_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (torch.utils.flop_counter; a multiply-add counts 2)."""
    was_training = module.training
    module.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(example)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


class ModelStats(MeasurementCallback):
    """``model/params``, ``model/params_dense``, ``model/compression``, ``model/flops`` (per image),
    ``model/size_mb``, counted from the built modules at the start of the fit.

    ``model/params_dense`` comes from ``pl_module.params_dense`` when the run decomposed the model
    (set by ``lrk.train``); otherwise it equals ``model/params``.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer, self.measure(pl_module, trainer.datamodule))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.metrics:  # a test-only run (train=false) still reports its model
            self._publish(trainer, self.measure(pl_module, trainer.datamodule))

    @staticmethod
    def measure(pl_module: L.LightningModule, datamodule: Any) -> dict[str, float]:
        model = pl_module.model
        params = count_parameters(model)
        params_dense = getattr(pl_module, "params_dense", None) or params
        metrics = {
            "model/params": float(params),
            "model/params_dense": float(params_dense),
            "model/compression": params_dense / params,
            "model/size_mb": module_size_mb(model),
        }
        if datamodule is not None and hasattr(datamodule, "in_chans"):
            example = torch.zeros(1, datamodule.in_chans, datamodule.image_size, datamodule.image_size)
            example = example.to(pl_module.device)
            metrics["model/flops"] = float(forward_flops(model, example))
        return metrics


class PhaseTimer(MeasurementCallback):
    """Wall time of the fit's phases: ``time/train_s`` (training steps, validation excluded),
    ``time/val_s`` (validation loops), ``time/epoch_s`` (mean wall time of one epoch, train + val),
    ``time/fit_s`` (the whole fit) and ``time/mha_s``: forward time inside attention modules during
    the fit (training and validation steps), from hooks on every module of ``attention_class``.

    On CUDA the hooks and phase boundaries synchronize the device so the times are real.
    """

    def __init__(self, attention_class: str | None = "lrk.models.AttentionBase") -> None:
        super().__init__()
        self.attention_class = attention_class
        self._handles: list[Any] = []
        self._sync = False
        self.train_s = self.val_s = self.mha_s = 0.0
        self.epochs = 0
        self._epoch_start = self._val_start = self._fit_start = 0.0
        self._val_in_epoch = 0.0
        self._mha_depth = 0
        self._mha_start = 0.0

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _attention_modules(self, model: nn.Module) -> list[nn.Module]:
        if not self.attention_class:
            return []
        try:
            cls = get_class(self.attention_class)
        except Exception:  # the class's package is not there: no attention timing
            return []
        return [m for m in model.modules() if isinstance(m, cls)]

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if self._mha_depth == 0:
            self._mha_start = self._now()
        self._mha_depth += 1  # nested attention modules are timed once

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._mha_depth -= 1
        if self._mha_depth == 0:
            self.mha_s += self._now() - self._mha_start

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync = pl_module.device.type == "cuda"
        self._fit_start = self._now()
        for module in self._attention_modules(pl_module):
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._post_hook))

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
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_dict(self) -> dict[str, float]:
        # a resumed fit continues the totals of the interrupted one
        return {"train_s": self.train_s, "val_s": self.val_s, "mha_s": self.mha_s, "epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.train_s = state_dict["train_s"]
        self.val_s = state_dict["val_s"]
        self.mha_s = state_dict["mha_s"]
        self.epochs = int(state_dict["epochs"])


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max memory allocated on ``device``. CPU: the process's peak resident set size
    (it includes the Python runtime and the cached dataset, which every run of a dataset shares)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakMemory(MeasurementCallback):
    """``mem/peak_mb``: peak device memory of the fit (see :func:`peak_memory_mb`)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer, {"mem/peak_mb": peak_memory_mb(pl_module.device)})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics["mem/peak_mb"] = peak_memory_mb(pl_module.device)


class InferenceBenchmark(MeasurementCallback):
    """``time/infer_ms`` (mean latency of one test batch) and ``time/throughput_ips`` (images/s),
    timed after the test loop on up to ``max_batches`` test batches in eval mode, after warm-up."""

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


@torch.inference_mode()
def measure_inference(
    model: nn.Module, loader: Any, max_batches: int = 20, warmup_batches: int = 2
) -> dict[str, float]:
    """Mean forward latency per batch (ms) and throughput (images/s) over the loader's first batches."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    images_seen, elapsed, batches, seen = 0, 0.0, 0, 0
    try:
        # a short test split is passed over again until warm-up and timed batches are done
        for _ in range(warmup_batches + max_batches):
            for images, _labels in loader:
                if batches >= max_batches:
                    break
                images = images.to(device, non_blocking=True)
                sync()
                start = time.perf_counter()
                model(images)
                sync()
                seen += 1
                if seen <= warmup_batches:
                    continue
                elapsed += time.perf_counter() - start
                images_seen += images.shape[0]
                batches += 1
            if batches >= max_batches or seen == 0:
                break
    finally:
        model.train(was_training)
    if batches == 0:
        return {}
    return {"time/infer_ms": 1000.0 * elapsed / batches, "time/throughput_ips": images_seen / elapsed}


class EpochLog(Callback):
    """One log line per epoch (``epoch 3/30: train/loss 0.41 val/acc 0.83 ... 12.1 s``), for log files and
    terminals without a live progress bar."""

    def __init__(self, keys: tuple[str, ...] = ("train/loss", "val/loss", "val/acc", "val/bal_acc")) -> None:
        self.keys = tuple(keys)
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = trainer.callback_metrics
        shown = " ".join(f"{key} {float(values[key]):.4f}" for key in self.keys if key in values)
        elapsed = time.perf_counter() - self._start
        log.info("epoch %d/%s: %s (%.1f s)", trainer.current_epoch + 1, trainer.max_epochs, shown, elapsed)
