"""Latency: candidates timed alternately after warm-up, and the inference latency / throughput of a loader.

On a shared machine the load changes from second to second. :func:`alternating_latency` runs the candidates
in turn, round after round (A B, B A, A B, ...: the order rotates each round so that none always runs first,
right after the other's caches and allocations), so that each ratio compares the same stretch of load.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrk.measure.clock import clock, needs_sync

__all__ = [
    "LatencyStats",
    "alternating_latency",
    "measure_inference",
    "paired_min",
    "paired_ratio",
    "ratio",
    "time_call",
]


@dataclass(frozen=True)
class LatencyStats:
    """Seconds of each timed run of one candidate, in round order (``times[i]`` is round ``i``)."""

    times: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def min_s(self) -> float:
        return min(self.times)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.times)


def time_call(fn: Callable[[], Any], sync: bool = False) -> float:
    """Seconds of one call of ``fn`` (synchronising CUDA before and after when ``sync``)."""
    start = clock(sync)
    fn()
    return clock(sync) - start


def alternating_latency(
    fns: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1, sync: bool = False
) -> dict[str, LatencyStats]:
    """Time every candidate ``repeats`` times, alternating: each round runs all candidates once, the order
    rotated by one each round; ``warmup`` untimed rounds first. ``sync``: synchronise CUDA around each call."""
    if not fns:
        raise ValueError("alternating_latency needs at least one candidate")
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"alternating_latency(repeats={repeats}, warmup={warmup}): need repeats >= 1, warmup >= 0"
        )
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = time_call(fns[name], sync)
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: LatencyStats(tuple(values)) for name, values in times.items()}


def ratio(stats: Mapping[str, LatencyStats], baseline: str, statistic: str = "median_s") -> dict[str, float]:
    """Each candidate's ``statistic`` (``median_s``, ``min_s`` or ``mean_s``) over the baseline's."""
    base = getattr(stats[baseline], statistic)
    return {name: getattr(s, statistic) / base for name, s in stats.items()}


def paired_ratio(stats: Mapping[str, LatencyStats], name: str, baseline: str) -> float:
    """Median over rounds of ``name``'s time over the baseline's time of the same round (a paired design)."""
    pairs = zip(stats[name].times, stats[baseline].times, strict=True)
    return statistics.median(a / b for a, b in pairs)


def paired_min(
    a: Callable[[], Any], b: Callable[[], Any], repeats: int, warmup: int = 1, sync: bool = False
) -> tuple[float, float]:
    """Minimum seconds of ``a`` and of ``b`` over ``repeats`` alternating rounds (:func:`alternating_latency`)."""
    stats = alternating_latency({"a": a, "b": b}, repeats, warmup, sync)
    return stats["a"].min_s, stats["b"].min_s


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def measure_inference(
    model: nn.Module, loader: Iterable[Any], max_batches: int = 20, warmup_batches: int = 2
) -> dict[str, float]:
    """``time/infer_ms`` (mean forward latency of one batch) and ``time/throughput_ips`` (images/s) over the
    loader's first ``max_batches`` batches after ``warmup_batches`` untimed ones, in eval mode (restored after).
    A loader shorter than that is passed over again. Batches are ``(images, labels, ...)`` or image tensors;
    empty dict when the loader yields nothing."""
    device = _device(model)
    sync = needs_sync(device)
    was_training = model.training
    model.eval()
    images_seen, elapsed, batches, seen = 0, 0.0, 0, 0
    try:
        for _ in range(warmup_batches + max_batches):
            for batch in loader:
                if batches >= max_batches:
                    break
                images = batch[0] if isinstance(batch, list | tuple) else batch
                images = images.to(device, non_blocking=True)
                seconds = time_call(lambda images=images: model(images), sync)
                seen += 1
                if seen <= warmup_batches:
                    continue
                elapsed += seconds
                images_seen += images.shape[0]
                batches += 1
            if batches >= max_batches or seen == 0:
                break
    finally:
        model.train(was_training)
    if batches == 0 or elapsed <= 0:
        return {}
    return {"time/infer_ms": 1000.0 * elapsed / batches, "time/throughput_ips": images_seen / elapsed}
