"""Layer merging (accelerating_lrd_paper Sec. 2.3, Fig. 3) as pure module surgery: model -> merged model + report.

Two kinds of merge, and what is exact about each:

1. **Bottleneck merge (Fig. 3, an approximation).** After vanilla LRD a ResNet bottleneck reads
   ``conv1 (1x1 C->W) -> bn1 -> relu -> [first 1x1 W->R1, core 3x3 R1->R2, last 1x1 R2->W] -> bn2 -> relu ->
   conv3 (1x1 W->S) -> bn3 (+ identity) -> relu``: six convolutions. Fig. 3 "mixes consecutive 1x1 conv layers":
   ``first`` is multiplied into ``conv1`` and ``last`` into ``conv3``, giving
   ``conv1' (1x1 C->R1) -> bn1' -> relu -> core (3x3 R1->R2) -> bn2' -> relu -> conv3' (1x1 R2->S) -> bn3``: a
   torchvision ``Bottleneck`` again, with the ranks inside, the original three convolutions (ResNet-50 keeps its
   50 layers) and ``C R1 + k^2 R1 R2 + R2 S`` weights. ``conv1 -> bn1 -> relu -> first`` has a non-linearity in
   between, so the merge *changes the function*: the ReLU that acted on W channels now acts on R1 (R2) channels.
   The paper merges before re-training; lrk does the same and measures what it costs. The linear parts are kept
   exactly: ``conv1' = first . diag(s1) . conv1`` and ``conv3' = conv3 . diag(s2) . last`` where ``s, t`` are
   the eval-mode affine maps of bn1 / bn2 (exact folds of a BN into the conv beside it, with nothing between).
   Batch norms: bn1 and bn2 (over W channels) are folded into the products; the new ``bn1'`` (R1 channels) and
   ``bn2'`` (R2 channels) are **re-fitted on the calibration batches**: running statistics of their inputs
   measured there, and weight/bias set so that in eval mode ``bn1'(q) = q + first (s1 . c1 + t1)`` exactly (the
   folded shift of bn1) and ``bn2'(y) = y``, i.e. the pre-activations equal the linearised LRD block's; in train
   mode they normalise by batch statistics close to those. The constant ``conv3 (s2 . b_last + t2)`` is taken
   into ``bn3``'s running mean (exact in eval mode; in train mode BN removes a per-channel constant anyway).
   Without a ``first`` factor (``decomp=svd`` on the 3x3: ``w0`` is the 3x3, ``w1`` the 1x1) only the back merge
   applies and conv1 / bn1 stay (conv1 folded to one conv if it was factorized: exact). Each merged block gets a
   report row with its relative output error on the calibration batches, before fine-tuning, against the vanilla
   LRD block (``merge_rel_error``) and against the dense block (``rel_error``, when the dense layers are known),
   and the vanilla LRD block's own error (``lrd_rel_error``); the model's logits error is
   :attr:`MergeReport.model_rel_error`. A factorized conv1 / conv3 is folded into the product (its factorization
   is gone: the merged block has one conv there). In a method's report (``decomp.merge=true``) the block's row
   replaces the rows of its conv1 / conv2 / conv3 (:func:`merged_rows`; ``params_before`` counts the dense
   block's conv1, bn1, conv2, bn2, conv3, ``params_after`` the merged ones), so the totals stay the built model's.
   Measured on a random-init ResNet-50 (benchmarks/freeze_merge.py): the merge moves a block's output by about as
   much as the decomposition itself (relative block errors ~0.4-0.8 before fine-tuning): fine-tuning is not
   optional after a merge.

2. **Exact folds (no non-linearity between).** Inside an ``nn.Sequential``, a factorized layer directly followed
   by a pointwise dense layer (``nn.Linear``, or a 1x1 ``nn.Conv2d`` with stride 1 and no padding), or a
   pointwise dense layer directly followed by a factorized layer whose first factor is pointwise, are one
   factorized layer: ``B . (w1 w0) = (B w1) w0`` and ``(w1 w0) . A = w1 (w0 A)`` (biases carried through).
   ``nn.Identity`` and ``nn.Dropout(p=0)`` between them are skipped. Exact to rounding (measured, report
   ``merge_rel_error`` ~1e-7). Not folded: two factorized layers in a row (a three-factor chain has no layer type
   here), two dense layers (an architecture choice, not the decomposition's), a k x k first factor after a dense
   1x1 (zero padding and a bias do not commute).

What cannot be merged, and is left alone:

- ResNet-18/34's ``BasicBlock`` (3x3 -> bn -> relu -> 3x3 -> bn): no 1x1 neighbours; a Tucker 3x3's 1x1 factors
  would meet each other only across a BN and a ReLU, and merging them would not bring the block back to two
  layers. Nothing in such a model is merged.
- ViT/DeiT (lrk.models.vit): no Linear is directly followed by another Linear: the MLP has a GELU between
  ``fc1`` and ``fc2``; ``qkv`` and ``proj`` have the attention (softmax, per-head products) between them; each
  block starts with a LayerNorm (a normalisation, not a linear map); the head follows a LayerNorm. The per-head
  value-output product ``W_v,h W_o,h`` is exact but is a d x d matrix per head: more parameters, not fewer, and
  not the attention module's structure. Nothing in a ViT is merged.

``merge: true`` on a model where nothing is mergeable is one :class:`LrkConfigError` (:func:`check_mergeable`,
before anything is decomposed).

For inference only, :func:`fold_batchnorm` folds every eval-mode BN into the conv before it (exact in eval mode;
not part of ``merge``, since the merged model is fine-tuned and BN in train mode uses batch statistics).

The merged modules are plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` inside torchvision's ``Bottleneck`` (and lrk's
factorized layers for the exact folds): they pickle, train, and ride in the checkpoint's structure skeleton
(:mod:`lrk.pipeline.structure`) like any other model.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer
from lrk.layers.svd import SVDConv2d, SVDLinear
from lrk.measure import count_params
from lrk.models.utils import replace_module

BOTTLENECK_KIND = "merged bottleneck"
#: the modules of a Bottleneck a merge rebuilds (bn3 keeps its size): a merged block row counts their parameters
MERGED_PARTS = ("conv1", "bn1", "conv2", "bn2", "conv3")
FOLD_KIND = "fold"
_LAYERS = (nn.Conv2d, nn.Linear)


# --- counting -------------------------------------------------------------------------------------------------
def weight_layers(model: nn.Module) -> int:
    """Conv2d + Linear modules of ``model`` (the depth: each factor of a factorized layer counts)."""
    return sum(isinstance(m, _LAYERS) for m in model.modules())


def main_path_layers(model: nn.Module) -> int:
    """:func:`weight_layers` without the ResNet ``downsample`` convs: the paper's "Layers" column (ResNet-50: 50,
    vanilla LRD at 2x: 115 in Table 1 counts this way)."""
    return sum(
        isinstance(m, _LAYERS) and "downsample" not in name.split(".") for name, m in model.named_modules()
    )


# --- the report -----------------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    """What :func:`merge_model` did. ``rows``: one per merged unit (a bottleneck or a folded pair), report-row
    keys (``name kind shape rank ranks params_before params_after rel_error energy seconds note``; a bottleneck's
    parameters are those of conv1, bn1, conv2, bn2, conv3, dense before and merged after) plus
    ``merged_layers`` (module names it replaced), ``merge_rel_error`` (output vs the unit before the merge),
    ``lrd_rel_error`` (the unit before the merge vs dense), ``exact``, ``layers_before`` / ``layers_after``.
    ``rel_error`` is the merged unit's relative output error against the dense unit on the calibration batches,
    before fine-tuning (None where the dense layers or the batches are not known). ``skipped``: units looked at
    and left, with the reason. ``model_rel_error``: relative error of the logits, merged vs before the merge."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    layers_before: int = 0
    layers_after: int = 0
    params_before: int = 0
    params_after: int = 0
    model_rel_error: float | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        errors = [r["merge_rel_error"] for r in self.rows if r.get("merge_rel_error") is not None]
        return {
            "merged_units": len(self.rows),
            "layers_before": self.layers_before,
            "layers_after": self.layers_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "merge_rel_error_max": max(errors) if errors else None,
            "model_rel_error": self.model_rel_error,
            "seconds": self.seconds,
        }


