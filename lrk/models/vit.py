"""Vision Transformer (Dosovitskiy et al. 2021) and its DeiT-style distilled variant (Touvron et al.
2021), written to be read: patch embedding, class (and distillation) token, learned position
embedding, pre-norm blocks, final norm, linear head.

``stem: conv`` replaces the patchify layer by a convolutional stem (Xiao et al. 2021, "Early convolutions help
transformers see better", Sec. 3: a stack of stride-2 3x3 convolutions with BatchNorm and ReLU, then one 1x1
convolution to ``dim``), with the same token count as patchify.

Module names, which decomposition targets glob over (e.g. ``blocks.*.attn.qkv``)::

    patch_embed.proj                 Conv2d(in_chans, dim, patch_size, stride=patch_size)    (stem: patch)
    patch_embed.convs.{j}.0 / .1     Conv2d 3x3 stride 2 / BatchNorm2d, j < log2(patch_size) (stem: conv)
    patch_embed.proj                 Conv2d(width, dim, 1)                                   (stem: conv)
    blocks.{i}.norm1 / norm2         LayerNorm(dim)
    blocks.{i}.attn                  an AttentionBase (MultiHeadSelfAttention: .qkv, .proj)
    blocks.{i}.mlp.fc1 / act / fc2   Linear(dim, hidden), GELU, Linear(hidden, dim)
    norm, head (, head_dist)         LayerNorm(dim), Linear(dim, num_classes)
"""

from __future__ import annotations

import logging
from itertools import pairwise

import torch
from torch import nn
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import Conv2dNormActivation

from lrk.checks import boolean, positive_float, positive_int, probability
from lrk.errors import LrkConfigError
from lrk.layers.attention.dense import AttentionBase, MultiHeadSelfAttention
from lrk.models.registry import register_backbone

log = logging.getLogger(__name__)

#: patch sizes ``patch_size: auto`` tries first, largest first (16 is ViT's own)
AUTO_PATCH_SIZES = (16, 8, 4, 2, 1)
#: widest patch grid ``auto`` accepts from a power-of-two patch below 16 before it looks at other divisors
AUTO_MAX_GRID = 16


