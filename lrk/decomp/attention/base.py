"""Base of the methods that swap whole attention modules (SDRM; later Cholesky/PCA/attention-SVD, issue #4).

A weight method (``lrk.decomp.base``) replaces Linear/Conv layers by factorized ones. An attention-swap method
replaces every :class:`~lrk.models.AttentionBase` of the model (``blocks.*.attn``) by another attention
implementation built from it (``cls.from_attention(dense, ...)``), possibly after looking at the attention
inputs of a few calibration batches. The shared parts live here:

- target selection: ``targets`` / ``skip`` are glob patterns over *attention module* names (``blocks.*.attn``);
  ``targets: null`` takes every attention module; a pattern that matches no attention module is an error;
  a model without attention modules (a ResNet) is an error naming the model and asking for a ViT;
- :func:`token_count`: the number of tokens T a ViT feeds its attention modules (from ``patch_embed`` and
  ``num_prefix_tokens``), for checks that need T before anything runs;
- :func:`run_batches` runs calibration batches through the model in eval mode without gradients;
  :func:`collect_attention_inputs` adds forward pre-hooks that hand each target's input ``[B, T, D]`` to a callback;
- :func:`output_errors`: the report's measured ``rel_error`` of each swapped module against the dense one on the
  calibration inputs; :func:`monitoring` turns on a module's per-forward measurements (``monitor``) while the
  report is measured, so that the fit's forwards can run without them;
- the config checks every attention method shares (in :class:`AttentionSwapMethod`'s constructor):
  ``rank_multiple`` / ``min_rank`` stay 1, ``calibration_batches`` is an integer >= 0, or >= 1 for a method that
  ``needs_calibration`` (which :meth:`~AttentionSwapMethod.apply` also refuses to run without a batch);
- :meth:`AttentionSwapMethod.apply`: checks -> ``prepare`` (e.g. calibration, before any change) -> build every
  replacement -> swap them all -> ``finish`` (report rows). A failure before the swap leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lrk.checks import is_int
from lrk.decomp.base import Built, DecompMethod, Rows
from lrk.decomp.targets import TargetSelector
from lrk.errors import LrkConfigError
from lrk.layers.attention.dense import AttentionBase, MultiHeadSelfAttention
from lrk.layers.attention.stats import relative_error
from lrk.measure import count_params
from lrk.progress import progress

log = logging.getLogger(__name__)

PROGRESS_MIN_BATCHES = 8  # fewer calibration batches run quietly (a test, the default 4)
VIT_BACKBONES = "backbone=vit_hybrid, vit_edge, vit_tiny, vit_small or deit_small (name: vit)"


def token_count(model: nn.Module) -> int | None:
    """Tokens per image that the attention modules of a lrk ViT see: patches + prefix (class/distillation)
    tokens. None when the model does not expose ``patch_embed.num_patches`` (then T is known at run time only)."""
    patch_embed = getattr(model, "patch_embed", None)
    patches = getattr(patch_embed, "num_patches", None)
    if not isinstance(patches, int):
        return None
    prefix = getattr(model, "num_prefix_tokens", 0)
    return patches + (prefix if isinstance(prefix, int) else 0)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    ref = next(iter(model.parameters()), None)
    return ref.device if ref is not None else torch.device("cpu")


def calibration_images(batch: Any) -> torch.Tensor:
    """The image tensor of a calibration batch: the tensor itself, or the first item of an (images, labels) pair."""
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise LrkConfigError(
            f"calibration batch of type {type(batch).__name__} is invalid: it must be an image tensor "
            "[B, C, H, W] or an (images, labels) pair"
        )
    return batch


def run_batches(model: nn.Module, batches: Iterable[Any], desc: str = "calibration batches") -> int:
    """Run ``batches`` through ``model`` in eval mode without gradients (e.g. so that swapped modules record their
    statistics on the calibration batches). The train/eval modes are restored afterwards, also on error. Returns
    the number of batches run. From :data:`PROGRESS_MIN_BATCHES` batches a progress bar (:mod:`lrk.progress`)
    named ``desc`` shows the pass."""
    modes = {m: m.training for m in model.modules()}
    device = model_device(model)
    count = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in progress(batches, desc, min_total=PROGRESS_MIN_BATCHES, logger=log):
                model(calibration_images(batch).to(device))
                count += 1
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return count


def collect_attention_inputs(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Any],
    callback: Callable[[str, torch.Tensor], None],
    desc: str = "calibration (attention inputs)",
) -> int:
    """Run ``batches`` through ``model`` in eval mode without gradients (:func:`run_batches`); for every attention
    module named in ``names``, call ``callback(name, x)`` with its input ``x`` ([B, T, D]) from a forward pre-hook.

    The model's train/eval modes are restored afterwards, also on error. Returns the number of batches run.
    """
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            callback(_name, args[0].detach())

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        return run_batches(model, batches, desc)
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def monitoring(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Turn on the per-forward measurements (``monitor``) of ``modules`` for the block, restoring each module's
    setting afterwards, also on error: the report rows are measured on the calibration batches at apply, while
    the fit's forwards run without those host synchronisations (``monitor: false``, the default)."""
    saved = [(m, m.monitor) for m in modules if hasattr(m, "monitor")]
    try:
        for m, _ in saved:
            m.monitor = True
        yield
    finally:
        for m, before in saved:
            m.monitor = before


