"""``decomp=none``: the dense baseline; ``apply`` changes nothing and returns an empty report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from torch import nn

from lrk.decomp.base import DecompMethod, register_method
from lrk.decomp.report import DecompReport


@register_method("none")
class NoDecomposition(DecompMethod):
    """No decomposition. Rank-policy keys are ignored (the config may leave them all null)."""

    supported = "nothing (the model stays dense)"
    generic_cases: ClassVar[dict[str, Any]] = {  # tests/test_methods_generic.py
        "exact": {},
        "lossy": None,
        "lossy_reason": "the dense baseline: apply changes nothing, whatever the keys",
        "invalid": [{"no_such_key": 1}, {"stage": "later"}],
    }

    def apply(self, model: nn.Module, calibration_batches: Iterable[Any] | None = None) -> DecompReport:
        """Return an empty report; ``metrics()`` then gives ``time/rr_s`` = 0 and ``decomp/layers`` = 0."""
        del model, calibration_batches
        return DecompReport(self.name, [])
