"""Base of the factorized layers, their common protocol, and helpers to build them from dense ones (no config).

The protocol (:class:`FactorizedLayer`), implemented by every factorized Linear/Conv layer:

- ``cls.from_dense(module, ranks, **options)``: the uniform constructor from a dense ``nn.Linear`` /
  ``nn.Conv2d`` (it delegates to the layer's own ``from_linear`` / ``from_conv``; those stay);
- ``dense_weight()`` / ``dense_bias()``: the equivalent dense weight (the dense module's shape) and bias;
- ``factors()``: the named factor parameters (biases are not factors), to freeze or regularise some
  (accelerating_lrd_paper Sec. 2.2, "Layer Freezing");
- ``fold(keep=None)``: an equivalent module with fewer layers (accelerating_lrd_paper Sec. 2.3, "Layer
  Merging"): by default the dense ``nn.Linear`` / ``nn.Conv2d``; each layer documents its partial merges;
- ``flops(input_shape)``: analytic FLOPs of one forward, the count ``torch.utils.flop_counter`` makes.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Ranks = tuple[int, ...]


def describe(module: nn.Module) -> str:
    """A short description of a layer for messages and reports: ``Linear 192->576``, ``Conv2d 64->128 3x3``."""
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "x".join(str(k) for k in module.kernel_size)
        groups = f", groups={module.groups}" if module.groups != 1 else ""
        return f"{type(module).__name__} {module.in_channels}->{module.out_channels} {kernel}{groups}"
    return type(module).__name__


def conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    """A bias-free Conv2d with ``conv``'s kernel size, stride, padding, dilation, padding mode, device and
    dtype: the spatial factor of a factorized convolution (SVD, Tucker-2 core, CP depthwise)."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=groups,
        bias=False,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


# --- building dense modules (fold) --------------------------------------------------------------------------
def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A fresh ``nn.Linear`` holding copies of ``weight`` (out x in) and ``bias``."""
    weight = weight.detach()
    out = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    return out


def dense_conv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    padding_mode: str = "zeros",
) -> nn.Conv2d:
    """A fresh ``nn.Conv2d`` (groups=1) holding copies of ``weight`` (S x C x kh x kw) and ``bias``, with the
    given geometry."""
    weight = weight.detach()
    out = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias is not None,
        padding_mode=padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    return out


def dense_conv_like(geometry: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """:func:`dense_conv` with the stride, padding, dilation and padding mode of ``geometry``."""
    return dense_conv(
        weight, bias, geometry.stride, geometry.padding, geometry.dilation, geometry.padding_mode
    )


# --- FLOPs ----------------------------------------------------------------------------------------------------
def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv2d_output_size(
    size: Sequence[int], kernel: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1
) -> tuple[int, int]:
    """Output (H, W) of a 2-d convolution: ``floor((H + 2 p - d (k - 1) - 1) / s) + 1`` per side (the formula
    of ``nn.Conv2d``); ``padding`` may also be ``'valid'`` (0) or ``'same'`` (output = input)."""
    if padding == "same":
        return int(size[0]), int(size[1])
    pad = (0, 0) if padding == "valid" else _pair(padding)
    k, s, d = _pair(kernel), _pair(stride), _pair(dilation)
    oh, ow = ((int(size[i]) + 2 * pad[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))
    if min(oh, ow) < 1:
        raise ValueError(
            f"input size {tuple(size)} is too small for kernel {k} (dilation {d}, padding {pad})"
        )
    return oh, ow


def _image_shape(input_shape: Sequence[int], channels: int, who: str) -> tuple[int, int, int]:
    """(batch, H, W) of an input ``(B, C, H, W)`` or ``(C, H, W)`` with ``channels`` channels."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1] != channels:
        raise ValueError(f"{who}: input shape {tuple(input_shape)} is not (B, {channels}, H, W)")
    return shape[0], shape[2], shape[3]


