"""The factorized-layer protocol (lrk.layers.base.FactorizedLayer): from_dense, dense_weight, factors, fold,
flops, checked for every concrete subclass found by walking ``FactorizedLayer.__subclasses__()``.

Each class has case builders of tiny dense layers (``CASES``, keyed by class); a concrete subclass without
one fails ``test_every_concrete_layer_has_case_builders``, so a new layer cannot be forgotten.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lrk.layers
from lrk.layers import (
    CPConv2d,
    CPLinear,
    FactorizedLayer,
    SVDConv2d,
    SVDLinear,
    TrawlConv2d,
    TrawlLinear,
    TTConv1x1,
    TTLinear,
    TuckerConv2d,
)
from lrk.layers.base import module_flops
from lrk.layers.branched_tucker import BranchedTuckerConv2d
from lrk.layers.svd_train import SpatialSVDConv2d, SVDTrainConv2d, SVDTrainLinear
from lrk.layers.trawl import build_group
from lrk.linalg.cp import cp_to_tensor
from lrk.linalg.tt import tt_max_ranks

FOLD_TOL = 1e-5  # the fold computes what the layer does: max |diff| relative to max |y|


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


def concrete_layers() -> list[type[FactorizedLayer]]:
    """Every concrete ``FactorizedLayer`` subclass defined in lrk (all of ``lrk.layers`` imported first)."""
    for info in pkgutil.walk_packages(lrk.layers.__path__, "lrk.layers."):
        importlib.import_module(info.name)
    found, todo = set(), [FactorizedLayer]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted(
        (c for c in found if c.__module__.startswith("lrk.") and c.forward is not nn.Module.forward),
        key=lambda c: c.__name__,
    )


@dataclass
class Case:
    """A layer built from ``dense``; ``exact_tol`` set when it is built at full rank (it then equals ``dense``)."""

    id: str
    dense: nn.Module
    build: Callable[[nn.Module], FactorizedLayer]
    shape: tuple[int, ...]
    exact_tol: float | None = None
    keeps: tuple[str | None, ...] = (None,)
    extra_shapes: tuple[tuple[int, ...], ...] = field(default_factory=tuple)


def _linear(bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(16, 24, bias=bias, dtype=dtype)


def _conv(
    stride: int = 2, padding: int = 1, dilation: int = 1, bias: bool = True, kernel: int = 3, **kw: Any
) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(8, 12, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias, **kw)


def _exact_cp_conv(rank: int) -> nn.Conv2d:
    conv = _conv(dtype=torch.float64)
    factors = [torch.randn(d, rank, dtype=torch.float64) for d in (12, 8, 9)]
    conv.weight.data.copy_(cp_to_tensor(torch.ones(rank, dtype=torch.float64), factors).reshape(12, 8, 3, 3))
    return conv


def _exact_cp_linear(rank: int) -> nn.Linear:
    linear = _linear(dtype=torch.float64)
    factors = [torch.randn(d, rank, dtype=torch.float64) for d in (6, 4, 4, 4)]
    linear.weight.data.copy_(cp_to_tensor(torch.ones(rank, dtype=torch.float64), factors).reshape(24, 16))
    return linear


LIN = (5, 7, 16)
IMG = (2, 8, 9, 9)
ODD = (1, 8, 10, 7)
THREE = (None, "first", "last")


def _svd_linear() -> list[Case]:
    return [
        Case("low", _linear(), lambda d: SVDLinear.from_dense(d, 4), LIN, extra_shapes=((16,),)),
        Case("full", _linear(), lambda d: SVDLinear.from_dense(d, 16), LIN, exact_tol=1e-4),
        Case("low-nobias", _linear(bias=False), lambda d: SVDLinear.from_dense(d, (3,)), LIN),
    ]


def _svd_conv() -> list[Case]:
    return [
        Case("low", _conv(), lambda d: SVDConv2d.from_dense(d, 3), IMG, extra_shapes=(ODD,)),
        Case("full", _conv(), lambda d: SVDConv2d.from_dense(d, 12), IMG, exact_tol=1e-4),
        Case(
            "full-dilated-reflect-nobias",
            _conv(stride=1, padding=2, dilation=2, bias=False, padding_mode="reflect"),
            lambda d: SVDConv2d.from_dense(d, 12),
            IMG,
            exact_tol=1e-4,
        ),
        Case("low-1x1", _conv(padding=0, kernel=1), lambda d: SVDConv2d.from_dense(d, 2), IMG),
    ]


def _svd_train_linear() -> list[Case]:
    return [
        Case(
            "full",
            _linear(),
            lambda d: SVDTrainLinear.from_dense(d),
            LIN,
            exact_tol=1e-4,
            keeps=(None, "svd"),
        ),
        Case(
            "low-nobias",
            _linear(bias=False),
            lambda d: SVDTrainLinear.from_dense(d, 5),
            LIN,
            keeps=(None, "svd"),
        ),
    ]


def _svd_train_conv() -> list[Case]:
    return [
        Case(
            "channel-full",
            _conv(),
            lambda d: SVDTrainConv2d.from_dense(d),
            IMG,
            exact_tol=1e-4,
            keeps=(None, "svd"),
        ),
        Case(
            "spatial-full",
            _conv(),
            lambda d: SVDTrainConv2d.from_dense(d, decomposition="spatial"),
            IMG,
            exact_tol=1e-4,
            keeps=(None, "svd"),
            extra_shapes=(ODD,),
        ),
        Case(
            "spatial-low-dilated-reflect-nobias",
            _conv(stride=1, padding=2, dilation=2, bias=False, padding_mode="reflect"),
            lambda d: SVDTrainConv2d.from_dense(d, 5, decomposition="spatial"),
            IMG,
            keeps=(None, "svd"),
        ),
    ]


def _spatial_svd_conv() -> list[Case]:
    return [
        Case("low", _conv(), lambda d: SpatialSVDConv2d.from_dense(d, 4), IMG, extra_shapes=(ODD,)),
        Case("full", _conv(), lambda d: SpatialSVDConv2d.from_dense(d, 24), IMG, exact_tol=1e-4),
    ]


def _tucker() -> list[Case]:
    return [
        Case(
            "low",
            _conv(),
            lambda d: TuckerConv2d.from_dense(d, (4, 3)),
            IMG,
            keeps=THREE,
            extra_shapes=(ODD,),
        ),
        Case(
            "full", _conv(), lambda d: TuckerConv2d.from_dense(d, (12, 8)), IMG, exact_tol=1e-4, keeps=THREE
        ),
        Case(
            "low-dilated-circular-nobias",
            _conv(stride=1, padding=2, dilation=2, bias=False, padding_mode="circular"),
            lambda d: TuckerConv2d.from_dense(d, 3, n_iter_max=2),
            IMG,
            keeps=THREE,
        ),
    ]


def _branched_tucker() -> list[Case]:  # tests/test_branched_tucker.py has the maths
    return [
        Case(
            "low-2",
            _conv(),
            lambda d: BranchedTuckerConv2d.from_dense(d, (4, 6), branches=2),
            IMG,
            keeps=THREE,
            extra_shapes=(ODD,),
        ),
        Case(
            "full-1",
            _conv(),
            lambda d: BranchedTuckerConv2d.from_dense(d, (12, 8), branches=1),
            IMG,
            exact_tol=1e-4,
            keeps=THREE,
        ),
        Case(
            "low-4-sweeps-dilated-reflect-nobias",
            _conv(stride=1, padding=2, dilation=2, bias=False, padding_mode="reflect"),
            lambda d: BranchedTuckerConv2d.from_dense(d, 8, branches=4, sweeps=2),
            IMG,
            keeps=THREE,
        ),
    ]


def _cp_conv() -> list[Case]:
    return [
        Case(
            "low",
            _conv(),
            lambda d: CPConv2d.from_dense(d, 2, n_iter_max=3),
            IMG,
            keeps=THREE,
            extra_shapes=(ODD,),
        ),
        Case(
            "full",
            _exact_cp_conv(5),
            lambda d: CPConv2d.from_dense(d, 5, n_iter_max=500, tol=1e-14),
            IMG,
            exact_tol=1e-6,
            keeps=THREE,
        ),
    ]


def _cp_linear() -> list[Case]:
    return [
        Case("low", _linear(), lambda d: CPLinear.from_dense(d, 2, n_iter_max=3), LIN),
        Case(
            "full",
            _exact_cp_linear(3),
            lambda d: CPLinear.from_dense(d, 3, (6, 4), (4, 4), n_iter_max=500, tol=1e-14),
            LIN,
            exact_tol=1e-6,
        ),
    ]


def _tt_linear() -> list[Case]:
    shapes = ((4, 3, 2), (2, 4, 2))
    limits = tuple(tt_max_ranks(*shapes))
    return [
        Case("low", _linear(), lambda d: TTLinear.from_dense(d, (2, 2), *shapes), LIN, extra_shapes=((16,),)),
        Case("full", _linear(), lambda d: TTLinear.from_dense(d, limits, *shapes), LIN, exact_tol=1e-4),
        Case("low-uniform-2cores", _linear(), lambda d: TTLinear.from_dense(d, 3, cores=2), LIN),
    ]


def _tt_conv() -> list[Case]:
    dense = _conv(padding=0, kernel=1)
    return [
        Case("low", dense, lambda d: TTConv1x1.from_dense(d, (2,), (4, 3), (2, 4)), IMG, extra_shapes=(ODD,)),
        Case("full", dense, lambda d: TTConv1x1.from_dense(d, 6, cores=2), IMG, exact_tol=1e-4),
    ]


def _trawl_linear() -> list[Case]:
    return [
        Case("tucker-low", _linear(), lambda d: TrawlLinear.from_dense(d, (4, 3)), LIN),
        Case("tucker-full", _linear(), lambda d: TrawlLinear.from_dense(d, 16), LIN, exact_tol=1e-4),
        Case("cp-low", _linear(), lambda d: TrawlLinear.from_dense(d, 3, decomposition="cp"), LIN),
        Case(
            "tucker-layer-rank",
            _linear(),
            lambda d: build_group([d, _linear(), nn.Linear(16, 24)], (5, 4), layer_rank=2)[0],
            LIN,
        ),
    ]


def _trawl_conv() -> list[Case]:
    return [
        Case("tucker-low", _conv(), lambda d: TrawlConv2d.from_dense(d, (4, 3)), IMG, extra_shapes=(ODD,)),
        Case("tucker-full", _conv(), lambda d: TrawlConv2d.from_dense(d, (12, 8)), IMG, exact_tol=1e-4),
        Case(
            "cp-low",
            _conv(stride=1, dilation=2, padding=2),
            lambda d: TrawlConv2d.from_dense(d, 4, decomposition="cp", n_iter_max=3),
            IMG,
            extra_shapes=(ODD,),
        ),
        Case(
            "cp-1x1",
            _conv(padding=0, kernel=1),
            lambda d: TrawlConv2d.from_dense(d, 3, decomposition="cp", n_iter_max=3),
            IMG,
        ),
        Case(
            "tucker-layer-rank",
            _conv(),
            lambda d: build_group([d, nn.Conv2d(8, 12, 3, 2, 1), nn.Conv2d(8, 12, 3, 2, 1)], 4, layer_rank=2)[
                1
            ],
            IMG,
            extra_shapes=(ODD,),
        ),
    ]


CASES: dict[type[FactorizedLayer], Callable[[], list[Case]]] = {
    SVDLinear: _svd_linear,
    SVDConv2d: _svd_conv,
    SVDTrainLinear: _svd_train_linear,
    SVDTrainConv2d: _svd_train_conv,
    SpatialSVDConv2d: _spatial_svd_conv,
    TuckerConv2d: _tucker,
    BranchedTuckerConv2d: _branched_tucker,
    CPConv2d: _cp_conv,
    CPLinear: _cp_linear,
    TTLinear: _tt_linear,
    TTConv1x1: _tt_conv,
    TrawlLinear: _trawl_linear,
    TrawlConv2d: _trawl_conv,
}


def _params() -> list[Any]:
    out = []
    for cls in concrete_layers():
        if cls not in CASES:
            out.append(pytest.param(cls, None, id=f"{cls.__name__}-missing"))
            continue
        out.extend(pytest.param(cls, case, id=f"{cls.__name__}-{case.id}") for case in CASES[cls]())
    return out


PARAMS = _params()


def _layer(cls: type[FactorizedLayer], case: Case | None) -> FactorizedLayer:
    if case is None:
        pytest.fail(f"{cls.__name__} has no case builder in tests/test_layers_protocol.py CASES")
    torch.manual_seed(1)
    layer = case.build(case.dense)
    assert type(layer) is cls
    return layer


def _input(case: Case, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(shape or case.shape, dtype=case.dense.weight.dtype)


def _counted(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def _leaves(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if not list(m.children()))


def test_every_concrete_layer_has_case_builders() -> None:
    assert set(CASES) == set(concrete_layers())


@pytest.mark.parametrize(("cls", "case"), PARAMS)
def test_fold_computes_what_the_layer_does_and_the_dense_layer_at_full_rank(cls, case) -> None:
    layer = _layer(cls, case)
    x = _input(case)
    with torch.no_grad():
        y = layer(x)
        for keep in case.keeps:
            folded = layer.fold(keep)
            assert not any(p is q for p in folded.parameters() for q in layer.parameters())
            assert _close(folded(x), y, FOLD_TOL), keep
        dense = layer.fold()
        assert type(dense) is type(case.dense)
        assert dense.weight.shape == case.dense.weight.shape
        assert torch.equal(dense.weight, layer.dense_weight())
        assert (dense.bias is None) == (case.dense.bias is None)
        if isinstance(dense, nn.Conv2d):
            for attr in ("stride", "padding", "dilation", "padding_mode", "groups"):
                assert getattr(dense, attr) == getattr(case.dense, attr), attr
        if case.exact_tol is not None:
            expected = case.dense(x)
            assert _close(y, expected, case.exact_tol)
            assert _close(dense(x), expected, case.exact_tol)
            assert _close(dense.weight, case.dense.weight, case.exact_tol)


@pytest.mark.parametrize(("cls", "case"), PARAMS)
def test_flops_equal_the_flop_counter(cls, case) -> None:
    layer = _layer(cls, case)
    for shape in (case.shape, *case.extra_shapes):
        x = _input(case, shape)
        assert layer.flops(shape) == _counted(layer, x) > 0, shape
        assert module_flops(layer, shape) == layer.flops(shape)
        for keep in case.keeps:
            folded = layer.fold(keep)
            assert module_flops(folded, shape) == _counted(folded, x), (shape, keep)


def test_svd_linear_keeps_its_closed_form_on_the_class() -> None:
    layer = SVDLinear.from_dense(_linear(), 5)
    assert SVDLinear.flops(35, 16, 24, 5) == layer.flops((5, 7, 16)) == 2 * 35 * 5 * (16 + 24)


@pytest.mark.parametrize(("cls", "case"), PARAMS)
def test_factors_are_the_parameters_that_are_not_biases(cls, case) -> None:
    layer = _layer(cls, case)
    named = dict(layer.named_parameters())
    biases = {n: p for n, p in named.items() if n.split(".")[-1] == "bias"}
    factors = layer.factors()
    assert {id(p) for p in factors.values()} == {id(p) for n, p in named.items() if n not in biases}
    assert len(factors) == len(named) - len(biases)
    for key, p in factors.items():  # a key is the parameter's path, ".weight" dropped
        assert named.get(key, named.get(f"{key}.weight")) is p, key
    assert sum(p.numel() for p in factors.values()) + sum(b.numel() for b in biases.values()) == sum(
        p.numel() for p in layer.parameters()
    )
    for p in factors.values():
        p.requires_grad_(False)
    x = _input(case).requires_grad_(not biases)
    layer(x).square().sum().backward()
    with_grad = {n for n, p in layer.named_parameters() if p.grad is not None}
    assert with_grad == set(biases)


BAD_RANKS: dict[type[FactorizedLayer], list[tuple[Callable[[], FactorizedLayer], int]]] = {
    SVDLinear: [
        (lambda: SVDLinear.from_dense(_linear(), 17), 17),
        (lambda: SVDLinear.from_dense(_linear(), 0), 0),
    ],
    SVDConv2d: [
        (lambda: SVDConv2d.from_dense(_conv(), 13), 13),
        (lambda: SVDConv2d.from_dense(_conv(), -1), -1),
    ],
    SVDTrainLinear: [
        (lambda: SVDTrainLinear.from_dense(_linear(), 17), 17),
        (lambda: SVDTrainLinear.from_dense(_linear(), 0), 0),
    ],
    SVDTrainConv2d: [
        (lambda: SVDTrainConv2d.from_dense(_conv(), 13), 13),
        (lambda: SVDTrainConv2d.from_dense(_conv(), 25, decomposition="spatial"), 25),
    ],
    SpatialSVDConv2d: [
        (lambda: SpatialSVDConv2d.from_dense(_conv(), 25), 25),
        (lambda: SpatialSVDConv2d.from_dense(_conv(), 0), 0),
    ],
    TuckerConv2d: [
        (lambda: TuckerConv2d.from_dense(_conv(), (13, 8)), 13),
        (lambda: TuckerConv2d.from_dense(_conv(), (12, 9)), 9),
        (lambda: TuckerConv2d.from_dense(_conv(), 0), 0),
    ],
    BranchedTuckerConv2d: [
        (lambda: BranchedTuckerConv2d.from_dense(_conv(), (14, 8)), 14),
        (lambda: BranchedTuckerConv2d.from_dense(_conv(), (4, 3), branches=2), 3),
        (lambda: BranchedTuckerConv2d.from_dense(_conv(), 4, branches=0), 0),
    ],
    CPConv2d: [(lambda: CPConv2d.from_dense(_conv(), 73), 73), (lambda: CPConv2d.from_dense(_conv(), 0), 0)],
    CPLinear: [
        (lambda: CPLinear.from_dense(_linear(), 65), 65),
        (lambda: CPLinear.from_dense(_linear(), 0), 0),
    ],
    TTLinear: [
        (lambda: TTLinear.from_dense(_linear(), 99, (4, 3, 2), (2, 4, 2)), 99),
        (lambda: TTLinear.from_dense(_linear(), (2, 77), (4, 3, 2), (2, 4, 2)), 77),
        (lambda: TTLinear.from_dense(_linear(), 0), 0),
    ],
    TTConv1x1: [
        (lambda: TTConv1x1.from_dense(_conv(padding=0, kernel=1), 9, cores=2), 9),
        (lambda: TTConv1x1.from_dense(_conv(padding=0, kernel=1), (0,), cores=2), 0),
    ],
    TrawlLinear: [
        (lambda: TrawlLinear.from_dense(_linear(), (25, 4)), 25),
        (lambda: TrawlLinear.from_dense(_linear(), 17, decomposition="cp"), 17),
    ],
    TrawlConv2d: [
        (lambda: TrawlConv2d.from_dense(_conv(), (4, 9)), 9),
        (lambda: TrawlConv2d.from_dense(_conv(), 0, decomposition="cp"), 0),
    ],
}


@pytest.mark.parametrize("cls", concrete_layers(), ids=lambda c: c.__name__)
def test_from_dense_rejects_a_rank_outside_the_valid_range(cls) -> None:
    assert cls in BAD_RANKS, f"{cls.__name__} has no bad-rank case"
    for build, bad in BAD_RANKS[cls]:
        with pytest.raises(ValueError, match=rf"={re.escape(str(bad))} is invalid") as info:
            build()
        assert cls.__name__ in str(info.value) or "TRAWL" in str(info.value)


@pytest.mark.parametrize(
    ("layer", "keeps"),
    [
        (SVDLinear.from_dense(_linear(), 4), (None,)),
        (SVDConv2d.from_dense(_conv(), 3), (None,)),
        (TuckerConv2d.from_dense(_conv(), (4, 3)), THREE),
        (CPConv2d.from_dense(_conv(), 3, n_iter_max=2), THREE),
    ],
    ids=["svd-linear", "svd-conv", "tucker", "cp-conv"],
)
def test_fold_has_fewer_layers(layer: FactorizedLayer, keeps) -> None:
    for keep in keeps:
        assert _leaves(layer.fold(keep)) < _leaves(layer), keep
    assert _leaves(layer.fold()) == 1


def test_tucker_partial_folds_are_the_papers_two_layer_merges() -> None:
    layer = TuckerConv2d.from_dense(_conv(), (4, 3))
    last = layer.fold("last")  # first 1x1 merged into the core (Eq. 5): k x k C -> R2, 1x1 R2 -> S
    assert isinstance(last, SVDConv2d) and last.ranks == (4,)
    assert last.w0.weight.shape == (4, 8, 3, 3) and last.w0.stride == (2, 2)
    first = layer.fold("first")  # core merged with the last 1x1: 1x1 C -> R1, k x k R1 -> S
    assert [tuple(m.weight.shape) for m in first] == [(3, 8, 1, 1), (12, 3, 3, 3)]
    assert first[1].bias is not None and first[1].stride == (2, 2)


def test_bad_fold_and_module_type_are_refused() -> None:
    with pytest.raises(ValueError, match="keep='first'"):
        SVDLinear.from_dense(_linear(), 4).fold("first")
    with pytest.raises(ValueError, match="keep='middle'"):
        TuckerConv2d.from_dense(_conv(), 3).fold("middle")
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        SVDLinear.from_dense(_conv(), 3)
    with pytest.raises(ValueError, match="1x1"):
        TTConv1x1.from_dense(_conv(), 2)
    with pytest.raises(ValueError, match="groups=1"):
        TuckerConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), 2)


def test_trawl_group_shares_its_factors_and_from_dense_is_a_group_of_one() -> None:
    convs = [_conv(), nn.Conv2d(8, 12, 3, 2, 1), nn.Conv2d(8, 12, 3, 2, 1)]
    group = build_group(convs, (6, 5))
    assert all(layer.shared is group[0].shared for layer in group)
    assert group[0].factors()["shared.in_factor"] is group[2].factors()["shared.in_factor"]
    alone = TrawlConv2d.from_dense(convs[0], (6, 5))
    assert sum(p.numel() for p in alone.shared.parameters()) == 12 * 6 + 8 * 5
    with pytest.raises(ValueError, match="does not match"):
        build_group([_conv(), _conv(kernel=1, padding=0)], 2)
