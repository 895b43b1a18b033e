"""Lightning DDP for lrk runs: which process is rank zero, the device checks, the DDP strategy, the cross-rank check
of the compressed model.

``trainer=ddp`` (GPUs, nccl) and ``trainer=ddp_cpu`` (2 CPU processes, gloo) run one process per device. Lightning's
subprocess launcher starts ranks 1.. at the first ``trainer.fit`` by re-running the command line (with the same run
dir), so every rank builds the data, the model and its decomposition itself, from the same seed and the same
calibration batches. :class:`RankConsistency` proves, at the start of every fit, that every rank holds the same
model: the same modules, names and shapes (else the fit stops with an error naming the ranks) and the same values
(the largest difference to rank zero's is measured and logged, then rank zero's values are copied in, as DDP's own
broadcast at wrapping does for parameters and buffers). Recomputing on every rank rather than compressing once and
broadcasting: rank zero compresses before ranks 1.. exist (they start at the first fit), and a method's non-tensor
state (its report, chosen ranks in the shapes) must exist on every rank anyway; the check turns "identical by
construction" into a measured fact.

Rank zero alone writes summary.json, the CSV tables and the W&B tables (:func:`is_global_zero`); Lightning's loggers
and checkpoint writes are rank-zero already. A rank that dies ends the run: :class:`DDPStrategy`'s launcher watches
ranks 1.. from rank zero and, when one exits with an error, calls the hooks of :func:`on_rank_death` (lrk.train
writes summary.json as failed) before it stops every process; a rank stuck in a collective gives up after the
process group's ``timeout``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy as _LightningDDP
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrk.config import strategy_name
from lrk.errors import LrkConfigError
from lrk.layers.attention.distributed import group_ready, rank_of

log = logging.getLogger(__name__)

#: seconds a collective waits for a missing rank before it fails (trainer.strategy.timeout overrides it)
DEFAULT_TIMEOUT_S = 1800.0

_DEATH_HOOKS: list[Callable[[str], None]] = []
#: the ranks this process started (their observer, processes and the environment variables set for them)
_LAUNCHED: dict[str, Any] = {}
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


# --- ranks ---------------------------------------------------------------------------------------------------
def global_rank() -> int:
    """This process's global rank: the process group's when one is initialised, else Lightning's (read from the
    launcher's environment variables ``RANK`` / ``LOCAL_RANK`` / ``SLURM_PROCID``; 0 outside DDP)."""
    if group_ready():
        return rank_of()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_global_zero() -> bool:
    """True in the process that writes the run's files (rank zero; the only process outside DDP)."""
    return global_rank() == 0


@contextmanager
def on_rank_death(hook: Callable[[str], None]) -> Iterator[None]:
    """Inside the block, ``hook(message)`` is called in rank zero when another rank exits with an error, just
    before :class:`DDPStrategy` stops all processes (the message names the rank and its exit code)."""
    _DEATH_HOOKS.append(hook)
    try:
        yield
    finally:
        _DEATH_HOOKS.remove(hook)


def dead_rank(wait_s: float = 2.0) -> str | None:
    """In the process that started DDP ranks: a message naming the first rank that exited with an error (waiting
    up to ``wait_s`` for one to exit: rank zero's collective may fail just before the dead rank's exit is seen), or
    None when every rank is alive or ended well."""
    procs = _LAUNCHED.get("procs") or []
    deadline = time.monotonic() + wait_s
    while procs:
        for rank, proc in enumerate(procs, start=1):
            code = proc.poll()
            if code:
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                return f"DDP rank {rank} (pid {proc.pid}) died ({how})"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
    return None


def end_of_run(wait_s: float = 60.0) -> None:
    """In a process that started DDP ranks (:class:`DDPStrategy`): wait up to ``wait_s`` for them to exit (kill
    them after), destroy the process group and drop the launcher's environment variables, so that the next run in
    this process (the next trial of an in-process sweep) starts its own ranks. Nothing elsewhere."""
    if not _LAUNCHED:
        return
    observer, procs, env = _LAUNCHED.pop("observer"), _LAUNCHED.pop("procs"), _LAUNCHED.pop("env")
    observer.stopped = True
    deadline = time.monotonic() + wait_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(
                "DDP rank (pid %d) still running %.0f s after the run ended: killed", proc.pid, wait_s
            )
            proc.kill()
            proc.wait()
    if group_ready():
        torch.distributed.destroy_process_group()
    for key in _LAUNCH_ENV:
        if key in env:
            os.environ[key] = env[key]
        else:
            os.environ.pop(key, None)
    rank_zero_only.rank = 0


