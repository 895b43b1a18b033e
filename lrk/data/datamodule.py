"""The LightningDataModule behind every dataset: options, ``prepare()``, splits, class weights, loaders.

Subclasses implement ``_prepare()`` (what to load and how to split it). :class:`InMemoryDataModule` is the
base of the small datasets (ELPV, folder trees, digits, synthetic): decoded once into a uint8 cache.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lrk.data.datasets import FileImageDataset, TensorImageDataset
from lrk.data.images import check_files, decode_files, report_bad
from lrk.data.options import Options, to_plain_dict
from lrk.data.splits import (
    channel_stats,
    class_counts,
    class_weights,
    stratified_split,
    stratified_subsample,
)
from lrk.errors import LrkConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

COMMON_DEFAULTS: dict[str, Any] = {
    "name": None,
    "batch_size": 64,  # images per batch (all loaders and calibration_batches)
    "num_workers": 0,  # DataLoader worker processes (persistent when > 0)
    "image_size": 64,  # images are resized to image_size x image_size
    "val_fraction": 0.15,  # stratified share of the images held out for validation
    "class_weighting": "none",  # inverse: w_c = N / (K n_c) on the train split; none: all ones
    "augment": True,  # true: random flips (and 90° rotations for defect images) on the train split; false: none;
    # strong: a random resized crop, small affine and brightness/contrast jitter before them (lrk.data.datasets)
    "shuffle": True,  # reshuffle the train split every epoch (false: split order, e.g. to compare DDP runs)
    "seed": 0,  # split, subsample and shuffling seed (the root config's ${seed})
    "root": None,  # where the files are (datasets read from disk)
    "limit": None,  # use a stratified seeded subsample of at most this many images (quick runs)
    "mean": None,  # per-channel normalisation; null: measured on the train split
    "std": None,
    "norm_samples": 1024,  # images used to measure mean/std when the data is not cached in memory
    "pin_memory": None,  # null: only when training on CUDA
}


@dataclass
class Prepared:
    """What a subclass's ``_prepare()`` hands back."""

    class_names: list[str]
    datasets: dict[str, Dataset]  # train (augmented), val, test
    calibration: Dataset  # the train split without augmentation
    labels: dict[str, np.ndarray]  # per split
    mean: list[float]
    std: list[float]
    stats: dict[str, Any] = field(default_factory=dict)


