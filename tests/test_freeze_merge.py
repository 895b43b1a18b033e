"""Layer freezing (accelerating_lrd_paper Sec. 2.2, lrk.decomp.freeze) and layer merging (Sec. 2.3 / Fig. 3,
lrk.decomp.merge): frozen factors stay bit-identical through a real Lightning step and hold no optimizer state;
bad roles are refused before training; the exact folds (BN in eval mode, a factorized layer beside a Linear) match
to rounding; the bottleneck merge keeps the dense model's layer count, reports its measured error (an
approximation: > 0) and is exact in its linear part; nothing mergeable is one error; merged models train and load.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import Bottleneck, ResNet

from lrk.decomp import build_method
from lrk.decomp.freeze import LAYER_ROLES, layer_roles, trainable_params
from lrk.decomp.merge import (
    check_mergeable,
    fold_batchnorm,
    fold_bn_into_conv,
    main_path_layers,
    merge_model,
    weight_layers,
)
from lrk.errors import LrkConfigError
from lrk.layers.base import FactorizedLayer
from lrk.layers.cp import CPConv2d
from lrk.layers.svd import SVDConv2d, SVDLinear
from lrk.layers.tucker import TuckerConv2d
from lrk.lit.module import LitClassifier
from lrk.measure import count_params
from lrk.models import build_backbone
from lrk.pipeline.structure import StructureCheckpoint, restore_model, structure_payload

SIZE = 32
GEN = torch.Generator().manual_seed(3)
X = torch.randn(4, 3, SIZE, SIZE, generator=GEN)
CALIB = [torch.randn(8, 3, SIZE, SIZE, generator=GEN) for _ in range(2)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def randomize_bn(model: nn.Module) -> nn.Module:
    """BN statistics and affine parameters away from the identity (a fresh BN would hide folding mistakes)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def bottleneck_resnet(num_classes: int = 3) -> ResNet:
    """A small ResNet-50-style model: torchvision Bottleneck blocks [1, 1, 1, 1], width 16 (64 at stage 4)."""
    torch.manual_seed(0)
    return randomize_bn(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=16)).eval()


def decomposed(model: nn.Module, **keys: Any) -> tuple[nn.Module, Any]:
    model = copy.deepcopy(model)
    report = build_method({"name": "tucker", "ratio": 0.5, **keys}).apply(model, CALIB)
    return model, report


# --- freezing ---------------------------------------------------------------------------------------------------
def test_every_layer_with_roles_maps_all_its_factors() -> None:
    """LAYER_ROLES is the one table: every factor name of each layer type has a role, ``paper`` freezes the first
    factor of an SVD pair and both 1x1 factors of a Tucker / CP triple."""
    conv3, conv1, linear = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 6)
    layers = [
        SVDLinear.from_dense(linear, 2),
        SVDConv2d.from_dense(conv3, 2),
        SVDConv2d.from_dense(conv1, 2),
        TuckerConv2d.from_dense(conv3, 2),
        CPConv2d.from_dense(conv3, 2, n_iter_max=2),
    ]
    try:
        from lrk.layers.branched_tucker import BranchedTuckerConv2d

        layers.append(BranchedTuckerConv2d.from_dense(conv3, 4, branches=2))
    except ImportError:  # pragma: no cover - the branched layer lands in its own issue
        pass
    for layer in layers:
        names, paper = layer_roles(layer)
        assert set(names) == set(layer.factors()), type(layer).__name__
        expected = {"first"} if len(names) == 2 else {"first", "last"}
        assert paper == expected
    assert set(LAYER_ROLES) >= {"SVDLinear", "SVDConv2d", "TuckerConv2d", "CPConv2d"}


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"name": "svd", "freeze": ["core"]}, r"role\(s\) \['core'\].*valid roles are \['first', 'last'\]"),
        ({"name": "tucker", "freeze": ["first", "middle"]}, r"\['middle'\].*\['first', 'core', 'last'\]"),
        ({"name": "tucker", "freeze": "everything"}, r"\['everything'\].*valid roles"),
        ({"name": "tucker", "freeze": []}, "non-empty list"),
        ({"name": "svd", "freeze": 3}, "decomp.freeze=3"),
        ({"name": "svd", "merge": "yes"}, "decomp.merge='yes'"),
        ({"name": "cp", "freeze": "paper"}, r"\['freeze'\] are invalid for decomp=cp"),
    ],
)
def test_bad_freeze_or_merge_is_refused_when_the_method_is_built(keys: dict, match: str) -> None:
    with pytest.raises(LrkConfigError, match=match):
        build_method({"ratio": 0.5, **keys})


