"""Methods applied to models: registry and configs, default targets, globs, errors before any change,
full-rank reproduction, reports, shared TRAWL factors, fine-tuning."""

from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from lrk.decomp import METHODS, TrawlShared, build_method, count_params
from lrk.errors import LrkConfigError

CONF = Path(__file__).resolve().parent.parent / "conf" / "decomp"
NAMES = ["svd", "tucker", "cp", "tt", "trawl"]


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.norm(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.attn.proj(att @ v)
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class TinyViT(nn.Module):
    """ViT module names as lrk.models builds them: patch_embed.proj, blocks.{i}.attn.qkv ..., head."""

    def __init__(self, dim: int = 16, depth: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().eval()


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=4).eval()


X_VIT = torch.randn(2, 3, 16, 16)
BLOCK_LINEARS = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def targets(method: str, model: nn.Module) -> list[str]:
    return [n for n, _ in build_method({"name": method, "ratio": 0.5}).select_targets(model)]


# --- registry and configs ------------------------------------------------------------------------------
def test_every_config_file_builds_its_method():
    assert set(METHODS) >= {"none", *NAMES}  # attention methods (sdrm) register too
    for name in ["none", *NAMES]:
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        method = build_method(cfg)
        assert method.name == name and method.stage == "init" and method.finetune_epochs == 0
        assert method.ckpt_path is None
        if name != "none":
            assert method.policy.kind == "ratio" and method.policy.ratio == 0.5  # default_ratio
    cfg = OmegaConf.load(CONF / "tucker.yaml")
    cfg.energy = 0.9  # as `decomp=tucker decomp.energy=0.9` on the command line
    assert build_method(cfg).policy.kind == "energy"


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"name": "qr"}, r"decomp.name='qr' is invalid: it must be one of \[.*'cp', .*'none'"),
        ({"name": "svd", "ratio": 0.5, "rnak": 3}, r"\['rnak'\] are invalid"),
        ({"name": "svd", "ratio": 0.5, "stage": "later"}, r"decomp.stage='later' is invalid"),
        ({"name": "svd", "ratio": 0.5, "finetune_epochs": -1}, "finetune_epochs=-1"),
        ({"name": "svd", "ratio": 0.5, "targets": [3]}, "glob patterns"),
        ({"name": "tucker", "ratio": 0.5, "beta": 0}, "decomp.beta=0"),
        ({"name": "cp", "ratio": 0.5, "n_iter_max": 0}, "decomp.n_iter_max=0"),
        ({"name": "tt", "ratio": 0.5, "cores": 1}, "decomp.cores=1"),
        ({"name": "trawl", "ratio": 0.5, "decomposition": "svd"}, "decomp.decomposition='svd'"),
    ],
)
def test_bad_method_configs(cfg, match):
    with pytest.raises(LrkConfigError, match=match):
        build_method(cfg)


# --- default targets -----------------------------------------------------------------------------------
def test_default_targets_on_a_vit():
    model = vit()
    for name in ("svd", "tucker", "cp", "tt", "trawl"):
        assert targets(name, model) == BLOCK_LINEARS, name  # never the head nor the patch embedding (stem)


def test_default_targets_on_resnet18():
    model = resnet()
    kxk = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    one = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert kxk[0] == "conv1" and len(kxk) == 17 and len(one) == 3
    every_conv = [n for n in (kxk + one) if n != "conv1"]
    assert sorted(targets("svd", model)) == sorted(every_conv)
    assert sorted(targets("tucker", model)) == sorted(every_conv)
    assert sorted(targets("trawl", model)) == sorted(every_conv)
    assert targets("cp", model) == kxk[1:]
    assert targets("tt", model) == one  # the 1x1 downsample convolutions only


def test_target_and_skip_globs_on_resnet18():
    model = resnet()
    method = build_method({"name": "tucker", "rank": 8, "targets": ["layer*.*.conv2"], "skip": ["layer4.*"]})
    assert [n for n, _ in method.select_targets(model)] == [
        f"layer{i}.{j}.conv2" for i in (1, 2, 3) for j in (0, 1)
    ]
    # a glob that also hits containers and BatchNorms keeps the weight layers it matches
    method = build_method({"name": "tucker", "rank": 8, "targets": ["layer1.0.*"]})
    assert [n for n, _ in method.select_targets(model)] == ["layer1.0.conv1", "layer1.0.conv2"]


