"""A run's model structure inside its Lightning checkpoint, so that a compressed model loads back.

A checkpoint's ``state_dict`` holds only weights; a decomposed model (SVD layers, swapped attention, ...) does
not fit the dense backbone its config builds. Every lrk checkpoint therefore also carries
``checkpoint["lrk_structure"]`` (:func:`structure_payload`, added by the :class:`StructureCheckpoint` callback
that ``lrk.train`` gives every trainer; a callback here rather than ``LitClassifier.on_save_checkpoint``, since
``lrk.lit`` imports no other lrk package, see tests/test_architecture.py)::

    {"format": 1, "lrk_version": "0.1.0", "torch_version": ...,
     "skeleton": <bytes: torch.save of the model with every parameter and persistent buffer on the meta
                  device: its classes and attributes, no weights>,
     "model_class": "lrk.models.vit.VisionTransformer", "params": ..., "params_dense": ...,
     "data": {"num_classes": ..., "in_chans": ..., "image_size": ...}, "classes": [...],
     "decomp_method": "svd", "decomp_layers": [<the run's report rows>]}

Only plain types, so Lightning's ``weights_only`` loader still reads the checkpoint. :func:`restore_model`
unpickles the skeleton (``weights_only=False``: the skeleton is the user's own local run), gives every meta
tensor real memory and loads the checkpoint's ``model.*`` weights with ``strict=True``. It materializes the
tensors itself instead of ``nn.Module.to_empty``: measured on torch 2.14, ``to_empty`` unties shared parameters
(TRAWL's shared factors) and fills non-persistent buffers (not in the state dict) with garbage; here a shared
tensor stays one tensor and non-persistent buffers keep the values stored in the skeleton. A pickled class whose
lrk module is gone (the layout moved ``lrk/decomp/svd.py`` to ``lrk/layers/``) is looked up by its name among lrk's
modules, so checkpoints survive such moves; a class that exists nowhere is an error naming it.

Every failure is one :class:`~lrk.errors.LrkConfigError` naming the file and what does not fit.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import logging
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import lrk
from lrk.errors import LrkConfigError

log = logging.getLogger(__name__)

STRUCTURE_KEY = "lrk_structure"
FORMAT = 1
DATA_FACTS = ("num_classes", "in_chans", "image_size")
_PREFIX = "model."


# --- writing ------------------------------------------------------------------------------------------------
def structure_payload(
    model: nn.Module,
    data_facts: Mapping[str, Any] | None,
    *,
    classes: list[str] | None = None,
    params_dense: int | None = None,
    decomp_method: str | None = None,
    decomp_layers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``lrk_structure`` entry of a checkpoint: ``model``'s skeleton (structure without weights, as bytes)
    and the facts of the data it was built for (``num_classes``, ``in_chans``, ``image_size``; None ones are
    left out), the class names, the dense parameter count and the decomposition's report rows."""
    buffer = io.BytesIO()
    torch.save(skeleton(model), buffer)
    facts = {key: _plain(value) for key, value in dict(data_facts or {}).items() if value is not None}
    return {
        "format": FORMAT,
        "lrk_version": str(lrk.__version__),
        "torch_version": str(torch.__version__),
        "skeleton": buffer.getvalue(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "params": _count_params(model),
        "params_dense": int(params_dense) if params_dense is not None else None,
        "data": facts,
        "classes": [str(name) for name in classes] if classes is not None else None,
        "decomp_method": decomp_method,
        # a JSON round trip: plain types only (tuples -> lists, numbers -> Python numbers)
        "decomp_layers": json.loads(json.dumps(list(decomp_layers or []), default=_plain)),
    }


class StructureCheckpoint(Callback):
    """Adds ``lrk_structure`` (:func:`structure_payload`) to every checkpoint the trainer saves, from the
    LightningModule's ``model``, its ``class_names``, ``params_dense``, ``decomp_method`` and ``decomp_layers`` (set
    by ``lrk.train``) and the datamodule's ``num_classes``, ``in_chans`` and ``image_size``. A model whose structure
    cannot be stored costs only a warning: the fit goes on and the checkpoint has its weights only."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            return
        try:
            checkpoint[STRUCTURE_KEY] = structure_payload(
                model,
                _data_facts(trainer, pl_module),
                classes=getattr(pl_module, "class_names", None),
                params_dense=getattr(pl_module, "params_dense", None),
                decomp_method=getattr(pl_module, "decomp_method", None),
                decomp_layers=getattr(pl_module, "decomp_layers", None),
            )
        except Exception as exc:  # never lose a fit over the structure
            log.warning(
                "the checkpoint holds weights only: the model's structure was not saved (%s: %s)",
                type(exc).__name__,
                exc,
            )


def _data_facts(trainer: Any, pl_module: Any) -> dict[str, Any]:
    """num_classes of the module, in_chans and image_size of the trainer's datamodule, where they are ints."""
    datamodule = getattr(trainer, "datamodule", None)
    facts: dict[str, Any] = {}
    for key, owner in (("num_classes", pl_module), ("in_chans", datamodule), ("image_size", datamodule)):
        try:
            value = getattr(owner, key, None)
        except Exception:  # a datamodule that cannot tell
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            facts[key] = value
    return facts


def skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and persistent buffers are on the meta device (no weights are
    copied; shared tensors stay shared). Non-persistent buffers and plain attributes (e.g. an attention module's
    run statistics) are copied with their values; forward/backward hooks (a callback's timers) are left out."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if name.startswith(("_forward", "_backward")) and isinstance(value, dict):
                memo[id(value)] = type(value)()
        for param in module._parameters.values():
            if param is not None and id(param) not in memo:
                memo[id(param)] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buffer in module._buffers.items():
            if (
                buffer is not None
                and name not in module._non_persistent_buffers_set
                and id(buffer) not in memo
            ):
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters once


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, int | float | str | bool | list | dict) or value is None else str(value)


# --- reading ------------------------------------------------------------------------------------------------
def find_checkpoint(run_dir_or_ckpt: str | Path) -> Path:
    """The checkpoint to load a run's model from for inference.

    A file is taken as it is. A run dir gives, in this order: the checkpoint the run tested (summary.json
    ``extra.tested_checkpoint``, also when the run dir was moved since), the newest ``checkpoints/best-*.ckpt``
    (the best epoch by ``optimized_metric``), ``checkpoints/last.ckpt`` (the last epoch). The same inputs as
    ``ckpt_path=`` (:func:`lrk.pipeline.checkpoints.resolve_checkpoint`), which for resuming prefers ``last.ckpt``.
    """
    path = Path(run_dir_or_ckpt).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise LrkConfigError(f"{path} does not exist: give a .ckpt file or a run dir holding checkpoints/")
    checkpoints = path / "checkpoints"
    tested = _tested_checkpoint(path)
    if tested is not None:
        for candidate in (Path(tested), checkpoints / Path(tested).name):
            if candidate.is_file():
                return candidate
    best = sorted(checkpoints.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    if (checkpoints / "last.ckpt").is_file():
        return checkpoints / "last.ckpt"
    found = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))
    raise LrkConfigError(
        f"no checkpoint in {path}: expected checkpoints/best-*.ckpt or checkpoints/last.ckpt"
        + (f"; .ckpt files there: {', '.join(found[:5])}" if found else " (is it a run dir of lrk?)")
    )


