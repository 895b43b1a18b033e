"""lrk: low-rank methods for vision models, compared on one grid of dataset x backbone x decomposition.

``lrk.load_model(run_dir)`` gives a run's (compressed) model back, ready for inference
(:func:`lrk.pipeline.structure.load_model`); it is imported on first use, so ``import lrk`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]

if TYPE_CHECKING:
    from lrk.pipeline.structure import load_model


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from lrk.pipeline.structure import load_model

        return load_model
    raise AttributeError(f"module 'lrk' has no attribute {name!r}")
