"""Measurement: the one place for parameter counts, FLOPs, model size, clocks, latency and memory.

Used by callbacks, benchmarks and methods; imports only torch and the standard library (nothing of lrk's
models, methods or Lightning code).
"""

from lrk.measure.clock import ModuleTimer, Stopwatch, clock, needs_sync
from lrk.measure.flops import FACTORIZATION_OPS, FlopCount, FlopCounter, count_flops, flop_formulas
from lrk.measure.latency import (
    LatencyStats,
    alternating_latency,
    measure_inference,
    paired_min,
    paired_ratio,
    ratio,
    time_call,
)
from lrk.measure.memory import peak_memory_mb, profiled_peak_mb, reset_peak_memory
from lrk.measure.params import count_params
from lrk.measure.size import MIB, module_size_mb

__all__ = [
    "FACTORIZATION_OPS",
    "MIB",
    "FlopCount",
    "FlopCounter",
    "LatencyStats",
    "ModuleTimer",
    "Stopwatch",
    "alternating_latency",
    "clock",
    "count_flops",
    "count_params",
    "flop_formulas",
    "measure_inference",
    "module_size_mb",
    "needs_sync",
    "paired_min",
    "paired_ratio",
    "peak_memory_mb",
    "profiled_peak_mb",
    "ratio",
    "reset_peak_memory",
    "time_call",
]