def _rows(input_shape: Sequence[int], features: int, who: str) -> int:
    """Number of rows of an input ``(..., features)``."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or shape[-1] != features:
        raise ValueError(f"{who}: input shape {tuple(input_shape)} does not end with in_features={features}")
    return math.prod(shape[:-1])


def _conv_flops(conv: nn.Conv2d, input_shape: Sequence[int]) -> tuple[int, tuple[int, int, int, int]]:
    """FLOPs of ``conv`` (2 per multiply-add: 2 B H' W' S (C / groups) kh kw) and its output shape."""
    batch, h, w = _image_shape(input_shape, conv.in_channels, describe(conv))
    oh, ow = conv2d_output_size((h, w), conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    per_pixel = conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    return 2 * batch * oh * ow * per_pixel, (batch, conv.out_channels, oh, ow)


def module_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Analytic FLOPs of one forward of ``module`` for an input of ``input_shape``: a
    :class:`FactorizedLayer` (its :meth:`~FactorizedLayer.flops`), an ``nn.Linear``, an ``nn.Conv2d``, or an
    ``nn.Sequential`` of Linear/Conv2d (what :meth:`FactorizedLayer.fold` returns). 2 FLOPs per
    multiply-add of every matrix product and convolution; biases and elementwise operations not counted."""
    return _flops_and_shape(module, tuple(int(d) for d in input_shape))[0]


def _flops_and_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    if isinstance(module, FactorizedLayer):
        return module.flops(shape), ()
    if isinstance(module, nn.Linear):
        rows = _rows(shape, module.in_features, describe(module))
        return 2 * rows * module.in_features * module.out_features, (*shape[:-1], module.out_features)
    if isinstance(module, nn.Conv2d):
        flops, out = _conv_flops(module, shape)
        return flops, out if len(shape) == 4 else out[1:]
    if isinstance(module, nn.Sequential):
        total = 0
        for child in module:
            if isinstance(child, FactorizedLayer):
                raise TypeError("module_flops: a FactorizedLayer inside an nn.Sequential is not supported")
            flops, shape = _flops_and_shape(child, shape)
            total += flops
        return total, shape
    raise TypeError(f"module_flops: {type(module).__name__} is not supported")


# --- the protocol -------------------------------------------------------------------------------------------
class ClassFormula:
    """A method name that is a static closed form on the class and the protocol's method on an instance.

    Kept for old callers: ``SVDLinear.flops(batch, in, out, rank)`` (on the class) is the closed form, while
    ``layer.flops(input_shape)`` (on an instance) is :meth:`FactorizedLayer.flops`.
    """

    def __init__(self, on_class: Callable[..., int], on_instance: Callable[..., int]) -> None:
        self.on_class, self.on_instance = on_class, on_instance
        self.__doc__ = on_instance.__doc__

    def __get__(self, obj: Any, objtype: type | None = None) -> Callable[..., int]:
        if obj is None:
            return self.on_class
        return types.MethodType(self.on_instance, obj)


def as_ranks(ranks: int | Sequence[int], n: int, who: str) -> Ranks:
    """``ranks`` as a tuple of ``n`` ints (an int is repeated ``n`` times); a ValueError names a bad value."""
    values = (ranks,) * n if isinstance(ranks, int) else tuple(ranks)
    if len(values) != n or not all(isinstance(r, int) and not isinstance(r, bool) for r in values):
        raise ValueError(f"{who}: ranks={ranks!r} is invalid: it must be an int or {n} ints")
    return values


def check_rank(rank: int, low: int, high: int, who: str, what: str = "rank") -> None:
    """ValueError naming ``rank`` unless ``low <= rank <= high``."""
    if not low <= rank <= high:
        raise ValueError(f"{who}: {what}={rank} is invalid: it must lie in [{low}, {high}]")


def expect_module(module: nn.Module, kind: type, who: str) -> None:
    """TypeError unless ``module`` is a ``kind`` (nn.Linear / nn.Conv2d)."""
    if not isinstance(module, kind):
        raise TypeError(f"{who}.from_dense needs an nn.{kind.__name__}, got {type(module).__name__}")