def test_freeze_role_lists_set_requires_grad_by_role() -> None:
    model, report = decomposed(bottleneck_resnet(), freeze=["core"])
    tucker = [m for m in model.modules() if isinstance(m, TuckerConv2d)]
    svd = [m for m in model.modules() if isinstance(m, SVDConv2d)]
    assert tucker and svd
    assert all(not t.core.weight.requires_grad and t.first.weight.requires_grad for t in tucker)
    assert all(p.requires_grad for s in svd for p in s.parameters())  # an SVD layer has no core
    rows = {r["name"]: r for r in report.rows}
    assert rows["layer1.0.conv2"]["frozen"] == ["core"]
    assert rows["layer1.0.conv2"]["frozen_params"] == tucker[0].core.weight.numel()
    assert rows["layer1.0.conv1"]["frozen"] == []


def loader(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=4)


def trainer(root, steps: int, **extra: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(root),
        **extra,
    )


def test_frozen_factors_do_not_move_and_hold_no_optimizer_state(tmp_path) -> None:
    """freeze=paper, one real AdamW step through LitClassifier.configure_optimizers (a Lightning fit): the frozen
    factors (Tucker first + last, SVD w0) are bit-identical, every other factor changed, the optimizer holds only
    parameters that require grad and state for none of the frozen ones; a resumed fit (last.ckpt) keeps that, and
    the checkpoint's structure restores the same requires_grad flags."""
    model, report = decomposed(bottleneck_resnet(), freeze="paper")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    factors = {
        f"{name}.{key}": p
        for name, m in model.named_modules()
        if isinstance(m, FactorizedLayer)
        for key, p in m.factors().items()
    }
    trained = {n: p.detach().clone() for n, p in factors.items() if p.requires_grad}
    assert frozen and trained
    for m in model.modules():
        if isinstance(m, TuckerConv2d):
            assert (
                not m.first.weight.requires_grad
                and not m.last.weight.requires_grad
                and m.core.weight.requires_grad
            )
        if isinstance(m, SVDConv2d):
            assert not m.w0.weight.requires_grad and m.w1.weight.requires_grad
    assert sum(r["frozen_params"] for r in report.rows) == sum(p.numel() for p in frozen.values())
    assert trainable_params(model) == count_params(model) - sum(p.numel() for p in frozen.values())

    lit = LitClassifier(model.train(), num_classes=3, lr=1e-2)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(tmp_path, 1, callbacks=[checkpoint, StructureCheckpoint()])
    fit.fit(lit, train_dataloaders=loader())
    after = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(after[name].detach(), value), name
    for name, value in trained.items():
        assert not torch.equal(factors[name].detach(), value), f"{name} did not move"
    optimizer = fit.optimizers[0]
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p.requires_grad for p in in_optimizer)
    assert len(in_optimizer) == sum(p.requires_grad for p in model.parameters())
    frozen_ids = {id(after[n]) for n in frozen}
    assert optimizer.state and not frozen_ids & {id(p) for p in optimizer.state}

    # resume from last.ckpt for one more step: the optimizer state loads into the same groups
    again = LitClassifier(copy.deepcopy(model), num_classes=3, lr=1e-2)
    trainer(tmp_path, 2).fit(
        again, train_dataloaders=loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    resumed = dict(again.model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(resumed[name].detach(), value) and not resumed[name].requires_grad

    restored = restore_model(tmp_path / "ckpt" / "last.ckpt")
    flags = {n: p.requires_grad for n, p in restored.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


# --- exact folds ------------------------------------------------------------------------------------------------
def test_bn_folds_into_the_conv_before_it_exactly_in_eval_mode() -> None:
    torch.manual_seed(1)
    for conv in (nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.Conv2d(4, 6, 1, bias=True)):
        bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
        x = torch.randn(2, 4, 9, 9)
        assert rel(fold_bn_into_conv(conv, bn)(x), bn(conv(x))) < 1e-6
    model, _ = decomposed(bottleneck_resnet())  # factorized convs: BN folds into their last factor
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert rel(folded(X), model(X)) < 1e-5


def sequential() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(12, 20), nn.Dropout(0.0), nn.Linear(20, 16), nn.GELU(), nn.Linear(16, 18), nn.Linear(18, 5)
    )


@pytest.mark.parametrize("target", ["0", "5"])  # SVD then a Linear / a Linear (with bias) then SVD
def test_a_factorized_layer_folds_exactly_into_the_linear_beside_it(target: str) -> None:
    x = torch.randn(7, 12)
    lrd = sequential()
    build_method({"name": "svd", "rank": 3, "targets": [target]}).apply(lrd, [x])
    merged = sequential()
    report = build_method({"name": "svd", "rank": 3, "targets": [target], "merge": True}).apply(merged, [x])
    (row,) = report.rows
    assert row["exact"] is True and row["merge_rel_error"] < 1e-6
    assert row["kind"].startswith("fold")
    assert weight_layers(merged) == weight_layers(lrd) - 1
    with torch.no_grad():
        assert rel(merged(x), lrd(x)) < 1e-6
    dense = sequential()
    pair = (dense[0], dense[2]) if target == "0" else (dense[4], dense[5])
    assert row["params_before"] == sum(count_params(m) for m in pair)
    assert row["params_after"] == count_params(merged[0 if target == "0" else 4])
    assert count_params(merged) == count_params(dense) - (row["params_before"] - row["params_after"])


def test_a_factorized_kxk_conv_folds_exactly_into_a_following_1x1() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1))
    lrd = copy.deepcopy(model)
    build_method({"name": "svd", "rank": 2, "targets": ["0"]}).apply(lrd, [X])
    report = build_method({"name": "svd", "rank": 2, "targets": ["0"], "merge": True}).apply(model, [X])
    assert isinstance(model[0], SVDConv2d) and isinstance(model[1], nn.Identity)
    assert report.rows[0]["merge_rel_error"] < 1e-6
    with torch.no_grad():
        assert rel(model(X), lrd(X)) < 1e-6


