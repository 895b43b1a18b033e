"""Run statistics of the attention modules (they time themselves with :func:`lrk.measure.clock`).

Statistics that a forward has on the device (a rank vector, a retained energy) may be accumulated there as 0-d
tensors, so that the forward does not wait for the device to hand them to the host: :func:`as_float` reads such a
field (one synchronisation when the metrics are read, not one per forward), and :class:`ModuleStats` pickles (and
deep-copies: checkpoint skeletons) plain numbers in their place.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch

from lrk.layers.attention.distributed import world_size


@dataclass
class ModuleStats:
    """Base of the run statistics that a swapped attention module keeps in ``module.stats`` (not in the state
    dict): a dataclass whose fields all have plain defaults, which :meth:`reset` restores."""

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def __getstate__(self) -> dict[str, Any]:
        # device tensors (accumulated without a host sync) become plain numbers: a pickled module (a checkpoint's
        # skeleton) must not carry CUDA tensors in its statistics
        return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}


def reduce_op(name: str) -> str:
    """How a statistic combines over DDP ranks, by its field name: ``*_seconds`` -> ``max`` (the ranks run in
    parallel: the slowest rank's wall time), ``*_min`` -> ``min``, ``*_max`` -> ``max``, ``last_*`` -> ``mean``
    (over ranks), any other number (counts, sums) -> ``sum``."""
    if name.endswith(("_seconds", "_max")):
        return "max"
    if name.endswith("_min"):
        return "min"
    if name.startswith("last_"):
        return "mean"
    return "sum"


def reduce_across_ranks(stats: list[ModuleStats]) -> list[ModuleStats]:
    """Collective (every rank calls it with its modules' statistics, in the same module order): copies of
    ``stats`` whose numeric fields are combined over the ranks of the default process group by :func:`reduce_op`;
    a field that is None on a rank (``last_rel_error`` before any forward) is left out of its mean. Without a
    process group of several ranks: ``stats`` themselves."""
    world = world_size()
    if world < 2:
        return stats
    dist = torch.distributed
    entries = [(i, f.name) for i, st in enumerate(stats) for f in fields(st)]
    local = [getattr(stats[i], name) for i, name in entries]
    numeric = [isinstance(v, int | float | torch.Tensor) and not isinstance(v, bool) for v in local]
    values = torch.tensor(
        [float(v) if ok else 0.0 for v, ok in zip(local, numeric, strict=True)], dtype=torch.float64
    )
    present = torch.tensor([1.0 if ok else 0.0 for ok in numeric], dtype=torch.float64)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    gathered = [torch.zeros(2, len(entries), dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.stack([values, present]).to(device))
    table = torch.stack(gathered).cpu()  # [ranks, 2, fields]
    out = [copy.copy(st) for st in stats]
    for k, (i, name) in enumerate(entries):
        mask = table[:, 1, k] > 0
        if not mask.any():
            continue
        column = table[mask, 0, k]
        op = reduce_op(name)
        value = {"sum": column.sum, "max": column.max, "min": column.min, "mean": column.mean}[op]().item()
        setattr(out[i], name, int(value) if isinstance(local[k], int) and op != "mean" else value)
    return out


@contextmanager
def reduced_stats(model: Any) -> Iterator[None]:
    """Inside the block every module of ``model`` with :class:`ModuleStats` shows the statistics of all DDP ranks
    (:func:`reduce_across_ranks`; a collective: call it on every rank); its own are back after the block, so a
    later fit keeps counting from them. Outside DDP: nothing changes."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "stats", None), ModuleStats)]
    own = [m.stats for m in modules]
    for module, reduced in zip(modules, reduce_across_ranks(own), strict=True):
        module.stats = reduced
    try:
        yield
    finally:
        for module, stats in zip(modules, own, strict=True):
            module.stats = stats


def as_float(value: float | torch.Tensor) -> float:
    """A statistic as a Python float (a device tensor is read here: one host synchronisation)."""
    return float(value)


def relative_error(diff_sq: float, ref_sq: float) -> float:
    """sqrt(diff_sq / ref_sq): a relative Frobenius error from its squared sums (0 when both are 0, inf when only
    the reference is 0)."""
    if ref_sq > 0:
        return math.sqrt(diff_sq / ref_sq)
    return 0.0 if diff_sq == 0 else math.inf
