"""``surface_defect``: solar-cell electroluminescence images (ELPV, shipped by PyPI's ``elpv-dataset``) or any
surface-defect collection on disk: class folders (optionally inside official ``train/val/test`` split folders) or
list files (Caffe-style ``<path> <label>`` lines, or a CSV)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lrk.data.datamodule import IN_MEMORY_DEFAULTS, Index, InMemoryDataModule
from lrk.data.images import IMAGE_EXTENSIONS
from lrk.data.lists import ListEntries, class_names_of, label_indices, read_list_file
from lrk.data.registry import register_dataset
from lrk.data.sources import (
    ELPV_LEVEL_NAMES,
    ELPV_TYPES,
    find_split_folders,
    index_folder,
    read_elpv_labels,
    warn_stray_images,
)
from lrk.errors import LrkConfigError

log = logging.getLogger(__name__)

SOURCES = ("elpv", "folder", "list")
LABEL_MODES = {"elpv": ("binary", "levels"), "folder": ("folders", "binary"), "list": ("labels", "binary")}
LIST_KEYS = ("list_file", "val_list_file", "test_list_file")
BINARY_NAMES = ["good", "defective"]


@register_dataset("surface_defect")
class SurfaceDefectDataModule(InMemoryDataModule):
    """Good vs defective surfaces.

    ``source: elpv``: 2,624 real 300x300 grey EL images of solar cells (Deitsch et al.; data CC BY-NC-SA 4.0)
    with a defect probability of 0, 1/3, 2/3 or 1. ``label_mode: binary``: class 1 "defective" when the
    probability is >= 0.5; ``levels``: four classes p0, p33, p67, p100. ``elpv_types`` keeps mono and/or poly
    cells.

    ``source: folder``: ``root/<class>/**/<image>``, or with official splits ``root/{train,val,test}/<class>/...``
    (``split_folders``: auto-detected when the first-level folders are exactly split names). ``label_mode:
    folders`` (one class per folder) or ``binary`` (``good_classes`` are class 0 "good", every other folder folds
    into class 1 "defective").

    ``source: list``: ``list_file`` (and optionally the official ``val_list_file`` / ``test_list_file``) names
    the images and their labels (:mod:`lrk.data.lists`). ``label_mode: labels`` (one class per label; names
    sorted, or integer class indices, or ``classes``) or ``binary`` (with ``good_classes``).

    ``good_classes`` set with ``label_mode`` unset means binary. Splits that are not given are carved from train,
    stratified and seeded; without any official split, the whole pool is split at random (stratified).
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **IN_MEMORY_DEFAULTS,
        "class_weighting": "inverse",
        "source": "elpv",
        "label_mode": None,  # null: binary for elpv (and with good_classes), folders / labels otherwise
        "elpv_types": None,  # null: both mono and poly
        "elpv_dir": None,  # null: the data folder of the installed elpv-dataset package
        "include": ["*"],
        "exclude": [],
        "extensions": list(IMAGE_EXTENSIONS),
        "good_classes": None,
        "split_folders": "auto",  # folder: auto | true | false
        "list_file": None,  # list: the train list (or the whole pool without val/test lists)
        "val_list_file": None,
        "test_list_file": None,
        "list_root": None,  # list: the folder list paths are relative to (null: each list file's folder)
        "path_column": "path",  # CSV lists: the columns of the image path and of the label
        "label_column": "label",
        "classes": None,  # list: fixed class names in index order (null: from the train list's labels)
    }

    def _check_options(self) -> None:
        super()._check_options()
        opts = self.opts
        self.source = str(opts.choice("source", SOURCES))
        self.good_classes = opts.str_list("good_classes", optional=True)
        modes = LABEL_MODES[self.source]
        if self.good_classes is not None and self.source == "elpv":
            raise LrkConfigError(
                f"data.good_classes={self.good_classes} is invalid with data.source=elpv (its labels are defect "
                "probabilities): good_classes is for data.source=folder or list; set it to null"
            )
        if opts.raw("label_mode") is None:
            self.label_mode = "binary" if self.good_classes else modes[0]
        elif opts.raw("label_mode") not in modes:
            raise LrkConfigError(
                f"data.label_mode={opts.raw('label_mode')!r} is invalid for data.source={self.source}: "
                f"valid values: {', '.join(modes)}"
            )
        else:
            self.label_mode = str(opts.raw("label_mode"))
        if self.good_classes is not None and self.label_mode != "binary":
            raise LrkConfigError(
                f"data.good_classes={self.good_classes} is set but data.label_mode={self.label_mode}: "
                "good_classes folds classes into good/defective; set data.label_mode=binary (or null), "
                "or data.good_classes=null"
            )
        self.elpv_types = opts.str_list("elpv_types", optional=True)
        if self.elpv_types is not None and (not self.elpv_types or set(self.elpv_types) - set(ELPV_TYPES)):
            raise LrkConfigError(
                f"data.elpv_types={self.elpv_types} is invalid: a non-empty list of {', '.join(ELPV_TYPES)}"
            )
        self.elpv_dir = opts.string("elpv_dir", optional=True)
        self.include = opts.str_list("include") or ["*"]
        self.exclude = opts.str_list("exclude") or []
        self.extensions = opts.str_list("extensions")
        self.root = opts.string("root", optional=True)
        split_folders = opts.raw("split_folders")
        if split_folders not in ("auto", None, True, False):
            raise LrkConfigError(
                f"data.split_folders={split_folders!r} is invalid: valid values: auto, true, false"
            )
        self.split_folders: bool | None = None if split_folders in ("auto", None) else bool(split_folders)
        self.lists = {key: opts.string(key, optional=True) for key in LIST_KEYS}
        self.list_root = opts.string("list_root", optional=True)
        self.path_column = str(opts.string("path_column"))
        self.label_column = str(opts.string("label_column"))
        self.classes = opts.str_list("classes", optional=True)
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise LrkConfigError(f"data.classes={self.classes} is invalid: it names {', '.join(dup)} twice")
        for key in ("val_list_file", "test_list_file"):
            if self.lists[key] is not None and self.lists["list_file"] is None:
                raise LrkConfigError(
                    f"data.{key}={self.lists[key]} is set without data.list_file: the train list is "
                    "data.list_file (val/test lists add official splits to it)"
                )
        if self.source != "list":
            given = [k for k in (*LIST_KEYS, "classes") if opts.raw(k) is not None]
            if given:
                raise LrkConfigError(
                    f"data.{given[0]} is set but data.source={self.source}: list files and data.classes are "
                    "read by data.source=list"
                )
        if self.source == "list" and self.lists["list_file"] is None:
            raise LrkConfigError(
                "data.list_file is not set: data.source=list reads '<path> <label>' lines (or a CSV with "
                f"columns {self.path_column!r}, {self.label_column!r}) from it"
            )
        if self.source == "folder" and self.root is None:
            raise LrkConfigError("data.root is not set: data.source=folder reads root/<class>/.../<image>")
        if self.label_mode == "binary" and self.source != "elpv" and not self.good_classes:
            what = "class folders" if self.source == "folder" else "classes (labels)"
            raise LrkConfigError(
                f"data.label_mode=binary with data.source={self.source} needs data.good_classes: the {what} "
                "holding good images (class 0), e.g. data.good_classes=[good]; every other class is defective"
            )

    def _index(self) -> Index:
        if self.source == "elpv":
            return self._index_elpv()
        return self._index_folder() if self.source == "folder" else self._index_list()

    def _index_elpv(self) -> Index:
        records = read_elpv_labels(Path(self.elpv_dir) if self.elpv_dir else None)
        if self.elpv_types is not None:
            records = [r for r in records if r.type in self.elpv_types]
        if self.label_mode == "binary":
            labels = np.array([int(r.probability >= 0.5) for r in records], dtype=np.int64)
            names = list(BINARY_NAMES)
        else:
            labels = np.array([r.level for r in records], dtype=np.int64)
            names = list(ELPV_LEVEL_NAMES)
        return Index(
            labels,
            names,
            paths=[r.path for r in records],
            stats={"source": "elpv", "label_mode": self.label_mode},
        )

    def _binary(self, labels: np.ndarray, names: list[str], where: str) -> np.ndarray:
        """Fold class indices into 0 good (``good_classes``) / 1 defective."""
        assert self.good_classes is not None
        unknown = sorted(set(self.good_classes) - set(names))
        if unknown:
            raise LrkConfigError(
                f"data.good_classes names {', '.join(unknown)} that are not {where}; "
                f"the {'folders' if self.source == 'folder' else 'classes'} are: {', '.join(names)}"
            )
        good = np.isin(labels, [names.index(g) for g in self.good_classes])
        if good.all():
            raise LrkConfigError(
                f"data.good_classes={self.good_classes} lists every class of {where}: no defective images are left"
            )
        return (~good).astype(np.int64)

    def _index_folder(self) -> Index:
        assert self.root is not None and self.extensions is not None
        root = Path(self.root).expanduser()
        splits = find_split_folders(root, self.split_folders, self.exclude)
        stats: dict[str, Any] = {"source": "folder", "label_mode": self.label_mode}
        opts = {"include": self.include, "exclude": self.exclude, "extensions": self.extensions}
        if splits is None:
            names, files = index_folder(root, **opts)
            split_of = None
        else:
            warn_stray_images(root, self.extensions, self.include, self.exclude)
            found = {split: index_folder(folder, **opts) for split, folder in splits.items()}
            names = found["train"][0]
            for split, (split_names, _) in found.items():
                if split_names != names:
                    extra = sorted(set(split_names) - set(names))
                    lack = sorted(set(names) - set(split_names))
                    raise LrkConfigError(
                        f"the split folders under data.root={root} have different class folders: "
                        f"{splits[split].name}/ "
                        + "; ".join(
                            part
                            for part in (
                                f"has {', '.join(extra)} that train/ lacks" if extra else "",
                                f"lacks {', '.join(lack)}" if lack else "",
                            )
                            if part
                        )
                        + f" (train/ has {', '.join(names)}): every split needs the same class folders"
                    )
            files = [[p for split in found for p in found[split][1][c]] for c in range(len(names))]
            codes = {"train": 0, "val": 1, "test": 2}
            split_of = np.concatenate(
                [
                    np.full(len(found[split][1][c]), codes[split], dtype=np.int64)
                    for c in range(len(names))
                    for split in found
                ]
            )
            stats["split_folders"] = {s: p.name for s, p in splits.items()}
        paths = [p for group in files for p in group]
        folder_labels = np.concatenate([np.full(len(g), c, dtype=np.int64) for c, g in enumerate(files)])
        stats["folders"] = names
        log.info(
            "data %s: indexed %d images in %d class folders under %s", self.name, len(paths), len(names), root
        )
        if self.label_mode == "folders":
            return Index(folder_labels, names, paths=paths, stats=stats, split_of=split_of)
        labels = self._binary(folder_labels, names, f"class folders under data.root={root}")
        return Index(labels, list(BINARY_NAMES), paths=paths, stats=stats, split_of=split_of)

    def _read_list(self, key: str) -> ListEntries:
        file = self.lists[key]
        assert file is not None
        return read_list_file(
            file,
            key=key,
            base=self.list_root,
            path_column=self.path_column,
            label_column=self.label_column,
        )

    def _index_list(self) -> Index:
        lists = {key: self._read_list(key) for key in LIST_KEYS if self.lists[key] is not None}
        train = lists["list_file"]
        names = class_names_of(train, self.classes)
        labels = [label_indices(entries, names) for entries in lists.values()]
        split_of = None
        if len(lists) > 1:
            codes = {"list_file": 0, "val_list_file": 1, "test_list_file": 2}
            split_of = np.concatenate(
                [np.full(len(e.paths), codes[key], dtype=np.int64) for key, e in lists.items()]
            )
            seen: dict[str, str] = {}
            for key, entries in lists.items():
                for i, path in enumerate(entries.paths):
                    other = seen.setdefault(str(path.resolve()), key)
                    if other != key:
                        log.warning(
                            "data.%s and data.%s both list the image %s (%s): the splits overlap",
                            other,
                            key,
                            path,
                            entries.where(i),
                        )
                        break
        all_labels = np.concatenate(labels)
        paths = [p for entries in lists.values() for p in entries.paths]
        stats: dict[str, Any] = {
            "source": "list",
            "label_mode": self.label_mode,
            "lists": {key: str(e.file) for key, e in lists.items()},
        }
        log.info(
            "data %s: %d images, %d classes from %s",
            self.name,
            len(paths),
            len(names),
            ", ".join(str(e.file) for e in lists.values()),
        )
        if self.label_mode == "labels":
            return Index(all_labels, names, paths=paths, stats=stats, split_of=split_of)
        labels_binary = self._binary(all_labels, names, f"the labels of data.list_file={train.file}")
        return Index(labels_binary, list(BINARY_NAMES), paths=paths, stats=stats, split_of=split_of)
