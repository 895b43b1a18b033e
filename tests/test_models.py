"""Backbones: registry and config validation, ViT/DeiT, attention, ResNet, checkpoints, module utils."""

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lrk.errors import LrkConfigError
from lrk.models import (
    BACKBONES,
    AttentionBase,
    MultiHeadSelfAttention,
    VisionTransformer,
    attention_modules,
    auto_patch_size,
    build_backbone,
    count_parameters,
    load_checkpoint,
    replace_module,
)

PRESETS = sorted((Path(__file__).parents[1] / "conf" / "backbone").glob("*.yaml"))
TINY = {"name": "vit", "dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}


def tiny_vit(num_classes: int = 3, image_size: int = 16, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone({**TINY, **overrides}, num_classes=num_classes, in_chans=1, image_size=image_size)


# ----------------------------------------------------------------------------- presets and registry


def test_presets_are_found():
    names = {p.stem for p in PRESETS}
    assert {"vit_tiny", "vit_small", "deit_small", "vit_edge", "resnet18", "resnet50"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_builds_and_classifies(path):
    cfg = OmegaConf.load(path)
    assert cfg.name in BACKBONES and cfg.checkpoint_path is None
    torch.manual_seed(0)
    model = build_backbone(cfg, num_classes=3, in_chans=1, image_size=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_vit_tiny_has_vit_ti_parameter_count():
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "backbone" / "vit_tiny.yaml")
    cfg.patch_size = 16
    model = build_backbone(cfg, num_classes=1000, in_chans=3, image_size=224)
    assert model.patch_embed.grid_size == 14
    assert count_parameters(model) == pytest.approx(5.717e6, rel=0.01)  # ViT-Ti / DeiT-Ti: 5.7 M


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(LrkConfigError, match=r"backbone.name='vgg'.*resnet18, resnet50, vit"):
        build_backbone({"name": "vgg"}, num_classes=2, in_chans=3, image_size=32)


def test_unknown_option_lists_valid_options():
    with pytest.raises(LrkConfigError, match=r"backbone.width is not an option of backbone 'vit'.*num_heads"):
        build_backbone({**TINY, "width": 3}, num_classes=2, in_chans=3, image_size=16)


def test_data_sized_options_are_rejected_in_backbone_config():
    with pytest.raises(
        LrkConfigError, match=r"backbone.image_size=32 is invalid: image_size is set from the data"
    ):
        build_backbone({**TINY, "image_size": 32}, num_classes=2, in_chans=3, image_size=16)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("patch_size", 5, r"patch_size=5 is invalid for image_size=16.*\[1, 2, 4, 8, 16\]"),
        ("patch_size", "big", r"patch_size='big' is invalid: it must be a positive integer or 'auto'"),
        ("num_heads", 5, r"num_heads=5 is invalid for dim=32.*\[1, 2, 4, 8, 16, 32\]"),
        ("dim", 0, r"backbone.dim=0 is invalid"),
        ("depth", 1.5, r"backbone.depth=1.5 is invalid"),
        ("drop_path_rate", 1.0, r"drop_path_rate=1.0 is invalid: it must be a number in \[0, 1\)"),
        ("distilled", "yes", r"backbone.distilled='yes' is invalid: it must be true or false"),
    ],
)
def test_bad_vit_hyper_parameters_raise_config_errors(key, value, match):
    with pytest.raises(LrkConfigError, match=match):
        tiny_vit(**{key: value})


def test_bad_data_sizes_raise_config_errors():
    with pytest.raises(LrkConfigError, match=r"num_classes=0 is invalid"):
        build_backbone(TINY, num_classes=0, in_chans=1, image_size=16)
    with pytest.raises(LrkConfigError, match=r"in_chans=-1 is invalid"):
        build_backbone({"name": "resnet18"}, num_classes=2, in_chans=-1, image_size=16)


# ----------------------------------------------------------------------------- patch size


@pytest.mark.parametrize(("size", "expected"), [(8, 2), (32, 4), (64, 8), (96, 8), (224, 16), (300, 30)])
def test_auto_patch_size(size, expected):
    patch = auto_patch_size(size)
    assert patch == expected
    assert size % patch == 0 and size // patch >= min(8, size // 2)


def test_auto_patch_size_warns_when_no_divisor_keeps_the_grid_small(caplog):
    with caplog.at_level(logging.WARNING, logger="lrk.models.vit"):
        assert auto_patch_size(97) == 1
    assert "97x97 = 9409 tokens" in caplog.text


@pytest.mark.parametrize("size", [8, 32])
def test_auto_patch_size_builds_a_working_vit(size):
    model = tiny_vit(image_size=size, patch_size="auto")
    assert model.patch_size == auto_patch_size(size)
    assert model(torch.randn(1, 1, size, size)).shape == (1, 3)


def test_input_of_another_size_is_reported():
    with pytest.raises(LrkConfigError, match=r"built for image_size=16"):
        tiny_vit()(torch.randn(1, 1, 32, 32))


# ----------------------------------------------------------------------------- ViT structure


def test_vit_module_names_match_decomposition_globs():
    names = dict(tiny_vit().named_modules())
    for name in ["patch_embed.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.0.mlp.fc1"]:
        assert name in names
    assert isinstance(names["patch_embed.proj"], nn.Conv2d)
    assert names["blocks.0.attn.qkv"].out_features == 3 * 32
    assert names["blocks.0.mlp.fc2"].in_features == 64 and isinstance(names["blocks.0.mlp.act"], nn.GELU)
    assert {"norm", "head", "blocks.0.norm1", "blocks.0.norm2"} <= set(names)


def test_vit_initialisation():
    model = tiny_vit(dim=64, num_heads=4)
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert abs(qkv.weight.mean().item()) < 0.002
    assert torch.all(qkv.bias == 0) and torch.all(model.head.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.blocks[0].norm1.bias == 0)


def test_drop_path_rises_linearly_to_the_last_block():
    model = tiny_vit(depth=3, drop_path_rate=0.2)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    assert model.blocks[1].drop_path.p == pytest.approx(0.1) and model.blocks[2].drop_path.p == pytest.approx(
        0.2
    )


def test_every_parameter_gets_a_gradient():
    model = tiny_vit(distilled=True)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_attention_matches_the_softmax_formula():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(dim=8, num_heads=2).eval()
    x = torch.randn(3, 5, 8)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), expected)


