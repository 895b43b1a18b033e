"""Where small datasets come from: the ELPV package, a folder tree of class folders, sklearn's digits."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lrk.data.images import IMAGE_EXTENSIONS
from lrk.errors import LrkConfigError

ELPV_TYPES = ("mono", "poly")
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
    empty = [d.name for d, f in zip(class_dirs, files, strict=True) if not f]
    if empty:
        raise LrkConfigError(
            f"class folder{'s' if len(empty) > 1 else ''} {', '.join(repr(e) for e in empty)} under data.root={root} "
            f"{'have' if len(empty) > 1 else 'has'} no images (extensions {', '.join(sorted(exts))}, "
            f"include={list(include)}, exclude={list(exclude)}): add images or remove the folder"
        )
    return [d.name for d in class_dirs], files


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
