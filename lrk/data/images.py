"""Decoding image files with PIL into small uint8 arrays, with bad files skipped and reported."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lrk.progress import Progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm", ".pbm")
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_WARN_LIMIT = 10  # warn one by one about the first bad files, then once for the rest


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """``img`` as 8-bit grey (``channels=1``) or RGB (``channels=3``).

    16-bit and 32-bit grey are rescaled to 0..255 (PIL's own ``convert("L")`` would clip them), palette
    images go through RGBA, alpha is dropped, grey is replicated to RGB, colour becomes luminance.
    """
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif img.mode == "I":
            arr = arr / 257.0 if arr.max(initial=0.0) > 255 else arr
        elif arr.max(initial=0.0) <= 1.0:  # "F" holding 0..1
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def decode_file(path: str | os.PathLike[str], size: int, channels: int) -> np.ndarray:
    """Read one image file as a uint8 array ``[channels, size, size]`` (resized with PIL's
    antialiased bilinear filter; aspect ratio is not kept). Raises whatever PIL raises on a bad file."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (size, size))  # DCT-domain downscale: faster decode
        img = to_channels(img, channels)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.array(img, dtype=np.uint8)  # a writable copy
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def check_file(path: str | os.PathLike[str]) -> None:
    """Cheap integrity check without a full decode (PIL ``verify``); raises on a bad file."""
    with Image.open(path) as img:
        img.verify()


@dataclass
class DecodeResult:
    """What :func:`decode_files` produced: the decoded images of the good files and the bad ones."""

    images: torch.Tensor  # uint8 [n_ok, C, S, S]
    ok: np.ndarray  # bool [n_files]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    from_memo: bool = False  # reused from an earlier decode in this process


def default_workers() -> int:
    """Decoding threads: PIL releases the GIL while decoding and resizing."""
    return max(1, min(8, os.cpu_count() or 1))


def file_progress(total: int, desc: str) -> Progress:
    """A :class:`lrk.progress.Progress` over ``total`` image files, logging under this module's name."""
    return Progress(total, desc, logger=log)


def _try(func, path: Path, *args):  # (result, None) or (None, reason)
    try:
        return func(path, *args), None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, f"{type(err).__name__}: {err}"


def report_bad(bad: Sequence[tuple[str, str]], total: int) -> None:
    """``warnings.warn`` for each of the first bad files (then one line for the rest)."""
    for path, reason in bad[:_WARN_LIMIT]:
        warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=3)
    if len(bad) > _WARN_LIMIT:
        warnings.warn(f"skipping {len(bad) - _WARN_LIMIT} more unreadable images", stacklevel=3)
    if bad:
        log.warning("skipped %d of %d image files that could not be read", len(bad), total)


_MEMO: OrderedDict[tuple, DecodeResult] = OrderedDict()
_MEMO_SIZE = 2


def _memo_key(paths: Sequence[Path], size: int, channels: int) -> tuple:
    stamps = []
    for p in paths:
        try:
            st = os.stat(p)
            stamps.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((str(p), -1, -1))
    return (size, channels, tuple(stamps))


def decode_files(
    paths: Sequence[Path],
    size: int,
    channels: int,
    *,
    workers: int | None = None,
    desc: str = "decoding images",
    memo: bool = True,
) -> DecodeResult:
    """Decode + resize every file once into one uint8 tensor; unreadable files are skipped (listed in
    ``bad``, warned about by :func:`report_bad`). With ``memo`` the last two results are kept in the
    process (keyed by paths, mtimes, sizes), so repeated runs in one process (a sweep) decode once."""
    key = _memo_key(paths, size, channels) if memo else None
    if key is not None and key in _MEMO:
        _MEMO.move_to_end(key)
        return replace(_MEMO[key], from_memo=True)
    start = time.perf_counter()
    out = np.zeros((len(paths), channels, size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    bad: list[tuple[str, str]] = []
    log.info("%s: %d files at %dx%d", desc, len(paths), size, size)
    with (
        ThreadPoolExecutor(max_workers=workers or default_workers()) as pool,
        file_progress(len(paths), desc) as bar,
    ):
        for i, (arr, reason) in enumerate(pool.map(lambda p: _try(decode_file, p, size, channels), paths)):
            if arr is None:
                bad.append((str(paths[i]), str(reason)))
            else:
                out[i] = arr
                ok[i] = True
            bar.update(1)
    result = DecodeResult(torch.from_numpy(out[ok]), ok, bad, time.perf_counter() - start)
    log.info("%s: %d images in %.2f s (%d unreadable)", desc, int(ok.sum()), result.seconds, len(bad))
    if key is not None:
        _MEMO[key] = result
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return result


def check_files(
    paths: Sequence[Path], *, workers: int | None = None, desc: str = "checking images"
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Integrity check of every file (for lazily decoded sets): ``(ok mask, bad list)``."""
    ok = np.zeros(len(paths), dtype=bool)
    bad: list[tuple[str, str]] = []
    with (
        ThreadPoolExecutor(max_workers=workers or default_workers()) as pool,
        file_progress(len(paths), desc) as bar,
    ):
        for i, (_, reason) in enumerate(pool.map(lambda p: _try(check_file, p), paths)):
            if reason is None:
                ok[i] = True
            else:
                bad.append((str(paths[i]), reason))
            bar.update(1)
    return ok, bad
