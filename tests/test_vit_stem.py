"""The ViT's convolutional stem (``backbone.stem=conv``, Xiao et al. 2021): shapes and token count for every image
size it accepts, a clear error for the others, the computation against a hand-built reference, attention modules
still swappable by every attention method, and the stem out of the weight methods' default targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attention_fixtures import random_images
from generic_fixtures import calibration, declared_cases, rel_diff
from omegaconf import OmegaConf
from torch import nn

from lrk.decomp import METHODS, build_method
from lrk.decomp.attention.base import AttentionSwapMethod
from lrk.decomp.weight.base import WeightMethod
from lrk.errors import LrkConfigError
from lrk.layers.attention.dense import AttentionBase, MultiHeadSelfAttention
from lrk.models import build_backbone, resolve_patch_size
from lrk.models.vit import _auto_patch

TINY = {"name": "vit", "dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 1.0, "stem": "conv"}
SIZES = range(2, 131)


def power_of_two(p: int) -> bool:
    return p >= 2 and (p & (p - 1)) == 0


def conv_vit(image_size: int, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone({**TINY, **overrides}, num_classes=3, in_chans=1, image_size=image_size)


@pytest.mark.parametrize("size", SIZES)
def test_every_accepted_image_size_gives_patchify_token_count(size: int) -> None:
    patch = _auto_patch(size)
    if not power_of_two(patch):
        with pytest.raises(
            LrkConfigError, match=rf"backbone\.stem=conv .*image_size={size}.*valid patch sizes"
        ):
            conv_vit(size)
        return
    model = conv_vit(size).eval()
    stem = model.patch_embed
    grid = size // patch
    assert (stem.patch_size, stem.grid_size, stem.num_patches) == (patch, grid, grid * grid)
    # one stride-2 3x3 conv per factor of two of the patch, then the 1x1 projection
    convs = [m for m in stem.convs.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == patch.bit_length() - 1
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs)
    assert stem.proj.kernel_size == (1, 1) and stem.proj.out_channels == 16
    patchify = build_backbone({**TINY, "stem": "patch"}, num_classes=3, in_chans=1, image_size=size)
    assert patchify.patch_embed.num_patches == stem.num_patches
    assert model.pos_embed.shape == patchify.pos_embed.shape == (1, 1 + grid * grid, 16)
    x = random_images(2, size)
    with torch.no_grad():
        tokens = stem(x)
        logits = model(x)
    assert tokens.shape == (2, grid * grid, 16)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("patch", [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96])
def test_explicit_patch_sizes(patch: int) -> None:
    """At 96 px: every power of two >= 2 dividing 96 builds; 1 and the other divisors are one clear error."""
    if power_of_two(patch):
        model = conv_vit(96, patch_size=patch)
        assert model.patch_embed.num_patches == (96 // patch) ** 2
        with torch.no_grad():
            assert model.patch_embed(random_images(1, 96)).shape == (1, (96 // patch) ** 2, 16)
    else:
        with pytest.raises(LrkConfigError, match=r"valid patch sizes for 96: \[2, 4, 8, 16, 32\]"):
            conv_vit(96, patch_size=patch)


def test_error_for_auto_names_image_sizes_that_work() -> None:
    with pytest.raises(
        LrkConfigError, match=r"image_size=300 .*patch 30.*image sizes near it that work"
    ) as info:
        conv_vit(300)
    near = [int(s) for s in str(info.value).split("work: [")[1].split("]")[0].split(", ")]
    for size in near:  # every size the message proposes really builds
        assert conv_vit(size).patch_embed.grid_size == size // resolve_patch_size(size, "auto")


def test_unknown_stem_lists_valid_stems() -> None:
    with pytest.raises(
        LrkConfigError, match=r"backbone\.stem='conv3' is invalid: valid stems are patch, conv"
    ):
        conv_vit(64, stem="conv3")


def test_widths_double_up_to_dim() -> None:
    model = conv_vit(128, dim=64, num_heads=2, patch_size=16)
    convs = [m for m in model.patch_embed.convs.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64]
    assert [c.in_channels for c in convs] == [1, 8, 16, 32]


def test_stem_matches_a_hand_built_reference() -> None:
    """conv3x3/s2 -> BN (eval: running statistics) -> ReLU, twice, then the 1x1 conv, computed with F.*."""
    model = conv_vit(32, patch_size=4)
    stem = model.patch_embed
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in stem.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    stem.eval()
    x = random_images(2, 32)
    y = x
    for layer in stem.convs:
        conv, bn = layer[0], layer[1]
        y = F.conv2d(y, conv.weight, None, stride=2, padding=1)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])
    y = F.conv2d(y, stem.proj.weight, stem.proj.bias)
    expected = y.flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(stem(x), expected, atol=1e-5, rtol=1e-5)


def test_every_parameter_of_the_stem_gets_a_gradient() -> None:
    model = conv_vit(16).train()
    model(random_images(4, 16)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_hybrid_preset_builds_at_64_and_96_px() -> None:
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "backbone" / "vit_hybrid.yaml")
    assert cfg.stem == "conv" and cfg.name == "vit"
    for size, grid in ((64, 8), (96, 12)):
        torch.manual_seed(0)
        model = build_backbone(cfg, num_classes=2, in_chans=1, image_size=size).eval()
        assert model.patch_embed.grid_size == grid
        assert all(isinstance(b.attn, MultiHeadSelfAttention) for b in model.blocks)
        with torch.no_grad():
            assert model(random_images(2, size)).shape == (2, 2)


# --- decomposition ------------------------------------------------------------------------------------------
ATTENTION_METHODS = sorted(n for n, c in METHODS.items() if issubclass(c, AttentionSwapMethod))
WEIGHT_METHODS = sorted(n for n, c in METHODS.items() if issubclass(c, WeightMethod))


def sharp_conv_vit() -> nn.Module:
    """A conv-stem ViT (16 px, 8x8 tokens, 2 blocks) in eval mode with sharpened attention, as
    tests/generic_fixtures.py's ``generic_vit``."""
    model = conv_vit(16, depth=2).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20.0)
    return model


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_every_attention_method_swaps_the_attention_of_a_conv_stem_vit(name: str) -> None:
    assert ATTENTION_METHODS  # the registry is read, not a list kept here
    cases = declared_cases(METHODS[name])
    model = sharp_conv_vit()
    assert all(isinstance(b.attn, AttentionBase) for b in model.blocks)
    x = random_images(4, 16, seed=2)
    with torch.no_grad():
        dense = model(x)
    report = build_method({"name": name, **cases["lossy"]}).apply(model, calibration())
    assert {row["name"] for row in report.rows} == {"blocks.0.attn", "blocks.1.attn"}
    assert all(
        isinstance(b.attn, AttentionBase) and type(b.attn) is not MultiHeadSelfAttention for b in model.blocks
    )
    with torch.no_grad():
        assert rel_diff(model(x), dense) > 0.05


@pytest.mark.parametrize("name", WEIGHT_METHODS)
def test_weight_methods_leave_the_conv_stem_out_of_their_default_targets(name: str) -> None:
    """``targets: null`` skips the stem (``patch_embed.*``, the model's ``stem_names``) as it skips patchify's
    ``patch_embed.proj``, and the classifier head."""
    cases = declared_cases(METHODS[name])
    keys = {k: v for k, v in cases["lossy"].items() if k not in ("targets", "skip")}
    method = build_method({"name": name, **keys, "targets": None})
    for stem in ("patch", "conv"):
        model = conv_vit(16, depth=2, stem=stem)
        chosen = [n for n, _ in method.select_targets(model)]
        assert chosen, f"decomp={name} selects nothing on a {stem}-stem ViT"
        assert not [n for n in chosen if n.startswith("patch_embed")], (name, stem, chosen)
        assert "head" not in chosen
