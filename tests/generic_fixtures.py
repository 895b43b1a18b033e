"""Set-up of the generic tests over the registries (tests/test_methods_generic.py, tests/test_backbones_generic.py):
which tiny models a registered method is tested on (from its base class, never from a list of names), the model
conditions a method's ``generic_cases`` may ask for, what a method's ``generic_cases`` must contain, and snapshots
to show that a refused ``apply`` left the model as it was.

``generic_cases`` (a class attribute of every :class:`~lrk.decomp.base.DecompMethod`; see CASE_KEYS):

- ``exact``: config keys under which the method reproduces the dense model (EXACT_RTOL), or None with
  ``exact_reason`` saying why no setting does;
- ``exact_model`` (optional): a condition of MODEL_CONDITIONS the tiny model must be put in first for ``exact`` to
  hold (e.g. Cholesky attention is exact only where W_Q W_K^T is already symmetric positive definite), with
  ``exact_reason`` saying why;
- ``lossy``: config keys under which the method must change the output by more than LOSSY_MIN, or None with
  ``lossy_reason`` (only the dense baseline ``none``);
- ``invalid``: a non-empty list of key sets the method must refuse with LrkConfigError, at ``build_method`` or
  at ``apply`` (then the model stays unchanged); the message names one of the keys of the set.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from attention_fixtures import random_images, tiny_vit
from torch import nn
from torchvision.models.resnet import BasicBlock

from lrk.decomp.attention.base import AttentionSwapMethod
from lrk.decomp.base import DecompMethod
from lrk.decomp.weight.base import WeightMethod
from lrk.models import MultiHeadSelfAttention

#: relative Frobenius distance of the logits (float32 models) under which an ``exact`` case reproduces the model
EXACT_RTOL = 1e-4
#: relative Frobenius distance of the logits a ``lossy`` case must exceed (measured: 0.56 to 1.4 for the cases
#: declared today; the exact cases stay below 3e-6)
LOSSY_MIN = 0.05

CASE_KEYS = {"exact", "exact_reason", "exact_model", "lossy", "lossy_reason", "invalid"}

# tiny ViT: dim 16, 2 heads (d_k = 8), 2 blocks, 16 px grey images -> 8x8 patches + cls = 65 tokens
VIT_DIM, VIT_HEADS, VIT_DEPTH, IMAGE_SIZE = 16, 2, 2, 16
#: the qkv weights of the generic ViT are scaled by this: at ViT's initialisation (std 0.02) the attention is
#: near uniform and every attention output nearly rank 1, which would hide what an attention method does
SHARPEN = 20.0


def generic_vit() -> nn.Module:
    """The lrk ViT of tests/attention_fixtures.py (seeded, eval) with sharpened attention (SHARPEN)."""
    model = tiny_vit(VIT_DIM, VIT_HEADS, VIT_DEPTH, IMAGE_SIZE)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(SHARPEN)
    return model


class SmallResNet(nn.Module):
    """A two-stage ResNet of torchvision's BasicBlocks with torchvision's module names (``conv1`` stem,
    ``layer1.0.conv1``, ``layer2.0.downsample.0`` a 1x1 stride-2 conv, ``fc``): 3x3 and 1x1 convolutions, as
    in ResNet-18, at widths 8 and 16 so that every weight method runs in well under a second."""

    def __init__(self, in_chans: int = 1, num_classes: int = 2, widths: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        w1, w2 = widths
        self.conv1 = nn.Conv2d(in_chans, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(w1, w1))
        down = nn.Sequential(nn.Conv2d(w1, w2, 1, stride=2, bias=False), nn.BatchNorm2d(w2))
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, stride=2, downsample=down), BasicBlock(w2, w2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet() -> nn.Module:
    """:class:`SmallResNet` with the weights of ``torch.manual_seed(0)``, BatchNorm statistics made non-trivial,
    in eval mode."""
    torch.manual_seed(0)
    model = SmallResNet()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


#: the tiny models, by the name used in test ids
MODELS = {"vit": generic_vit, "resnet": small_resnet}


def models_for(cls: type[DecompMethod]) -> list[str]:
    """The tiny models a method is tested on, from its base class: attention methods need a ViT; weight methods
    get a ViT (Linear layers) and a ResNet (3x3 and 1x1 convolutions); any other method (``none``) both."""
    if issubclass(cls, AttentionSwapMethod):
        return ["vit"]
    if issubclass(cls, WeightMethod):
        return ["vit", "resnet"]
    return ["vit", "resnet"]


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return random_images(n, IMAGE_SIZE, seed)


def calibration() -> list[torch.Tensor]:
    """The calibration batches every method's ``apply`` gets (weight methods ignore them)."""
    return [images(4, seed=1)]


