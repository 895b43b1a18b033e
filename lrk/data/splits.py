"""Stratified seeded splits, class weights and normalisation statistics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

from lrk.errors import LrkConfigError


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class, ``int64 [num_classes]``."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def check_min_per_class(labels: np.ndarray, class_names: Sequence[str], minimum: int, why: str) -> None:
    """Every class needs ``minimum`` images; name the ones that have fewer."""
    counts = class_counts(labels, len(class_names))
    few = [f"'{class_names[c]}' ({counts[c]})" for c in range(len(class_names)) if counts[c] < minimum]
    if few:
        raise LrkConfigError(
            f"class{'es' if len(few) > 1 else ''} {', '.join(few)} "
            f"{'have' if len(few) > 1 else 'has'} too few images to {why}: each class needs at least {minimum}; "
            "add images, merge or drop the class, or raise data.limit"
        )


def stratified_split(
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    val_fraction: float,
    test_fraction: float | None,
    seed: int,
) -> dict[str, np.ndarray]:
    """Indices of train / val (/ test), seeded, with every class in the same proportion in each split.

    Per class: ``round(n_c * test_fraction)`` test and ``round(n_c * val_fraction)`` val images (a seeded
    permutation of the class), the rest train; so each class's count in a split is within 1 image of
    ``n_c * fraction`` (sklearn's two-stage ``train_test_split(stratify=...)`` can miss by more, since its
    second cut rounds again). Each split is then shuffled. ``test_fraction=None``: train/val only (datasets
    with an official test split).
    """
    labels = np.asarray(labels, dtype=np.int64)
    k = len(class_names)
    check_min_per_class(
        labels, class_names, 3 if test_fraction is not None else 2, "split into train/val/test"
    )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(k):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(np.floor(len(members) * test_fraction + 0.5)) if test_fraction is not None else 0
        n_val = int(np.floor(len(members) * val_fraction + 0.5))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    out = {s: rng.permutation(np.concatenate(p)).astype(np.int64) for s, p in parts.items()}
    if test_fraction is None:
        del out["test"]
    missing = [class_names[c] for c in np.flatnonzero(class_counts(labels[out["train"]], k) == 0)]
    if missing:
        raise LrkConfigError(f"the train split has no image of class {', '.join(missing)}: add images of it")
    for split, idx in out.items():
        if len(idx) == 0:
            frac = val_fraction if split == "val" else test_fraction
            raise LrkConfigError(
                f"the {split} split is empty ({len(labels)} images, data.{split}_fraction={frac}): "
                f"use more images or a larger data.{split}_fraction"
            )
    return out


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded stratified subsample of ``n`` images (``data.limit``); all if ``n >= N``."""
    labels = np.asarray(labels, dtype=np.int64)
    if n >= len(labels):
        return np.arange(len(labels))
    try:
        keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    except ValueError as err:
        raise LrkConfigError(
            f"data.limit={n} is invalid: a stratified subsample of {len(labels)} images failed ({err})"
        ) from err
    return np.sort(np.asarray(keep, dtype=np.int64))


def class_weights(train_labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor:
    """Per-class loss weights, float32 ``[K]``.

    ``inverse``: inverse class frequency on the train split, ``w_c = N / (K * n_c)`` (sklearn's
    ``class_weight="balanced"``; a balanced set gets all ones) — the ``class_weight`` the SDRM paper sets
    against the good/defective imbalance (Sec. 5.1.1). ``none``: all ones.
    """
    if mode == "none":
        return torch.ones(num_classes, dtype=torch.float32)
    counts = class_counts(train_labels, num_classes)
    if (counts == 0).any():
        raise LrkConfigError(
            f"class weights need every class in the train split; counts are {counts.tolist()}"
        )
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(train_labels))
    return torch.as_tensor(weights, dtype=torch.float32)


def channel_stats(images: torch.Tensor, chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images ``[N, C, H, W]`` on the 0..1 scale (exact integer sums,
    in chunks, so a large cache needs no float copy)."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.int64).transpose(0, 1).reshape(c, -1)
        s += x.sum(dim=1)
        s2 += (x * x).sum(dim=1)
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s.double() / n
    var = (s2.double() / n - mean * mean).clamp_min(0.0)
    return (mean / 255.0).tolist(), (var.sqrt() / 255.0).clamp_min(1e-3).tolist()


class RunningStats:
    """Per-channel mean/std accumulated over float images ``[C, H, W]`` in 0..1 (for lazy datasets)."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, image: torch.Tensor) -> None:
        x = image.to(torch.float64).reshape(image.shape[0], -1)
        s, s2 = x.sum(dim=1), (x * x).sum(dim=1)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.shape[1]

    def result(self) -> tuple[list[float], list[float]]:
        assert self.s is not None and self.s2 is not None and self.n > 0
        mean = self.s / self.n
        std = (self.s2 / self.n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)
        return mean.tolist(), std.tolist()
