"""Statistics of calibration batches for the data-aware weight methods (``decomp.weighting``, lrk.decomp.weight.svd).

- :func:`input_statistics`: forward pre-hooks on the target Linear/Conv2d layers collect, over every calibration
  batch, the inputs' second moment ``C = X X^T / n`` (SVD-LLM whitening) or their mean absolute values (ASVD).
  The "input" of a layer is what its matricized weight multiplies (:func:`input_rows`): a Linear's ``[.., in]``
  rows; a Conv2d's unfolded patches ``[C_in kh kw]`` (``torch.nn.functional.unfold`` with the conv's padding,
  stride and dilation), one per output position. Patches, not channel statistics: ``decomp=svd`` factorizes the
  ``out x (C_in kh kw)`` kernel matrix, and with patch statistics ``||(W - W') X||`` *is* the conv's output error,
  so whitening keeps SVD-LLM's optimality; channel statistics would ignore the kernel's spatial correlations. The
  cost is one ``(C k k)^2`` Gram product per output position (ResNet-18's 4608-wide layer4 patches included).
- :func:`fisher_row_importance`: FWSVD's row importances ``I_i = sum_d sum_j (dLoss_d / dW_ij)^2``, one
  gradient per calibration image (the paper's per-example empirical Fisher), with the cross-entropy on the
  batch's labels when it is an ``(images, labels)`` pair, else on the model's own predictions (pseudo-labels:
  lrk's calibration batches are images only, lrk.data.LrkDataModule.calibration_batches).

The forwards run in eval mode (BatchNorm running statistics, no dropout); modes are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrk.decomp.attention.base import calibration_images, model_device, run_batches
from lrk.errors import LrkConfigError

#: elements of one unfolded chunk of images (float32: 128 MB), so that large patches do not exhaust memory
UNFOLD_CHUNK = 1 << 25


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the matricized weight of ``module`` multiplies: ``[N, in]`` for a Linear (every leading index a
    row), ``[N, C_in kh kw]`` unfolded patches for a Conv2d (one per image and output position)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.padding_mode == "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice)
        else:
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # [B L, C kh kw]
    raise TypeError(f"input_rows needs a Linear or Conv2d, got {type(module).__name__}")


class InputStatistics:
    """Running sums of one layer's input rows: ``sum x x^T`` (``second_moment=True``), ``sum |x|``, the count."""

    def __init__(self, module: nn.Module, second_moment: bool) -> None:
        self.module, self.second_moment = module, second_moment
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        per_image = max(1, x[:1].numel() * (self._patch_factor()))
        step = max(1, UNFOLD_CHUNK // per_image)
        for chunk in x.split(step) if x.dim() > 1 else (x,):
            rows = input_rows(self.module, chunk)
            work = rows.double() if rows.dtype == torch.float64 else rows.float()
            self.count += rows.shape[0]
            if self.second_moment:
                gram = (work.T @ work).double()
                self.gram = gram if self.gram is None else self.gram + gram
            else:
                total = work.abs().sum(0).double()
                self.abs_sum = total if self.abs_sum is None else self.abs_sum + total

    def _patch_factor(self) -> int:
        if isinstance(self.module, nn.Conv2d):
            kh, kw = self.module.kernel_size
            return kh * kw
        return 1

    def moment(self) -> torch.Tensor:
        """``X X^T / n`` (in x in, float64)."""
        assert self.gram is not None and self.count > 0
        return self.gram / self.count

    def mean_abs(self) -> torch.Tensor:
        """``mean |x_j|`` per input feature (in,), float64."""
        assert self.abs_sum is not None and self.count > 0
        return self.abs_sum / self.count


def input_statistics(
    model: nn.Module, targets: Sequence[tuple[str, nn.Module]], batches: Sequence[Any], second_moment: bool
) -> dict[str, InputStatistics]:
    """Run ``batches`` through ``model`` (eval, no gradient) and collect each target's :class:`InputStatistics`
    from a forward pre-hook. A target that received no input is a config error naming it."""
    stats = {name: InputStatistics(module, second_moment) for name, module in targets}
    handles = [
        module.register_forward_pre_hook(lambda m, args, _n=name: stats[_n].add(args[0]))
        for name, module in targets
    ]
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, s in stats.items() if s.count == 0]
    if missing:
        raise LrkConfigError(
            f"decomp.weighting needs each target's inputs, but {missing} received none when the calibration "
            "batches ran through the model; skip them (decomp.skip) or use weighting: none"
        )
    return stats


def _logits(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def fisher_row_importance(
    model: nn.Module, targets: Sequence[tuple[str, nn.Module]], batches: Sequence[Any]
) -> tuple[dict[str, torch.Tensor], bool]:
    """FWSVD's row importances of every target weight (``[out]`` float64: the squared gradients of the
    cross-entropy summed over the row's entries and over the calibration images, one backward per image), and
    whether true labels were used (False: pseudo-labels, the model's argmax predictions).

    Gradients reach only the target weights (``requires_grad`` is switched on for them during the passes and
    restored); the model's parameters are not changed.
    """
    weights = {name: module.weight for name, module in targets}
    sums = {
        name: torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) for name, w in weights.items()
    }
    modes = {m: m.training for m in model.modules()}
    grad_flags = {name: w.requires_grad for name, w in weights.items()}
    device = model_device(model)
    labelled = bool(batches) and all(isinstance(b, (list, tuple)) and len(b) >= 2 for b in batches)
    params = list(weights.values())
    try:
        model.eval()
        for w in params:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                images = calibration_images(batch).to(device)
                labels = batch[1].to(device) if labelled else None
                for i in range(images.shape[0]):
                    logits = _logits(model(images[i : i + 1]))
                    target = labels[i : i + 1] if labels is not None else logits.detach().argmax(-1)
                    loss = F.cross_entropy(logits, target.long())
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for (name, w), g in zip(weights.items(), grads, strict=True):
                        if g is not None:
                            sums[name] += g.detach().double().reshape(w.shape[0], -1).square().sum(1)
    finally:
        for name, w in weights.items():
            w.requires_grad_(grad_flags[name])
        for module, mode in modes.items():
            module.train(mode)
    return sums, labelled


def statistics_for(
    weighting: str, model: nn.Module, targets: Sequence[tuple[str, nn.Module]], batches: Sequence[Any]
) -> Mapping[str, Any]:
    """The per-target statistic a weighting needs: ``activation`` the input second moments, ``asvd`` the mean
    absolute inputs, ``fisher`` the row importances."""
    if weighting == "activation":
        return {n: s.moment() for n, s in input_statistics(model, targets, batches, True).items()}
    if weighting == "asvd":
        return {n: s.mean_abs() for n, s in input_statistics(model, targets, batches, False).items()}
    if weighting == "fisher":
        return fisher_row_importance(model, targets, batches)[0]
    raise ValueError(f"weighting={weighting!r} has no statistics")
