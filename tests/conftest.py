"""Shared fixtures: compose the real configs with Hydra, as `python train.py` would."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lrk.config import register_resolvers

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

#: the toy Hydra app of the sweeper's and the progress tests
SWEEP_APP_DIR = Path(__file__).resolve().parent / "sweep_app"


def load_sweep_app() -> Any:
    """tests/sweep_app/app.py as a module, whether or not tests/ is a package."""
    spec = importlib.util.spec_from_file_location("lrk_sweep_app", SWEEP_APP_DIR / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a tiny, fast grid point: synthetic defects, a one-block ViT, two epochs, CSV logging only
TINY = [
    "data=synthetic",
    "data.num_samples=96",
    "data.image_size=16",
    "data.batch_size=16",
    "backbone=vit_edge",
    "backbone.dim=32",
    "backbone.depth=1",
    "backbone.num_heads=2",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "callbacks.inference_benchmark.max_batches=2",
    "callbacks.inference_benchmark.warmup_batches=1",
]

torch.set_num_threads(min(2, torch.get_num_threads()))
register_resolvers()
os.environ.setdefault("WANDB_SILENT", "true")


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The root config with ``overrides``, run dir and logs under ``tmp_path``; HydraConfig set."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # as in a real run: the job's config has no hydra node
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``tiny_cfg(*overrides, run="run")``: the TINY config plus overrides, in its own run dir."""

    def make(*overrides: str, run: str = "run") -> DictConfig:
        cfg = compose_train([*TINY, *overrides], tmp_path)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / run)
        return cfg

    return make


def requires(module: str) -> pytest.MarkDecorator:
    """Skip unless ``module`` is importable (RunIf-style, without pkg_resources)."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module}")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Every test on one torch thread, the previous count restored after: LAPACK with 2 threads on the shared
    2-core machine ran 10-20x slower than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