def output_errors(
    model: nn.Module,
    counterparts: Mapping[str, nn.Module],
    batches: Iterable[Any],
    swapped: bool = True,
) -> dict[str, float]:
    """The report's ``rel_error`` of every attention module named in ``counterparts``: ||new(x) - dense(x)||_F /
    ||dense(x)||_F, both squared sums taken over every input x that the calibration ``batches`` give the module
    inside ``model``, in float64.

    The module ``name`` of ``model`` runs inside the model's forwards (:func:`run_batches`: eval, no gradient) and
    ``counterparts[name]`` (in eval mode, restored after) on the same input. ``swapped=True``: the model holds the
    replacements and ``counterparts`` are the dense modules (inputs as the swapped model computes them);
    ``swapped=False``: the model is still dense and ``counterparts`` are the replacements (inputs as the dense
    model computes them). Every name gets 0.0 when ``batches`` is empty.
    """
    modules = dict(model.named_modules())
    sums = {name: [0.0, 0.0] for name in counterparts}

    def compare(name: str, x: torch.Tensor, output: torch.Tensor) -> None:
        other = counterparts[name](x)
        new, dense = (output, other) if swapped else (other, output)
        dense = dense.double()
        sums[name][0] += float((new.double() - dense).square().sum())
        sums[name][1] += float(dense.square().sum())

    handles = [
        modules[name].register_forward_hook(lambda m, args, out, _n=name: compare(_n, args[0], out))
        for name in counterparts
    ]
    modes = {name: m.training for name, m in counterparts.items()}
    try:
        for m in counterparts.values():
            m.eval()
        run_batches(model, batches, "measuring output errors")
    finally:
        for handle in handles:
            handle.remove()
        for name, m in counterparts.items():
            m.train(modes[name])
    return {name: relative_error(diff, ref) for name, (diff, ref) in sums.items()}