# --- linear algebra of the modules -----------------------------------------------------------------------------
def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``bn(u) = s u + t`` per channel in eval mode (running statistics), in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn_affine needs a BatchNorm with running statistics (track_running_stats=True)")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    s = weight / torch.sqrt(var + bn.eps)
    return s, bias - mean * s


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` with ``bn`` in eval mode (exact: an affine map after a linear one).
    The result has a bias; geometry, device and dtype of ``conv``."""
    s, t = bn_affine(bn)
    weight = conv.weight.detach().double() * s.reshape(-1, 1, 1, 1)
    bias = t if conv.bias is None else conv.bias.detach().double() * s + t
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(weight.to(conv.weight.dtype))
        out.bias.copy_(bias.to(conv.weight.dtype))
    return out


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """For inference: a copy of ``model`` (eval mode) with every BN that directly follows a conv folded into it
    (the BN becomes ``nn.Identity``). Pairs: consecutive ``(Conv2d, BatchNorm2d)`` children of an
    ``nn.Sequential``; ``conv1/bn1``, ``conv2/bn2``, ``conv3/bn3`` of torchvision's ``BasicBlock``/``Bottleneck``
    and the ResNet stem (a factorized conv there folds into its last factor, ``w1`` / ``last``). Exact in eval
    mode; the result must not be trained (BN in train mode uses batch statistics)."""
    out = copy.deepcopy(model).eval()
    for module in list(out.modules()):
        pairs: list[tuple[str, str]] = []
        if isinstance(module, nn.Sequential):
            keys = list(module._modules)
            pairs = list(itertools.pairwise(keys))
        elif isinstance(module, (BasicBlock, Bottleneck, ResNet)):
            pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        for conv_name, bn_name in pairs:
            conv, bn = module._modules.get(conv_name), module._modules.get(bn_name)
            if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
                continue
            holder, attr = _last_conv(module, conv_name, conv)
            if holder is None:
                continue
            setattr(holder, attr, fold_bn_into_conv(getattr(holder, attr), bn))
            setattr(module, bn_name, nn.Identity())
    return out


def _last_conv(parent: nn.Module, name: str, conv: nn.Module | None) -> tuple[nn.Module | None, str]:
    """The module holding the conv whose output is ``conv``'s output, and its attribute name."""
    if isinstance(conv, nn.Conv2d):
        return parent, name
    for attr in ("w1", "last", "pointwise_out"):
        if isinstance(conv, FactorizedLayer) and isinstance(getattr(conv, attr, None), nn.Conv2d):
            return conv, attr
    return None, ""


def _is_pointwise_conv(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and (conv.padding in ((0, 0), "valid"))
    )


def pointwise_matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(W out x in, bias)`` in float64 of a pointwise linear map: ``nn.Linear``, a 1x1 ``nn.Conv2d`` (stride 1,
    no padding, groups 1), or an SVD layer made of those; None for anything else."""
    if isinstance(module, nn.Linear):
        weight, bias = module.weight, module.bias
    elif _is_pointwise_conv(module):
        weight, bias = module.weight[:, :, 0, 0], module.bias
    elif isinstance(module, SVDLinear) or (
        isinstance(module, SVDConv2d) and _is_pointwise_conv(module.w0) and _is_pointwise_conv(module.w1)
    ):
        weight, bias = module.dense_weight().reshape(module.w1.weight.shape[0], -1), module.dense_bias()
    else:
        return None
    return weight.detach().double(), None if bias is None else bias.detach().double()


def _pointwise_conv(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Conv2d) -> nn.Conv2d:
    """A fresh 1x1 Conv2d (stride 1, no padding) holding ``weight`` (out x in, float64 -> ``like``'s dtype) and
    ``bias``, on ``like``'s device."""
    factory = {"device": like.weight.device, "dtype": like.weight.dtype}
    out = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=bias is not None, **factory)
    with torch.no_grad():
        out.weight.copy_(weight.to(out.weight.dtype)[:, :, None, None])
        if bias is not None:
            out.bias.copy_(bias.to(out.weight.dtype))
    return out


def split_spatial(layer: nn.Module) -> tuple[torch.Tensor | None, nn.Conv2d, torch.Tensor | None, Any] | None:
    """A factorized k x k conv as ``(lead, spatial, trail, trail_bias)``: the leading 1x1 factor as a matrix
    (R1 x C, None without one), the k x k factor (a Conv2d, grouped for a branched Tucker or CP core), the trailing
    1x1 factor (S x R2, None without one) and its bias. Tucker-2 (and branched Tucker): ``first``, ``core``,
    ``last``; CP: ``pointwise_in``, ``depthwise``, ``pointwise_out``; SVD of a k x k: no lead, ``w0``, ``w1``.
    None for a layer that is not one of these (a dense conv, TT, TRAWL)."""
    if not isinstance(layer, FactorizedLayer):
        return None
    for lead, core, trail in (("first", "core", "last"), ("pointwise_in", "depthwise", "pointwise_out")):
        a, k, b = (getattr(layer, n, None) for n in (lead, core, trail))
        if _is_pointwise_conv(a) and isinstance(k, nn.Conv2d) and _is_pointwise_conv(b) and a.bias is None:
            return a.weight[:, :, 0, 0], k, b.weight[:, :, 0, 0], b.bias
    if isinstance(layer, SVDConv2d) and _is_pointwise_conv(layer.w1):
        return None, layer.w0, layer.w1.weight[:, :, 0, 0], layer.w1.bias
    return None


def _identity_bn(
    like: nn.BatchNorm2d, channels: int, mean: torch.Tensor, var: torch.Tensor, shift
) -> nn.BatchNorm2d:
    """A BN over ``channels`` re-fitted to its input statistics ``mean``/``var`` (calibration batches) that in
    eval mode computes exactly ``q + shift``: running stats (mean, var), weight sqrt(var + eps), bias mean + shift."""
    bn = nn.BatchNorm2d(
        channels, eps=like.eps, momentum=like.momentum, device=like.weight.device, dtype=like.weight.dtype
    )
    dtype = bn.weight.dtype
    with torch.no_grad():
        bn.running_mean.copy_(mean.to(dtype))
        bn.running_var.copy_(var.to(dtype))
        bn.weight.copy_(torch.sqrt(var + like.eps).to(dtype))
        bn.bias.copy_((mean + (0.0 if shift is None else shift)).to(dtype))
    return bn.train(like.training)


# --- the plan -------------------------------------------------------------------------------------------------
def _passthrough(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


def _fold_pair(a: nn.Module, b: nn.Module) -> nn.Module | None:
    """``b(a(x))`` as one factorized layer (exact), or None when the pair is not foldable (module docstring)."""
    linear = isinstance(a, (nn.Linear, SVDLinear)) and isinstance(b, (nn.Linear, SVDLinear))
    conv = isinstance(a, (nn.Conv2d, SVDConv2d)) and isinstance(b, (nn.Conv2d, SVDConv2d))
    if not (linear or conv):
        return None
    with torch.no_grad():
        if isinstance(a, (SVDLinear, SVDConv2d)) and not isinstance(b, FactorizedLayer):
            matrix = pointwise_matrix(b)
            if matrix is None:
                return None
            weight, bias = matrix
            w1 = a.w1.weight.detach().double().reshape(a.w1.weight.shape[0], -1)
            new_w = weight @ w1
            b1 = a.w1.bias.detach().double() if a.w1.bias is not None else None
            new_b = (
                None
                if (bias is None and b1 is None)
                else ((weight @ b1 if b1 is not None else 0.0) + (bias if bias is not None else 0.0))
            )
            out = copy.deepcopy(a)
            out.w1 = _linear_like(a.w1, new_w, new_b)
            if isinstance(out, SVDLinear):
                out.out_features = new_w.shape[0]
            return out.train(a.training)
        if isinstance(b, (SVDLinear, SVDConv2d)) and not isinstance(a, FactorizedLayer):
            matrix = pointwise_matrix(a)
            if matrix is None or (isinstance(b, SVDConv2d) and not _is_pointwise_conv(b.w0)):
                return None
            weight, bias = matrix
            w0 = b.w0.weight.detach().double().reshape(b.w0.weight.shape[0], -1)
            out = copy.deepcopy(b)
            out.w0 = _linear_like(b.w0, w0 @ weight, None)
            if bias is not None:  # w1 (w0 (A x + a_b)) = ... + w1 w0 a_b
                w1 = b.w1.weight.detach().double().reshape(b.w1.weight.shape[0], -1)
                shift = w1 @ (w0 @ bias)
                old = b.w1.bias.detach().double() if b.w1.bias is not None else 0.0
                out.w1 = _linear_like(b.w1, w1, shift + old)
            if isinstance(out, SVDLinear):
                out.in_features = weight.shape[1]
            return out.train(b.training)
    return None


def _linear_like(like: nn.Module, weight: torch.Tensor, bias) -> nn.Module:
    """A Linear (``like`` a Linear) or 1x1 Conv2d (``like`` a pointwise conv) holding ``weight`` (out x in)."""
    if isinstance(like, nn.Linear):
        out = nn.Linear(
            weight.shape[1],
            weight.shape[0],
            bias=bias is not None,
            device=like.weight.device,
            dtype=like.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(weight.to(out.weight.dtype))
            if bias is not None:
                out.bias.copy_(torch.as_tensor(bias).to(out.weight.dtype))
        return out
    return _pointwise_conv(weight, None if bias is None else torch.as_tensor(bias, dtype=torch.float64), like)


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Consecutive (a, b) children of every nn.Sequential (passthroughs skipped), by qualified name."""
    out = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = [k for k, m in seq._modules.items() if m is not None and not _passthrough(m)]
        prefix = f"{name}." if name else ""
        out += [(prefix + a, prefix + b) for a, b in itertools.pairwise(keys)]
    return out


def _bottlenecks(model: nn.Module) -> list[tuple[str, Bottleneck]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Bottleneck)]


def check_mergeable(model: nn.Module, targets: Sequence[str], method: str) -> dict[str, int]:
    """Before decomposing: the units ``merge`` can act on once ``targets`` are factorized (bottlenecks whose
    ``conv2`` is a target; Sequential pairs with a target beside a pointwise layer). None: one
    :class:`LrkConfigError` saying why (BasicBlocks, a ViT, targets that miss every bottleneck's conv2)."""
    wanted = set(targets)
    blocks = [n for n, _ in _bottlenecks(model) if f"{n}.conv2" in wanted]
    modules = dict(model.named_modules())
    pairs = [
        (a, b)
        for a, b in _pairs(model)
        if (a in wanted) != (b in wanted)  # exactly one factorized: two factorized layers are not folded
        and isinstance(modules[a], _LAYERS)
        and isinstance(modules[b], _LAYERS)
        and (
            pointwise_matrix(modules[b]) is not None
            if a in wanted
            else pointwise_matrix(modules[a]) is not None
        )
    ]
    if blocks or pairs:
        return {"bottlenecks": len(blocks), "pairs": len(pairs)}
    n_bottleneck = len(_bottlenecks(model))
    n_basic = sum(isinstance(m, BasicBlock) for m in model.modules())
    facts = []
    if n_basic:
        facts.append(
            f"its {n_basic} BasicBlock(s) (3x3 -> bn -> relu -> 3x3 -> bn) have no 1x1 conv beside a 3x3 to merge into"
        )
    if n_bottleneck:
        facts.append(f"none of its {n_bottleneck} Bottleneck(s) has its conv2 among the targets")
    if not n_basic and not n_bottleneck:
        facts.append(
            "it has no ResNet Bottleneck, and no factorized Linear/1x1 conv sits directly beside a pointwise layer "
            "in an nn.Sequential (in a ViT a GELU, the attention or a LayerNorm is between any two Linears)"
        )
    raise LrkConfigError(
        f"decomp.merge=true finds nothing to merge for decomp={method}: "
        + "; ".join(facts)
        + ". merge folds a decomposed 3x3 conv2 of a ResNet Bottleneck into its 1x1 neighbours "
        "(accelerating_lrd_paper Fig. 3) and a factorized layer into a Linear/1x1 conv directly beside it; "
        "set merge: false (or target the bottlenecks' conv2, e.g. targets: ['layer*.*.conv2'])"
    )


# --- the merge ------------------------------------------------------------------------------------------------
class _Stats:
    """Per-channel mean and variance of [N, C, H, W] activations, accumulated in float64."""

    def __init__(self) -> None:
        self.n, self.sum, self.sq = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        self.n += x.shape[1]
        self.sum = self.sum + x.sum(1)
        self.sq = self.sq + (x * x).sum(1)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.n
        return mean, (self.sq / self.n - mean * mean).clamp_min(0.0) * self.n / max(1, self.n - 1)


class _Err:
    """Accumulates ||a - b||^2 and ||b||^2."""

    def __init__(self) -> None:
        self.diff, self.ref = 0.0, 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.diff += float((a.double() - b.double()).square().sum())
        self.ref += float(b.double().square().sum())

    def value(self) -> float | None:
        return (self.diff**0.5) / (self.ref**0.5) if self.ref > 0 else (0.0 if self.diff == 0 else None)


@dataclass
class _Block:
    name: str
    old: Bottleneck
    new: Bottleneck
    dense: Bottleneck | None
    lead: bool
    trail: bool
    spatial: nn.Conv2d
    shift1: torch.Tensor | None = None
    stats1: _Stats = field(default_factory=_Stats)
    stats2: _Stats = field(default_factory=_Stats)
    err_merge: _Err = field(default_factory=_Err)
    err_dense: _Err = field(default_factory=_Err)
    err_lrd: _Err = field(default_factory=_Err)


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise LrkConfigError(
            f"calibration batches must be image tensors or (images, ...) tuples, got {type(batch).__name__}"
        )
    return batch


def _run(model: nn.Module, batches: Sequence[Any], hooks: Mapping[nn.Module, Callable]) -> list[torch.Tensor]:
    """Forward every batch through ``model`` (no grad) with forward hooks ``fn(input, output)``; the logits."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handles = [
        m.register_forward_hook(lambda _m, args, out, fn=fn: fn(args[0], out)) for m, fn in hooks.items()
    ]
    try:
        with torch.no_grad():
            return [model(_images(b).to(device)) for b in batches]
    finally:
        for h in handles:
            h.remove()


def _block_plan(name: str, block: Bottleneck, dense: Bottleneck | None) -> tuple[_Block | None, str]:
    split = split_spatial(block.conv2)
    if split is None:
        return None, f"conv2 is a {type(block.conv2).__name__}, not a factorized k x k conv with 1x1 factors"
    lead, spatial, trail, trail_bias = split
    m1, m3 = pointwise_matrix(block.conv1), pointwise_matrix(block.conv3)
    if m1 is None or m3 is None:
        return None, "conv1/conv3 are not pointwise (1x1, stride 1, no padding) linear maps"
    if block.bn1.running_mean is None or block.bn2.running_mean is None or block.bn3.running_mean is None:
        return None, "a batch norm without running statistics"
    (w1, c1), (w3, c3) = m1, m3
    s1, t1 = bn_affine(block.bn1)
    s2, t2 = bn_affine(block.bn2)
    like = spatial
    replaced = {
        id(block._modules[k]): nn.Identity() for k in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    }
    new = copy.deepcopy(block, replaced)
    shift1 = None
    if lead is not None:  # conv1' = first . diag(s1) . conv1; shift first (s1 c1 + t1) goes into bn1'
        lead = lead.detach().double()
        new.conv1 = _pointwise_conv(lead @ (s1[:, None] * w1), None, like)
        shift1 = lead @ (t1 if c1 is None else s1 * c1 + t1)
        new.bn1 = copy.deepcopy(block.bn1)  # placeholder: re-fitted after the first calibration pass
    else:
        new.conv1 = block.conv1 if isinstance(block.conv1, nn.Conv2d) else _pointwise_conv(w1, c1, like)
        new.conv1 = copy.deepcopy(new.conv1)
        new.bn1 = copy.deepcopy(block.bn1)
    new.conv2 = copy.deepcopy(spatial)
    new.bn3 = copy.deepcopy(block.bn3)
    # conv3' = conv3 . diag(s2) . last; the constant conv3 (s2 b + t2) + c3 goes into bn3's running mean
    if trail is not None:
        trail = trail.detach().double()
        new.conv3 = _pointwise_conv(w3 @ (s2[:, None] * trail), None, like)
        b2 = t2 if trail_bias is None else s2 * trail_bias.detach().double() + t2
        constant = w3 @ b2 + (0.0 if c3 is None else c3)
        with torch.no_grad():
            new.bn3.running_mean.sub_(constant.to(new.bn3.running_mean.dtype))
        new.bn2 = copy.deepcopy(block.bn2)  # placeholder: re-fitted after the second calibration pass
    else:
        new.conv3 = copy.deepcopy(
            block.conv3 if isinstance(block.conv3, nn.Conv2d) else _pointwise_conv(w3, c3, like)
        )
        new.bn2 = copy.deepcopy(block.bn2)
    new.train(block.training)
    return _Block(name, block, new, dense, lead is not None, trail is not None, new.conv2, shift1), ""


def _dense_block(name: str, block: Bottleneck, originals: Mapping[str, nn.Module]) -> Bottleneck | None:
    """The block with its pre-decomposition layers (``originals``, the downsample conv included) in place, or
    None when none is known."""
    memo = {id(m): originals[n] for n, m in block.named_modules(prefix=name) if n != name and n in originals}
    return copy.deepcopy(block, memo) if memo else None


def merge_model(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    originals: Mapping[str, nn.Module] | None = None,
) -> MergeReport:
    """Merge ``model`` in place (module docstring): every torchvision ``Bottleneck`` whose ``conv2`` is a
    factorized k x k conv with 1x1 factors (Fig. 3, an approximation, BNs re-fitted on ``batches``), and every
    exactly foldable pair in an ``nn.Sequential``. ``originals``: module name -> the dense module a decomposition
    replaced (for the errors against the dense model). Needs at least one calibration batch when a bottleneck
    is merged. Returns the :class:`MergeReport`; merging nothing is not an error here (the method's
    :func:`check_mergeable` and ``finish`` decide that)."""
    start = time.perf_counter()
    batches = list(batches or [])
    originals = dict(originals or {})
    report = MergeReport(layers_before=weight_layers(model), params_before=count_params(model))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        blocks: list[_Block] = []
        for name, block in _bottlenecks(model):
            plan, reason = _block_plan(name, block, _dense_block(name, block, originals))
            if plan is None:
                report.skipped.append({"name": name, "reason": reason})
            else:
                plan.new.eval()
                if plan.dense is not None:
                    plan.dense.eval()
                blocks.append(plan)
        if blocks and not batches:
            raise LrkConfigError(
                "decomp.merge=true needs calibration batches to re-fit the merged bottlenecks' batch norms "
                "(decomp.calibration_batches >= 1)"
            )
        pair_plans = _pair_plans(model, originals, report)
        if blocks:
            _calibrate(model, batches, blocks)
        reference = _measure(model, batches, blocks, pair_plans) if batches else []
        for plan in blocks:
            replace_module(model, plan.name, plan.new)
            report.rows.append(_block_row(plan, originals))
        for plan in pair_plans:
            replace_module(model, plan["a"], plan["new"])
            replace_module(model, plan["b"], nn.Identity())
            report.rows.append(_pair_row(plan))
        if reference:
            err = _Err()
            for out, ref in zip(_run(model, batches, {}), reference, strict=True):
                err.add(out, ref)
            report.model_rel_error = err.value()
    finally:  # every module back in its mode; a new module takes the mode of the one it replaced
        for module, training in modes.items():
            module.training = training
        for plan in blocks:
            plan.new.train(modes[plan.old])
        for plan in pair_plans:
            plan["new"].train(modes[plan["a_module"]])
    for row in report.rows:
        row["seconds"] = (time.perf_counter() - start) / max(1, len(report.rows))
    report.layers_after = weight_layers(model)
    report.params_after = count_params(model)
    report.seconds = time.perf_counter() - start
    return report


def _calibrate(model: nn.Module, batches: Sequence[Any], blocks: list[_Block]) -> None:
    """Re-fit bn1' (first pass: statistics of conv1'(x)) and bn2' (second pass: of conv2'(relu(bn1'(conv1' x))))
    of every merged block on the block's own inputs in the model before the merge."""
    hooks = {b.old: (lambda x, _out, b=b: b.stats1.add(b.new.conv1(x))) for b in blocks if b.lead}
    if hooks:
        _run(model, batches, hooks)
    for b in blocks:
        if b.lead:
            mean, var = b.stats1.mean_var()
            b.new.bn1 = _identity_bn(b.old.bn1, mean.numel(), mean, var, b.shift1).eval()

    def second(b: _Block, x: torch.Tensor) -> None:
        b.stats2.add(b.new.conv2(b.new.relu(b.new.bn1(b.new.conv1(x)))))

    hooks = {b.old: (lambda x, _out, b=b: second(b, x)) for b in blocks if b.trail}
    if hooks:
        _run(model, batches, hooks)
    for b in blocks:
        if b.trail:
            mean, var = b.stats2.mean_var()
            b.new.bn2 = _identity_bn(b.old.bn2, mean.numel(), mean, var, None).eval()


def _measure(
    model: nn.Module, batches: Sequence[Any], blocks: list[_Block], pairs: list[dict]
) -> list[torch.Tensor]:
    """One pass of the model before the merge: each unit's merged output against its output (and the dense
    unit's); returns the logits."""

    def block_hook(b: _Block, x: torch.Tensor, out: torch.Tensor) -> None:
        merged = b.new(x.clone())
        b.err_merge.add(merged, out)
        if b.dense is not None:
            dense = b.dense(x.clone())
            b.err_dense.add(merged, dense)
            b.err_lrd.add(out, dense)

    def pair_hook(p: dict, x: torch.Tensor, out_a: torch.Tensor) -> None:
        ref = p["b_module"](out_a)
        merged = p["new"](x)
        p["err_merge"].add(merged, ref)
        if p["dense_a"] is not p["a_module"] or p["dense_b"] is not p["b_module"]:
            # the hooked module itself is never called again here (its output is out_a)
            dense = p["dense_b"](out_a if p["dense_a"] is p["a_module"] else p["dense_a"](x))
            p["err_dense"].add(merged, dense)
            p["err_lrd"].add(ref, dense)

    hooks: dict[nn.Module, Callable] = {b.old: (lambda x, out, b=b: block_hook(b, x, out)) for b in blocks}
    for p in pairs:
        hooks[p["a_module"]] = lambda x, out, p=p: pair_hook(p, x, out)
    return _run(model, batches, hooks)


def _pair_plans(model: nn.Module, originals: Mapping[str, nn.Module], report: MergeReport) -> list[dict]:
    modules = dict(model.named_modules())
    plans, used = [], set()
    for a, b in _pairs(model):
        if a in used or b in used:
            continue
        ma, mb = modules[a], modules[b]
        kinds = (*_LAYERS, FactorizedLayer)
        if not (isinstance(ma, kinds) and isinstance(mb, kinds)):
            continue
        if not (isinstance(ma, FactorizedLayer) or isinstance(mb, FactorizedLayer)):
            continue
        new = _fold_pair(ma, mb)
        if new is None:
            report.skipped.append(
                {"name": f"{a}+{b}", "reason": "not an exactly foldable pair (see lrk.decomp.merge)"}
            )
            continue
        used |= {a, b}
        plans.append(
            {
                "a": a,
                "b": b,
                "a_module": ma,
                "b_module": mb,
                "new": new.eval(),
                "dense_a": originals.get(a, ma),
                "dense_b": originals.get(b, mb),
                "before": count_params(originals.get(a, ma)) + count_params(originals.get(b, mb)),
                "layers_before": weight_layers(ma) + weight_layers(mb),
                "err_merge": _Err(),
                "err_dense": _Err(),
                "err_lrd": _Err(),
            }
        )
    return plans


def _block_row(plan: _Block, originals: Mapping[str, nn.Module]) -> dict[str, Any]:
    names = [f"{plan.name}.{k}" for k in ("conv1", "conv2", "conv3")]
    before = sum(count_params(originals.get(n, getattr(plan.old, n.rsplit(".", 1)[1]))) for n in names)
    after = sum(count_params(getattr(plan.new, k)) for k in MERGED_PARTS)
    # bn1' and bn2' have R1 and R2 channels where bn1 and bn2 had W
    before += sum(count_params(getattr(plan.old, k)) for k in ("bn1", "bn2"))
    spatial = plan.spatial
    dense2 = originals.get(names[1])
    shape = list(dense2.weight.shape) if isinstance(dense2, nn.Conv2d) else list(spatial.weight.shape)
    ranks = [spatial.out_channels, spatial.in_channels] if plan.lead else [spatial.out_channels]
    rel = plan.err_dense.value() if plan.dense is not None else None
    how = []
    if plan.lead:
        how.append("conv2's first 1x1 merged into conv1 across bn1+relu (relu now on R1 channels)")
    if plan.trail:
        how.append("conv2's last 1x1 merged into conv3 across bn2+relu (relu now on R2 channels)")
    return {
        "name": plan.name,
        "kind": f"{BOTTLENECK_KIND} ({type(plan.old.conv2).__name__})",
        "shape": shape,
        "rank": float(sum(ranks) / len(ranks)),
        "ranks": ranks,
        "params_before": before,
        "params_after": after,
        "rel_error": rel,
        "energy": None if rel is None else max(0.0, 1.0 - rel * rel),
        "seconds": 0.0,
        "note": "approximation (Fig. 3): "
        + "; ".join(how)
        + "; bn1'/bn2' re-fitted on the calibration batches; "
        "rel_error = relative output error of the merged block vs the dense block on the calibration batches, "
        "before fine-tuning",
        "merged_layers": names,
        "merge_rel_error": plan.err_merge.value(),
        "lrd_rel_error": plan.err_lrd.value() if plan.dense is not None else None,
        "exact": False,
        "layers_before": weight_layers(plan.old),
        "layers_after": weight_layers(plan.new),
    }


def _pair_row(plan: dict) -> dict[str, Any]:
    new = plan["new"]
    rel = plan["err_dense"].value()
    return {
        "name": f"{plan['a']}+{plan['b']}",
        "kind": f"{FOLD_KIND} ({type(plan['a_module']).__name__} + {type(plan['b_module']).__name__})",
        "shape": list(new.dense_weight().shape),
        "rank": float(new.ranks[0]),
        "ranks": list(new.ranks),
        "params_before": plan["before"],
        "params_after": count_params(new),
        "rel_error": rel,
        "energy": None if rel is None else max(0.0, 1.0 - rel * rel),
        "seconds": 0.0,
        "note": "exact fold (nothing between the two layers); rel_error = output error vs the dense pair",
        "merged_layers": [plan["a"], plan["b"]],
        "merge_rel_error": plan["err_merge"].value(),
        "lrd_rel_error": plan["err_lrd"].value(),
        "exact": True,
        "layers_before": plan["layers_before"],
        "layers_after": weight_layers(new),
    }


def merged_rows(layer_rows: list[dict[str, Any]], report: MergeReport) -> list[dict[str, Any]]:
    """The method's report rows after a merge: the rows of the layers a merged unit replaced give way to the
    unit's row (at the place of the first of them), whose ``seconds`` also carry their decomposition time and
    ``weight_rel_error`` the decomposed conv2's (or factorized layer's) weight error."""
    owner = {name: row for row in report.rows for name in row["merged_layers"]}
    out, placed = [], set()
    by_name = {r["name"]: r for r in layer_rows}
    for row in layer_rows:
        unit = owner.get(row["name"])
        if unit is None:
            out.append(row)
            continue
        if id(unit) in placed:
            continue
        placed.add(id(unit))
        inner = [by_name[n] for n in unit["merged_layers"] if n in by_name]
        unit["seconds"] += sum(r["seconds"] for r in inner)
        conv2 = next((r for r in inner if r["name"].endswith(".conv2")), None) if not unit["exact"] else None
        factorized = [r for r in inner if r.get("ranks")]
        source = conv2 if conv2 is not None else (factorized[0] if factorized else None)
        unit["weight_rel_error"] = source["rel_error"] if source is not None else None
        if unit["rel_error"] is None:  # not measured (no batches): the decomposition's weight error stands in
            unit["rel_error"] = unit["weight_rel_error"] or 0.0
            unit["energy"] = max(0.0, 1.0 - unit["rel_error"] ** 2)
        out.append(unit)
    out += [r for r in report.rows if id(r) not in placed]
    return out
