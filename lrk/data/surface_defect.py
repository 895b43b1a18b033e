"""``surface_defect``: solar-cell electroluminescence images (ELPV, shipped by PyPI's ``elpv-dataset``) or any
surface-defect collection on disk laid out as class folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lrk.data.datamodule import IN_MEMORY_DEFAULTS, Index, InMemoryDataModule
from lrk.data.images import IMAGE_EXTENSIONS
from lrk.data.registry import register_dataset
from lrk.data.sources import ELPV_LEVEL_NAMES, ELPV_TYPES, index_folder, read_elpv_labels
from lrk.errors import LrkConfigError

SOURCES = ("elpv", "folder")
LABEL_MODES = {"elpv": ("binary", "levels"), "folder": ("folders", "binary")}
BINARY_NAMES = ["good", "defective"]


@register_dataset("surface_defect")
class SurfaceDefectDataModule(InMemoryDataModule):
    """Good vs defective surfaces.

    ``source: elpv``: 2,624 real 300x300 grey EL images of solar cells (Deitsch et al.; data CC BY-NC-SA 4.0)
    with a defect probability of 0, 1/3, 2/3 or 1. ``label_mode: binary``: class 1 "defective" when the
    probability is >= 0.5; ``levels``: four classes p0, p33, p67, p100. ``elpv_types`` keeps mono and/or poly
    cells.

    ``source: folder``: ``root/<class>/**/<image>``; ``label_mode: folders`` (one class per folder) or
    ``binary`` (``good_classes`` are class 0 "good", every other folder folds into class 1 "defective").
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **IN_MEMORY_DEFAULTS,
        "class_weighting": "inverse",
        "source": "elpv",
        "label_mode": None,  # null: binary for elpv, folders for folder
        "elpv_types": None,  # null: both mono and poly
        "elpv_dir": None,  # null: the data folder of the installed elpv-dataset package
        "include": ["*"],
        "exclude": [],
        "extensions": list(IMAGE_EXTENSIONS),
        "good_classes": None,
    }

    def _check_options(self) -> None:
        super()._check_options()
        opts = self.opts
        self.source = str(opts.choice("source", SOURCES))
        modes = LABEL_MODES[self.source]
        if opts.raw("label_mode") is None:
            self.label_mode = modes[0]
        elif opts.raw("label_mode") not in modes:
            raise LrkConfigError(
                f"data.label_mode={opts.raw('label_mode')!r} is invalid for data.source={self.source}: "
                f"valid values: {', '.join(modes)}"
            )
        else:
            self.label_mode = str(opts.raw("label_mode"))
        self.elpv_types = opts.str_list("elpv_types", optional=True)
        if self.elpv_types is not None and (not self.elpv_types or set(self.elpv_types) - set(ELPV_TYPES)):
            raise LrkConfigError(
                f"data.elpv_types={self.elpv_types} is invalid: a non-empty list of {', '.join(ELPV_TYPES)}"
            )
        self.elpv_dir = opts.string("elpv_dir", optional=True)
        self.include = opts.str_list("include") or ["*"]
        self.exclude = opts.str_list("exclude") or []
        self.extensions = opts.str_list("extensions")
        self.good_classes = opts.str_list("good_classes", optional=True)
        self.root = opts.string("root", optional=True)
        if self.source == "folder":
            if self.root is None:
                raise LrkConfigError(
                    "data.root is not set: data.source=folder reads root/<class>/.../<image>"
                )
            if self.label_mode == "binary" and not self.good_classes:
                raise LrkConfigError(
                    "data.label_mode=binary with data.source=folder needs data.good_classes: the class folders "
                    "holding good images (class 0), e.g. data.good_classes=[good]; every other folder is defective"
                )

    def _index(self) -> Index:
        return self._index_elpv() if self.source == "elpv" else self._index_folder()

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

    def _index_folder(self) -> Index:
        assert self.root is not None and self.extensions is not None
        root = Path(self.root).expanduser()
        names, files = index_folder(
            root, include=self.include, exclude=self.exclude, extensions=self.extensions
        )
        paths = [p for group in files for p in group]
        folder_labels = np.concatenate([np.full(len(g), c, dtype=np.int64) for c, g in enumerate(files)])
        stats: dict[str, Any] = {"source": "folder", "label_mode": self.label_mode, "folders": names}
        if self.label_mode == "folders":
            return Index(folder_labels, names, paths=paths, stats=stats)
        assert self.good_classes is not None
        unknown = sorted(set(self.good_classes) - set(names))
        if unknown:
            raise LrkConfigError(
                f"data.good_classes names {', '.join(unknown)} that are not class folders under data.root={root}; "
                f"the folders are: {', '.join(names)}"
            )
        good = np.isin(folder_labels, [names.index(g) for g in self.good_classes])
        if good.all():
            raise LrkConfigError(
                f"data.good_classes={self.good_classes} lists every class folder under data.root={root}: "
                "no defective images are left"
            )
        return Index((~good).astype(np.int64), list(BINARY_NAMES), paths=paths, stats=stats)
