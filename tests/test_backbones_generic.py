"""The tests every registered backbone gets, parametrised over ``sorted(BACKBONES)`` (no hand-kept list): it builds
from its defaults at a small image size for grey and colour images, a forward gives finite [B, num_classes]
logits (in eval and in train mode), and an unknown option is one LrkConfigError that names it."""

from __future__ import annotations

import pytest
import torch

from lrk.errors import LrkConfigError
from lrk.models import BACKBONES, build_backbone

IMAGE_SIZE, NUM_CLASSES, BATCH = 16, 3, 2


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_builds_and_classifies_small_images(name: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = build_backbone({"name": name}, num_classes=NUM_CLASSES, in_chans=in_chans, image_size=IMAGE_SIZE)
    x = torch.randn(BATCH, in_chans, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.eval()(x)
        train_out = model.train()(x)
    for logits in (out, train_out):
        assert logits.shape == (BATCH, NUM_CLASSES) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    assert out.std() > 0  # not a constant output
    wrong = torch.randn(BATCH, in_chans + 1, IMAGE_SIZE, IMAGE_SIZE)  # built for in_chans, not another count
    with torch.no_grad(), pytest.raises(RuntimeError, match=rf"{in_chans} channels"):
        model.eval()(wrong)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_an_unknown_option_is_one_error_naming_it(name: str) -> None:
    with pytest.raises(LrkConfigError, match=r"backbone\.no_such_option\b.*valid options") as info:
        build_backbone(
            {"name": name, "no_such_option": 1}, num_classes=NUM_CLASSES, in_chans=1, image_size=IMAGE_SIZE
        )
    assert str(info.value).count("no_such_option") == 1