def test_tokens_of_different_images_never_mix():
    model = tiny_vit().eval()
    x = torch.randn(4, 1, 16, 16)
    changed = x.clone()
    changed[1:] = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out, out_changed, alone = model(x), model(changed), model(x[:1])
    torch.testing.assert_close(out_changed[0], out[0])
    torch.testing.assert_close(alone[0], out[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_changed[1:], out[1:])


def test_deit_output_is_the_mean_of_both_heads_in_train_and_eval():
    model = tiny_vit(distilled=True)
    assert model.num_prefix_tokens == 2 and model.pos_embed.shape == (1, 2 + 64, 32)
    x = torch.randn(2, 1, 16, 16)
    for train in (True, False):
        model.train(train)
        tokens = model.forward_features(x)
        expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model(x), expected)
        cls_logits, dist_logits = model.forward_heads(x)
        assert not torch.allclose(cls_logits, dist_logits)


# ----------------------------------------------------------------------------- attention swapping


class ZeroAttention(AttentionBase):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_attention_base_is_abstract():
    with pytest.raises(TypeError):
        AttentionBase(dim=8, num_heads=2)


def test_attention_modules_are_listed_with_their_names():
    found = attention_modules(tiny_vit(depth=3))
    assert [name for name, _ in found] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert all(isinstance(m, AttentionBase) and m.head_dim == 8 for _, m in found)
    assert attention_modules(build_backbone({"name": "resnet18"}, 2, 1, 16)) == []


def test_replace_module_swaps_attention_and_changes_the_output():
    model = tiny_vit().eval()
    x = torch.randn(2, 1, 16, 16)
    before = model(x)
    old = model.blocks[1].attn
    copy = MultiHeadSelfAttention.from_attention(old)
    assert copy is not old and copy.init_kwargs() == old.init_kwargs()
    assert replace_module(model, "blocks.1.attn", copy) is old
    torch.testing.assert_close(model(x), before)  # same weights copied over
    replace_module(model, "blocks.1.attn", ZeroAttention.from_attention(old))
    assert isinstance(model.blocks[1].attn, ZeroAttention) and model.blocks[1].attn.num_heads == 4
    assert [n for n, m in attention_modules(model) if isinstance(m, ZeroAttention)] == ["blocks.1.attn"]
    assert not torch.allclose(model(x), before)


def test_replace_module_replaces_a_linear_and_rejects_unknown_names():
    model = tiny_vit()
    replace_module(model, "blocks.0.mlp.fc1", nn.Linear(32, 64, bias=False))
    assert model.blocks[0].mlp.fc1.bias is None
    for bad in ["blocks.7.attn", "blocks.0.attn.nope", ""]:
        with pytest.raises(LrkConfigError):
            replace_module(model, bad, nn.Identity())


# ----------------------------------------------------------------------------- ResNet


