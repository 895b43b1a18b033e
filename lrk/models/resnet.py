"""ResNet-18/50 (He et al. 2016) from torchvision, built with ``weights=None`` (nothing is fetched),
with the input channels, the classes and, for small images, the stem adapted.

``small_input`` (``auto`` | true | false): the CIFAR-style stem of He et al. 2016, Sec. 4.2 (a 3x3
stride-1 ``conv1`` and no max-pool) instead of the 7x7 stride-2 conv + max-pool that shrinks the
image 4x before the first stage; ``auto`` uses it for ``image_size < 64``, so that 8x8 digits and
32x32 CIFAR images do not collapse to 1x1 feature maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from lrk.checks import positive_int
from lrk.errors import LrkConfigError
from lrk.models.registry import register_backbone

#: below this image side, ``small_input: auto`` uses the CIFAR-style stem
SMALL_INPUT_BELOW = 64


def _uses_small_stem(small_input: bool | str, image_size: int) -> bool:
    if small_input == "auto":
        return image_size < SMALL_INPUT_BELOW
    if isinstance(small_input, bool):
        return small_input
    raise LrkConfigError(f"backbone.small_input={small_input!r} is invalid: it must be auto, true or false")


def _build_resnet(
    factory: Callable[..., torchvision.models.ResNet],
    num_classes: int,
    in_chans: int,
    image_size: int,
    small_input: bool | str,
) -> torchvision.models.ResNet:
    positive_int("num_classes", num_classes)
    positive_int("in_chans", in_chans)
    positive_int("image_size", image_size)
    small = _uses_small_stem(small_input, image_size)
    model = factory(weights=None, num_classes=num_classes)
    if small:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # torchvision's own initialisation of convolutions (kaiming normal, fan_out)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.head_names = ("fc",)  # the classifier, for checkpoint loading across num_classes
    model.small_input = small
    return model


@register_backbone("resnet18")
def resnet18(
    num_classes: int, in_chans: int, image_size: int, small_input: bool | str = "auto"
) -> torchvision.models.ResNet:
    """torchvision ResNet-18 (11.7 M parameters at 3 channels / 1000 classes), randomly initialised."""
    return _build_resnet(torchvision.models.resnet18, num_classes, in_chans, image_size, small_input)


@register_backbone("resnet50")
def resnet50(
    num_classes: int, in_chans: int, image_size: int, small_input: bool | str = "auto"
) -> torchvision.models.ResNet:
    """torchvision ResNet-50 (25.6 M parameters at 3 channels / 1000 classes), randomly initialised."""
    return _build_resnet(torchvision.models.resnet50, num_classes, in_chans, image_size, small_input)
