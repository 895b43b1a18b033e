"""surface_defect: a generated folder tree (source: folder) and the real ELPV images (source: elpv)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import data_cfg, make_defect_tree, write_corrupt, write_image
from PIL import Image

from lrk.data import build_datamodule
from lrk.data.images import decode_file, to_channels
from lrk.data.sources import read_elpv_labels
from lrk.errors import LrkConfigError

torch.set_num_threads(1)


def folder_cfg(root, **overrides):
    base = {
        "source": "folder",
        "image_size": 12,
        "batch_size": 4,
        "val_fraction": 0.25,
        "test_fraction": 0.25,
    }
    return data_cfg("surface_defect", root.parent, root=str(root), **{**base, **overrides})


# -- folder trees -------------------------------------------------------------------------------------
def test_folder_tree_nested_dirs_masks_excluded_mixed_modes(tmp_path) -> None:
    root = make_defect_tree(tmp_path / "defects")
    dm = build_datamodule(folder_cfg(root))
    dm.prepare()
    assert dm.class_names == ["dent", "good", "scratch"]  # folders, sorted
    assert sum(dm.split_sizes.values()) == 24  # 12 + 6 + 6: the 12 *_mask.png files are left out
    assert dm.stats["skipped_images"] == 0
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (1, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    # RGB and 16-bit images land on the same grey scale as the grey ones (around their value 150 / 90 / 60)
    calib = dm._ready().calibration
    raw = calib.images.float().mean(dim=(1, 2, 3))
    names = np.array(dm.class_names)[calib.labels.numpy()]
    assert raw[names == "good"].min() > 130 and raw[names == "dent"].max() < 80


def test_folder_include_glob_and_rgb_channels(tmp_path) -> None:
    root = make_defect_tree(tmp_path / "d")
    dm = build_datamodule(folder_cfg(root, include=["*.png"], exclude=[], channels=3, cache=False))
    assert dm.in_chans == 3
    assert sum(dm.split_sizes.values()) == 36  # masks now included
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 12, 12)


def test_folder_cache_false_matches_cache_true(tmp_path) -> None:
    root = make_defect_tree(tmp_path / "d")
    a = build_datamodule(folder_cfg(root, augment=False))
    b = build_datamodule(folder_cfg(root, augment=False, cache=False, norm_samples=1000))
    assert a.split_sizes == b.split_sizes
    torch.testing.assert_close(torch.cat(a.calibration_batches(3)), torch.cat(b.calibration_batches(3)))


def test_folder_binary_folds_defect_classes(tmp_path) -> None:
    root = make_defect_tree(tmp_path / "d")
    dm = build_datamodule(folder_cfg(root, label_mode="binary", good_classes=["good"]))
    assert dm.class_names == ["good", "defective"]
    totals = {c: sum(dm.stats["class_counts"][s][c] for s in dm.split_sizes) for c in dm.class_names}
    assert totals == {"good": 12, "defective": 12}
    with pytest.raises(
        LrkConfigError, match=r"data.good_classes names ok .*the folders are: dent, good, scratch"
    ):
        build_datamodule(folder_cfg(root, label_mode="binary", good_classes=["ok"])).prepare()
    with pytest.raises(LrkConfigError, match="no defective images are left"):
        build_datamodule(
            folder_cfg(root, label_mode="binary", good_classes=["good", "dent", "scratch"])
        ).prepare()


def test_corrupt_file_is_skipped_warned_and_counted(tmp_path) -> None:
    root = make_defect_tree(tmp_path / "d", n_good=20, n_scratch=10, n_dent=10)
    bad = write_corrupt(root / "scratch" / "broken.png")
    dm = build_datamodule(folder_cfg(root, max_bad_fraction=0.05))
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*broken\.png"):
        dm.prepare()
    assert dm.stats["skipped_images"] == 1 and dm.stats["skipped_files"] == [str(bad)]
    assert sum(dm.split_sizes.values()) == 40 and not dm.stats["decode_reused"]
    again = build_datamodule(folder_cfg(root, max_bad_fraction=0.05))  # same files: decoded once per process
    with pytest.warns(UserWarning, match=r"broken\.png"):
        again.prepare()
    assert again.stats["decode_reused"] and again.stats["skipped_images"] == 1
    torch.testing.assert_close(torch.cat(again.calibration_batches(9)), torch.cat(dm.calibration_batches(9)))


@pytest.mark.parametrize("cache", [True, False])
def test_too_many_corrupt_files_is_an_error(tmp_path, cache: bool) -> None:
    root = make_defect_tree(tmp_path / "d")
    for i in range(3):
        write_corrupt(root / "good" / f"broken{i}.png")
    dm = build_datamodule(folder_cfg(root, cache=cache))
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            LrkConfigError,
            match=r"3 of 27 image files \(11.1%\) could not be read, more than "
            r"data.max_bad_fraction=0.05; first: .*broken0.png",
        ),
    ):
        dm.prepare()


def test_folder_path_errors(tmp_path) -> None:
    with pytest.raises(LrkConfigError, match=r"data.root=.*nowhere does not exist"):
        build_datamodule(folder_cfg(tmp_path / "nowhere")).prepare()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrkConfigError, match=r"data.root=.*empty is empty: it has no class folders"):
        build_datamodule(folder_cfg(tmp_path / "empty")).prepare()
    root = make_defect_tree(tmp_path / "d")
    write_image(root / "hole" / "only_mask.png")
    (root / "hole" / "notes.txt").write_text("no images here")
    with pytest.raises(LrkConfigError, match=r"class folder 'hole' under data.root=.* has no images"):
        build_datamodule(folder_cfg(root)).prepare()


def test_folder_class_too_small_to_stratify_is_named(tmp_path) -> None:
    root = make_defect_tree(tmp_path / "d")
    write_image(root / "crack" / "c0.png")
    write_image(root / "crack" / "c1.png")
    with pytest.raises(LrkConfigError, match=r"class 'crack' \(2\) has too few images to split"):
        build_datamodule(folder_cfg(root)).prepare()


def test_image_modes_convert_without_clipping(tmp_path) -> None:
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(to_channels(sixteen, 1)).tolist() == [[0, 128, 255]]
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_channels(rgba, 3).mode == "RGB" and to_channels(rgba, 1).mode == "L"
    grey = write_image(tmp_path / "g.png", "L", size=(30, 10))
    arr = decode_file(grey, 8, 3)
    assert arr.shape == (3, 8, 8) and arr.dtype == np.uint8 and (arr[0] == arr[2]).all()


# -- ELPV (real images from the elpv-dataset package) -------------------------------------------------
def test_elpv_labels_class_balance() -> None:
    records = read_elpv_labels()
    assert len(records) == 2624
    good = np.mean([r.probability < 0.5 for r in records])
    assert good == pytest.approx(0.69, abs=0.01)
    assert sorted({r.level for r in records}) == [0, 1, 2, 3]
    assert {r.type for r in records} == {"mono", "poly"}


def test_elpv_subset_loads_real_images() -> None:
    dm = build_datamodule(data_cfg("surface_defect", limit=160, image_size=16, batch_size=16))
    dm.prepare()
    assert dm.class_names == ["good", "defective"] and dm.in_chans == 1
    assert sum(dm.split_sizes.values()) == 160
    counts = dm.stats["class_counts"]
    good = sum(counts[s]["good"] for s in counts) / 160
    assert good == pytest.approx(0.69, abs=0.01)  # the subsample keeps the class balance
    train = counts["train"]
    n = sum(train.values())
    torch.testing.assert_close(
        dm.class_weights, torch.tensor([n / (2 * train["good"]), n / (2 * train["defective"])])
    )
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 16, 16) and y.dtype == torch.int64
    assert x.std() > 0.5  # real images, normalised


def test_elpv_levels_and_type_filter() -> None:
    dm = build_datamodule(
        data_cfg("surface_defect", label_mode="levels", elpv_types=["mono"], limit=120, image_size=8)
    )
    assert dm.class_names == ["p0", "p33", "p67", "p100"]
    mono = [r for r in read_elpv_labels() if r.type == "mono"]
    assert dm.stats["num_images"] == 120 and len(mono) < 2624


def test_elpv_dir_with_broken_label_file(tmp_path) -> None:
    (tmp_path / "labels.csv").write_text("images/cell0001.png 1.0\n")
    with pytest.raises(LrkConfigError, match=r"labels.csv:1 is not '<path> <probability> <type>'"):
        build_datamodule(data_cfg("surface_defect", elpv_dir=str(tmp_path))).prepare()


@pytest.mark.slow
def test_elpv_full_cache_build() -> None:
    dm = build_datamodule(data_cfg("surface_defect"))
    dm.prepare()
    assert sum(dm.split_sizes.values()) == 2624 and dm.stats["skipped_images"] == 0
    assert dm.stats["decode_s"] > 0 or dm.stats["decode_reused"]