def _layer4_side(model: nn.Module, image_size: int, in_chans: int) -> int:
    sizes = []
    model.layer4.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    model.eval()(torch.randn(1, in_chans, image_size, image_size))
    return sizes[0]


@pytest.mark.parametrize("in_chans", [1, 3])
def test_resnet18_adapts_channels_and_classes(in_chans):
    model = build_backbone({"name": "resnet18"}, num_classes=5, in_chans=in_chans, image_size=64)
    assert model.conv1.in_channels == in_chans and model.conv1.kernel_size == (7, 7)  # auto: 64 is not small
    assert model.fc.out_features == 5
    assert model.eval()(torch.randn(2, in_chans, 64, 64)).shape == (2, 5)


def test_resnet_small_input_stem_keeps_feature_maps():
    small = build_backbone({"name": "resnet18"}, num_classes=10, in_chans=1, image_size=8)
    assert small.small_input and small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert small.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    cifar = build_backbone({"name": "resnet18", "small_input": "auto"}, 10, 3, 32)
    imagenet_stem = build_backbone({"name": "resnet18", "small_input": False}, 10, 3, 32)
    assert _layer4_side(cifar, 32, 3) == 4 and _layer4_side(imagenet_stem, 32, 3) == 1


def test_resnet_bad_small_input():
    with pytest.raises(LrkConfigError, match=r"small_input='yes' is invalid: it must be auto, true or false"):
        build_backbone({"name": "resnet18", "small_input": "yes"}, 2, 3, 32)


# ----------------------------------------------------------------------------- checkpoints


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("layout", ["state_dict", "lightning", "model_key", "lightning_with_config"])
def test_checkpoint_round_trip(tmp_path, layout):
    source = tiny_vit(seed=1)
    state = source.state_dict()
    if layout == "state_dict":
        obj = state
    elif layout == "model_key":
        obj = {"model": state, "epoch": 3}
    else:
        obj = {
            "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "criterion.weight": torch.ones(3)},
            "epoch": 3,
            "hyper_parameters": {"lr": 1e-3},
        }
        if layout == "lightning_with_config":  # not loadable with weights_only=True
            obj["hyper_parameters"] = OmegaConf.create({"lr": 1e-3})
    torch.save(obj, tmp_path / "w.ckpt")
    target = tiny_vit(seed=2)
    x = torch.randn(2, 1, 16, 16)
    assert not torch.allclose(_outputs(target, x), _outputs(source, x))
    assert load_checkpoint(target, tmp_path / "w.ckpt") == []
    torch.testing.assert_close(_outputs(target, x), _outputs(source, x))


def test_build_backbone_loads_checkpoint_path(tmp_path):
    source = build_backbone({"name": "resnet18"}, 4, 1, 8)
    torch.save(source.state_dict(), tmp_path / "r.pt")
    loaded = build_backbone({"name": "resnet18", "checkpoint_path": str(tmp_path / "r.pt")}, 4, 1, 8)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(source, x))


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(LrkConfigError, match=r"checkpoint_path=.*nope.ckpt.* no such file"):
        build_backbone({**TINY, "checkpoint_path": str(missing)}, 3, 1, 16)


def test_checkpoint_with_other_keys_or_shapes_is_rejected(tmp_path):
    torch.save(tiny_vit(depth=3).state_dict(), tmp_path / "deep.pt")
    with pytest.raises(LrkConfigError, match=r"unexpected keys in it \(blocks.2.norm1.weight"):
        load_checkpoint(tiny_vit(depth=2), tmp_path / "deep.pt")
    torch.save(tiny_vit(depth=1).state_dict(), tmp_path / "shallow.pt")
    with pytest.raises(LrkConfigError, match=r"model keys missing from it \(blocks.1.norm1.weight"):
        load_checkpoint(tiny_vit(depth=2), tmp_path / "shallow.pt")
    torch.save(tiny_vit(mlp_ratio=1.0).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(
        LrkConfigError, match=r"differ in shape .*blocks.0.mlp.fc1.weight \(32, 32\) vs \(64, 32\)"
    ):
        load_checkpoint(tiny_vit(), tmp_path / "narrow.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(LrkConfigError, match=r"neither a state_dict"):
        load_checkpoint(tiny_vit(), tmp_path / "empty.pt")


def test_checkpoint_head_of_other_num_classes_is_skipped(tmp_path, caplog):
    source = tiny_vit(num_classes=5, seed=1, distilled=True)
    torch.save(source.state_dict(), tmp_path / "five.pt")
    target = tiny_vit(num_classes=3, seed=2, distilled=True)
    fresh_head = target.head.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="lrk.models.checkpoint"):
        skipped = load_checkpoint(target, tmp_path / "five.pt")
    assert skipped == ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]
    assert "left freshly initialised" in caplog.text
    torch.testing.assert_close(target.head.weight, fresh_head)
    torch.testing.assert_close(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    with pytest.raises(LrkConfigError, match=r"head.weight \(5, 32\) vs \(3, 32\)"):
        load_checkpoint(
            tiny_vit(num_classes=3, distilled=True), tmp_path / "five.pt", skip_mismatched_head=False
        )


def test_checkpoint_position_embedding_is_resampled_to_the_new_grid(tmp_path):
    source = tiny_vit(image_size=16, patch_size=4)  # 4x4 grid
    torch.save(source.state_dict(), tmp_path / "small.pt")
    target = tiny_vit(image_size=32, patch_size=4)  # 8x8 grid
    assert load_checkpoint(target, tmp_path / "small.pt") == []
    assert target.pos_embed.shape == (1, 1 + 64, 32)
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])
    torch.testing.assert_close(target.patch_embed.proj.weight, source.patch_embed.proj.weight)
    same = tiny_vit(image_size=16, patch_size=4, seed=5)  # same grid: unchanged
    load_checkpoint(same, tmp_path / "small.pt")
    torch.testing.assert_close(same.pos_embed, source.pos_embed)


