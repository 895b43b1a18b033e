"""surface_defect sources on generated trees: list/CSV files, official split folders, good_classes, stray
images, and lazy decoding against the in-memory cache."""

from __future__ import annotations

import logging

import pytest
import torch
from data_fixtures import data_cfg, make_defect_tree, write_flat, write_image

from lrk.data import build_datamodule
from lrk.data.images import file_progress
from lrk.errors import LrkConfigError

torch.set_num_threads(1)

BASE = {"image_size": 8, "batch_size": 4, "val_fraction": 0.25, "test_fraction": 0.25, "augment": False}


def cfg(tmp_path, **overrides):
    return data_cfg("surface_defect", tmp_path, **{**BASE, **overrides})


def flat_pool(folder, classes: dict[str, int], start: int = 10, sub: str = "img"):
    """``n`` flat images per class, each of a unique grey value; returns [(relative path, class, value)]."""
    rows, value = [], start
    for cls, n in classes.items():
        for i in range(n):
            rel = f"{sub}/{cls}/{'deep/' if i % 2 else ''}{cls}{i}.png"
            write_flat(folder / rel, value)
            rows.append((rel, cls, value))
            value += 1
    return rows


def split_values(dm) -> dict[str, set[int]]:
    """The grey value of every image in each split (the cached uint8 images are flat)."""
    out = {}
    for split, ds in dm._ready().datasets.items():
        assert (ds.images == ds.images[:, :, :1, :1]).all()
        out[split] = set(ds.images[:, 0, 0, 0].tolist())
    return out


def write_list(path, rows, *, sep=" "):
    path.write_text("".join(f"{p}{sep}{label}\n" for p, label, *_ in rows))
    return path


# -- list files ---------------------------------------------------------------------------------------
def test_text_list_names_random_stratified_split(tmp_path) -> None:
    rows = flat_pool(tmp_path, {"scratch": 8, "good": 12, "dent": 8})
    lst = write_list(tmp_path / "all.txt", rows)
    lst.write_text("# comment\n\n" + lst.read_text())
    dm = build_datamodule(cfg(tmp_path, source="list", list_file=str(lst)))
    dm.prepare()
    assert dm.class_names == ["dent", "good", "scratch"]  # sorted label names
    # stratified: per class round(n * 0.25) test and val images
    assert dm.stats["class_counts"]["test"] == {"dent": 2, "good": 3, "scratch": 2}
    assert dm.stats["class_counts"]["val"] == {"dent": 2, "good": 3, "scratch": 2}
    # each image carries the label its line gives
    value_class = {v: c for _, c, v in rows}
    for split, ds in dm._ready().datasets.items():
        got = [dm.class_names[y] for y in ds.labels.tolist()]
        assert got == [value_class[v] for v in ds.images[:, 0, 0, 0].tolist()], split


def test_int_labels_are_class_indices_and_classes_names_them(tmp_path) -> None:
    rows = [(p, {"a": 0, "b": 1, "c": 2}[c], v) for p, c, v in flat_pool(tmp_path, {"a": 4, "b": 4, "c": 5})]
    lst = write_list(tmp_path / "train.txt", rows, sep="\t")
    dm = build_datamodule(cfg(tmp_path, source="list", list_file=str(lst)))
    assert dm.class_names == ["0", "1", "2"]
    assert sum(dm.stats["class_counts"][s]["2"] for s in dm.split_sizes) == 5
    named = build_datamodule(
        cfg(tmp_path, source="list", list_file=str(lst), classes=["ok", "crack", "hole"])
    )
    assert named.class_names == ["ok", "crack", "hole"]
    assert sum(named.stats["class_counts"][s]["hole"] for s in named.split_sizes) == 5