class AttentionSwapMethod(DecompMethod):
    """A method that replaces attention modules. Subclasses implement :meth:`build_module` and may override
    :meth:`prepare` (checks and calibration, before any change) and :meth:`finish` (report rows after the swap).

    Rank-policy keys are the subclass's business: an activation method such as SDRM applies its energy rule to
    each batch's activations, not to the weights.
    """

    supported = "the attention modules (lrk.models.AttentionBase) of a ViT/DeiT backbone"
    #: whether the method cannot work without calibration batches (then ``calibration_batches`` must be >= 1)
    needs_calibration: ClassVar[bool] = False
    #: what the calibration batches are for (error messages of a method with ``needs_calibration``)
    calibration_use: ClassVar[str] = ""
    #: why ``rank_multiple`` / ``min_rank`` can only be 1, appended to their error message ("" = no reason given)
    no_rank_rounding_reason: ClassVar[str] = ""
    #: whether every target must be a standard MultiHeadSelfAttention (the replacement reuses its qkv/proj)
    needs_dense_attention: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.check_no_rank_rounding()
        self.check_calibration_count()

    # --- checks shared by every attention method --------------------------------------------------------
    def check_no_rank_rounding(self) -> None:
        """``rank_multiple`` and ``min_rank`` must stay 1 (or null): no attention method rounds a rank."""
        for key in ("rank_multiple", "min_rank"):
            value = self.cfg[key]
            if value not in (None, 1):
                reason = f"; {self.no_rank_rounding_reason}" if self.no_rank_rounding_reason else ""
                raise LrkConfigError(
                    f"decomp.{key}={value!r} is invalid for decomp={self.name}: it supports only 1 (the default)"
                    f"{reason}"
                )

    def check_calibration_count(self) -> None:
        """``calibration_batches`` must be null or an integer >= 0 (>= 1 for a method with ``needs_calibration``)."""
        calib = self.cfg["calibration_batches"]
        least = 1 if self.needs_calibration else 0
        if calib is None or (is_int(calib) and calib >= least):
            return
        if self.needs_calibration:
            raise LrkConfigError(
                f"decomp.calibration_batches={calib!r} is invalid for decomp={self.name}: it must be an integer "
                f">= 1 ({self.calibration_use})"
            )
        raise LrkConfigError(f"decomp.calibration_batches={calib!r} is invalid: it must be an integer >= 0")

    def require_dense_attention(self, targets: Sequence[tuple[str, AttentionBase]]) -> None:
        """A method with ``needs_dense_attention`` refuses a target that is not a standard multi-head attention."""
        if not self.needs_dense_attention:
            return
        for name, module in targets:
            if not isinstance(module, MultiHeadSelfAttention):
                raise LrkConfigError(
                    f"decomp={self.name} cannot swap '{name}' ({type(module).__name__}): it replaces a standard "
                    "multi-head attention (lrk.models.MultiHeadSelfAttention) and reuses its qkv/proj weights"
                )

    def require_calibration(self, batches: Sequence[Any]) -> None:
        """A method with ``needs_calibration`` was handed no calibration batch: one clear error."""
        if self.needs_calibration and not batches:
            raise LrkConfigError(
                f"decomp={self.name} needs calibration batches (decomp.calibration_batches >= 1), got none: "
                f"{self.calibration_use}"
            )

    # --- hooks -----------------------------------------------------------------------------------------
    def finish(self, model: nn.Module, built: Built, batches: list[Any], context: dict[str, Any]) -> Rows:
        """Report rows after the swap (``built``: name, old module, new module). Default: one row per module
        with the parameter counts and the build seconds of the context (``context['seconds'][name]``)."""
        seconds = context.get("seconds", {})
        return [
            {
                "name": name,
                "kind": self.name,
                "shape": [new.dim, new.dim],
                "rank": float(new.dim),
                "ranks": [new.dim],
                "params_before": count_params(old),
                "params_after": count_params(new),
                "rel_error": 0.0,
                "energy": 1.0,
                "seconds": float(seconds.get(name, 0.0)),
            }
            for name, old, new in built
        ]

    # --- the contract ----------------------------------------------------------------------------------
    def selector(self, model: nn.Module) -> TargetSelector:
        """Every attention module (``targets: null``) or those whose names match ``targets``, minus ``skip``; a
        model without attention modules (a ResNet) is an error naming the model and asking for a ViT."""
        return TargetSelector(
            method=self.name,
            kinds=(AttentionBase,),
            label="attention modules",
            supported=self.supported,
            is_default=lambda n, m: True,
            support_error=lambda n, m: None,
            none_found=(
                f"decomp={self.name} needs a backbone with attention modules (a ViT: {VIT_BACKBONES}); "
                f"the backbone {type(model).__name__} has none"
            ),
        )

    def select_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        targets = super().select_targets(model)
        self.require_dense_attention(targets)
        return targets

    def check_batches(self, batches: list[Any]) -> None:
        self.require_calibration(batches)
