"""Small validators shared by the backbones: each raises LrkConfigError naming the key."""

from __future__ import annotations

from typing import Any

from lrk.errors import LrkConfigError


def positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LrkConfigError(f"{key}={value!r} is invalid: it must be a positive integer")
    return value


def positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise LrkConfigError(f"{key}={value!r} is invalid: it must be a positive number")
    return float(value)


def probability(key: str, value: Any) -> float:
    """A drop rate: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise LrkConfigError(f"{key}={value!r} is invalid: it must be a number in [0, 1)")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise LrkConfigError(f"{key}={value!r} is invalid: it must be true or false")
    return value
