"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes, offline)."""

from __future__ import annotations

from typing import Any, ClassVar

from lrk.data.datamodule import IN_MEMORY_DEFAULTS, Index, InMemoryDataModule
from lrk.data.registry import register_dataset
from lrk.data.sources import load_digits_uint8, resize_uint8
from lrk.errors import LrkConfigError


@register_dataset("digits")
class DigitsDataModule(InMemoryDataModule):
    """Native size 8; other ``image_size`` values resize (antialiased bilinear). No augmentation: a flipped
    or rotated digit is another digit or none."""

    DEFAULTS: ClassVar[dict[str, Any]] = {**IN_MEMORY_DEFAULTS, "image_size": 8, "augment": False}
    rotate: ClassVar[bool] = False

    def _check_options(self) -> None:
        super()._check_options()
        if self.augment:
            raise LrkConfigError(
                "data.augment=true is not supported for digits: flips and rotations change what a digit means; "
                "set data.augment=false"
            )

    def _index(self) -> Index:
        images, labels = load_digits_uint8()
        return Index(labels, [str(d) for d in range(10)], images=resize_uint8(images, self.image_size))
