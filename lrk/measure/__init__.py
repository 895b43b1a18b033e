"""Measurement: the one place for parameter counts, FLOPs, model size, clocks, latency and memory."""