# --- errors before any change --------------------------------------------------------------------------
def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (
            {"name": "svd", "rank": 2, "targets": ["blocks.*.attn.qkvv"]},
            r"pattern 'blocks.\*.attn.qkvv' matches no Linear/Conv layers \(no module at all\)",
        ),
        (
            {"name": "svd", "rank": 2, "targets": ["blocks.*.norm"]},
            r"matches no Linear/Conv layers \(only blocks.0.norm",
        ),
        (
            {"name": "svd", "rank": 2, "skip": ["nothing.*"]},
            r"decomp.skip pattern 'nothing.\*' matches no module",
        ),
        ({"name": "svd", "rank": 2, "skip": ["blocks.*"]}, "removes every target"),
        (
            {"name": "svd", "rank": 17},
            r"decomp.rank=17 is invalid for layer 'blocks.0.attn.qkv' \(Linear 16->48\): "
            r"it must be an integer in \[1, 16\]",
        ),
        (
            {"name": "tucker", "rank": 4, "targets": ["patch_embed.proj"]},
            r"layer 'patch_embed.proj' \(Conv2d 3->16 4x4\)"
            r": it must be an integer in \[1, 3\]",
        ),
        (
            {"name": "tt", "rank": 2, "targets": ["patch_embed.proj"]},
            r"decomp=tt cannot decompose layer "
            r"'patch_embed.proj' \(Conv2d 3->16 4x4\): a 4x4 kernel is not a matrix; decomp=tt supports Linear and 1x1",
        ),
        (
            {"name": "tt", "rank": 2, "out_factors": [5, 5]},
            r"decomp.out_factors=\[5, 5\] is invalid for layer "
            r"'blocks.0.attn.qkv': the factors must multiply to 48",
        ),
        (
            {"name": "trawl", "rank": 2, "layer_rank": 3},
            r"decomp.layer_rank=3 is invalid for group 'blocks.0.attn.qkv "
            r"\(\+1 same-shaped\)' of 2 layers",
        ),
    ],
)
def test_bad_targets_and_ranks_fail_before_the_model_changes(cfg, match):
    model = vit()
    before = _snapshot(model)
    with pytest.raises(LrkConfigError, match=match):
        build_method(cfg).apply(model, None)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_unsupported_layer_types_name_the_layer_and_the_supported_types():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 3), nn.Linear(4, 2))
    with pytest.raises(
        LrkConfigError, match=r"layer '0' \(Conv2d 4->4 3x3, groups=2\): grouped .* supports Conv2d"
    ):
        build_method({"name": "tucker", "rank": 2, "targets": ["0"]}).apply(model)
    with pytest.raises(
        LrkConfigError, match=r"layer '1' \(Conv1d 4->4 3\): Conv1d is not a Linear or Conv2d"
    ):
        build_method({"name": "cp", "rank": 2, "targets": ["1"]}).apply(model)


# --- full rank, low rank, report -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["svd", "tucker", "tt", "trawl"])
def test_full_rank_reproduces_the_model_and_low_rank_changes_it(name):
    model = vit()
    with torch.no_grad():
        y = model(X_VIT)
    report = build_method({"name": name, "energy": 1.0}).apply(model)
    assert len(report.rows) == 8
    with torch.no_grad():
        assert torch.allclose(model(X_VIT), y, atol=1e-4, rtol=1e-4)
    assert report.metrics()["decomp/rel_error_mean"] < 1e-5
    model = vit()
    report = build_method({"name": name, "rank": 2}).apply(model)
    with torch.no_grad():
        assert float((model(X_VIT) - y).norm() / y.norm()) > 0.01
    assert report.metrics()["decomp/rel_error_mean"] > 0.1


def test_cp_on_a_vit_changes_the_computation_and_counts_match():
    model = vit()
    with torch.no_grad():
        y = model(X_VIT)
    report = build_method({"name": "cp", "rank": 3, "n_iter_max": 5}).apply(model)
    with torch.no_grad():
        assert float((model(X_VIT) - y).norm() / y.norm()) > 0.01
    row = report.rows[0]  # qkv 48x16 as (8x6) x (4x4): 3 (8 + 6 + 4 + 4) + bias 48
    assert row["kind"] == "cp_linear" and row["params_after"] == 3 * 22 + 48
    assert all(r["ranks"] == [3] for r in report.rows)


