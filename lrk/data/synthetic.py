"""``synthetic``: procedurally generated grey surface textures with scratches, spots and cracks.

Deterministic: the same seed gives a bit-identical dataset (one ``numpy.random.Generator`` drawn in a
fixed order). Backgrounds are smooth noise plus a periodic grating plus pixel noise; a defect adds a
thin straight scratch (bright or dark), a dark elliptical spot, or a dark jagged branching crack.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lrk.data.datamodule import IN_MEMORY_DEFAULTS, Index, InMemoryDataModule
from lrk.data.registry import register_dataset

DEFECT_TYPES = ("scratch", "spot", "crack")


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each pixel ``(px, py)`` (``[P]``) to the nearest of the segments ``a[m] -> b[m]`` (``[M, 2]``)."""
    ab = b - a  # [M, 2]
    apx, apy = px[None, :] - a[:, :1], py[None, :] - a[:, 1:]  # [M, P]
    length2 = np.maximum((ab * ab).sum(axis=1, keepdims=True), 1e-12)
    t = np.clip((apx * ab[:, :1] + apy * ab[:, 1:]) / length2, 0.0, 1.0)
    dx, dy = apx - t * ab[:, :1], apy - t * ab[:, 1:]
    return np.sqrt(dx * dx + dy * dy).min(axis=0)


def _polyline(points: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    pts = np.asarray(points)
    return pts[:-1], pts[1:]


def _walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, step: float, jitter: float
):
    points = [start]
    for _ in range(steps):
        heading += rng.normal(0.0, jitter)
        points.append(points[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
    return points, heading


def _defect_mask(
    kind: int, rng: np.random.Generator, size: int, px: np.ndarray, py: np.ndarray
) -> np.ndarray:
    """Intensity profile in [0, 1] of one defect (``kind`` 1 scratch, 2 spot, 3 crack), flattened ``[S*S]``."""
    s = float(size)
    width = max(0.55, 0.7 * s / 32.0)  # line half-width in pixels, scaled with the image
    if kind == 1:  # scratch: long, thin, nearly straight
        centre = rng.uniform(0.3 * s, 0.7 * s, size=2)
        angle = rng.uniform(0.0, math.pi)
        half = rng.uniform(0.25, 0.42) * s
        direction = np.array([math.cos(angle), math.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        bend = rng.uniform(-0.03, 0.03) * s
        a, b = _polyline([centre - half * direction, centre + bend * normal, centre + half * direction])
        d = _segment_distance(px, py, a, b)
        return np.exp(-((d / width) ** 2))
    if kind == 2:  # spot: an elliptical blob
        centre = rng.uniform(0.2 * s, 0.8 * s, size=2)
        rx, ry = rng.uniform(0.06, 0.12, size=2) * s
        angle = rng.uniform(0.0, math.pi)
        u = (px - centre[0]) * math.cos(angle) + (py - centre[1]) * math.sin(angle)
        v = -(px - centre[0]) * math.sin(angle) + (py - centre[1]) * math.cos(angle)
        r2 = (u / rx) ** 2 + (v / ry) ** 2
        return np.exp(-(r2**1.5))
    # crack: a jagged random walk with one or two branches
    start = rng.uniform(0.25 * s, 0.75 * s, size=2)
    step = rng.uniform(0.05, 0.08) * s
    points, _ = _walk(rng, start, rng.uniform(0.0, 2 * math.pi), int(rng.integers(6, 10)), step, 0.6)
    a, b = _polyline(points)
    segs_a, segs_b = [a], [b]
    for _ in range(int(rng.integers(1, 3))):
        origin = points[int(rng.integers(1, len(points) - 1))]
        branch, _ = _walk(
            rng, origin, rng.uniform(0.0, 2 * math.pi), int(rng.integers(3, 6)), step * 0.8, 0.6
        )
        ba, bb = _polyline(branch)
        segs_a.append(ba)
        segs_b.append(bb)
    d = _segment_distance(px, py, np.concatenate(segs_a), np.concatenate(segs_b))
    return np.exp(-((d / (0.85 * width)) ** 2))


def generate_surfaces(
    num_samples: int, image_size: int, good_fraction: float, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """``(images uint8 [N, 1, S, S], kinds int64 [N])``; kind 0 is good, 1..3 are scratch, spot, crack.

    Exactly ``round(good_fraction * N)`` images are good; the defective ones cycle through the three kinds.
    """
    rng = np.random.default_rng(seed)
    n, s = num_samples, image_size
    n_good = round(good_fraction * n)
    kinds = np.concatenate([np.zeros(n_good, dtype=np.int64), 1 + np.arange(n - n_good, dtype=np.int64) % 3])
    rng.shuffle(kinds)
    # background: smooth noise + a grating of random orientation/frequency + pixel noise
    coarse = torch.from_numpy(rng.normal(size=(n, 1, 5, 5)))
    smooth = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=True)[:, 0].numpy()
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s
    theta = rng.uniform(0.0, math.pi, size=(n, 1, 1))
    freq = rng.uniform(3.0, 8.0, size=(n, 1, 1))
    phase = rng.uniform(0.0, 2 * math.pi, size=(n, 1, 1))
    amp = rng.uniform(0.02, 0.07, size=(n, 1, 1))
    grating = amp * np.sin(2 * math.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    base = rng.uniform(0.4, 0.6, size=(n, 1, 1))
    images = base + 0.05 * smooth + grating + rng.normal(0.0, 0.015, size=(n, s, s))
    # defects
    py, px = (np.mgrid[0:s, 0:s].astype(np.float64) + 0.5).reshape(2, -1)
    for i in np.flatnonzero(kinds):
        mask = _defect_mask(int(kinds[i]), rng, s, px, py).reshape(s, s)
        contrast = rng.uniform(0.28, 0.42)
        sign = rng.choice([-1.0, 1.0]) if kinds[i] == 1 else -1.0
        images[i] += sign * contrast * mask
    out = np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return torch.from_numpy(out[:, None]), kinds


@register_dataset("synthetic")
class SyntheticDataModule(InMemoryDataModule):
    """Generated defect textures (see :func:`generate_surfaces`); ``label_mode: binary`` (good / defective)
    or ``types`` (good, scratch, spot, crack)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **IN_MEMORY_DEFAULTS,
        "image_size": 32,
        "class_weighting": "inverse",
        "num_samples": 1000,
        "good_fraction": 0.7,
        "label_mode": "binary",
    }

    def _check_options(self) -> None:
        super()._check_options()
        self.num_samples = self.opts.req_integer("num_samples", minimum=1)
        self.good_fraction = self.opts.fraction("good_fraction")
        self.label_mode = str(self.opts.choice("label_mode", ("binary", "types")))

    def _index(self) -> Index:
        images, kinds = generate_surfaces(self.num_samples, self.image_size, self.good_fraction, self.seed)
        if self.label_mode == "binary":
            labels, names = (kinds > 0).astype(np.int64), ["good", "defective"]
        else:
            labels, names = kinds, ["good", *DEFECT_TYPES]
        return Index(labels, names, images=images, stats={"label_mode": self.label_mode})