def test_csv_lists_with_official_val_and_test(tmp_path) -> None:
    rows = flat_pool(tmp_path, {"good": 9, "bad": 9})
    parts = {"train": rows[0:5] + rows[9:14], "val": rows[5:7] + rows[14:16], "test": rows[7:9] + rows[16:18]}
    files = {}
    for split, part in parts.items():
        files[split] = tmp_path / f"{split}.csv"
        files[split].write_text(
            "id,file,cls\n" + "".join(f"{i},{p},{c}\n" for i, (p, c, _) in enumerate(part))
        )
    dm = build_datamodule(
        cfg(
            tmp_path,
            source="list",
            list_file=str(files["train"]),
            val_list_file=str(files["val"]),
            test_list_file=str(files["test"]),
            path_column="file",
            label_column="cls",
        )
    )
    dm.prepare()
    assert dm.class_names == ["bad", "good"]
    assert split_values(dm) == {s: {v for *_, v in part} for s, part in parts.items()}
    assert dm.stats["official_splits"] == ["test", "train", "val"]


def test_val_list_only_carves_test_from_train(tmp_path) -> None:
    rows = flat_pool(tmp_path, {"good": 12, "bad": 8})
    train, val = rows[:9] + rows[12:18], rows[9:12] + rows[18:]
    dm = build_datamodule(
        cfg(
            tmp_path,
            source="list",
            list_file=str(write_list(tmp_path / "train.txt", train)),
            val_list_file=str(write_list(tmp_path / "val.txt", val)),
            test_fraction=0.2,
        )
    )
    values = split_values(dm)
    assert values["val"] == {v for *_, v in val}
    # test: round(9 * 0.2) = 2 good and round(6 * 0.2) = 1 bad image, carved from the train list
    assert dm.stats["class_counts"]["test"] == {"bad": 1, "good": 2}
    assert values["test"] | values["train"] == {v for *_, v in train} and not values["test"] & values["train"]


def test_list_root_and_binary_from_good_classes(tmp_path) -> None:
    rows = flat_pool(tmp_path / "images", {"ok": 6, "crack": 4, "spot": 4}, sub=".")
    lists = tmp_path / "lists"
    lists.mkdir()
    lst = write_list(lists / "train.txt", rows)
    dm = build_datamodule(
        cfg(
            tmp_path,
            source="list",
            list_file=str(lst),
            list_root=str(tmp_path / "images"),
            good_classes=["ok"],
        )
    )
    assert dm.class_names == ["good", "defective"]  # good_classes without label_mode: binary
    totals = {c: sum(dm.stats["class_counts"][s][c] for s in dm.split_sizes) for c in dm.class_names}
    assert totals == {"good": 6, "defective": 8}


# -- split folders ------------------------------------------------------------------------------------
def make_split_tree(root, val_name: str | None = "valid", test: bool = True):
    splits = {"train": 6, **({val_name: 2} if val_name else {}), **({"test": 2} if test else {})}
    values, v = {}, 10
    for split, n in splits.items():
        values[split] = set()
        for cls in ("dent", "good"):
            for i in range(n):
                write_flat(root / split / cls / f"{cls}{i}.png", v)
                values[split].add(v)
                v += 1
    return values


def test_split_folders_auto_detected_with_valid_alias(tmp_path) -> None:
    values = make_split_tree(tmp_path / "d")
    dm = build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path / "d")))
    dm.prepare()
    assert dm.class_names == ["dent", "good"]
    assert split_values(dm) == {"train": values["train"], "val": values["valid"], "test": values["test"]}
    assert dm.stats["split_folders"] == {"test": "test", "train": "train", "val": "valid"}
    y = dm._ready().calibration.labels
    assert not bool((y[:-1] <= y[1:]).all())  # shuffled (seeded), not grouped by class folder
    # split_folders=false: train/valid/test are three class folders of one random pool
    flat = build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path / "d"), split_folders=False))
    assert flat.class_names == ["test", "train", "valid"]


