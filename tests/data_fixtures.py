"""Helpers for the data tests: configs from conf/data/*.yaml, generated image trees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def data_cfg(
    name: str, data_dir: Path | str = "/nonexistent-lrk-data", seed: int = 0, **overrides: Any
) -> DictConfig:
    """The ``data`` node of ``conf/data/<name>.yaml`` inside a minimal root config (``seed``,
    ``paths.data_dir``), with ``overrides`` applied, as the lead's root config would compose it."""
    root = OmegaConf.create(
        {
            "seed": seed,
            "paths": {"data_dir": str(data_dir)},
            "data": OmegaConf.load(CONF_DATA / f"{name}.yaml"),
        }
    )
    for key, value in overrides.items():
        root.data[key] = value
    return root.data


def write_image(
    path: Path, mode: str = "L", size: tuple[int, int] = (20, 16), value: int = 128, seed: int = 0
) -> Path:
    """A small random image of PIL ``mode`` (L, RGB, RGBA, I;16) around ``value`` (0..255 scale)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.clip(value + rng.normal(0, 20, size=(h, w)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        img = Image.fromarray(base.astype(np.uint8), mode="L")
    elif mode in ("RGB", "RGBA"):
        chans = [base] * 3 + ([np.full((h, w), 255.0)] if mode == "RGBA" else [])
        img = Image.fromarray(np.stack(chans, axis=-1).astype(np.uint8), mode=mode)
    elif mode == "I;16":
        img = Image.fromarray((base * 257).astype(np.uint16))
    else:
        raise ValueError(mode)
    img.save(path)
    return path


def write_corrupt(path: Path) -> Path:
    """A file with an image extension that is not an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return path


def make_defect_tree(root: Path, n_good: int = 12, n_scratch: int = 6, n_dent: int = 6) -> Path:
    """``root/good``, ``root/scratch``, ``root/dent`` with nested folders, grey / RGB / RGBA / 16-bit images,
    and a ground-truth mask beside each defect image (``*_mask.png``), which the default globs exclude."""
    modes = ["L", "RGB", "RGBA", "I;16"]
    for i in range(n_good):
        write_image(root / "good" / f"batch{i % 2}" / f"g{i}.png", modes[i % 4], value=150, seed=i)
    for cls, n, value in (("scratch", n_scratch, 90), ("dent", n_dent, 60)):
        for i in range(n):
            sub = root / cls / "lot_a" / "deep" if i % 2 else root / cls
            write_image(sub / f"{cls}{i}.png", modes[i % 4], value=value, seed=100 + i)
            write_image(sub / f"{cls}{i}_mask.png", "L", value=255, seed=i)
    return root


def write_flat(path: Path, value: int, size: tuple[int, int] = (10, 8), mode: str = "L") -> Path:
    """An image of one constant grey ``value`` (it survives resizing: tests tell images apart by it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.full((h, w), value, dtype=np.uint8)
    img = Image.fromarray(arr, mode="L") if mode == "L" else Image.fromarray(np.stack([arr] * 3, -1), "RGB")
    img.save(path)
    return path
