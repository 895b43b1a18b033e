"""Local pretrained weights for a backbone (``backbone.checkpoint_path``): nothing comes from a hub.

Accepted: a file (``torch.save`` output, below) or an lrk run dir, whose checkpoint is taken as
:func:`lrk.load_model` takes it (:func:`weights_file`: the checkpoint the run tested, else the newest
``checkpoints/best-*.ckpt``, else ``checkpoints/last.ckpt``). Files:

* a plain ``state_dict``;
* a dict with ``state_dict`` (a Lightning checkpoint): keys prefixed ``model.`` (the LightningModule's
  attribute holding the backbone) are taken with the prefix stripped, other keys are ignored;
* a dict with ``model`` (a state_dict or a whole module).

A ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix is stripped too.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrk.errors import LrkConfigError

log = logging.getLogger(__name__)

#: classifier modules looked for when the model does not declare ``head_names``
DEFAULT_HEAD_NAMES = ("head", "head_dist", "fc", "classifier")
_SHOWN = 5  # keys listed in an error message


def _load_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # a Lightning checkpoint may pickle config objects (e.g. omegaconf's) in its hyper-parameters;
        # the user named this local file, so it is trusted like code it would run
        log.warning("checkpoint %s holds more than tensors; loading it with weights_only=False", path)
    except (RuntimeError, EOFError, OSError) as err:
        raise LrkConfigError(
            f"backbone.checkpoint_path={str(path)!r} is invalid: not a torch checkpoint ({err})"
        ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise LrkConfigError(
            f"backbone.checkpoint_path={str(path)!r} is invalid: not a torch checkpoint ({err})"
        ) from err


def _strip(state: dict[str, torch.Tensor], prefix: str, only_prefixed: bool) -> dict[str, torch.Tensor]:
    if only_prefixed:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def weights_file(path: str | Path) -> Path:
    """The checkpoint file of ``path``: the file itself, or for an lrk run dir the checkpoint it tested
    (summary.json ``extra.tested_checkpoint``), else its newest ``checkpoints/best-*.ckpt``, else
    ``checkpoints/last.ckpt`` (the order of ``lrk.pipeline.structure.find_checkpoint``, which this package may not
    import)."""
    file = Path(path).expanduser()
    if file.is_file():
        return file
    if not file.is_dir():
        raise LrkConfigError(f"backbone.checkpoint_path={str(path)!r} is invalid: no such file or run dir")
    checkpoints = file / "checkpoints"
    try:
        tested = json.loads((file / "summary.json").read_text()).get("extra", {}).get("tested_checkpoint")
    except (OSError, ValueError, AttributeError):
        tested = None
    candidates = [Path(tested), checkpoints / Path(tested).name] if tested else []
    candidates += sorted(checkpoints.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates.append(checkpoints / "last.ckpt")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise LrkConfigError(
            f"backbone.checkpoint_path={str(path)!r} is invalid: a directory without checkpoints/best-*.ckpt or "
            "checkpoints/last.ckpt (give a checkpoint file or an lrk run dir)"
        )
    return found


def read_state_dict(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The backbone's tensors held in the checkpoint file or run dir ``path`` (see the module doc for formats).

    ``model``, when given, tells whether its own keys start with ``model.`` (then that prefix is kept).
    """
    file = weights_file(path)
    obj = _load_file(file)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module | Mapping):
        obj = obj["model"]
        obj = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LrkConfigError(
            f"backbone.checkpoint_path={str(path)!r} is invalid: it holds neither a state_dict nor a dict "
            "with 'state_dict' or 'model'"
        )
    state = dict(obj)
    own_keys = model.state_dict().keys() if model is not None else ()
    if any(k.startswith("model.") for k in state) and not any(k.startswith("model.") for k in own_keys):
        state = _strip(state, "model.", only_prefixed=True)  # a LightningModule's `model` attribute
    for prefix in ("module.", "_orig_mod."):
        state = _strip(state, prefix, only_prefixed=False)
    return state


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """Bicubic resampling of a ``[1, prefix + g*g, D]`` position embedding to a ``grid`` x ``grid`` one
    (the prefix tokens' embeddings are kept as they are), as when fine-tuning ViT at another resolution
    (Dosovitskiy et al. 2021, Sec. 3.2)."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patch tokens is not a square grid")
    dim = patches.shape[-1]
    patches = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def _resample_pos_embed(model: nn.Module, state: dict[str, torch.Tensor], own: torch.Tensor) -> None:
    """Bicubic resampling of a ViT position embedding from another patch grid, in ``state``."""
    theirs = state["pos_embed"]
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if prefix is None or grid is None or theirs.ndim != 3 or theirs.shape[-1] != own.shape[-1]:
        return
    old = math.isqrt(theirs.shape[1] - prefix)
    if old * old != theirs.shape[1] - prefix:
        return
    state["pos_embed"] = resample_pos_embed(theirs, grid, prefix)
    log.info("checkpoint pos_embed resampled from a %dx%d to a %dx%d patch grid", old, old, grid, grid)


def load_checkpoint(model: nn.Module, path: str | Path, *, skip_mismatched_head: bool = True) -> list[str]:
    """Load the local weights at ``path`` into ``model`` in place; return the keys skipped.

    Every model key must be in the file and every file key in the model, with the same shape, or an
    :class:`LrkConfigError` lists the first few offenders. Exceptions: a classifier head (the model's
    ``head_names``) whose shapes differ (another ``num_classes``) is skipped with a warning and keeps
    its fresh initialisation when ``skip_mismatched_head``; a ViT position embedding of another grid
    is resampled bicubically.
    """
    state = read_state_dict(path, model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys missing from it ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys in it ({_listed(unexpected)})")
        raise LrkConfigError(
            f"backbone.checkpoint_path={str(path)!r} does not fit the backbone: {'; '.join(parts)}"
        )
    if "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        _resample_pos_embed(model, state, own["pos_embed"])

    heads = getattr(model, "head_names", DEFAULT_HEAD_NAMES)

    def head_of(key: str) -> str | None:
        return next((h for h in heads if key == h or key.startswith(h + ".")), None)

    mismatched = [k for k in own if state[k].shape != own[k].shape]
    skipped_heads = {head_of(k) for k in mismatched} - {None} if skip_mismatched_head else set()
    bad = [k for k in mismatched if head_of(k) not in skipped_heads]
    if bad:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad]
        raise LrkConfigError(
            f"backbone.checkpoint_path={str(path)!r} does not fit the backbone: {len(bad)} tensors differ in "
            f"shape (checkpoint vs model: {_listed(shapes)})"
        )
    skipped = [k for k in own if head_of(k) in skipped_heads]
    for key in skipped:
        del state[key]
    if skipped:
        log.warning(
            "checkpoint %s: classifier %s has another shape (num_classes); left freshly initialised",
            path,
            ", ".join(sorted(skipped_heads)),  # type: ignore[arg-type]
        )
    model.load_state_dict(state, strict=False)
    return skipped
