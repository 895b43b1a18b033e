"""data.augment: strong (random resized crop, small affine, brightness/contrast jitter before the flips)."""

from __future__ import annotations

import pytest
import torch

from lrk.data import build_datamodule
from lrk.data.datasets import TensorImageDataset, strong_transform
from lrk.errors import LrkConfigError


def synthetic(**overrides):
    cfg = {"name": "synthetic", "num_samples": 64, "image_size": 16, "batch_size": 8, "seed": 0, **overrides}
    dm = build_datamodule(cfg)
    dm.prepare()
    return dm


def test_strong_changes_train_images_only_and_keeps_their_shape_and_range():
    dm = synthetic(augment="strong")
    train, val = dm._ready().datasets["train"], dm._ready().datasets["val"]
    assert train.strong_enabled and not val.strong_enabled
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(1)
    b = train[0][0]
    assert a.shape == b.shape == (dm.in_chans, 16, 16) and not torch.equal(a, b)
    assert torch.equal(val[0][0], val[0][0])


def test_strong_transform_is_the_documented_torchvision_pipeline():
    """With the same RNG state, the dataset's strong path equals torchvision's transforms applied by hand, then
    the flips and the normalisation."""
    from torchvision.transforms import v2

    from lrk.data.datasets import augment_tensor

    image = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8)
    ds = TensorImageDataset(
        image, torch.zeros(1).numpy(), [0.5], [0.25], augment=True, rotate=True, strong=True
    )
    torch.manual_seed(3)
    got = ds[0][0]
    torch.manual_seed(3)
    x = image[0].float() / 255.0
    x = v2.RandomResizedCrop(16, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)(x)
    x = v2.RandomAffine(degrees=10, translate=(0.05, 0.05))(x)
    x = v2.ColorJitter(brightness=0.2, contrast=0.2)(x).clamp(0, 1)
    expected = (augment_tensor(x, True) - 0.5) / 0.25
    torch.testing.assert_close(got, expected)
    assert callable(strong_transform(16))


@pytest.mark.parametrize("value", ["heavy", 2])
def test_bad_augment_value_names_the_valid_ones(value):
    with pytest.raises(
        LrkConfigError, match=r"data.augment=.* is invalid: valid values: true, false, strong"
    ):
        synthetic(augment=value)