def _auto_patch(image_size: int) -> int:
    """The rule of :func:`auto_patch_size`, without its warning."""
    min_grid = min(8, image_size // 2)
    patch = next(p for p in AUTO_PATCH_SIZES if image_size % p == 0 and image_size // p >= min_grid)
    if patch < AUTO_PATCH_SIZES[0] and image_size // patch > AUTO_MAX_GRID:
        patch = max(
            p for p in range(1, image_size + 1) if image_size % p == 0 and image_size // p >= min_grid
        )
    return patch


def auto_patch_size(image_size: int) -> int:
    """The patch size ``patch_size: auto`` picks for a square image of side ``image_size`` (S).

    1. The largest p in (16, 8, 4, 2, 1) that divides S and leaves at least ``min(8, S // 2)`` patches
       per side: ViT's 16 where the image is large enough, otherwise the largest power of two that
       still leaves an 8x8 grid (or a grid of half the side, for images below 16 pixels).
    2. If that p is below 16 and leaves more than 16 patches per side (a side with few factors of
       two, e.g. 300 -> p 4 -> 75x75 = 5,625 tokens), take instead the largest divisor p of S that
       leaves at least ``min(8, S // 2)`` patches per side.

    Examples (S -> p, grid): 8 -> 2 (4x4), 16 -> 2 (8x8), 28 -> 2 (14x14), 32 -> 4 (8x8),
    48 -> 4 (12x12), 64 -> 8 (8x8), 96 -> 8 (12x12), 128 -> 16 (8x8), 224 -> 16 (14x14),
    300 -> 30 (10x10), 384 -> 16 (24x24). A prime side has only p = 1 (a warning is logged).
    """
    image_size = positive_int("image_size", image_size)
    min_grid = min(8, image_size // 2)
    patch = _auto_patch(image_size)
    grid = image_size // patch
    if patch < AUTO_PATCH_SIZES[0] and grid > AUTO_MAX_GRID:
        log.warning(
            "patch_size auto: image_size=%d has no divisor leaving %d to %d patches per side; "
            "using patch %d (%dx%d = %d tokens); set backbone.patch_size or resize the images",
            image_size,
            min_grid,
            AUTO_MAX_GRID,
            patch,
            grid,
            grid,
            grid * grid,
        )
    return patch


def resolve_patch_size(image_size: int, patch_size: int | str) -> int:
    """``patch_size`` as an int: ``auto`` (see :func:`auto_patch_size`) or a divisor of ``image_size``."""
    if patch_size == "auto":
        return auto_patch_size(image_size)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise LrkConfigError(
            f"backbone.patch_size={patch_size!r} is invalid: it must be a positive integer or 'auto'"
        )
    if image_size % patch_size:
        divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
        raise LrkConfigError(
            f"backbone.patch_size={patch_size} is invalid for image_size={image_size}: it must divide the "
            f"image size (valid patch sizes: {divisors}, or 'auto')"
        )
    return patch_size


class _TokenEmbed(nn.Module):
    """What both stems share: the image and patch sizes, the patch grid and the input-size check."""

    def __init__(self, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise LrkConfigError(
                f"input images are {tuple(x.shape[-2:])} but the backbone was built for "
                f"image_size={self.image_size}"
            )


class PatchEmbed(_TokenEmbed):
    """Cut the image into non-overlapping ``patch_size`` squares and project each to ``dim``:
    ``[B, C, S, S] -> [B, (S/p)^2, dim]`` (ViT Eq. 1, as one strided convolution ``proj``)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__(image_size, patch_size)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.proj(x).flatten(2).transpose(1, 2)


def conv_stem_widths(patch_size: int, dim: int) -> list[int]:
    """Output channels of the stride-2 3x3 convolutions of :class:`ConvStem`: ``log2(patch_size)`` of them,
    doubling up to ``dim`` (Xiao et al. 2021, Sec. 3: e.g. ViT_C-1GF, dim 192, p 16: 24, 48, 96, 192), at least
    8 channels (or ``dim`` when smaller)."""
    depth = patch_size.bit_length() - 1
    return [max(min(8, dim), dim >> (depth - 1 - j)) for j in range(depth)]


class ConvStem(_TokenEmbed):
    """Convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better", Sec. 3):
    ``log2(patch_size)`` stride-2 3x3 convolutions, each followed by BatchNorm and ReLU, with widths doubling up
    to ``dim`` (:func:`conv_stem_widths`), then a 1x1 convolution ``proj`` to ``dim``:
    ``[B, C, S, S] -> [B, (S/p)^2, dim]``, the token count of :class:`PatchEmbed` at the same patch size.

    Xiao et al. take one transformer block off to keep the FLOPs; lrk keeps ``depth`` as configured (the
    presets set it). ``patch_size`` must be a power of two >= 2 (the total stride of the stack)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__(image_size, patch_size)
        if not _power_of_two(patch_size):
            raise ValueError(f"ConvStem needs a power-of-two patch size >= 2, not {patch_size}")
        widths = conv_stem_widths(patch_size, dim)
        channels = [in_chans, *widths]
        self.convs = nn.Sequential(
            *(
                Conv2dNormActivation(c_in, c_out, kernel_size=3, stride=2, padding=1)
                for c_in, c_out in pairwise(channels)
            )
        )
        self.proj = nn.Conv2d(widths[-1], dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.proj(self.convs(x)).flatten(2).transpose(1, 2)


def _power_of_two(p: int) -> bool:
    return p >= 2 and not p & (p - 1)


def check_conv_stem_patch(image_size: int, patch_size: int | str, resolved: int) -> None:
    """``stem: conv`` needs a resolved patch size that is a power of two >= 2 (the stride of the stack of
    stride-2 convolutions); otherwise a config error naming the valid patch sizes for ``image_size`` and the
    nearest image sizes that work with the configured ``patch_size``."""
    if _power_of_two(resolved):
        return
    valid = [p for p in range(2, image_size + 1) if _power_of_two(p) and image_size % p == 0]
    near: list[int] = []
    if patch_size == "auto" or _power_of_two(patch_size):  # type: ignore[arg-type]
        for s in sorted(range(2, 2 * image_size + 17), key=lambda s: (abs(s - image_size), s)):
            fits = s % patch_size == 0 if patch_size != "auto" else _power_of_two(_auto_patch(s))
            if fits:
                near.append(s)
            if len(near) == 4:
                break
    sizes = f"image sizes near it that work: {sorted(near)}" if near else "no image size works with it"
    raise LrkConfigError(
        f"backbone.stem=conv is invalid for image_size={image_size} with patch_size={patch_size!r} (patch "
        f"{resolved}): its stride-2 convolutions need a patch size that is a power of two >= 2 dividing the "
        f"image size; valid patch sizes for {image_size}: {valid or 'none'}; with patch_size={patch_size!r}, "
        f"{sizes} (or use stem=patch)"
    )


class Mlp(nn.Module):
    """The block's feed-forward part: ``fc2(drop(act(fc1(x))))``, hidden width ``dim * mlp_ratio``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (ViT Eqs. 2-3): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``,
    each residual branch with optional stochastic depth (drop path, Huang et al. 2016).

    ``attn`` may be any :class:`AttentionBase`; swap it with ``lrk.models.replace_module``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn: AttentionBase = MultiHeadSelfAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, max(1, int(dim * mlp_ratio)), drop)
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


#: ``backbone.stem`` -> the module that turns images into patch tokens
STEMS: dict[str, type[_TokenEmbed]] = {"patch": PatchEmbed, "conv": ConvStem}


@register_backbone("vit")
class VisionTransformer(nn.Module):
    """ViT for ``image_size`` x ``image_size`` images of ``in_chans`` channels; ``forward`` returns
    ``[B, num_classes]`` logits from the class token.

    ``distilled=True`` gives the DeiT layout (Touvron et al. 2021, Sec. 4): a distillation token beside
    the class token, with its own head ``head_dist``. The single output is DeiT's inference rule, the mean
    of the two heads' logits, in train and eval alike. :meth:`forward_heads` returns the two heads apart:
    with a teacher (``model.teacher``, :class:`lrk.lit.distillation.DistillationLoss`) the class head learns
    from the labels and the distillation head from the teacher; without one, the CE is taken on the mean.

    ``stem``: ``patch`` (ViT's patchify convolution, :class:`PatchEmbed`) or ``conv`` (:class:`ConvStem`).
    """

    #: classifier modules: a checkpoint whose shapes differ there (other num_classes) may skip them
    head_names = ("head", "head_dist")
    #: the stem's modules (every conv below it): weight methods leave them out of their default targets
    stem_names = ("patch_embed",)

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int,
        patch_size: int | str = "auto",
        dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        distilled: bool = False,
        stem: str = "patch",
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        positive_int("in_chans", in_chans)
        positive_int("image_size", image_size)
        positive_int("backbone.dim", dim)
        positive_int("backbone.num_heads", num_heads)
        positive_int("backbone.depth", depth)
        positive_float("backbone.mlp_ratio", mlp_ratio)
        boolean("backbone.qkv_bias", qkv_bias)
        boolean("backbone.distilled", distilled)
        for key, value in (
            ("drop_rate", drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            probability(f"backbone.{key}", value)
        if stem not in STEMS:
            raise LrkConfigError(f"backbone.stem={stem!r} is invalid: valid stems are {', '.join(STEMS)}")
        resolved = resolve_patch_size(image_size, patch_size)
        if stem == "conv":
            check_conv_stem_patch(image_size, patch_size, resolved)
        patch_size = resolved

        self.num_classes = num_classes
        self.dim = dim
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.stem = stem
        self.patch_embed = STEMS[stem](image_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, dim)
        )
        self.pos_drop = nn.Dropout(drop_rate)
        # stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None
        self.reset_parameters()

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def reset_parameters(self) -> None:
        """ViT/DeiT initialisation: ``trunc_normal_(std=0.02)`` for tokens, position embedding and every
        Linear weight, zero biases, LayerNorm weight 1 / bias 0 (the patch convolution keeps PyTorch's).

        As in timm and DeiT, the cut-off stays at the default +-2 (absolute), so at std 0.02 this is in
        effect a plain normal."""
        for param in (self.cls_token, self.dist_token, self.pos_embed):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, S, S]`` -> normalised tokens ``[B, prefix + patches, dim]`` (class token first,
        then the distillation token when ``distilled``)."""
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = self.pos_drop(torch.cat([*prefix, x], dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the class-token head and of the distillation head (None when not distilled)."""
        tokens = self.head_drop(self.forward_features(x))
        logits = self.head(tokens[:, 0])
        dist = self.head_dist(tokens[:, 1]) if self.head_dist is not None else None
        return logits, dist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, dist = self.forward_heads(x)
        return logits if dist is None else (logits + dist) / 2