def test_vit_class_is_the_registered_builder():
    assert BACKBONES["vit"] is VisionTransformer


# ----------------------------------------------------------------------------- weights trained elsewhere


def pretrain_run(tmp_path: Path) -> Path:
    """A conv-stem ViT trained by lrk.train on 4-class synthetic data at 32 px (patch 4: an 8x8 grid)."""
    from conftest import TINY, compose_train
    from omegaconf import open_dict

    from lrk.train import run

    overrides = [
        *TINY, "data.label_mode=types", "data.image_size=32", "data.num_samples=48", "trainer.max_epochs=1",
        "backbone.stem=conv", "backbone.patch_size=4",
    ]  # fmt: skip
    cfg = compose_train(overrides, tmp_path)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "pretrain")
    run(cfg)
    return tmp_path / "pretrain"


def test_fine_tune_from_a_run_dir_of_other_classes_and_image_size(tmp_path, tiny_cfg, caplog):
    """Item 3 of issue 12 (docs/pretraining.md): pretrain on 4 classes at 32 px, then start a binary 16 px run
    from that run dir with backbone.checkpoint_path: the head is replaced, the position embedding resampled from
    8x8 to 4x4 patches, every other tensor taken as trained."""
    from lrk.models.checkpoint import weights_file
    from lrk.summary import read_summary
    from lrk.train import run

    source = pretrain_run(tmp_path)
    state = torch.load(weights_file(source), map_location="cpu", weights_only=False)["state_dict"]
    state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    assert state["head.weight"].shape == (4, 32) and state["pos_embed"].shape == (1, 65, 32)

    cfg_node = {**TINY, "dim": 32, "depth": 1, "num_heads": 2, "stem": "conv", "patch_size": 4}
    cfg_node["checkpoint_path"] = str(source)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="lrk.models.checkpoint"):
        model = build_backbone(cfg_node, num_classes=2, in_chans=1, image_size=16)
    assert "head" in caplog.text and "resampled from a 8x8 to a 4x4" in caplog.text
    own = model.state_dict()
    for key, value in own.items():
        if key.startswith("head"):
            assert value.shape[0] == 2  # a fresh 2-class classifier
        elif key == "pos_embed":
            grid = state[key][:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
            small = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
            expected = torch.cat([state[key][:, :1], small.permute(0, 2, 3, 1).reshape(1, 16, 32)], dim=1)
            torch.testing.assert_close(value, expected)
        else:
            torch.testing.assert_close(value, state[key], msg=key)

    # the same through lrk.train, end to end
    cfg = tiny_cfg(
        f"backbone.checkpoint_path={source}", "backbone.stem=conv", "backbone.patch_size=4", "trainer.max_epochs=1",
        "data.num_samples=48", run="finetune",
    )  # fmt: skip
    metrics = run(cfg)
    assert read_summary(Path(cfg.paths.output_dir))["status"] == "completed"
    assert 0.0 <= metrics["test/bal_acc"] <= 1.0


def test_checkpoint_path_run_dir_without_checkpoints_is_a_config_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(
        LrkConfigError, match=r"backbone\.checkpoint_path=.*run' is invalid: a directory without"
    ):
        tiny_vit(checkpoint_path=str(tmp_path / "run"))
