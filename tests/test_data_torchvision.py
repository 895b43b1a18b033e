"""Torchvision datasets: one clear error when the data is missing; ImageNet and Food-101 on generated trees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_fixtures import data_cfg, write_image

from lrk.data import build_datamodule
from lrk.errors import LrkConfigError

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        (
            "cifar10",
            r"has no CIFAR-10 \(expected the 'cifar-10-batches-py' folder there\): set data.download=true",
        ),
        ("cifar100", r"has no CIFAR-100 \(expected the 'cifar-100-python' folder there\)"),
        ("svhn", r"has no SVHN \(expected the files 'train_32x32.mat' and 'test_32x32.mat' there\)"),
        ("food101", r"has no Food-101 \(expected the 'food-101' folder \(with images/ and meta/\) there\)"),
        (
            "imagenet",
            r"has no ImageNet-style tree: expected 'train/<class>/<image>' and 'val/<class>/<image>'",
        ),
    ],
)
def test_missing_dataset_is_one_clear_error(name: str, hint: str, tmp_path) -> None:
    dm = build_datamodule(data_cfg(name, tmp_path))
    root = tmp_path / name
    with pytest.raises(LrkConfigError, match=f"data.root={root} " + hint):
        dm.prepare()


def test_imagenet_cannot_download() -> None:
    with pytest.raises(LrkConfigError, match=r"data.download=true is invalid for imagenet"):
        build_datamodule(data_cfg("imagenet", download=True))


def _imagenet_tree(root, classes=("ant", "bee", "cat"), n_train=8, n_val=3):
    for c, name in enumerate(classes):
        for i in range(n_train):
            write_image(
                root / "train" / name / f"{name}_{i}.JPEG", "RGB", size=(24, 20), value=60 + 60 * c, seed=i
            )
        for i in range(n_val):
            write_image(
                root / "val" / name / f"v_{name}_{i}.JPEG",
                "RGB",
                size=(20, 24),
                value=60 + 60 * c,
                seed=50 + i,
            )
    return root


def test_imagenet_folder_tree(tmp_path) -> None:
    root = _imagenet_tree(tmp_path / "imagenet")
    dm = build_datamodule(
        data_cfg("imagenet", tmp_path, image_size=16, batch_size=5, val_fraction=0.25, num_workers=0)
    )
    dm.prepare()
    assert dm.class_names == ["ant", "bee", "cat"] and dm.num_classes == 3 and dm.in_chans == 3
    assert dm.split_sizes == {"train": 18, "val": 6, "test": 9}
    assert dm.stats["root"] == str(root)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, _ = next(iter(dm.test_dataloader()))
    assert xt.shape == (5, 3, 16, 16)
    # eval transform is deterministic; class 'cat' (value 180) is brighter than 'ant' (60) after normalising
    test = torch.cat([b for b, _ in dm.test_dataloader()])
    labels = torch.as_tensor(dm.split_labels["test"])
    assert test[labels == 2].mean() > test[labels == 0].mean()
    assert len(dm.calibration_batches(2)) == 2
    torch.testing.assert_close(dm.class_weights, torch.ones(3))


def test_imagenet_tree_errors(tmp_path) -> None:
    root = _imagenet_tree(tmp_path / "imagenet")
    (root / "val" / "dog").mkdir()
    write_image(root / "val" / "dog" / "d.JPEG", "RGB")
    with pytest.raises(
        LrkConfigError, match=r"class folders of val/ and train/ differ \(only in val: \['dog'\]"
    ):
        build_datamodule(data_cfg("imagenet", tmp_path, image_size=8)).prepare()
    (root / "train" / "dog").mkdir()
    with pytest.raises(LrkConfigError, match=r"has no ImageNet-style tree.*dog"):  # an empty class folder
        build_datamodule(data_cfg("imagenet", tmp_path, image_size=8)).prepare()


def test_measured_normalisation(tmp_path) -> None:
    _imagenet_tree(tmp_path / "imagenet")
    dm = build_datamodule(
        data_cfg(
            "imagenet",
            tmp_path,
            image_size=8,
            mean=None,
            std=None,
            augment=False,
            val_fraction=0.25,
            num_workers=1,  # worker processes: the datasets and transforms must pickle
        )
    )
    train = torch.cat([b for b, _ in dm.train_dataloader()])
    assert train.mean().abs() < 0.05 and (train.std() - 1).abs() < 0.05
    assert len(dm.stats["mean"]) == 3


def test_food101_fake_tree(tmp_path) -> None:
    base = tmp_path / "food101" / "food-101"
    classes = ["apple_pie", "baklava"]
    meta = {
        "train": {c: [f"{c}/{i}" for i in range(6)] for c in classes},
        "test": {c: [f"{c}/{i}" for i in range(6, 8)] for c in classes},
    }
    (base / "meta").mkdir(parents=True)
    for split, entries in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(entries))
        for items in entries.values():
            for item in items:
                write_image(base / "images" / f"{item}.jpg", "RGB", size=(40, 30), seed=len(item))
    dm = build_datamodule(
        data_cfg("food101", tmp_path, image_size=16, batch_size=4, val_fraction=0.34, num_workers=0)
    )
    dm.prepare()
    assert dm.class_names == classes
    assert dm.split_sizes == {"train": 8, "val": 4, "test": 4}
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    assert np.bincount(dm.split_labels["test"]).tolist() == [2, 2]