# --- the bottleneck merge (Fig. 3) ------------------------------------------------------------------------------
def test_bottleneck_merge_keeps_the_dense_layer_count_and_reports_its_error() -> None:
    dense = bottleneck_resnet()
    lrd, _ = decomposed(dense, targets=["layer*.*.conv2"])
    merged, report = decomposed(dense, targets=["layer*.*.conv2"], merge=True)
    assert weight_layers(lrd) == weight_layers(dense) + 2 * 4  # each Tucker 3x3 is three layers
    assert weight_layers(merged) == weight_layers(dense)
    assert main_path_layers(merged) == main_path_layers(dense) == 14  # 1 + 4 x 3 + fc
    assert len(report.rows) == 4
    for row in report.rows:
        block = merged.get_submodule(row["name"])
        assert isinstance(block, Bottleneck) and row["exact"] is False
        downsample = 1 if block.downsample is not None else 0
        assert (row["layers_before"], row["layers_after"]) == (5 + downsample, 3 + downsample)
        # measured before fine-tuning, on the calibration batches: an approximation, so not 0
        assert 0 < row["merge_rel_error"] < 2 and 0 < row["rel_error"] < 2 and row["lrd_rel_error"] > 0
        parts = ("conv1", "bn1", "conv2", "bn2", "conv3")
        assert row["params_after"] == sum(count_params(getattr(block, k)) for k in parts)
        dense_block = dense.get_submodule(row["name"])
        assert row["params_before"] == sum(count_params(getattr(dense_block, k)) for k in parts)
        r2, r1 = row["ranks"]
        assert (block.conv1.out_channels, block.conv2.in_channels, block.conv2.out_channels) == (r1, r1, r2)
        assert block.conv3.in_channels == r2 and block.bn1.num_features == r1 and block.bn2.num_features == r2
    saved = sum(r["params_before"] - r["params_after"] for r in report.rows)
    assert count_params(merged) == count_params(dense) - saved
    assert {"decomp/params_before", "decomp/params_after"} <= set(report.metrics())


