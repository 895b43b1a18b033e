"""Backbones by registered name: ViT/DeiT with a swappable attention module, ResNet.

model = build_backbone(cfg.backbone, num_classes=K, in_chans=C, image_size=S)
for name, attn in attention_modules(model): ...
"""

from lrk.layers.attention.dense import AttentionBase, MultiHeadSelfAttention
from lrk.models import resnet, vit  # noqa: F401  (registers the backbones)
from lrk.models.checkpoint import load_checkpoint, read_state_dict
from lrk.models.registry import BACKBONES, build_backbone, register_backbone
from lrk.models.utils import attention_modules, count_parameters, replace_module
from lrk.models.vit import Block, PatchEmbed, VisionTransformer, auto_patch_size, resolve_patch_size

__all__ = [
    "BACKBONES",
    "AttentionBase",
    "Block",
    "MultiHeadSelfAttention",
    "PatchEmbed",
    "VisionTransformer",
    "attention_modules",
    "auto_patch_size",
    "build_backbone",
    "count_parameters",
    "load_checkpoint",
    "read_state_dict",
    "register_backbone",
    "replace_module",
    "resolve_patch_size",
]
