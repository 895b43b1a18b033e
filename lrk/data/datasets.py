"""``torch.utils.data`` Datasets: an in-memory uint8 cache, lazily decoded files, and a transformed view
of a torchvision dataset. Every item is ``(float32 [C, H, W] normalised, int label)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lrk.data.images import decode_file


def strong_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``augment: strong`` before the flips, for grey defect images (no hue or saturation): a random resized crop
    keeping 60-100 % of the area (aspect 0.8-1.25), a small affine (±10°, ±5 % shift) and brightness/contrast
    jitter of ±20 %, on the float image in [0, 1] (torchvision.transforms.v2; the global torch RNG, as the flips)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05)),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    )


def augment_tensor(x: torch.Tensor, rotate: bool) -> torch.Tensor:
    """Random horizontal and vertical flips, and with ``rotate`` a random multiple of 90°: all eight
    symmetries of the square for defect images, which have no canonical orientation."""
    r = torch.rand(3)
    if r[0] < 0.5:
        x = x.flip(-1)
    if r[1] < 0.5:
        x = x.flip(-2)
    if rotate:
        k = int(r[2] * 4)
        if k:
            x = torch.rot90(x, k, dims=(-2, -1))
    return x


class _Normalised(Dataset):
    def __init__(
        self, mean: Sequence[float], std: Sequence[float], augment: bool, rotate: bool, strong: bool = False
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.rotate = rotate
        self.strong: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.strong_enabled = strong and augment

    def _finish(self, image: torch.Tensor) -> torch.Tensor:  # uint8 [C, H, W] -> normalised float32
        x = image.to(torch.float32).div_(255.0)
        if self.strong_enabled:
            if self.strong is None:
                self.strong = strong_transform(x.shape[-1])
            x = self.strong(x).clamp_(0.0, 1.0)
        if self.augment:
            x = augment_tensor(x, self.rotate)
        return x.sub_(self.mean).div_(self.std).contiguous()


class TensorImageDataset(_Normalised):
    """Images held in memory as uint8 ``[N, C, H, W]``: an epoch costs no decoding."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = False,
        rotate: bool = False,
        strong: bool = False,
    ) -> None:
        super().__init__(mean, std, augment, rotate, strong)
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._finish(self.images[i]), self.labels[i]


class FileImageDataset(_Normalised):
    """Image files decoded on access (``cache: false`` or a collection too large to cache), in the DataLoader's
    workers; the same decode, resize, normalisation and augmentation as :class:`TensorImageDataset`, so both
    give the same batches for the same seed."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = False,
        rotate: bool = False,
        strong: bool = False,
    ) -> None:
        super().__init__(mean, std, augment, rotate, strong)
        assert len(paths) == len(labels)
        # one numpy string array, not a list of str objects: DataLoader workers read it without copy-on-write
        self.paths = np.asarray([str(p) for p in paths], dtype=np.str_)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, i: int) -> torch.Tensor:
        """The decoded uint8 image ``[C, S, S]`` (no augmentation, no normalisation)."""
        return torch.from_numpy(decode_file(str(self.paths[i]), self.size, self.channels))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._finish(self.raw(i)), self.labels[i]


class TransformSubset(Dataset):
    """``indices`` of a torchvision dataset (built without a transform), each item passed through
    ``transform``; the label comes from ``labels`` (no second read)."""

    def __init__(
        self, base: Any, indices: np.ndarray, labels: np.ndarray, transform: Callable[[Any], torch.Tensor]
    ) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels)[self.indices], dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.base[int(self.indices[i])]
        return self.transform(image), self.labels[i]
