"""Where small datasets come from: the ELPV package, a folder tree of class folders (optionally inside official
split folders ``train/``, ``val/``, ``test/``), sklearn's digits. List files are read by :mod:`lrk.data.lists`."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lrk.data.images import IMAGE_EXTENSIONS
from lrk.errors import LrkConfigError

log = logging.getLogger(__name__)

ELPV_TYPES = ("mono", "poly")
# the folder names of official splits; val may be spelled three ways
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
ELPV_LEVEL_NAMES = ("p0", "p33", "p67", "p100")


@dataclass(frozen=True)
class ElpvRecord:
    """One line of ``elpv_dataset/data/labels.csv``: image path, defect probability, cell type."""

    path: Path
    probability: float
    type: str

    @property
    def level(self) -> int:
        """0..3 for probability 0, 1/3, 2/3, 1."""
        return round(self.probability * 3)


def elpv_data_dir() -> Path:
    """The ``data`` folder shipped by the PyPI package ``elpv-dataset`` (found without importing it)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise LrkConfigError(
            "data.source=elpv needs the package elpv-dataset: pip install elpv-dataset "
            "(or use data.source=folder with data.root=<your images>)"
        )
    return Path(spec.origin).parent / "data"


def read_elpv_labels(data_dir: Path | None = None) -> list[ElpvRecord]:
    """Parse ``labels.csv`` (whitespace separated: ``images/cellNNNN.png  <probability>  <type>``)."""
    data_dir = elpv_data_dir() if data_dir is None else Path(data_dir)
    labels = data_dir / "labels.csv"
    if not labels.is_file():
        raise LrkConfigError(f"the ELPV label file {labels} is missing: reinstall elpv-dataset")
    records = []
    for lineno, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            path, prob, kind = parts
            records.append(ElpvRecord(data_dir / path, float(prob), kind))
        except ValueError as err:
            raise LrkConfigError(f"{labels}:{lineno} is not '<path> <probability> <type>': {line!r}") from err
    return records


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch(rel, pat) or fnmatch(name, pat) for pat in patterns)


def index_folder(
    root: Path,
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> tuple[list[str], list[list[Path]]]:
    """Class folders under ``root`` and the image files found recursively below each.

    A class is a first-level folder (hidden ones and those matching ``exclude`` skipped). A file is kept when its extension is an image
    extension, it matches one ``include`` pattern and no ``exclude`` pattern; patterns are ``fnmatch``
    globs tried on the path relative to ``root`` (``/`` separators, ``*`` crosses folders) and on the file
    name, so ``"*mask*"`` or ``"*_gt.*"`` leave out ground-truth masks stored beside the images.
    """
    if not root.exists():
        raise LrkConfigError(
            f"data.root={root} does not exist: point it at a folder with one sub-folder per class"
        )
    if not root.is_dir():
        raise LrkConfigError(f"data.root={root} is not a folder: it must hold one sub-folder per class")
    class_dirs = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not _matches(p.name, exclude)
    )
    if not class_dirs:
        raise LrkConfigError(
            f"data.root={root} is empty: it has no class folders (expected root/<class>/.../<image>)"
        )
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files: list[list[Path]] = []
    for class_dir in class_dirs:
        found = []
        for path in sorted(class_dir.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in rel.split("/")) or path.suffix.lower() not in exts:
                continue
            if _matches(rel, include) and not _matches(rel, exclude) and path.is_file():
                found.append(path)
        files.append(found)
    warn_stray_images(root, sorted(exts), include, exclude)
    empty = [d.name for d, f in zip(class_dirs, files, strict=True) if not f]
    if empty:
        raise LrkConfigError(
            f"class folder{'s' if len(empty) > 1 else ''} {', '.join(repr(e) for e in empty)} under data.root={root} "
            f"{'have' if len(empty) > 1 else 'has'} no images (extensions {', '.join(sorted(exts))}, "
            f"include={list(include)}, exclude={list(exclude)}): add images or remove the folder"
        )
    return [d.name for d in class_dirs], files


def warn_stray_images(
    root: Path, extensions: Sequence[str], include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> int:
    """Warn (log) about image files lying directly under ``root``, outside every class folder, which are not
    used; returns their count."""
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    stray = [
        p
        for p in sorted(root.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in exts
        and _matches(p.name, include)
        and not _matches(p.name, exclude)
    ]
    if stray:
        many = len(stray) > 1
        log.warning(
            "%d image file%s directly under %s %s outside every class folder and %s not used (e.g. %s): "
            "move %s into a class folder <root>/<class>/",
            len(stray),
            "s" if many else "",
            root,
            "lie" if many else "lies",
            "are" if many else "is",
            stray[0].name,
            "them" if many else "it",
        )
    return len(stray)


def find_split_folders(root: Path, mode: bool | None, exclude: Sequence[str] = ()) -> dict[str, Path] | None:
    """Official split folders under ``root``: ``{"train": root/train, "val": root/val, "test": root/test}`` (only
    those present; ``val`` may be named ``valid`` or ``validation``), or ``None`` for a plain class-folder tree.

    ``mode=None`` (``data.split_folders: auto``): split folders when the first-level folders of ``root`` are
    exactly split names, ``train`` among them. ``True``: they must be; ``False``: never (``train`` would be a
    class).
    """
    if mode is False or not root.is_dir():
        return None
    dirs = [
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not _matches(p.name, exclude)
    ]
    split_of = {alias: split for split, aliases in SPLIT_ALIASES.items() for alias in aliases}
    named = [d for d in dirs if d.lower() in split_of]
    others = sorted(d for d in dirs if d.lower() not in split_of)
    has_train = any(split_of[d.lower()] == "train" for d in named)
    if mode is None and (others or not has_train):
        if named and has_train:
            log.warning(
                "data.root=%s has split folders (%s) beside other folders (%s): they are all read as class "
                "folders; set data.split_folders=true to read train/val/test splits",
                root,
                ", ".join(sorted(named)),
                ", ".join(others),
            )
        return None
    if others or not has_train:
        raise LrkConfigError(
            f"data.split_folders=true but data.root={root} "
            + (
                f"has folders that are not split names: {', '.join(others)}"
                if others
                else "has no train folder"
            )
            + "; expected root/train/<class>/..., optionally root/val (or valid, validation) and root/test"
        )
    out: dict[str, Path] = {}
    for d in sorted(named):
        split = split_of[d.lower()]
        if split in out:
            raise LrkConfigError(
                f"data.root={root} has two {split} folders, {out[split].name} and {d}: keep one"
            )
        out[split] = root / d
    return out


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch ``[N, C, H, W]`` to ``size x size`` (antialiased bilinear), back to uint8."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


def load_digits_uint8() -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16) as uint8 ``[N, 1, 8, 8]`` in 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(images[:, None]), bunch.target.astype(np.int64)