class FactorizedLayer(nn.Module):
    """Base of every factorized Linear/Conv layer, and the protocol each one implements.

    - :meth:`from_dense` (classmethod): build the layer from a dense ``nn.Linear`` / ``nn.Conv2d`` at
      ``ranks`` (an int or a tuple; the layer's docstring says what its ranks are). A rank outside the
      valid range raises a ValueError that names it.
    - :meth:`dense_weight`, :meth:`dense_bias`: the equivalent dense weight (shape of the dense module's
      weight) and bias (``None`` without one).
    - :meth:`factors`: the factor parameters by name. A key is the parameter's path inside the layer with a
      trailing ``.weight`` dropped (``"w0"`` is ``self.w0.weight``, ``"cores.0"`` is ``self.cores[0]``).
      Biases are not factors: ``factors()`` plus the biases are all of ``self.parameters()``. Freezing some
      factors while fine-tuning is accelerating_lrd_paper Sec. 2.2 ("Layer Freezing").
    - :meth:`fold`: an equivalent module with fewer layers (accelerating_lrd_paper Sec. 2.3, "Layer
      Merging"); ``keep=None`` gives the dense ``nn.Linear`` / ``nn.Conv2d`` (stride, padding, dilation,
      padding mode and bias kept) with weight :meth:`dense_weight`; layers with three factors also merge
      partially (``keep="first"`` / ``"last"``, see each layer). The result is a new module with copies of
      the weights, on the layer's device and dtype.
    - :meth:`flops`: FLOPs of one forward for an input of ``input_shape`` from the layer's own shapes: 2 per
      multiply-add of every matrix product and convolution (what ``torch.utils.flop_counter.FlopCounterMode``
      counts); bias additions and elementwise operations are not counted. Conv output sizes follow from
      stride, padding and dilation.

    The paper's own Sec. 2.3 merge (Fig. 3) fuses a Tucker layer's 1x1 convolutions with the *neighbouring*
    1x1 convolutions of a ResNet bottleneck, across the BN/ReLU between them: a change of the model that
    needs its neighbours (the pipeline's merge stage), not an identity of one layer, so it is not ``fold``.
    """

    ranks: Ranks

    @classmethod
    def from_dense(cls, module: nn.Module, ranks: int | Sequence[int], **options: Any) -> FactorizedLayer:
        """The layer factorizing ``module`` at ``ranks``; ``options`` are the layer's own (see its docstring)."""
        raise NotImplementedError(f"{cls.__name__}.from_dense is not implemented")

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The equivalent dense weight, shaped like the dense module's weight."""
        raise NotImplementedError

    def dense_bias(self) -> torch.Tensor | None:  # pragma: no cover - abstract
        """The bias the layer adds (that of the dense module), or ``None``."""
        raise NotImplementedError

    def factors(self) -> dict[str, nn.Parameter]:  # pragma: no cover - abstract
        """The factor parameters by name (biases excluded)."""
        raise NotImplementedError

    def dense_module(self) -> nn.Module:  # pragma: no cover - abstract
        """The dense ``nn.Linear`` / ``nn.Conv2d`` computing what this layer computes."""
        raise NotImplementedError

    def fold(self, keep: str | None = None) -> nn.Module:
        """An equivalent module with fewer layers; the default (``keep=None``) is :meth:`dense_module`."""
        if keep is not None:
            raise ValueError(
                f"{type(self).__name__}.fold(keep={keep!r}) is invalid: this layer folds only into its dense "
                "module (keep=None)"
            )
        with torch.no_grad():
            return self.dense_module().train(self.training)

    def flops(self, input_shape: Sequence[int]) -> int:  # pragma: no cover - abstract
        """FLOPs of one forward for an input of ``input_shape`` (2 per multiply-add; biases not counted)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"ranks={tuple(self.ranks)}"