def test_split_folders_without_val_carve_it_from_train(tmp_path) -> None:
    values = make_split_tree(tmp_path / "d", val_name=None)
    dm = build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path / "d"), split_folders=True))
    got = split_values(dm)
    assert got["test"] == values["test"]
    assert dm.stats["class_counts"]["val"] == {"dent": 2, "good": 2}  # round(6 * 0.25) per class
    assert got["val"] | got["train"] == values["train"]


def test_limit_keeps_the_share_of_each_official_split(tmp_path) -> None:
    make_split_tree(tmp_path / "d", val_name="val")  # per class: 6 train, 2 val, 2 test
    dm = build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path / "d"), limit=10))
    # stratified by (split, class): 20 -> 10 halves each of the six strata
    assert dm.split_sizes == {"train": 6, "val": 2, "test": 2}
    assert dm.stats["class_counts"]["train"] == {"dent": 3, "good": 3}


def test_split_folders_with_good_classes_are_binary(tmp_path) -> None:
    make_split_tree(tmp_path / "d", val_name="val")
    dm = build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path / "d"), good_classes=["good"]))
    assert dm.class_names == ["good", "defective"]
    assert dm.stats["class_counts"]["val"] == {"good": 2, "defective": 2}


def test_good_classes_implies_binary_for_class_folders(tmp_path) -> None:
    root = make_defect_tree(tmp_path / "d")
    dm = build_datamodule(cfg(tmp_path, source="folder", root=str(root), good_classes=["good"]))
    assert dm.class_names == ["good", "defective"]
    totals = {c: sum(dm.stats["class_counts"][s][c] for s in dm.split_sizes) for c in dm.class_names}
    assert totals == {"good": 12, "defective": 12}  # scratch (6) and dent (6) fold into defective
    with pytest.raises(
        LrkConfigError, match=r"data.good_classes=\['good'\] is set but data.label_mode=folders"
    ):
        build_datamodule(
            cfg(tmp_path, source="folder", root=str(root), good_classes=["good"], label_mode="folders")
        )
    with pytest.raises(
        LrkConfigError, match=r"data.good_classes=\['good'\] is invalid with data.source=elpv"
    ):
        build_datamodule(cfg(tmp_path, good_classes=["good"]))


