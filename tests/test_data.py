"""lrk.data: config checks, splits, class weights, loaders, and the small in-memory datasets."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from data_fixtures import CONF_DATA, data_cfg
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from lrk.data import DATASETS, build_datamodule
from lrk.data.datasets import augment_tensor
from lrk.data.splits import class_weights, stratified_split
from lrk.errors import LrkConfigError

torch.set_num_threads(1)


# -- the registry and the YAML files ------------------------------------------------------------------
def test_registry_has_every_yaml() -> None:
    names = sorted(p.stem for p in CONF_DATA.glob("*.yaml"))
    assert names == sorted(DATASETS)
    for name in names:
        assert OmegaConf.load(CONF_DATA / f"{name}.yaml").name == name


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_DATA.glob("*.yaml")))
def test_every_yaml_builds(name: str, tmp_path) -> None:
    dm = build_datamodule(data_cfg(name, tmp_path, seed=7))
    assert isinstance(dm, L.LightningDataModule)
    assert dm.seed == 7 and dm.image_size > 0 and dm.in_chans in (1, 3)


def test_build_from_plain_dict() -> None:
    dm = build_datamodule({"name": "digits", "augment": False, "seed": 3})
    assert dm.image_size == 8 and dm.seed == 3


# -- cheap config errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"image_size": 0}, r"data.image_size=0 is invalid: it must be a positive integer"),
        ({"image_size": -3}, r"data.image_size=-3"),
        ({"image_size": "big"}, r"data.image_size='big'.*integer"),
        ({"val_fraction": 0.0}, r"data.val_fraction=0.0 .*strictly between 0 and 1"),
        ({"test_fraction": 1.0}, r"data.test_fraction=1.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"sum must be < 1"),
        ({"source": "s3"}, r"data.source='s3' is invalid: valid values: elpv, folder"),
        (
            {"label_mode": "folders"},
            r"label_mode='folders' is invalid for data.source=elpv: valid values: binary, levels",
        ),
        ({"source": "folder", "label_mode": "levels"}, r"valid values: folders, binary"),
        ({"source": "folder", "label_mode": "binary"}, r"needs data.good_classes"),
        (
            {"class_weighting": "balanced"},
            r"data.class_weighting='balanced' is invalid: valid values: inverse, none",
        ),
        ({"channels": 2}, r"data.channels=2 is invalid"),
        ({"elpv_types": ["mono", "amorphous"]}, r"data.elpv_types=.*mono, poly"),
        ({"max_bad_fraction": 1.5}, r"data.max_bad_fraction=1.5"),
        ({"batch_size": 0}, r"data.batch_size=0"),
        (
            {"imgsize": 32},
            r"data.imgsize is not a known option of dataset 'surface_defect'; valid options: .*image_size",
        ),
        ({"mean": [0.5]}, r"data.mean and data.std must be set together"),
        ({"mean": [0.5], "std": [0.0]}, r"data.std=\[0.0\] is invalid"),
    ],
)
def test_bad_options_raise_one_clear_error(overrides, match) -> None:
    with pytest.raises(LrkConfigError, match=match):
        build_datamodule(data_cfg("surface_defect", **overrides))


def test_unknown_or_missing_dataset_name_lists_valid_ones() -> None:
    with pytest.raises(
        LrkConfigError, match=r"data.name='mnist' is not a known dataset; valid names: cifar10, .*synthetic"
    ):
        build_datamodule({"name": "mnist"})
    with pytest.raises(LrkConfigError, match=r"data.name is missing"):
        build_datamodule({"image_size": 8})


def test_synthetic_and_digits_option_errors() -> None:
    with pytest.raises(
        LrkConfigError, match=r"data.label_mode='levels' is invalid: valid values: binary, types"
    ):
        build_datamodule(data_cfg("synthetic", label_mode="levels"))
    with pytest.raises(LrkConfigError, match=r"data.good_fraction=1.0"):
        build_datamodule(data_cfg("synthetic", good_fraction=1.0))
    with pytest.raises(LrkConfigError, match=r"data.augment=true is not supported for digits"):
        build_datamodule(data_cfg("digits", augment=True))


def test_unresolvable_interpolation_is_a_config_error() -> None:
    node = OmegaConf.load(CONF_DATA / "surface_defect.yaml")  # ${seed} has no root to resolve against
    with pytest.raises(LrkConfigError, match="cannot be resolved"):
        build_datamodule(node)


# -- splits and weights -------------------------------------------------------------------------------
def test_class_weights_hand_computed() -> None:
    labels = np.array([0] * 6 + [1] * 2 + [2] * 4)  # N=12, K=3: w = 12 / (3 * n_c)
    w = class_weights(labels, 3, "inverse")
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([12 / 18, 12 / 6, 12 / 12]))
    torch.testing.assert_close(class_weights(labels, 3, "none"), torch.ones(3))
    with pytest.raises(LrkConfigError, match="every class"):
        class_weights(np.array([0, 0, 1]), 3, "inverse")


def _check_proportions(labels: np.ndarray, idx: dict[str, np.ndarray], fractions: dict[str, float]) -> None:
    assert sorted(np.concatenate(list(idx.values())).tolist()) == list(range(len(labels)))  # a partition
    for c in np.unique(labels):
        n_c = int((labels == c).sum())
        for split, frac in fractions.items():
            got = int((labels[idx[split]] == c).sum())
            assert abs(got - n_c * frac) <= 1.0, (c, split, got, n_c * frac)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_split_proportions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, size=503, p=[0.55, 0.25, 0.15, 0.05])
    idx = stratified_split(labels, list("abcd"), val_fraction=0.15, test_fraction=0.2, seed=seed)
    _check_proportions(labels, idx, {"train": 0.65, "val": 0.15, "test": 0.2})
    again = stratified_split(labels, list("abcd"), val_fraction=0.15, test_fraction=0.2, seed=seed)
    assert all(np.array_equal(idx[s], again[s]) for s in idx)


def test_too_few_images_to_stratify_names_the_class() -> None:
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(LrkConfigError, match=r"class 'rare' \(2\) has too few images"):
        stratified_split(labels, ["common", "rare"], val_fraction=0.2, test_fraction=0.2, seed=0)


# -- digits -------------------------------------------------------------------------------------------
def test_digits_loads_splits_and_batches() -> None:
    dm = build_datamodule(data_cfg("digits", batch_size=32))
    dm.prepare()
    assert dm.num_classes == 10 and dm.in_chans == 1 and dm.class_names == [str(d) for d in range(10)]
    sizes = dm.split_sizes
    assert sum(sizes.values()) == 1797 and set(sizes) == {"train", "val", "test"}
    per_class = np.bincount(load_digits().target)  # each class: round(n_c * 0.15) test images
    assert sizes["test"] == int(np.floor(per_class * 0.15 + 0.5).sum())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        xb, yb = next(iter(loader))
        assert xb.shape[1:] == (1, 8, 8) and yb.dtype == torch.int64
    # normalised with the train split's statistics
    train = torch.cat([b for b, _ in dm.train_dataloader()])
    assert abs(train.mean().item()) < 1e-3 and abs(train.std().item() - 1) < 1e-2
    torch.testing.assert_close(dm.class_weights, torch.ones(10))
    counts = dm.stats["class_counts"]
    labels = np.concatenate(
        [np.repeat(np.arange(10), [counts[s][str(c)] for c in range(10)]) for s in counts]
    )
    assert np.bincount(labels).tolist() == np.bincount(load_digits().target).tolist()


def test_digits_resize_and_rgb() -> None:
    dm = build_datamodule(data_cfg("digits", image_size=16, channels=3, batch_size=8))
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 16, 16) and dm.in_chans == 3
    assert torch.equal(x[:, 0], x[:, 1])  # grey replicated


# -- synthetic ----------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_by_seed() -> None:
    from lrk.data.synthetic import generate_surfaces

    a, ka = generate_surfaces(60, 24, 0.7, seed=5)
    b, kb = generate_surfaces(60, 24, 0.7, seed=5)
    c, _ = generate_surfaces(60, 24, 0.7, seed=6)
    assert a.dtype == torch.uint8 and a.shape == (60, 1, 24, 24)
    assert torch.equal(a, b) and np.array_equal(ka, kb)
    assert not torch.equal(a, c)
    dm1 = build_datamodule(data_cfg("synthetic", num_samples=80, seed=5))
    dm2 = build_datamodule(data_cfg("synthetic", num_samples=80, seed=5))
    assert torch.equal(torch.cat(dm1.calibration_batches(10)), torch.cat(dm2.calibration_batches(10)))
    assert dm1.split_sizes == dm2.split_sizes


def test_synthetic_imbalance_and_types() -> None:
    dm = build_datamodule(data_cfg("synthetic", num_samples=200, good_fraction=0.7, label_mode="types"))
    assert dm.class_names == ["good", "scratch", "spot", "crack"]
    totals = {
        c: sum(dm.stats["class_counts"][s][c] for s in ("train", "val", "test")) for c in dm.class_names
    }
    assert totals == {"good": 140, "scratch": 20, "spot": 20, "crack": 20}
    train = dm.stats["class_counts"]["train"]
    n, k = sum(train.values()), 4
    torch.testing.assert_close(dm.class_weights, torch.tensor([n / (k * train[c]) for c in dm.class_names]))
    assert dm.class_weights[0] < 1 < dm.class_weights[1]  # the majority class weighs less


def test_synthetic_defects_stand_out_from_background() -> None:
    from lrk.data.synthetic import generate_surfaces

    images, kinds = generate_surfaces(120, 32, 0.5, seed=0)
    x = images[:, 0].float() / 255
    # largest deviation from the image's median: defects add contrast 0.28..0.42 on a ~0.1 texture
    dev = (x - x.flatten(1).median(dim=1).values[:, None, None]).abs().flatten(1).amax(dim=1)
    good, bad = dev[kinds == 0], dev[kinds > 0]
    assert bad.median() > good.median() + 0.1


def test_stratification_holds_for_a_datamodule() -> None:
    dm = build_datamodule(
        data_cfg("synthetic", num_samples=300, label_mode="types", val_fraction=0.2, test_fraction=0.1)
    )
    counts = dm.stats["class_counts"]
    fractions = {"train": 0.7, "val": 0.2, "test": 0.1}
    for c in dm.class_names:
        n_c = sum(counts[s][c] for s in fractions)
        for split, frac in fractions.items():
            assert abs(counts[split][c] - n_c * frac) <= 1.0


# -- loaders, calibration, augmentation ---------------------------------------------------------------
def test_calibration_batches_are_the_first_unaugmented_train_batches() -> None:
    dm = build_datamodule(data_cfg("synthetic", num_samples=100, batch_size=16))
    batches = dm.calibration_batches(2)
    assert len(batches) == 2 and all(b.shape == (16, 1, 32, 32) and b.dtype == torch.float32 for b in batches)
    assert torch.equal(torch.cat(batches), torch.cat(dm.calibration_batches(2)))  # no augmentation
    calib = dm._ready().calibration
    torch.testing.assert_close(batches[1][0], calib[16][0])
    n_batches = -(-dm.split_sizes["train"] // 16)
    assert len(dm.calibration_batches(100)) == n_batches
    assert dm.calibration_batches(0) == []
    with pytest.raises(LrkConfigError):
        dm.calibration_batches(-1)


def test_train_loader_augments_and_shuffles_but_keeps_labels() -> None:
    dm = build_datamodule(data_cfg("synthetic", num_samples=100, batch_size=1000))
    x1, y1 = next(iter(dm.train_dataloader()))
    x2, y2 = next(iter(dm.train_dataloader()))
    assert len(y1) == dm.split_sizes["train"]
    assert not torch.equal(x1, x2)
    assert sorted(y1.tolist()) == sorted(y2.tolist()) == sorted(dm.split_labels["train"].tolist())


def test_augment_tensor_reaches_all_symmetries() -> None:
    x = torch.arange(9.0).view(1, 3, 3)
    torch.manual_seed(0)
    seen = {tuple(augment_tensor(x, rotate=True).flatten().tolist()) for _ in range(200)}
    assert len(seen) == 8  # the dihedral group of the square
    seen = {tuple(augment_tensor(x, rotate=False).flatten().tolist()) for _ in range(100)}
    assert len(seen) == 4


def test_setup_prepares_once_and_drops_only_a_singleton_last_batch() -> None:
    dm = build_datamodule(data_cfg("synthetic", num_samples=100, batch_size=67, augment=False))
    dm.setup("fit")
    first = dm._prepared
    dm.prepare()
    dm.setup("test")
    assert dm._prepared is first
    assert dm.split_sizes["train"] == 68
    assert [len(y) for _, y in dm.train_dataloader()] == [67]  # 68 = 67 + 1: the singleton is dropped
    assert sum(len(y) for _, y in dm.val_dataloader()) == dm.split_sizes["val"]


def test_limit_takes_a_stratified_subsample() -> None:
    dm = build_datamodule(data_cfg("digits", limit=300))
    assert sum(dm.split_sizes.values()) == 300
    counts = np.array([sum(dm.stats["class_counts"][s][str(c)] for s in dm.split_sizes) for c in range(10)])
    assert counts.min() >= 28 and counts.max() <= 32


def test_synthetic_is_learnable_by_a_tiny_cnn() -> None:
    torch.manual_seed(0)
    dm = build_datamodule(data_cfg("synthetic", num_samples=400, batch_size=32))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, dm.num_classes),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loss_fn = torch.nn.CrossEntropyLoss(weight=dm.class_weights)
    for _ in range(6):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            loss_fn(net(x), y).backward()
            opt.step()
    with torch.no_grad():
        right = sum((net(x).argmax(1) == y).sum().item() for x, y in dm.val_dataloader())
    assert right / dm.split_sizes["val"] > 0.85  # majority class alone: 0.7
