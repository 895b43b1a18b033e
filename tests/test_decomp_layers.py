"""Factorized layers built from dense ones: exact at full rank, different at low rank, closed-form counts,
trainable factors."""

import pytest
import torch
from torch import nn

from lrk.decomp import (
    CPConv2d,
    CPLinear,
    SVDConv2d,
    SVDLinear,
    TTConv1x1,
    TTLinear,
    TuckerConv2d,
    count_params,
)
from lrk.linalg.cp import cp_to_tensor
from lrk.linalg.tt import tt_max_ranks
from lrk.measure import count_flops

TOL = 1e-4  # float32 layers: max |y_factorized - y_dense| relative to max |y_dense|


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


def _conv(stride: int = 2, padding: int = 1, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(8, 12, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)


def _exact_cp_conv(rank: int) -> nn.Conv2d:
    conv = _conv()
    factors = [torch.randn(d, rank, dtype=torch.float64) for d in (12, 8, 9)]
    conv.weight.data.copy_(cp_to_tensor(torch.ones(rank, dtype=torch.float64), factors).reshape(12, 8, 3, 3))
    return conv


def _exact_cp_linear(rank: int) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    factors = [torch.randn(d, rank, dtype=torch.float64) for d in (6, 4, 4, 4)]
    linear.weight.data.copy_(cp_to_tensor(torch.ones(rank, dtype=torch.float64), factors).reshape(24, 16))
    return linear


# (name, dense layer, build(dense, full), build(dense, low), input, closed-form params(full))
def _cases():
    torch.manual_seed(0)
    lin = nn.Linear(16, 24)
    x_lin = torch.randn(5, 7, 16)
    x_img = torch.randn(2, 8, 9, 9)
    tt_limits = tuple(tt_max_ranks((4, 3, 2), (2, 4, 2)))
    return [
        (
            "svd-linear",
            lin,
            lambda d: SVDLinear.from_linear(d, 16),
            lambda d: SVDLinear.from_linear(d, 4),
            x_lin,
            SVDLinear.param_count(16, 24, 16),
        ),
        (
            "svd-conv",
            _conv(),
            lambda d: SVDConv2d.from_conv(d, 12),
            lambda d: SVDConv2d.from_conv(d, 3),
            x_img,
            SVDConv2d.param_count(8, 12, 9, 12),
        ),
        (
            "svd-conv1x1",
            nn.Conv2d(8, 12, 1, stride=2),
            lambda d: SVDConv2d.from_conv(d, 8),
            lambda d: SVDConv2d.from_conv(d, 2),
            x_img,
            SVDConv2d.param_count(8, 12, 1, 8),
        ),
        (
            "tucker-conv",
            _conv(),
            lambda d: TuckerConv2d.from_conv(d, (12, 8)),
            lambda d: TuckerConv2d.from_conv(d, (4, 3)),
            x_img,
            TuckerConv2d.param_count(8, 12, 9, (12, 8)),
        ),
        (
            "tucker-conv-dilated-nobias",
            _conv(stride=1, padding=2, dilation=2, bias=False),
            lambda d: TuckerConv2d.from_conv(d, (12, 8)),
            lambda d: TuckerConv2d.from_conv(d, (4, 3)),
            x_img,
            TuckerConv2d.param_count(8, 12, 9, (12, 8), bias=False),
        ),
        (
            "cp-conv",
            _exact_cp_conv(5),
            lambda d: CPConv2d.from_conv(d, 5, n_iter_max=500, tol=1e-12),
            lambda d: CPConv2d.from_conv(d, 2),
            x_img,
            CPConv2d.param_count(8, 12, 9, 5),
        ),
        (
            "cp-linear",
            _exact_cp_linear(3),
            lambda d: CPLinear.from_linear(d, 3, (6, 4), (4, 4), n_iter_max=500, tol=1e-12),
            lambda d: CPLinear.from_linear(d, 1, (6, 4), (4, 4)),
            x_lin,
            CPLinear.param_count((6, 4), (4, 4), 3),
        ),
        (
            "tt-linear",
            lin,
            lambda d: TTLinear.from_linear(d, tt_limits, (4, 3, 2), (2, 4, 2)),
            lambda d: TTLinear.from_linear(d, (2, 2), (4, 3, 2), (2, 4, 2)),
            x_lin,
            TTLinear.param_count((4, 3, 2), (2, 4, 2), tt_limits),
        ),
        (
            "tt-conv1x1",
            nn.Conv2d(8, 12, 1, stride=2),
            lambda d: TTConv1x1.from_conv(d, (8,), (4, 3), (2, 4)),
            lambda d: TTConv1x1.from_conv(d, (2,), (4, 3), (2, 4)),
            x_img,
            TTLinear.param_count((4, 3), (2, 4), (8,)),
        ),
    ]


CASES = _cases()


@pytest.mark.parametrize(("name", "dense", "full", "low", "x", "params"), CASES, ids=[c[0] for c in CASES])
def test_full_rank_reproduces_the_dense_layer_and_low_rank_does_not(name, dense, full, low, x, params):
    with torch.no_grad():
        y = dense(x)
        f = full(dense)
        assert _close(f(x), y), name
        assert _close(f.dense_weight().reshape(dense.weight.shape), dense.weight), name
        assert count_params(f) == params
        lo = low(dense)
        y_low = lo(x)
        assert y_low.shape == y.shape
        assert float((y_low - y).norm() / y.norm()) > 0.05, name
        # the low-rank layer computes exactly what its rebuilt dense weight does
        rebuilt = lo.dense_weight().reshape(dense.weight.shape)
        if isinstance(dense, nn.Linear):
            expected = nn.functional.linear(x, rebuilt, dense.bias)
        else:
            expected = nn.functional.conv2d(
                x, rebuilt, dense.bias, dense.stride, dense.padding, dense.dilation
            )
        assert _close(y_low, expected, 1e-5), name


@pytest.mark.parametrize(("name", "dense", "full", "low", "x", "params"), CASES, ids=[c[0] for c in CASES])
def test_factors_are_parameters_and_sgd_lowers_the_loss(name, dense, full, low, x, params):
    with torch.no_grad():
        target = dense(x)
        layer = low(dense)
    assert all(p.requires_grad for p in layer.parameters())
    opt = torch.optim.SGD(layer.parameters(), lr=0.02)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), target)
        loss.backward()
        assert all(p.grad is not None for p in layer.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (name, losses)


def test_flop_counter_matches_the_closed_form():
    torch.manual_seed(0)
    layer = SVDLinear.from_linear(nn.Linear(16, 24), 5)
    assert count_flops(layer, torch.randn(7, 16)).total == SVDLinear.flops(7, 16, 24, 5)
    conv = TuckerConv2d.from_conv(_conv(stride=2, padding=1), (4, 3))  # 9x9 -> 5x5
    x = torch.randn(2, 8, 9, 9)
    expected = 2 * 2 * (81 * 8 * 3 + 25 * 3 * 4 * 9 + 25 * 4 * 12)
    assert count_flops(conv, x).total == expected
    cp = CPConv2d.from_conv(_conv(stride=1, padding=1), 6, n_iter_max=2)
    assert count_flops(cp, x).total == 2 * 2 * 81 * (8 * 6 + 6 * 9 + 6 * 12)


def test_preserves_conv_geometry_and_rejects_groups():
    conv = _conv(stride=2, padding=1)
    t = TuckerConv2d.from_conv(conv, (4, 3))
    assert t.core.stride == (2, 2) and t.core.padding == (1, 1) and t.first.kernel_size == (1, 1)
    c = CPConv2d.from_conv(conv, 4, n_iter_max=2)
    assert c.depthwise.groups == 4 and c.depthwise.stride == (2, 2)
    with pytest.raises(ValueError, match="groups=1"):
        TuckerConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2), (4, 4))
