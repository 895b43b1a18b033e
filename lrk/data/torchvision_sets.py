"""Standard benchmarks through torchvision, loaded lazily with per-sample transforms: ``cifar10``,
``cifar100``, ``svhn``, ``food101`` and ``imagenet`` (an ``ImageFolder`` over ``root/train`` and ``root/val``).

The official train split is split into train/val (stratified, seeded); the official test split (ImageNet:
val) is the test split. Nothing is downloaded unless ``download: true``.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision import datasets as tvd
from torchvision.transforms import v2

from lrk.data.datamodule import COMMON_DEFAULTS, LrkDataModule, Prepared
from lrk.data.datasets import TransformSubset
from lrk.data.registry import register_dataset
from lrk.data.splits import RunningStats, stratified_split, stratified_subsample
from lrk.errors import LrkConfigError

_TV_ERRORS = (RuntimeError, FileNotFoundError, OSError)


class TorchvisionDataModule(LrkDataModule):
    """Common part: open both official splits, split train into train/val, transforms, normalisation."""

    DEFAULTS: ClassVar[dict[str, Any]] = {**COMMON_DEFAULTS, "image_size": 32, "download": False}
    title: ClassVar[str] = ""  # e.g. "CIFAR-10"
    expected: ClassVar[str] = ""  # what must be under root, e.g. "the 'cifar-10-batches-py' folder"
    native_size: ClassVar[int | None] = 32  # small images: pad-and-crop; None: resize + centre crop
    hflip: ClassVar[bool] = True

    def _check_options(self) -> None:
        if self.augment_strong:
            raise LrkConfigError(
                f"data.augment=strong is invalid for data={self.name}: it is for image folders, lists and elpv; "
                "torchvision datasets have their own train transforms: valid values here: true, false"
            )
        self.download = bool(self.opts.flag("download"))
        root = self.opts.string("root", optional=True)
        if root is None:
            raise LrkConfigError(f"data.root is not set: it must be the folder that holds {self.expected}")
        self.root = Path(root).expanduser()

    @abstractmethod
    def _open(self, split: str, download: bool) -> tuple[Any, np.ndarray, list[str]]:
        """``(dataset returning (PIL image, label), labels, class names)`` of the official ``train``/``test``
        split; may raise torchvision's errors."""

    def _missing(self, err: Exception) -> LrkConfigError:
        return LrkConfigError(
            f"data.root={self.root} has no {self.title} (expected {self.expected} there): set data.download=true "
            f"on a machine with network access, or copy {self.expected} there [torchvision: {err}]"
        )

    def _open_checked(self, split: str) -> tuple[Any, np.ndarray, list[str]]:
        try:
            base, labels, names = self._open(split, False)
        except _TV_ERRORS as err:
            raise self._missing(err) from err
        return base, np.asarray(labels, dtype=np.int64), list(names)

    def _download(self) -> None:
        if not self.download:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for split in ("train", "test"):
                self._open(split, True)
        except Exception as err:  # network errors come in many types
            raise LrkConfigError(f"downloading {self.title} to data.root={self.root} failed: {err}") from err

    def _transforms(self, mean: list[float] | None, std: list[float] | None) -> tuple[v2.Compose, v2.Compose]:
        """(train, eval) transforms; without mean/std: eval transform without normalisation (for stats)."""
        s = self.image_size
        tail: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if mean is not None and std is not None:
            tail.append(v2.Normalize(mean, std))
        if self.native_size is not None:
            resize = [] if s == self.native_size else [v2.Resize((s, s), antialias=True)]
            evaluate = [*resize]
            train = [*resize, v2.RandomCrop(s, padding=max(1, s // 8), padding_mode="reflect")]
        else:
            evaluate = [v2.Resize(round(s / 0.875), antialias=True), v2.CenterCrop(s)]
            train = [v2.RandomResizedCrop(s, antialias=True)]
        if self.hflip:
            train.append(v2.RandomHorizontalFlip())
        if not self.augment:
            train = evaluate
        return v2.Compose(train + tail), v2.Compose(evaluate + tail)

    def _measure(self, base: Any, indices: np.ndarray) -> tuple[list[float], list[float]]:
        """Per-channel mean/std of up to ``norm_samples`` train images (seeded pick, eval transform)."""
        _, plain = self._transforms(None, None)
        pick = np.random.default_rng(self.seed).permutation(indices)[: self.norm_samples]
        acc = RunningStats()
        for i in pick:
            acc.add(plain(base[int(i)][0]))
        return acc.result()

    def _prepare(self) -> Prepared:
        self._download()
        train_base, train_labels, names = self._open_checked("train")
        test_base, test_labels, _ = self._open_checked("test")
        pool = (
            stratified_subsample(train_labels, self.limit, self.seed)
            if self.limit
            else np.arange(len(train_labels))
        )
        test_idx = (
            stratified_subsample(test_labels, self.limit, self.seed)
            if self.limit
            else np.arange(len(test_labels))
        )
        split = stratified_split(
            train_labels[pool], names, val_fraction=self.val_fraction, test_fraction=None, seed=self.seed
        )
        idx = {"train": pool[split["train"]], "val": pool[split["val"]]}
        if self._mean is not None and self._std is not None:
            mean, std = self._mean, self._std
        else:
            mean, std = self._measure(train_base, idx["train"])
        train_tf, eval_tf = self._transforms(mean, std)
        return Prepared(
            class_names=names,
            datasets={
                "train": TransformSubset(train_base, idx["train"], train_labels, train_tf),
                "val": TransformSubset(train_base, idx["val"], train_labels, eval_tf),
                "test": TransformSubset(test_base, test_idx, test_labels, eval_tf),
            },
            calibration=TransformSubset(train_base, idx["train"], train_labels, eval_tf),
            labels={
                "train": train_labels[idx["train"]],
                "val": train_labels[idx["val"]],
                "test": test_labels[test_idx],
            },
            mean=list(mean),
            std=list(std),
            stats={"root": str(self.root)},
        )


@register_dataset("cifar10")
class Cifar10DataModule(TorchvisionDataModule):
    title = "CIFAR-10"
    expected = "the 'cifar-10-batches-py' folder"

    def _open(self, split: str, download: bool) -> tuple[Any, np.ndarray, list[str]]:
        ds = tvd.CIFAR10(str(self.root), train=split == "train", download=download)
        return ds, np.asarray(ds.targets), list(ds.classes)


@register_dataset("cifar100")
class Cifar100DataModule(TorchvisionDataModule):
    title = "CIFAR-100"
    expected = "the 'cifar-100-python' folder"

    def _open(self, split: str, download: bool) -> tuple[Any, np.ndarray, list[str]]:
        ds = tvd.CIFAR100(str(self.root), train=split == "train", download=download)
        return ds, np.asarray(ds.targets), list(ds.classes)


@register_dataset("svhn")
class SvhnDataModule(TorchvisionDataModule):
    """SVHN cropped digits (train_32x32.mat / test_32x32.mat); no flips (digits)."""

    title = "SVHN"
    expected = "the files 'train_32x32.mat' and 'test_32x32.mat'"
    hflip = False

    def _open(self, split: str, download: bool) -> tuple[Any, np.ndarray, list[str]]:
        ds = tvd.SVHN(str(self.root), split=split, download=download)
        return ds, np.asarray(ds.labels), [str(d) for d in range(10)]


@register_dataset("food101")
class Food101DataModule(TorchvisionDataModule):
    DEFAULTS: ClassVar[dict[str, Any]] = {**TorchvisionDataModule.DEFAULTS, "image_size": 224}
    title = "Food-101"
    expected = "the 'food-101' folder (with images/ and meta/)"
    native_size = None

    def _open(self, split: str, download: bool) -> tuple[Any, np.ndarray, list[str]]:
        ds = tvd.Food101(str(self.root), split=split, download=download)
        return ds, np.asarray(ds._labels), list(ds.classes)


@register_dataset("imagenet")
class ImageNetDataModule(TorchvisionDataModule):
    """``ImageFolder`` over ``root/train/<class>/*`` (train + val split from it) and ``root/val/<class>/*``
    (the test split): ILSVRC2012 as usually laid out on disk, or any tree of that shape."""

    DEFAULTS: ClassVar[dict[str, Any]] = {**TorchvisionDataModule.DEFAULTS, "image_size": 224}
    title = "ImageNet"
    expected = "'train/<class>/<image>' and 'val/<class>/<image>' folders"
    native_size = None

    def _check_options(self) -> None:
        super()._check_options()
        if self.download:
            raise LrkConfigError(
                "data.download=true is invalid for imagenet: ILSVRC2012 cannot be downloaded automatically; "
                "get it from image-net.org and lay it out as root/train/<class>/ and root/val/<class>/"
            )

    def _missing(self, err: Exception) -> LrkConfigError:
        return LrkConfigError(
            f"data.root={self.root} has no ImageNet-style tree: expected {self.expected} (ILSVRC2012 comes from "
            f"image-net.org; sort the validation images into class folders) [{err}]"
        )

    def _open(self, split: str, download: bool) -> tuple[Any, np.ndarray, list[str]]:
        folder = self.root / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        ds = tvd.ImageFolder(str(folder))
        if split == "test":
            train_classes = sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir())
            if ds.classes != train_classes:
                only_val = sorted(set(ds.classes) - set(train_classes))
                only_train = sorted(set(train_classes) - set(ds.classes))
                raise LrkConfigError(
                    f"data.root={self.root}: the class folders of val/ and train/ differ "
                    f"(only in val: {only_val[:5]}, only in train: {only_train[:5]}); they must be the same classes"
                )
        return ds, np.asarray(ds.targets), list(ds.classes)
