"""Branched Tucker (accelerating_lrd_paper Sec. 2.4, Eqs. 8-20, Fig. 4): the layer, its maths and ``decomp=tucker
decomp.branches=N``. The protocol (fold, flops, factors, bad ranks) is checked with every layer in
tests/test_layers_protocol.py."""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock

from lrk.decomp import build_method
from lrk.decomp.weight.base import RatioUnreachableWarning
from lrk.errors import LrkConfigError
from lrk.layers.branched_tucker import BranchedTuckerConv2d
from lrk.layers.tucker import TuckerConv2d
from lrk.linalg.tucker import branched_tucker2, branched_tucker2_to_tensor, tucker2_rank_eq7

CONF = Path(__file__).resolve().parent.parent / "conf" / "decomp" / "tucker.yaml"


def _conv(c: int = 16, s: int = 24, bias: bool = True, dtype: torch.dtype = torch.float64) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(c, s, 3, stride=1, padding=1, bias=bias, dtype=dtype)


def _x(c: int = 16, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, c, 7, 7, dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the layer ----------------------------------------------------------------------------------------------
def test_one_branch_is_vanilla_tucker() -> None:
    conv, x = _conv(), _x()
    vanilla = TuckerConv2d.from_dense(conv, (8, 6))
    one = BranchedTuckerConv2d.from_dense(conv, (8, 6), branches=1)
    assert one.core.groups == 1
    with torch.no_grad():
        assert torch.allclose(one(x), vanilla(x), rtol=1e-10, atol=1e-12)
        assert torch.allclose(one.dense_weight(), vanilla.dense_weight(), rtol=1e-10, atol=1e-12)
    assert _params(one) == _params(vanilla)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_core_has_one_nth_of_the_vanilla_core_and_the_layer_the_closed_form(n: int) -> None:
    c, s, r2, r1 = 16, 24, 16, 8  # both ranks multiples of 8
    conv = _conv(c, s)
    layer = BranchedTuckerConv2d.from_dense(conv, (r2, r1), branches=n)
    vanilla = TuckerConv2d.from_dense(conv, (r2, r1))
    assert layer.core.groups == n and layer.core.weight.shape == (r2, r1 // n, 3, 3)
    core = _params(layer.core)  # counted from the built module
    assert core * n == _params(vanilla.core) == r1 * r2 * 9  # Eq. 20
    assert core == n * ((r1 // n) * (r2 // n) * 9)  # Eqs. 18-19
    assert core == BranchedTuckerConv2d.core_param_count((r2, r1), 9, n)
    total = c * r1 + r1 * r2 * 9 // n + r2 * s + s  # first + core + last (+ bias)
    assert _params(layer) == total == BranchedTuckerConv2d.param_count(c, s, 9, (r2, r1), n, bias=True)


def test_grouped_core_computes_the_sum_of_the_n_branches_of_fig4() -> None:
    """Fig. 4: N parallel branches 1x1 C -> R1, k x k R1 -> R2, 1x1 R2 -> S, summed, are the three layers with a
    groups=N core (each branch computed here with its own ungrouped convolutions)."""
    n, (r2, r1) = 4, (12, 8)
    conv, x = _conv(), _x()
    layer = BranchedTuckerConv2d.from_dense(conv, (r2, r1), branches=n)
    first, core, last = layer.first.weight, layer.core.weight, layer.last.weight
    a, b = r1 // n, r2 // n
    with torch.no_grad():
        y = sum(
            F.conv2d(
                F.conv2d(F.conv2d(x, first[j * a : (j + 1) * a]), core[j * b : (j + 1) * b], padding=1),
                last[:, j * b : (j + 1) * b],
            )
            for j in range(n)
        )
        assert torch.allclose(layer(x), y + layer.last.bias[:, None, None], rtol=1e-10, atol=1e-12)


def test_branches_are_the_diagonal_blocks_of_vanilla_tucker_and_the_error_is_what_they_drop() -> None:
    """Eqs. 12-17: branch j takes the j-th groups of columns of the Tucker factors and the j-th diagonal block of
    its core. The kernel error, computed by hand from the vanilla HOSVD: with orthonormal factors and the core
    the projection of W, ||W - W_branched||^2 = ||W||^2 - sum_j ||X_jj||^2."""
    n, (r2, r1) = 2, (12, 8)
    conv, x = _conv(), _x()
    w = conv.weight.detach()
    vanilla = TuckerConv2d.from_dense(conv, (r2, r1))
    layer = BranchedTuckerConv2d.from_dense(conv, (r2, r1), branches=n)
    with torch.no_grad():
        assert _rel(layer(x), vanilla(x)) > 0.05  # equal ranks, different outputs at N > 1
        g, u, v = vanilla.core.weight, vanilla.first.weight[:, :, 0, 0].T, vanilla.last.weight[:, :, 0, 0]
        a, b = r1 // n, r2 // n
        blocks = [g[j * b : (j + 1) * b, j * a : (j + 1) * a] for j in range(n)]
        by_hand = sum(
            torch.einsum("sb,bahw,ca->schw", v[:, j * b : (j + 1) * b], blocks[j], u[:, j * a : (j + 1) * a])
            for j in range(n)
        )  # Eq. 17 from the vanilla factors
        assert torch.allclose(layer.dense_weight(), by_hand, rtol=1e-9, atol=1e-12)
        kept = sum(float(blk.square().sum()) for blk in blocks)
        expected = ((float(w.square().sum()) - kept) / float(w.square().sum())) ** 0.5
        err = _rel(layer.dense_weight(), w)
        assert err == pytest.approx(expected, rel=1e-9)
        assert err > _rel(vanilla.dense_weight(), w)  # dropping the off-diagonal blocks costs accuracy
        # a random grouped core of the same norm, on the same factors, is far worse
        torch.manual_seed(3)
        noise = torch.randn_like(layer.core.weight)
        random = copy.deepcopy(layer)
        random.core.weight.copy_(noise * layer.core.weight.norm() / noise.norm())
        assert _rel(random.dense_weight(), w) > err + 0.1


def test_refinement_sweeps_never_increase_the_error_and_keep_the_structure() -> None:
    torch.manual_seed(4)  # a kernel with decaying mode spectra, as trained kernels have
    w = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    w *= (torch.arange(1, 25, dtype=torch.float64) ** -0.7)[:, None, None, None]
    w *= (torch.arange(1, 17, dtype=torch.float64) ** -0.7)[None, :, None, None]
    errors = [
        _rel(branched_tucker2_to_tensor(branched_tucker2(w, (12, 8), 4, sweeps=k)), w) for k in (0, 1, 2, 5)
    ]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.9 * errors[0], errors
    conv = _conv()
    conv.weight.data.copy_(w)
    layer = BranchedTuckerConv2d.from_dense(conv, (12, 8), branches=4, sweeps=5)
    assert _rel(layer.dense_weight(), w) == pytest.approx(errors[-1], rel=1e-9)
    assert _params(layer) == _params(BranchedTuckerConv2d.from_dense(conv, (12, 8), branches=4))


def test_ranks_that_the_branches_do_not_divide_are_refused_with_the_nearest_multiples() -> None:
    with pytest.raises(
        ValueError, match=r"R1=6 is invalid: it must be a multiple of branches=4.*e\.g\. 4 or 8"
    ):
        BranchedTuckerConv2d.from_dense(_conv(), (8, 6), branches=4)
    with pytest.raises(ValueError, match=r"R2=3 is invalid.*branches=4.*e\.g\. 4\b"):
        BranchedTuckerConv2d.from_dense(_conv(), (3, 8), branches=4)
    with pytest.raises(ValueError, match="groups=1"):
        BranchedTuckerConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), 4)


# --- decomp=tucker decomp.branches=N ------------------------------------------------------------------------
def _cfg(**overrides) -> dict:
    """conf/decomp/tucker.yaml with ``overrides``, as ``python train.py decomp=tucker decomp.<k>=<v>`` composes."""
    return OmegaConf.merge(OmegaConf.load(CONF), overrides)


def test_config_default_is_vanilla_and_branches_are_validated() -> None:
    assert OmegaConf.load(CONF).branches == 1
    assert build_method(_cfg(rank=4)).branches == 1
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(LrkConfigError, match=rf"decomp\.branches={bad!r} is invalid"):
            build_method(_cfg(rank=4, branches=bad))
    with pytest.raises(LrkConfigError, match=r"decomp\.branch_sweeps=-1 is invalid"):
        build_method(_cfg(rank=4, branch_sweeps=-1))


@pytest.mark.parametrize(("rank", "n", "valid"), [(5, 2, "4 or 6"), (6, 4, "4 or 8"), (3, 4, "4")])
def test_a_rank_the_branches_do_not_divide_is_one_config_error(rank: int, n: int, valid: str) -> None:
    with pytest.raises(LrkConfigError) as info:
        build_method(_cfg(rank=rank, branches=n))
    message = str(info.value)
    assert f"decomp.rank={rank} is invalid with decomp.branches={n}" in message
    assert message.endswith(f"the nearest valid ranks are {valid}")
    build_method(_cfg(rank=rank - rank % n or n, branches=n))  # a multiple is accepted


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


LAYERS = ["layer2.0.conv1", "layer3.1.conv2"]  # 64 -> 128 stride 2, 256 -> 256


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ratio_is_met_within_the_tolerance_on_resnet18_layers(n: int) -> None:
    model = _resnet18()
    dense = {name: copy.deepcopy(model.get_submodule(name)) for name in LAYERS}
    report = build_method(_cfg(ratio=0.5, branches=n, targets=LAYERS)).apply(model)
    low, high = 0.5 * 0.9, 0.5 * 1.1
    for row in report.rows:
        layer, conv = model.get_submodule(row["name"]), dense[row["name"]]
        assert type(layer) is (TuckerConv2d if n == 1 else BranchedTuckerConv2d)
        r2, r1 = row["ranks"]
        assert r2 % n == 0 and r1 % n == 0
        assert row["params_after"] == _params(layer)  # counted from the module
        assert row["params_after"] == BranchedTuckerConv2d.param_count(
            conv.in_channels, conv.out_channels, 9, (r2, r1), n, bias=False
        )
        assert low <= _params(layer) / _params(conv) <= high, row
        assert row["kind"] == ("tucker2" if n == 1 else "branched_tucker2")
    if n == 2:  # branching spends the same budget on larger ranks (Eq. 7 with the core / N)
        guess = tucker2_rank_eq7(256, 256, 9, 2.0, 1.0, branches=2)
        r2, r1 = next(r["ranks"] for r in report.rows if r["name"] == "layer3.1.conv2")
        assert abs(r1 - guess) <= 2 and r1 > tucker2_rank_eq7(256, 256, 9, 2.0, 1.0) + 50


def test_rank_multiple_and_branches_combine_and_an_unreachable_ratio_stays_dense_with_a_warning() -> None:
    model = _resnet18()
    report = build_method(_cfg(ratio=0.5, branches=4, rank_multiple=16, targets=LAYERS)).apply(model)
    assert all(r % 16 == 0 for row in report.rows for r in row["ranks"])
    model = _resnet18()  # energy: the per-mode ranks rounded up to multiples of N
    report = build_method(_cfg(energy=0.5, branches=4, targets=LAYERS)).apply(model)
    assert all(r % 4 == 0 for row in report.rows for r in row["ranks"])
    assert all(isinstance(model.get_submodule(n), BranchedTuckerConv2d) for n in LAYERS)
    # N = 8 on a square 3x3 conv: even full ranks keep only (2 + 9/8)/9 = 0.347 < 0.45 of it
    model = _resnet18()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_method(_cfg(ratio=0.5, branches=8, targets=["layer3.1.conv2"])).apply(model)
    (row,) = report.rows
    assert row["kind"].startswith("dense") and "ranks [256, 256]" in row["note"]
    assert isinstance(model.get_submodule("layer3.1.conv2"), nn.Conv2d)
    assert any(issubclass(w.category, RatioUnreachableWarning) for w in caught)


def test_a_layer_narrower_than_the_branches_is_a_config_error_naming_it() -> None:
    with pytest.raises(LrkConfigError, match=r"branches=4 is invalid for layer 'conv1' \(Conv2d 3->64 7x7\)"):
        build_method(_cfg(ratio=0.5, branches=4, targets=["conv1"])).apply(_resnet18())


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down))
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_apply_on_a_tiny_resnet_runs_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model.eval()(x)
    report = build_method(_cfg(rank=4, branches=2)).apply(
        model
    )  # 8- and 16-channel layers: a ratio is too coarse
    branched = [n for n, m in model.named_modules() if isinstance(m, BranchedTuckerConv2d)]
    assert branched == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert {row["kind"] for row in report.rows} == {"branched_tucker2", "svd"}
    with torch.no_grad():
        assert _rel(model(x), before) > 1e-3  # the computation changed
    model.train()
    model(x).square().mean().backward()
    for name in branched:
        layer = model.get_submodule(name)
        assert layer.core.groups == 2
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.factors().values())
