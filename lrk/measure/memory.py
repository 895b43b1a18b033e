"""Peak memory: of a device over a fit, and of one function call (torch's profiler)."""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from lrk.measure.size import MIB

__all__ = ["peak_memory_mb", "profiled_peak_mb", "reset_peak_memory"]


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new CUDA peak on ``device`` (nothing on the CPU: a process's peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device | str) -> float:
    """CUDA: max memory allocated on ``device`` since the last :func:`reset_peak_memory`, in MiB. CPU: the
    process's peak resident set size (it includes the Python runtime and cached datasets)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def profiled_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak of the CPU memory timeline of torch's profiler while ``fn`` runs (every tensor allocation minus
    frees, all categories: inputs and parameters included), in MiB; NaN when nothing was recorded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            fn()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "timeline.json"
            prof.export_memory_timeline(str(path), device="cpu")
            _, sizes = json.loads(path.read_text())
    return max(sum(row) for row in sizes) / MIB if sizes else float("nan")