def test_report_rows_and_metrics():
    model = vit()
    dense = count_params(model)
    report = build_method({"name": "svd", "rank": 4}).apply(model)
    row = report.rows[0]
    assert row["name"] == "blocks.0.attn.qkv" and row["kind"] == "svd" and row["shape"] == [48, 16]
    assert row["rank"] == 4 and row["params_before"] == 48 * 16 + 48 and row["params_after"] == 4 * 64 + 48
    assert row["energy"] == pytest.approx(1 - row["rel_error"] ** 2)
    metrics = report.metrics()
    assert metrics["decomp/layers"] == 8 and metrics["decomp/rank_mean"] == 4
    assert metrics["time/rr_s"] == pytest.approx(sum(r["seconds"] for r in report.rows))
    assert dense - count_params(model) == metrics["decomp/params_before"] - metrics["decomp/params_after"]
    columns, rows = report.table()
    assert columns[0] == "name" and rows[0][2] == "48x16"


def test_none_changes_nothing_and_reports_nothing():
    model = vit()
    before = _snapshot(model)
    report = build_method({"name": "none"}).apply(model, [torch.zeros(1)])
    assert report.rows == [] and report.metrics() == {"time/rr_s": 0.0, "decomp/layers": 0.0}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --- TRAWL: shared factors -------------------------------------------------------------------------------
@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
def test_trawl_layers_share_factors_counted_once(decomposition):
    model = vit()
    dense = count_params(model)
    report = build_method(
        {"name": "trawl", "rank": 4, "decomposition": decomposition, "n_iter_max": 3}
    ).apply(model)
    qkv0, qkv1 = model.blocks[0].attn.qkv, model.blocks[1].attn.qkv
    assert isinstance(qkv0.shared, TrawlShared) and qkv0.shared is qkv1.shared
    assert model.blocks[0].mlp.fc1.shared is not qkv0.shared  # one group per weight shape
    assert {r["group_size"] for r in report.rows} == {2}
    # the model counts each shared tensor once; the rows share it out
    assert dense - count_params(model) == pytest.approx(
        report.metrics()["decomp/params_before"] - report.metrics()["decomp/params_after"]
    )
    if decomposition == "tucker":  # qkv group: U_out 48x4 + U_in 16x4 shared, core 4x4 + bias 48 per layer
        assert report.rows[0]["params_after"] == pytest.approx(16 + 48 + (48 * 4 + 16 * 4) / 2)
    else:  # CP: A 48x4, B 16x4 shared, 4 scales + bias 48 per layer
        assert report.rows[0]["params_after"] == pytest.approx(4 + 48 + (48 * 4 + 16 * 4) / 2)


def test_trawl_with_a_layer_rank_mixes_shared_cores():
    model = vit()
    build_method({"name": "trawl", "energy": 1.0, "layer_rank": 1}).apply(model)
    qkv = model.blocks[0].attn.qkv
    assert qkv.core is None and qkv.coef.shape == (1,) and qkv.shared.core_basis.shape[0] == 1


def test_trawl_on_resnet_convs_and_cp_on_convs():
    model = resnet()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    report = build_method({"name": "trawl", "energy": 1.0, "targets": ["layer1.*.conv*"]}).apply(model)
    assert [r["group_size"] for r in report.rows] == [4, 4, 4, 4]
    with torch.no_grad():
        assert torch.allclose(model(x), y, atol=1e-3, rtol=1e-3)
    model = resnet()
    report = build_method({"name": "cp", "rank": 8, "n_iter_max": 3, "targets": ["layer1.0.conv1"]}).apply(
        model
    )
    assert report.rows[0]["params_after"] == 8 * (64 + 64 + 9)


# --- fine-tuning after factorization -----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_few_sgd_steps_lower_the_loss_after_factorization(name):
    model = vit().train()
    torch.manual_seed(1)
    x, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    build_method(
        {"name": name, "rank": 2, "n_iter_max": 3} if name in ("cp", "trawl") else {"name": name, "rank": 2}
    ).apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
