"""Run statistics of the attention modules (they time themselves with :func:`lrk.measure.clock`).

Statistics that a forward has on the device (a rank vector, a retained energy) may be accumulated there as 0-d
tensors, so that the forward does not wait for the device to hand them to the host: :func:`as_float` reads such a
field (one synchronisation when the metrics are read, not one per forward), and :class:`ModuleStats` pickles (and
deep-copies: checkpoint skeletons) plain numbers in their place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch


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


def as_float(value: float | torch.Tensor) -> float:
    """A statistic as a Python float (a device tensor is read here: one host synchronisation)."""
    return float(value)


def relative_error(diff_sq: float, ref_sq: float) -> float:
    """sqrt(diff_sq / ref_sq): a relative Frobenius error from its squared sums (0 when both are 0, inf when only
    the reference is 0)."""
    if ref_sq > 0:
        return math.sqrt(diff_sq / ref_sq)
    return 0.0 if diff_sq == 0 else math.inf