# --- bad input -----------------------------------------------------------------------------------------------
def check_devices(trainer: DictConfig | dict[str, Any]) -> None:
    """``trainer.devices`` that this machine has, and CUDA for ``accelerator: gpu``; one :class:`LrkConfigError`
    naming the value and what is available, before anything trains."""
    accelerator = str(trainer.get("accelerator", "auto") or "auto").lower()
    devices = trainer.get("devices", "auto")
    if OmegaConf.is_config(devices):
        devices = OmegaConf.to_container(devices)
    strategy = strategy_name(trainer)
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            what = f"trainer.strategy={strategy} with " if "ddp" in strategy.lower() else ""
            raise LrkConfigError(
                f"{what}trainer.accelerator={accelerator} needs a CUDA device and this machine has none: use "
                "trainer=ddp_cpu (or trainer=cpu), or trainer.accelerator=cpu"
            )
        name, unit = "GPUs", "CUDA devices"
    elif accelerator == "cpu":
        available, name, unit = os.cpu_count() or 1, "CPU cores", "processes"
    else:  # auto, mps, tpu: Lightning's own checks
        return
    if isinstance(devices, bool):
        raise LrkConfigError(f"trainer.devices={devices} is invalid: give a count (1..{available}) or -1")
    if isinstance(devices, int) or (isinstance(devices, str) and devices.strip().lstrip("-").isdigit()):
        count = int(devices)
        if count == -1 or (count == 0 and accelerator != "cpu"):
            return
        if count < 1 or count > available:
            raise LrkConfigError(
                f"trainer.devices={count} is invalid: this machine has {available} {name}, so at most "
                f"{available} {unit} (or -1 for all)"
            )
    elif isinstance(devices, list) and accelerator != "cpu":
        wrong = [d for d in devices if not isinstance(d, int) or not 0 <= d < available]
        if wrong:
            raise LrkConfigError(
                f"trainer.devices={devices} is invalid: device indices {wrong} do not exist; this machine has "
                f"{available} {name} (indices 0..{available - 1})"
            )


# --- the strategy --------------------------------------------------------------------------------------------
class DDPStrategy(_LightningDDP):
    """Lightning's DDP with a process-group ``timeout`` in seconds (a collective waiting for a dead rank fails
    after it instead of hanging), ``sync_batchnorm`` dropped on the CPU (torch's SyncBatchNorm is CUDA-only), and a
    launcher that reports a dead rank (:func:`on_rank_death`) and starts the
    ranks of a sweep's job as single runs of that job (Lightning's own re-runs the whole ``-m`` command line)."""

    def __init__(self, timeout: float | timedelta | None = DEFAULT_TIMEOUT_S, **kwargs: Any) -> None:
        if timeout is not None and not isinstance(timeout, timedelta):
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
                raise LrkConfigError(f"trainer.strategy.timeout={timeout!r} is invalid: give seconds > 0")
            timeout = timedelta(seconds=float(timeout))
        super().__init__(timeout=timeout, **kwargs)

    def setup(self, trainer: L.Trainer) -> None:
        if self._layer_sync is not None and self.root_device.type == "cpu":
            # torch's SyncBatchNorm runs on CUDA only: on the CPU every rank keeps its own BatchNorm statistics
            if trainer.is_global_zero:
                log.info(
                    "trainer.sync_batchnorm is off on the CPU: each rank normalises with its own batch statistics"
                )
            self._layer_sync = None
        super().setup(trainer)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _Launcher(self.cluster_environment, self.num_processes, self.num_nodes)


class _Launcher(_SubprocessScriptLauncher):
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if self.cluster_environment.creates_processes_externally or self.procs:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        # Lightning's launch with lrk's observer of the child processes
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        before = {key: os.environ[key] for key in _LAUNCH_ENV if key in os.environ}
        self._call_children_scripts()
        observer = _Observer(self.procs)
        observer.start()
        _LAUNCHED.update(observer=observer, procs=self.procs, env=before)
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        command = _sweep_job_command()
        if command is None:
            super()._call_children_scripts()
            return
        # a job of a sweep (-m): ranks 1.. run this one job, in its run dir, as single runs
        env = self.cluster_environment
        os.environ.update(
            MASTER_ADDR=env.main_address,
            MASTER_PORT=str(env.main_port),
            NODE_RANK=str(env.node_rank()),
            LOCAL_RANK=str(env.local_rank()),
            WORLD_SIZE=str(self.num_processes * self.num_nodes),
        )
        self.procs = []
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            args = [*command, f"hydra.job.name=train_ddp_process_{local_rank}"]
            self.procs.append(subprocess.Popen(args, env=child_env, cwd=_original_cwd()))


