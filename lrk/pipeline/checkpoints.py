"""Checkpoint resolution and loading: ``ckpt_path=`` values, dense weights for ``stage=post``, the best checkpoint
of a fit, and the model restored from a checkpoint that carries its structure (:mod:`lrk.pipeline.structure`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lrk.errors import LrkConfigError
from lrk.pipeline.structure import find_checkpoint, load_checkpoint, read_structure, restore_model


def resolve_checkpoint(value: str | None, runs_dir: Path, current_run: Path | None = None) -> Path | None:
    """Turn ``ckpt_path`` into a checkpoint file.

    Accepts a ``.ckpt`` file, a run dir (its ``checkpoints/last.ckpt``), or ``last``: the newest
    ``runs_dir/*/checkpoints/last.ckpt`` other than the current run's.
    """
    if value is None or str(value).strip() == "":
        return None
    if str(value) == "last":
        found = [
            path
            for path in Path(runs_dir).glob("*/checkpoints/last.ckpt")
            if current_run is None or path.parents[1].resolve() != Path(current_run).resolve()
        ]
        if not found:
            raise LrkConfigError(
                f"ckpt_path=last found no checkpoints/last.ckpt under {runs_dir}: give a .ckpt file or a run dir"
            )
        return max(found, key=lambda path: path.stat().st_mtime)
    path = Path(str(value)).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
        ckpts = sorted(p.name for p in path.rglob("*.ckpt"))
        raise LrkConfigError(
            f"ckpt_path={value} is a directory without checkpoints/last.ckpt"
            + (f"; checkpoints there: {', '.join(ckpts[:5])}" if ckpts else "")
        )
    if not path.is_file():
        raise LrkConfigError(
            f"ckpt_path={value} does not exist: give a .ckpt file, a run dir holding checkpoints/last.ckpt, "
            "or 'last'"
        )
    return path


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint of the monitored metric (the last one when nothing is monitored)."""
    checkpoints = [
        c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.best_model_path
    ]
    monitored = [c for c in checkpoints if c.monitor]
    chosen = (monitored or checkpoints)[:1]
    return chosen[0].best_model_path if chosen else None


def load_dense_weights(lit: nn.Module, path: Path) -> None:
    """Load a dense checkpoint (an lrk Lightning checkpoint or a plain state_dict) into the LightningModule
    (``decomp.ckpt_path`` of ``stage=post``)."""
    state = torch.load(path, map_location="cpu")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not any(key.startswith("model.") for key in state):
        state = {f"model.{key}": value for key, value in state.items()}
    missing, unexpected = lit.load_state_dict(state, strict=False)
    missing = [key for key in missing if key.startswith("model.")]
    if missing or unexpected:
        raise LrkConfigError(
            f"decomp.ckpt_path={path} does not fit this backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; it must come from a dense run of the same backbone and data"
        )


def restore_for_test(
    ckpt_value: str, ckpt_path: Path, decomp_name: str, data_facts: dict[str, Any]
) -> tuple[Path, nn.Module | None, dict[str, Any] | None]:
    """``train=false`` with a checkpoint: the checkpoint to test (of a run dir: the one that run tested, see
    :func:`lrk.pipeline.structure.find_checkpoint`) and, when it carries its structure, the model restored from it
    and the structure payload (no decomposition config needed, none applied again). ``(path, None, None)`` for a
    checkpoint with weights only (written before lrk stored structures): the model is then built from the config.
    """
    if ckpt_value != "last" and Path(ckpt_value).expanduser().is_dir():
        ckpt_path = find_checkpoint(ckpt_value)
    checkpoint = load_checkpoint(ckpt_path)
    payload = read_structure(checkpoint)
    if payload is None:
        return ckpt_path, None, None
    if decomp_name != "none":
        raise LrkConfigError(
            f"ckpt_path={ckpt_path} already holds its model's structure "
            f"(decomp={payload.get('decomp_method') or 'none'}): drop decomp={decomp_name}, the checkpoint is "
            "tested as it was saved (to decompose a dense checkpoint: decomp.stage=post decomp.ckpt_path=<it>)"
        )
    return ckpt_path, restore_model(checkpoint, data_facts), payload
