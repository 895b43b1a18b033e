"""Value predicates of the decomposition config checks (one copy for every method).

YAML and the command line hand over plain Python values; ``true`` is a ``bool``, which Python also counts as an
``int``, so every predicate here rejects booleans.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a boolean (NaN and inf are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_fraction(value: Any) -> bool:
    """A number in (0, 1]: a ratio, or an energy phi (SDRM paper, Eqs. 2-3)."""
    return is_number(value) and 0.0 < float(value) <= 1.0
