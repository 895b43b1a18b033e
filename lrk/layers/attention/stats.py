"""Run statistics of the attention modules, and the synchronised clock they time themselves with."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import torch


def clock(sync: bool) -> float:
    """``time.perf_counter()``, after ``torch.cuda.synchronize()`` when ``sync`` (CUDA kernels run asynchronously:
    without it a forward's time would miss the work still queued)."""
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class ModuleStats:
    """Base of the run statistics that a swapped attention module keeps in ``module.stats`` (not in the state
    dict): a dataclass whose fields all have plain defaults, which :meth:`reset` restores."""

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)


def relative_error(diff_sq: float, ref_sq: float) -> float:
    """sqrt(diff_sq / ref_sq): a relative Frobenius error from its squared sums (0 when both are 0, inf when only
    the reference is 0)."""
    if ref_sq > 0:
        return math.sqrt(diff_sq / ref_sq)
    return 0.0 if diff_sq == 0 else math.inf