def test_the_linear_part_of_the_bottleneck_merge_is_exact() -> None:
    """With the ReLUs taken out, conv1' bn1' core bn2' conv3' bn3 equals the LRD block in eval mode: the products,
    the BN folds, the re-fitted BNs and bn3's shifted mean are exact; only the moved ReLU approximates."""
    lrd, _ = decomposed(bottleneck_resnet(), targets=["layer*.*.conv2"])
    merged = copy.deepcopy(lrd)
    report = merge_model(merged, CALIB)
    assert report.rows and report.model_rel_error > 0
    x = torch.randn(2, 64, 8, 8)
    for row in report.rows:
        a = copy.deepcopy(lrd.get_submodule(row["name"])).eval()
        b = copy.deepcopy(merged.get_submodule(row["name"])).eval()
        a.relu = b.relu = nn.Identity()
        inp = x if a.conv1.in_channels == 64 else torch.randn(2, a.conv1.in_channels, 8, 8)
        with torch.no_grad():
            assert rel(b(inp), a(inp)) < 1e-5, row["name"]


def test_svd_merge_folds_only_the_trailing_1x1_and_keeps_the_count() -> None:
    dense = bottleneck_resnet()
    merged = copy.deepcopy(dense)
    report = build_method({"name": "svd", "ratio": 0.5, "targets": ["layer*.*.conv2"], "merge": True}).apply(
        merged, CALIB
    )
    assert weight_layers(merged) == weight_layers(dense)
    for row in report.rows:
        block = merged.get_submodule(row["name"])
        # no front merge: conv1 keeps its width
        assert block.conv1.out_channels == dense.get_submodule(row["name"]).conv1.out_channels
        assert block.conv3.in_channels == row["ranks"][0] and row["merge_rel_error"] > 0


def test_a_merged_tiny_resnet50_trains_and_loads_back() -> None:
    """lrk's resnet50 at 32 px, Tucker with the default targets, merge + freeze=paper: forward, backward and an
    optimizer step run; the merged modules pickle and come back through the checkpoint structure."""
    torch.manual_seed(0)
    model = randomize_bn(
        build_backbone({"name": "resnet50"}, num_classes=3, in_chans=3, image_size=SIZE)
    ).eval()
    dense_layers = main_path_layers(model)
    report = build_method({"name": "tucker", "ratio": 0.5, "merge": True, "freeze": "paper"}).apply(
        model, CALIB[:1]
    )
    merged_rows = [r for r in report.rows if r["kind"].startswith("merged bottleneck")]
    assert len(merged_rows) == 16 and main_path_layers(model) == dense_layers == 50
    assert all(isinstance(r["rel_error"], float) for r in report.rows)
    frozen = [p for p in model.parameters() if not p.requires_grad]  # the downsample SVDs' w0
    assert frozen and sum(r["frozen_params"] for r in report.rows) == sum(p.numel() for p in frozen)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.layer1[0].conv1.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(X), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.layer1[0].conv1.weight, before)
    model.eval()
    payload = structure_payload(model, {"num_classes": 3, "in_chans": 3, "image_size": SIZE})
    buffer = io.BytesIO()
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lrk_structure": payload},
        buffer,
    )
    restored = restore_model(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)).eval()
    with torch.no_grad():
        assert torch.equal(restored(X), model(X))


# --- nothing to merge -------------------------------------------------------------------------------------------
def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_merge_on_a_model_with_nothing_mergeable_is_one_error_before_decomposing() -> None:
    torch.manual_seed(0)
    resnet18 = build_backbone({"name": "resnet18"}, num_classes=3, in_chans=3, image_size=SIZE)
    before = state(resnet18)
    with pytest.raises(LrkConfigError, match=r"nothing to merge.*BasicBlock"):
        build_method({"name": "tucker", "ratio": 0.5, "merge": True}).apply(resnet18, CALIB)
    assert all(torch.equal(v, before[k]) for k, v in resnet18.state_dict().items())
    vit = build_backbone(
        {"name": "vit", "dim": 16, "depth": 2, "num_heads": 2}, num_classes=2, in_chans=3, image_size=16
    )
    for name in ("svd", "tucker"):
        with pytest.raises(LrkConfigError, match=r"nothing to merge.*LayerNorm"):
            build_method({"name": name, "ratio": 0.5, "merge": True}).apply(vit, [torch.randn(2, 3, 16, 16)])
    with pytest.raises(LrkConfigError, match="none of its 4 Bottleneck"):
        check_mergeable(bottleneck_resnet(), ["layer1.0.conv1"], "svd")
    with pytest.raises(LrkConfigError, match="needs calibration batches"):
        build_method({"name": "tucker", "ratio": 0.5, "merge": True}).apply(bottleneck_resnet(), [])