class LrkDataModule(L.LightningDataModule):
    """Base of all lrk datasets; see ``lrk.data.build_datamodule`` for the public interface."""

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = COMMON_DEFAULTS

    def __init__(self, cfg: DictConfig | Mapping[str, Any]) -> None:
        super().__init__()
        values = to_plain_dict(cfg)
        self.opts = opts = Options(values, self.DEFAULTS, self.name)
        self.batch_size: int = opts.req_integer("batch_size", minimum=1)
        self.num_workers: int = opts.req_integer("num_workers", minimum=0)
        self._image_size: int = opts.req_integer("image_size", minimum=1)
        self.val_fraction: float = opts.fraction("val_fraction")
        self.class_weighting = opts.choice("class_weighting", ("inverse", "none"))
        augment = opts.raw("augment")
        if augment not in (True, False, "strong"):
            raise LrkConfigError(f"data.augment={augment!r} is invalid: valid values: true, false, strong")
        self.augment = augment is not False
        self.augment_strong = augment == "strong"
        self.shuffle = bool(opts.flag("shuffle"))
        self.seed: int = opts.req_integer("seed", minimum=0)
        self.limit = opts.integer("limit", minimum=1, optional=True)
        self.norm_samples: int = opts.req_integer("norm_samples", minimum=1)
        self.pin_memory = opts.flag("pin_memory", optional=True)
        self._check_options()
        self._mean = opts.float_list("mean", self.in_chans)
        self._std = opts.float_list("std", self.in_chans)
        if (self._mean is None) != (self._std is None):
            raise LrkConfigError(
                "data.mean and data.std must be set together (or both null: measured on train)"
            )
        if self._std is not None and min(self._std) <= 0:
            raise LrkConfigError(f"data.std={self._std} is invalid: every value must be > 0")
        self._prepared: Prepared | None = None
        self._class_weights: torch.Tensor | None = None
        self._shuffle = torch.Generator().manual_seed(self.seed)

    # -- hooks for subclasses ------------------------------------------------------------------------
    def _check_options(self) -> None:
        """Validate the dataset's own options (cheap: no disk access)."""

    @property
    def in_chans(self) -> int:
        """Channels of a batch image."""
        return 3

    @abstractmethod
    def _prepare(self) -> Prepared:
        """Index, load and split the data; raise LrkConfigError for bad input."""

    def _download(self) -> None:
        """Fetch the data (only datasets with ``download``)."""

    # -- public interface ----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self._image_size

    def prepare(self) -> None:
        """Index, check, load (and cache) and split the data. Idempotent; Lightning's ``setup`` calls it."""
        if self._prepared is not None:
            return
        start = time.perf_counter()
        prepared = self._prepare()
        k = len(prepared.class_names)
        weights = class_weights(prepared.labels["train"], k, str(self.class_weighting))
        prepared.stats.setdefault("skipped_images", 0)
        prepared.stats["class_counts"] = {
            split: dict(zip(prepared.class_names, class_counts(lab, k).tolist(), strict=True))
            for split, lab in prepared.labels.items()
        }
        prepared.stats["mean"], prepared.stats["std"] = prepared.mean, prepared.std
        prepared.stats["prepare_s"] = round(time.perf_counter() - start, 3)
        self._prepared, self._class_weights = prepared, weights
        log.info(
            "data %s: %d classes, splits %s, %.2f s",
            self.name,
            k,
            {s: len(lab) for s, lab in prepared.labels.items()},
            prepared.stats["prepare_s"],
        )

    def _ready(self) -> Prepared:
        self.prepare()
        assert self._prepared is not None
        return self._prepared

    @property
    def num_classes(self) -> int:
        return len(self._ready().class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._ready().class_names)

    @property
    def class_weights(self) -> torch.Tensor:
        """float32 ``[num_classes]`` from the train split (see :func:`lrk.data.splits.class_weights`)."""
        self.prepare()
        assert self._class_weights is not None
        return self._class_weights.clone()

    @property
    def split_sizes(self) -> dict[str, int]:
        return {split: len(lab) for split, lab in self._ready().labels.items()}

    @property
    def split_labels(self) -> dict[str, np.ndarray]:
        """Labels of each split (int64 arrays), e.g. for balanced accuracy on the test set."""
        return {split: lab.copy() for split, lab in self._ready().labels.items()}

    @property
    def stats(self) -> dict[str, Any]:
        """``skipped_images``, ``class_counts`` per split, ``mean``/``std``, ``prepare_s`` and the
        dataset's own figures (e.g. ``decode_s``)."""
        return dict(self._ready().stats)

    # -- Lightning -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._download()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _use_pin_memory(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            from lightning.pytorch.accelerators import CUDAAccelerator

            return isinstance(trainer.accelerator, CUDAAccelerator)
        return torch.cuda.is_available()

    def _loader(self, dataset: Dataset, *, train: bool, workers: int | None = None) -> DataLoader:
        """A loader of ``dataset``; under DDP (a trainer on several processes) with a ``DistributedSampler`` of its
        own (rank r gets images r, r + W, ...; shuffled by ``data.seed`` and the epoch only with ``data.shuffle``),
        which Lightning keeps (its own would always shuffle the train split)."""
        workers = self.num_workers if workers is None else workers
        shuffle = train and self.shuffle
        n = len(dataset)  # type: ignore[arg-type]
        trainer = getattr(self, "trainer", None)
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(
                dataset,
                num_replicas=trainer.world_size,
                rank=trainer.global_rank,
                shuffle=shuffle,
                seed=self.seed,
            )
            n = len(sampler)  # this rank's share
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            generator=self._shuffle if shuffle and sampler is None else None,
            # a last batch of one image breaks BatchNorm in training: drop only that one
            drop_last=train and n % self.batch_size == 1 and n > 1,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._use_pin_memory(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._ready().datasets["train"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._ready().datasets["val"], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._ready().datasets["test"], train=False)

    def calibration_batches(self, n: int, labels: bool = False) -> list[Any]:
        """The first ``n`` image batches of the train split, in split order, without augmentation (inputs
        for data-dependent decompositions); ``(images, labels)`` pairs with ``labels`` (Fisher-weighted SVD).
        Fewer when the train split is shorter."""
        if n < 0:
            raise LrkConfigError(f"calibration batches n={n} is invalid: it must be >= 0")
        batches: list[Any] = []
        if n == 0:
            return batches
        loader = DataLoader(
            self._ready().calibration, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
        for images, targets in loader:
            batches.append((images, targets) if labels else images)
            if len(batches) == n:
                break
        return batches


@dataclass
class Index:
    """What an in-memory dataset indexes: labels and either decoded images or files to decode."""

    labels: np.ndarray
    class_names: list[str]
    images: torch.Tensor | None = None  # uint8 [N, C, H, W] at image_size
    paths: list[Path] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    # official splits: int [N], 0 train, 1 val, 2 test (null: one pool, split at random, stratified)
    split_of: np.ndarray | None = None


IN_MEMORY_DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "test_fraction": 0.15,  # stratified share held out for the final test
    "channels": 1,  # 1: grey, 3: RGB (grey inputs are replicated)
    "cache": True,  # decode + resize once into memory when it fits the two limits below (false: always lazy)
    "cache_max_images": 20000,  # more images than this: decoded lazily in the loaders' workers
    "cache_max_mb": 2048,  # cache estimate N x C x S^2 x 4 bytes above this: decoded lazily
    "max_bad_fraction": 0.05,  # unreadable files are skipped, up to this share of all files
    "decode_workers": None,  # decoding threads (null: up to 8)
}


class InMemoryDataModule(LrkDataModule):
    """Small datasets: one pool of images, split train/val/test (stratified, seeded), held as uint8."""

    DEFAULTS: ClassVar[dict[str, Any]] = IN_MEMORY_DEFAULTS
    rotate: ClassVar[bool] = True  # random 90° rotations in augmentation (defect images)

    def _check_options(self) -> None:
        opts = self.opts
        self.test_fraction = opts.fraction("test_fraction")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise LrkConfigError(
                f"data.val_fraction={self.val_fraction} + data.test_fraction={self.test_fraction} is invalid: "
                "their sum must be < 1 so that images are left to train on"
            )
        self.channels = opts.req_integer("channels")
        if self.channels not in (1, 3):
            raise LrkConfigError(f"data.channels={self.channels} is invalid: valid values: 1 (grey), 3 (RGB)")
        self.cache = bool(opts.flag("cache"))
        self.cache_max_images: int = opts.req_integer("cache_max_images", minimum=0)
        self.cache_max_mb = opts.number("cache_max_mb", low=0.0)
        self.max_bad_fraction = opts.number("max_bad_fraction", low=0.0, high=1.0)
        self.decode_workers = opts.integer("decode_workers", minimum=1, optional=True)

    @property
    def in_chans(self) -> int:
        return self.channels

    @abstractmethod
    def _index(self) -> Index:
        """Labels and images (or files) of the whole pool."""

    def cache_estimate_mb(self, n: int) -> float:
        """Memory of caching ``n`` images, ``n x C x S^2 x 4`` bytes in MiB: the uint8 cache, its per-split
        copies and the decode buffer, about 4 bytes a pixel at the peak."""
        return n * self.channels * self.image_size**2 * 4 / 2**20

    def use_cache(self, n: int) -> bool:
        """Cache ``n`` images in memory, or decode them lazily (``cache: false``, more than
        ``cache_max_images``, or an estimate over ``cache_max_mb``)."""
        return self.cache and n <= self.cache_max_images and self.cache_estimate_mb(n) <= self.cache_max_mb

    def _prepare(self) -> Prepared:
        ix = self._index()
        labels = np.asarray(ix.labels, dtype=np.int64)
        split_of = None if ix.split_of is None else np.asarray(ix.split_of, dtype=np.int64)
        stats: dict[str, Any] = dict(ix.stats)
        if self.limit:
            try:  # official splits: stratified by split and class, so each split keeps its share
                key = labels if split_of is None else labels * 3 + split_of
                sel = stratified_subsample(key, self.limit, self.seed)
            except LrkConfigError:
                if split_of is None:
                    raise
                sel = stratified_subsample(labels, self.limit, self.seed)
        else:
            sel = np.arange(len(labels))
        labels = labels[sel]
        split_of = None if split_of is None else split_of[sel]
        images = paths = None
        stats["skipped_images"] = 0
        if ix.paths is not None:
            paths = [ix.paths[i] for i in sel]
            cached = self.use_cache(len(paths))
            stats["cached"] = cached
            stats["cache_estimate_mb"] = round(self.cache_estimate_mb(len(paths)), 1)
            if cached:
                res = decode_files(
                    paths,
                    self.image_size,
                    self.channels,
                    workers=self.decode_workers,
                    desc=f"decoding {self.name} images",
                )
                ok, bad, images = res.ok, res.bad, res.images
                stats["decode_s"] = 0.0 if res.from_memo else round(res.seconds, 3)
                stats["decode_reused"] = res.from_memo
            else:
                if self.cache:
                    log.info(
                        "data %s: %d images (cache estimate %.0f MB) exceed data.cache_max_images=%d or "
                        "data.cache_max_mb=%g: decoding lazily in the loaders (data.num_workers=%d)",
                        self.name,
                        len(paths),
                        self.cache_estimate_mb(len(paths)),
                        self.cache_max_images,
                        self.cache_max_mb,
                        self.num_workers,
                    )
                ok, bad = check_files(paths, workers=self.decode_workers, desc=f"checking {self.name} images")
            report_bad(bad, len(paths))
            self._check_bad(bad, len(paths))
            labels, paths = labels[ok], [p for p, keep in zip(paths, ok, strict=True) if keep]
            split_of = None if split_of is None else split_of[ok]
            stats["skipped_images"] = len(bad)
            stats["skipped_files"] = [p for p, _ in bad[:20]]
        else:
            assert ix.images is not None
            images = ix.images[torch.from_numpy(sel)]
            if images.shape[1] == 1 and self.channels == 3:
                images = images.repeat(1, 3, 1, 1)
        stats["num_images"] = len(labels)
        if split_of is None:
            idx = stratified_split(
                labels,
                ix.class_names,
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
                seed=self.seed,
            )
        else:
            idx = self._official_splits(labels, split_of, ix.class_names)
            stats["official_splits"] = sorted(
                s for s, code in zip(SPLITS, range(3), strict=True) if (split_of == code).any()
            )
        if images is not None:
            split_images = {s: images[torch.from_numpy(i)] for s, i in idx.items()}
            mean, std = (
                (self._mean, self._std) if self._mean is not None else channel_stats(split_images["train"])
            )
            assert mean is not None and std is not None

            def make(split: str, augment: bool) -> Dataset:
                return TensorImageDataset(
                    split_images[split],
                    labels[idx[split]],
                    mean,
                    std,
                    augment=augment,
                    rotate=self.rotate,
                    strong=self.augment_strong,
                )
        else:
            assert paths is not None
            mean, std = (
                (self._mean, self._std) if self._mean is not None else self._file_stats(paths, idx["train"])
            )
            assert mean is not None and std is not None

            def make(split: str, augment: bool) -> Dataset:
                return FileImageDataset(
                    [paths[i] for i in idx[split]],
                    labels[idx[split]],
                    self.image_size,
                    self.channels,
                    mean,
                    std,
                    augment=augment,
                    rotate=self.rotate,
                    strong=self.augment_strong,
                )

        return Prepared(
            class_names=list(ix.class_names),
            datasets={s: make(s, self.augment and s == "train") for s in idx},
            calibration=make("train", False),
            labels={s: labels[i] for s, i in idx.items()},
            mean=list(mean),
            std=list(std),
            stats=stats,
        )

    def _official_splits(
        self, labels: np.ndarray, split_of: np.ndarray, class_names: list[str]
    ) -> dict[str, np.ndarray]:
        """Indices of the given splits (seeded shuffles); a missing val or test split is carved from train
        (stratified, seeded: ``val_fraction`` / ``test_fraction`` of the train images)."""
        given = {s: np.flatnonzero(split_of == code) for code, s in enumerate(SPLITS)}
        train = given["train"]
        missing = [s for s in ("val", "test") if len(given[s]) == 0]
        if missing == ["val", "test"]:
            sub = stratified_split(
                labels[train],
                class_names,
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
                seed=self.seed,
            )
            given = {s: train[sub[s]] for s in SPLITS}
        elif missing:
            split = missing[0]
            frac = self.val_fraction if split == "val" else self.test_fraction
            sub = stratified_split(
                labels[train], class_names, val_fraction=frac, test_fraction=None, seed=self.seed
            )
            given["train"], given[split] = train[sub["train"]], train[sub["val"]]
        else:
            k = len(class_names)
            absent = [class_names[c] for c in np.flatnonzero(class_counts(labels[train], k) == 0)]
            if absent:
                raise LrkConfigError(
                    f"the train split has no image of class {', '.join(absent)}: add images of it"
                )
        rng = np.random.default_rng(self.seed)  # shuffled like the random split: calibration sees every class
        given = {s: rng.permutation(i).astype(np.int64) for s, i in given.items()}
        if missing:
            log.info(
                "data %s: no official %s split: carved from train (data.val_fraction=%s, data.test_fraction=%s "
                "of the train images)",
                self.name,
                " and ".join(missing),
                self.val_fraction,
                self.test_fraction,
            )
        return given

    def _check_bad(self, bad: list[tuple[str, str]], total: int) -> None:
        if total and len(bad) / total > self.max_bad_fraction:
            path, reason = bad[0]
            raise LrkConfigError(
                f"{len(bad)} of {total} image files ({len(bad) / total:.1%}) could not be read, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}; first: {path} ({reason}). "
                "Fix or remove those files, or raise data.max_bad_fraction"
            )

    def _file_stats(self, paths: list[Path], train_idx: np.ndarray) -> tuple[list[float], list[float]]:
        """Mean/std of at most ``norm_samples`` train images (a seeded pick), decoded exactly as the cache
        would be, so with ``norm_samples >= n_train`` lazy and cached sets normalise identically."""
        rng = np.random.default_rng(self.seed)
        pick = rng.permutation(train_idx)[: self.norm_samples]
        res = decode_files(
            [paths[i] for i in pick],
            self.image_size,
            self.channels,
            workers=self.decode_workers,
            desc=f"measuring {self.name} mean/std",
            memo=False,
        )
        if not res.ok.all():
            raise LrkConfigError(
                f"image {res.bad[0][0]} became unreadable while measuring mean/std: {res.bad[0][1]}"
            )
        return channel_stats(res.images)