# --- model conditions (``exact_model``) -------------------------------------------------------------------
def symmetric_qk(model: nn.Module) -> nn.Module:
    """Make every head's dense query-key form W_Q^h W_K^h^T symmetric positive definite, as tests/
    test_attn_cholesky.py's ``spd_dense`` does for one module: W_K^h = M_h W_Q^h with M_h = I + R R^T / d_k (Linear
    rows: K_h = M_h Q_h), and random q/k/v biases (the key bias cancels in the softmax; the query bias's key term
    lies in span W_Q^h)."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, MultiHeadSelfAttention):
                continue
            d, h = module.dim, module.num_heads
            hd = d // h
            wq = module.qkv.weight[:d].reshape(h, hd, d)
            r = torch.randn(h, hd, hd, generator=g, dtype=wq.dtype)
            m = torch.eye(hd, dtype=wq.dtype) + r @ r.transpose(1, 2) / hd
            module.qkv.weight[d : 2 * d] = (m @ wq).reshape(d, d)
            if module.qkv.bias is not None:
                module.qkv.bias.copy_(0.1 * torch.randn(3 * d, generator=g, dtype=wq.dtype))
    return model


MODEL_CONDITIONS = {"symmetric_qk": symmetric_qk}


# --- the declaration -------------------------------------------------------------------------------------
def declared_cases(cls: type[DecompMethod]) -> dict[str, Any]:
    """``cls.generic_cases``, checked: fails the calling test (``pytest.fail``) when it is empty or incomplete, so
    that a new method cannot be registered without its generic cases."""
    cases = cls.__dict__.get("generic_cases") or {}
    where = f"{cls.__module__}.{cls.__qualname__}.generic_cases"
    if not cases:
        pytest.fail(f"{where} is empty: declare the method's exact, lossy and invalid config keys")
    problems = [f"unknown key {k!r}" for k in sorted(set(cases) - CASE_KEYS)]
    for key in ("exact", "lossy"):
        if key not in cases:
            problems.append(f"{key!r} missing")
        elif cases[key] is None:
            if not (isinstance(cases.get(f"{key}_reason"), str) and cases[f"{key}_reason"].strip()):
                problems.append(f"{key}=None needs a reason ({key}_reason)")
        elif not isinstance(cases[key], dict) or "name" in cases[key]:
            problems.append(f"{key} must be a dict of config keys (without 'name') or None")
    if "exact_model" in cases:
        if cases["exact_model"] not in MODEL_CONDITIONS:
            problems.append(f"exact_model={cases['exact_model']!r} is not one of {sorted(MODEL_CONDITIONS)}")
        if not (isinstance(cases.get("exact_reason"), str) and cases["exact_reason"].strip()):
            problems.append("exact_model needs an exact_reason")
    invalid = cases.get("invalid")
    if not (isinstance(invalid, list) and invalid and all(isinstance(c, dict) and c for c in invalid)):
        problems.append("invalid must be a non-empty list of non-empty dicts of config keys")
    if problems:
        pytest.fail(f"{where}: " + "; ".join(problems))
    return cases


def invalid_count(cls: type[DecompMethod]) -> int:
    """How many invalid key sets ``cls`` declares (at collection time; at least 1, so that a method without any
    still gets a test, which then fails in :func:`declared_cases`)."""
    invalid = (cls.__dict__.get("generic_cases") or {}).get("invalid")
    return max(1, len(invalid)) if isinstance(invalid, list) else 1


# --- comparing models ------------------------------------------------------------------------------------
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]]]:
    """Copies of the state dict's tensors and the (name, class) of every module."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m)) for n, m in model.named_modules()]


def assert_unchanged(
    model: nn.Module, before: tuple[dict[str, torch.Tensor], list[tuple[str, type]]]
) -> None:
    state, modules = before
    after = model.state_dict()
    assert list(after) == list(state), "the state dict's keys changed"
    changed = [k for k, v in state.items() if not torch.equal(after[k], v)]
    assert not changed, f"tensors changed: {changed}"
    assert [(n, type(m)) for n, m in model.named_modules()] == modules, "modules were replaced"