def _original_cwd() -> str | None:
    try:
        from hydra.utils import get_original_cwd

        return get_original_cwd()
    except Exception:  # Hydra not initialised
        return None


def _sweep_job_command() -> list[str] | None:
    """The command line that runs the current Hydra multirun job alone (its overrides, its run dir), or None
    outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except Exception:  # no Hydra
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is None:
        from hydra.utils import to_absolute_path

        head = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        head = [sys.executable, "-m", spec.name]
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    run_dir = hydra_cfg.runtime.output_dir
    return [*head, *overrides, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


class _Observer(threading.Thread):
    """Polls ranks 1.. from rank zero; when one exits with an error: the :func:`on_rank_death` hooks, then every
    process is killed (a rank stuck in a collective ignores SIGTERM), as Lightning's observer does."""

    def __init__(self, procs: list[subprocess.Popen], period_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="lrk-rank-observer")
        self.procs = procs
        self.period_s = period_s
        self.stopped = False  # set by end_of_run: the run is over, its ranks end (or are ended) on purpose

    def run(self) -> None:
        while not self.stopped:
            time.sleep(self.period_s)
            if self.stopped:
                return
            codes = [proc.poll() for proc in self.procs]
            if all(code == 0 for code in codes):
                return
            dead = [(rank, code) for rank, code in enumerate(codes, start=1) if code]
            if dead:
                self._stop(*dead[0])
                return

    def _stop(self, rank: int, code: int) -> None:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        message = (
            f"DDP rank {rank} (pid {self.procs[rank - 1].pid}) died ({how}): the run was stopped on all ranks"
        )
        log.error("%s", message)
        for hook in list(_DEATH_HOOKS):
            try:
                hook(message)
            except Exception as exc:  # never keep the processes alive over a hook
                log.error("on_rank_death hook failed: %s", exc)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        os.kill(os.getpid(), signal.SIGKILL)


# --- the same model on every rank ----------------------------------------------------------------------------
def structure_fingerprint(model: nn.Module) -> str:
    """sha256 of the module tree: every module's name and class, every parameter's and buffer's name, shape and
    dtype (what must be equal on every rank for DDP to run the same model)."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
    for kind, tensors in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, tensor in tensors:
            digest.update(f"{kind}:{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()


def align_with_rank_zero(model: nn.Module, device: torch.device | None = None) -> float:
    """Collective: the largest ``|x - x_rank0|`` over every parameter and buffer of ``model`` on any rank
    (0.0: identical), after which every rank holds rank zero's values. The structures must already agree."""
    dist = torch.distributed
    largest = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
            mine = tensor.detach().to(device) if device is not None else tensor.detach().clone()
            theirs = mine.clone()
            dist.broadcast(theirs, src=0)
            if tensor.is_floating_point() or tensor.is_complex():
                diff = (mine.double() - theirs.double()).abs().max() if mine.numel() else mine.new_zeros(())
            else:
                diff = (mine != theirs).any().double()
            largest = torch.maximum(largest, diff.detach().cpu().double())
            tensor.copy_(theirs.to(tensor.device))
    total = largest.to(device) if device is not None else largest
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return float(total.item())


class RankConsistency(Callback):
    """At the start of every fit or test on several processes: every rank must hold the same model (the same
    :func:`structure_fingerprint`, else a RuntimeError naming the ranks that differ), and the values are compared
    with rank zero's and aligned to them (:func:`align_with_rank_zero`). ``report``: ``world_size`` and
    ``max_abs_diff`` by stage (``{"fit": 0.0, "test": 0.0}``: the largest difference found, 0.0 when the ranks
    computed bit-identical models)."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        model = getattr(pl_module, "model", pl_module)
        fingerprints: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(fingerprints, structure_fingerprint(model))
        differ = [rank for rank, fp in enumerate(fingerprints) if fp != fingerprints[0]]
        if differ:
            raise RuntimeError(
                f"DDP ranks {differ} built another model than rank 0 (other modules or shapes): the decomposition "
                "must come out the same on every rank (same seed, data and decomp config)"
            )
        backend = torch.distributed.get_backend()
        device = trainer.strategy.root_device if backend == "nccl" else None
        diff = align_with_rank_zero(model, device)
        self.report.setdefault("world_size", trainer.world_size)
        self.report.setdefault("max_abs_diff", {})[str(getattr(stage, "value", stage))] = diff
        if trainer.is_global_zero:
            log.info(
                "DDP: the model is the same on all %d ranks (max |diff| to rank 0: %.3g)",
                trainer.world_size,
                diff,
            )