def _tested_checkpoint(run_dir: Path) -> str | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    extra = summary.get("extra") if isinstance(summary, dict) else None
    tested = extra.get("tested_checkpoint") if isinstance(extra, dict) else None
    return str(tested) if tested else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file (or of a run dir's, :func:`find_checkpoint`) on the CPU; a file that
    is not a checkpoint is a :class:`LrkConfigError`."""
    path = find_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load fails in many ways on a foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LrkConfigError(
            f"{path} is not a checkpoint: torch.load failed ({type(exc).__name__}: {reason[:200]})"
        ) from exc
    if not isinstance(checkpoint, dict):
        raise LrkConfigError(
            f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict with a state_dict"
        )
    checkpoint.setdefault("_lrk_source", str(path))
    return checkpoint


def read_structure(path_or_checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``lrk_structure`` payload of a checkpoint, or None when it has none (written before lrk stored
    structures, or a plain state_dict)."""
    checkpoint, _ = _checkpoint_and_source(path_or_checkpoint)
    payload = checkpoint.get(STRUCTURE_KEY)
    return dict(payload) if isinstance(payload, Mapping) else None


def restore_model(
    path_or_checkpoint: str | Path | Mapping[str, Any],
    expect: Mapping[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The model a checkpoint was saved from, with its weights, on ``device`` (in the train/eval mode it was
    saved in). ``expect``: data facts (``num_classes``, ``in_chans``, ``image_size``) the model must fit, or
    None. A checkpoint without ``lrk_structure``, another structure format, a class that no longer unpickles,
    weights that do not fit the skeleton, or other data facts: one :class:`LrkConfigError`."""
    checkpoint, source = _checkpoint_and_source(path_or_checkpoint)
    payload = checkpoint.get(STRUCTURE_KEY)
    if not isinstance(payload, Mapping):
        raise LrkConfigError(
            f"{source} has no lrk_structure: it is a plain state_dict or a checkpoint written before lrk stored "
            "model structures, so only weights can be read from it; rebuild the model from the run's config "
            "(backbone and decomp) and load its state_dict"
        )
    version = payload.get("lrk_version", "unknown")
    if payload.get("format") != FORMAT:
        raise LrkConfigError(
            f"{source} holds lrk_structure format {payload.get('format')!r} (written by lrk {version}); this lrk "
            f"({lrk.__version__}) reads format {FORMAT}: load it with lrk {version}"
        )
    check_data_facts(payload, expect, source)
    model = _unpickle_skeleton(payload, source)
    state = _model_state(checkpoint, source)
    _check_state(model, state, source, version)
    _materialize(model, torch.device(device))
    model.load_state_dict(state, strict=True)
    return model


def check_data_facts(payload: Mapping[str, Any], expect: Mapping[str, Any] | None, source: str) -> None:
    """Raise when the data facts the checkpoint's model was built for differ from ``expect`` (facts missing
    on either side are not compared). Class names that differ (same count) are only a warning."""
    if not expect:
        return
    saved = dict(payload.get("data") or {})
    differ = [
        key
        for key in DATA_FACTS
        if saved.get(key) is not None and expect.get(key) is not None and _plain(expect[key]) != saved[key]
    ]
    if differ:
        raise LrkConfigError(
            f"{source} holds a model for "
            + ", ".join(f"{key}={saved[key]}" for key in differ)
            + " but the data of this run has "
            + ", ".join(f"{key}={_plain(expect[key])}" for key in differ)
            + ": evaluate it on the data it was trained on (the same data config)"
        )
    classes, expected = payload.get("classes"), expect.get("classes")
    if classes and expected and list(classes) != [str(c) for c in expected]:
        log.warning(
            "%s was trained on classes %s, the data of this run has %s", source, classes, list(expected)
        )


def load_model(run_dir_or_ckpt: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The compressed (or dense) model of an lrk run, with its weights, on ``device``, in eval mode.

    ``run_dir_or_ckpt``: a ``.ckpt`` file, or a run dir, from which it takes the checkpoint the run tested
    (summary.json ``extra.tested_checkpoint``), else the newest ``checkpoints/best-*.ckpt``, else
    ``checkpoints/last.ckpt`` (:func:`find_checkpoint`). Needs no config: the structure comes from the
    checkpoint's ``lrk_structure``. Failures are one :class:`LrkConfigError` naming the file.
    """
    model = restore_model(load_checkpoint(run_dir_or_ckpt), device=device)
    return model.eval()


def _checkpoint_and_source(path_or_checkpoint: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_checkpoint, Mapping):
        checkpoint = dict(path_or_checkpoint)
    else:
        checkpoint = load_checkpoint(path_or_checkpoint)
    return checkpoint, f"checkpoint {checkpoint.get('_lrk_source', '(in memory)')}"


class _MissingClass(Exception):
    def __init__(self, qualified: str, reason: BaseException) -> None:
        super().__init__(qualified)
        self.qualified = qualified
        self.reason = reason


class _SkeletonUnpickler(pickle.Unpickler):
    """Finds a class that moved inside lrk (e.g. ``lrk.decomp.svd.SVDLinear`` -> ``lrk.layers.svd``) by its name,
    when exactly one lrk class has it; any other class that does not import raises :class:`_MissingClass`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as exc:
            moved = _moved_lrk_class(module, name) if module.split(".")[0] == "lrk" else None
            if moved is None:
                raise _MissingClass(f"{module}.{name}", exc) from exc
            log.warning(
                "the checkpoint's class %s.%s is now %s.%s: loading it from there",
                module,
                name,
                moved.__module__,
                moved.__qualname__,
            )
            return moved


_PICKLE_MODULE = types.SimpleNamespace(
    Unpickler=_SkeletonUnpickler, load=pickle.load, __name__="lrk_skeleton"
)


def _moved_lrk_class(module: str, name: str) -> type | None:
    """The one class named ``name`` among the loaded ``lrk.*`` modules (after importing lrk.models and
    lrk.decomp, which import every layer), or None when there is none or several."""
    for package in ("lrk.models", "lrk.decomp"):
        importlib.import_module(package)
    found = {
        id(obj): obj
        for mod_name, mod in list(sys.modules.items())
        if (mod_name == "lrk" or mod_name.startswith("lrk.")) and mod is not None and mod_name != module
        for obj in [getattr(mod, name, None)]
        if isinstance(obj, type) and obj.__qualname__ == name and obj.__module__.startswith("lrk.")
    }
    return next(iter(found.values())) if len(found) == 1 else None


def _unpickle_skeleton(payload: Mapping[str, Any], source: str) -> nn.Module:
    version = payload.get("lrk_version", "unknown")
    data = payload.get("skeleton")
    if not isinstance(data, bytes | bytearray):
        raise LrkConfigError(f"{source} has an lrk_structure without a skeleton (bytes): the file is damaged")
    try:
        model = torch.load(
            io.BytesIO(bytes(data)), map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE
        )
    except _MissingClass as exc:
        raise LrkConfigError(
            f"{source} was written by lrk {version}: its model uses the class {exc.qualified}, which this lrk "
            f"({lrk.__version__}) does not have ({type(exc.reason).__name__}: {exc.reason}); load it with lrk "
            f"{version}, or rebuild the model from the run's config and load its state_dict"
        ) from exc
    except (pickle.UnpicklingError, EOFError, RuntimeError, TypeError, ValueError) as exc:
        raise LrkConfigError(
            f"{source} was written by lrk {version}: its model structure does not unpickle in this lrk "
            f"({lrk.__version__}): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise LrkConfigError(f"{source}: its lrk_structure skeleton is a {type(model).__name__}, not a model")
    return model


def _model_state(checkpoint: Mapping[str, Any], source: str) -> OrderedDict[str, torch.Tensor]:
    """The ``model.*`` entries of the checkpoint's state_dict without the prefix (module metadata kept)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise LrkConfigError(f"{source} has no state_dict: it is not a Lightning checkpoint of lrk")
    out: OrderedDict[str, torch.Tensor] = OrderedDict(
        (key[len(_PREFIX) :], value) for key, value in state.items() if key.startswith(_PREFIX)
    )
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if key == "model" else key[len(_PREFIX) :], value)
            for key, value in metadata.items()
            if key == "model" or key.startswith(_PREFIX)
        )
    return out


def _check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, version: str) -> None:
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {expected[key]}"
        for key in expected
        if key in state and tuple(state[key].shape) != expected[key]
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes))
            if keys
        ]
        raise LrkConfigError(
            f"{source}: its weights do not fit its lrk_structure (written by lrk {version}): "
            + "; ".join(parts)
            + " (state_dict keys under model.)"
        )


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every parameter and buffer of ``model`` memory on ``device``: meta tensors become uninitialised
    ones (filled by ``load_state_dict``), others are moved; a tensor shared by several modules stays shared."""
    made: dict[
        int, tuple[torch.Tensor, torch.Tensor]
    ] = {}  # id -> (old, new): old kept alive, ids stay unique

    def convert(old: torch.Tensor, as_param: bool) -> torch.Tensor:
        if id(old) not in made:
            new = torch.empty_like(old, device=device) if old.is_meta else old.detach().to(device)
            if as_param:
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            made[id(old)] = (old, new)
        return made[id(old)][1]

    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = convert(param, as_param=True)  # type: ignore[assignment]
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = convert(buffer, as_param=False)
