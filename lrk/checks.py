"""Value checks of config and constructor arguments (one copy for the whole package).

YAML and the command line hand over plain Python values; ``true`` is a ``bool``, which Python also counts as an
``int``, so every check here rejects booleans. The ``is_*`` predicates answer; the others raise
:class:`~lrk.errors.LrkConfigError` naming the key.
"""

from __future__ import annotations

import math
from typing import Any

from lrk.errors import LrkConfigError


def is_int(value: Any) -> bool:
    """An integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a boolean (NaN and inf are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_fraction(value: Any) -> bool:
    """A number in (0, 1]: a ratio, or an energy phi (SDRM paper, Eqs. 2-3)."""
    return is_number(value) and 0.0 < float(value) <= 1.0


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