def test_stray_images_under_root_are_reported(tmp_path, caplog) -> None:
    root = make_defect_tree(tmp_path / "d")
    write_image(root / "loose1.png")
    write_image(root / "loose2.png")
    with caplog.at_level(logging.WARNING, logger="lrk.data.sources"):
        dm = build_datamodule(cfg(tmp_path, source="folder", root=str(root)))
        dm.prepare()
    assert sum(dm.split_sizes.values()) == 24
    msgs = [r.getMessage() for r in caplog.records if "outside every class folder" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("2 image files directly under") and "loose1.png" in msgs[0]


# -- lazy decoding ------------------------------------------------------------------------------------
def lazy_pair(tmp_path, **overrides):
    root = make_defect_tree(tmp_path / "d", n_good=14, n_scratch=8, n_dent=8)
    opts = {**BASE, "augment": True, "source": "folder", "root": str(root)}
    opts.update(overrides)
    cached = build_datamodule(data_cfg("surface_defect", tmp_path, **opts))
    lazy = build_datamodule(data_cfg("surface_defect", tmp_path, **opts, cache_max_images=10))
    return cached, lazy


def epochs(dm, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(123)  # the augmentation RNG (as Lightning's seed_everything sets it)
    loader = dm.train_dataloader()
    return [batch for _ in range(n) for batch in loader] + list(dm.val_dataloader())


@pytest.mark.parametrize("workers", [0, 2])
def test_lazy_decoding_gives_the_cached_batches(tmp_path, workers: int) -> None:
    cached, lazy = lazy_pair(tmp_path, num_workers=workers)
    cached.prepare(), lazy.prepare()
    assert cached.stats["cached"] and not lazy.stats["cached"]
    assert lazy._ready().datasets["train"].__class__.__name__ == "FileImageDataset"
    assert cached.stats["mean"] == lazy.stats["mean"] and cached.stats["std"] == lazy.stats["std"]
    a, b = epochs(cached), epochs(lazy)
    assert len(a) == len(b) == 2 * 4 + 2  # 18 train images (batches of 4), 6 val
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        torch.testing.assert_close(xb, xa, rtol=0, atol=0)
        assert torch.equal(ya, yb)
    plain, _ = lazy_pair(tmp_path / "plain", num_workers=workers, augment=False)
    changed = [not torch.equal(xa, xp) for (xa, _), (xp, _) in zip(a[:8], epochs(plain)[:8], strict=True)]
    assert any(changed)  # augmentation really ran (same shuffle order, unaugmented images differ)


def test_cache_size_limit_switches_to_lazy(tmp_path) -> None:
    root = make_defect_tree(tmp_path / "d")
    # 24 images x 1 channel x 8^2 x 4 bytes = 6144 bytes = 0.00586 MiB
    small = build_datamodule(cfg(tmp_path, source="folder", root=str(root), cache_max_mb=0.006))
    big = build_datamodule(cfg(tmp_path, source="folder", root=str(root), cache_max_mb=0.005))
    assert small.cache_estimate_mb(24) == pytest.approx(24 * 64 * 4 / 2**20)
    assert small.stats["cached"] and not big.stats["cached"]
    torch.testing.assert_close(torch.cat(big.calibration_batches(6)), torch.cat(small.calibration_batches(6)))


def test_progress_logs_quarters_when_not_a_terminal(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lrk.data.images"), file_progress(1000, "decoding x") as bar:
        for _ in range(1000):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [
        "decoding x: 250/1000 (25%)",
        "decoding x: 500/1000 (50%)",
        "decoding x: 750/1000 (75%)",
        "decoding x: 1000/1000 (100%)",
    ]


# -- bad input ----------------------------------------------------------------------------------------
def small_list(tmp_path, lines: str, name: str = "train.txt"):
    flat_pool(tmp_path, {"good": 3, "bad": 3})
    path = tmp_path / name
    path.write_text(lines)
    return str(path)


GOOD_LINES = "img/good/good0.png good\nimg/good/deep/good1.png good\nimg/bad/bad0.png bad\n"


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (GOOD_LINES + "img/bad/bad7.png bad\n", r"train.txt:4: the image 'img/bad/bad7.png' does not exist"),
        (GOOD_LINES + "img/bad/bad0.png\n", r"train.txt:4: malformed line 'img/bad/bad0.png': expected"),
        (
            "img/good/good0.png good\n\n../outside.png bad\n",
            r"train.txt:3: the path '../outside.png' escapes",
        ),
        (
            "img/good/good0.png 0\nimg/bad/bad0.png bad\n",
            r"train.txt:1: label '0' is an integer but .*:2 has",
        ),
        ("img/good/good0.png -1\n", r"train.txt:1: label '-1' is invalid: integer labels are class indices"),
        ("# only a comment\n", r"train.txt.* lists no images"),
    ],
)
def test_bad_text_lists_name_file_and_line(tmp_path, lines: str, match: str) -> None:
    (tmp_path.parent / "outside.png").write_bytes(b"")
    lst = small_list(tmp_path, lines)
    with pytest.raises(LrkConfigError, match=match):
        build_datamodule(cfg(tmp_path, source="list", list_file=lst)).prepare()


def test_unknown_labels_against_fixed_classes(tmp_path) -> None:
    lst = small_list(tmp_path, GOOD_LINES + "img/bad/bad2.png rust\n")
    with pytest.raises(LrkConfigError, match=r"train.txt:4: unknown label 'rust': the classes are good, bad"):
        build_datamodule(cfg(tmp_path, source="list", list_file=lst, classes=["good", "bad"])).prepare()
    train = small_list(tmp_path, GOOD_LINES)  # the train list fixes the classes: bad, good
    val = small_list(tmp_path, "img/good/good2.png good\nimg/bad/bad2.png dent\n", "val.txt")
    with pytest.raises(LrkConfigError, match=r"val.txt:2: unknown label 'dent': the classes are bad, good"):
        build_datamodule(cfg(tmp_path, source="list", list_file=train, val_list_file=val)).prepare()
    small_list(tmp_path, "img/good/good0.png 0\nimg/bad/bad0.png 1\nimg/bad/bad2.png 1\n")
    small_list(tmp_path, "img/good/good2.png 0\nimg/bad/bad2.png 2\n", "val.txt")
    with pytest.raises(
        LrkConfigError, match=r"val.txt:2: unknown label '2': the classes are 0, 1 \(names, or"
    ):
        build_datamodule(cfg(tmp_path, source="list", list_file=train, val_list_file=val)).prepare()


def test_bad_csv_lists(tmp_path) -> None:
    lst = small_list(tmp_path, "path,label\nimg/good/good0.png,good\nimg/bad/bad0.png,\n", "a.csv")
    with pytest.raises(LrkConfigError, match=r"a.csv:3: malformed CSV row 'img/bad/bad0.png,': it needs"):
        build_datamodule(cfg(tmp_path, source="list", list_file=lst)).prepare()
    lst = small_list(tmp_path, "file,label\nimg/good/good0.png,good\n", "b.csv")
    with pytest.raises(
        LrkConfigError, match=r"b.csv:1: the CSV header has no column 'path' \(columns: 'file'"
    ):
        build_datamodule(cfg(tmp_path, source="list", list_file=lst)).prepare()


def test_list_option_errors(tmp_path) -> None:
    with pytest.raises(LrkConfigError, match=r"data.list_file=.*nothere.txt does not exist"):
        build_datamodule(cfg(tmp_path, source="list", list_file=str(tmp_path / "nothere.txt"))).prepare()
    with pytest.raises(LrkConfigError, match=r"data.val_list_file=v.txt is set without data.list_file"):
        build_datamodule(cfg(tmp_path, source="list", val_list_file="v.txt"))
    with pytest.raises(LrkConfigError, match=r"data.list_file is not set: data.source=list reads"):
        build_datamodule(cfg(tmp_path, source="list"))
    with pytest.raises(LrkConfigError, match=r"data.list_file is set but data.source=folder"):
        build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path), list_file="t.txt"))
    with pytest.raises(LrkConfigError, match=r"data.split_folders='maybe' is invalid: valid values: auto"):
        build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path), split_folders="maybe"))
    lst = small_list(tmp_path, GOOD_LINES)
    with pytest.raises(
        LrkConfigError, match=r"data.good_classes names ok that are not the labels .*: bad, good"
    ):
        build_datamodule(cfg(tmp_path, source="list", list_file=lst, good_classes=["ok"])).prepare()


def test_split_folder_errors(tmp_path) -> None:
    make_split_tree(tmp_path / "d", val_name="val")
    write_flat(tmp_path / "d" / "test" / "crack" / "c0.png", 3)
    with pytest.raises(
        LrkConfigError,
        match=r"different class folders: test/ has crack that train/ lacks \(train/ has dent, good\)",
    ):
        build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path / "d"))).prepare()
    make_split_tree(tmp_path / "e", val_name="val")
    (tmp_path / "e" / "val" / "good").rename(tmp_path / "e" / "val_good_moved")
    with pytest.raises(LrkConfigError, match=r"split_folders=true but .* not split names: val_good_moved"):
        build_datamodule(
            cfg(tmp_path, source="folder", root=str(tmp_path / "e"), split_folders=True)
        ).prepare()
    make_split_tree(tmp_path / "f", val_name="val")
    make_split_tree(tmp_path / "f", val_name="validation")
    with pytest.raises(LrkConfigError, match=r"two val folders, val and validation: keep one"):
        build_datamodule(cfg(tmp_path, source="folder", root=str(tmp_path / "f"))).prepare()
