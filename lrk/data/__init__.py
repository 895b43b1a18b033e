"""Datasets and the LightningDataModule: ``build_datamodule(cfg.data)`` and the ``DATASETS`` registry.

``conf/data/<name>.yaml`` holds each dataset's options; ``name:`` picks the builder. Bad input (options,
paths, files) raises :class:`lrk.errors.LrkConfigError` before anything trains::

    dm = build_datamodule(cfg.data)   # checks options (no disk access)
    dm.prepare()                      # idempotent: index, check, decode/cache, split (Lightning's setup calls it)
    dm.num_classes, dm.in_chans, dm.image_size, dm.class_names
    dm.class_weights                  # float32 [K]: N / (K n_c) on the train split (inverse) or ones (none)
    dm.split_sizes, dm.split_labels, dm.stats
    dm.train_dataloader() / val_dataloader() / test_dataloader()   # (float32 [B, C, H, W], int64 [B])
    dm.calibration_batches(n)         # the first n train image batches, no augmentation

Datasets: surface_defect (source elpv | folder), digits, synthetic, cifar10, cifar100, svhn, food101, imagenet.
"""

from lrk.data import digits, surface_defect, synthetic, torchvision_sets  # noqa: F401  (registration)
from lrk.data.datamodule import InMemoryDataModule, LrkDataModule
from lrk.data.registry import DATASETS, build_datamodule, register_dataset

__all__ = ["DATASETS", "InMemoryDataModule", "LrkDataModule", "build_datamodule", "register_dataset"]
