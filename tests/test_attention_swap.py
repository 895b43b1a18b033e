"""What every attention-swap method shares (lrk.decomp.attention.base), tested once for all five: a model without
attention is refused, rank_multiple / min_rank stay 1, the calibration_batches count, the methods that cannot run
without calibration batches, and the measured output error of the report (output_errors) against an independent
computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from attention_fixtures import random_images, seeded_dense, tiny_vit
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lrk.decomp import build_method
from lrk.decomp.attention.base import AttentionSwapMethod, output_errors, run_batches
from lrk.decomp.base import METHODS
from lrk.errors import LrkConfigError
from lrk.layers.attention.stats import relative_error
from lrk.models import AttentionBase, MultiHeadSelfAttention, attention_modules, build_backbone

METHOD_NAMES = ["sdrm", "cholesky", "pca", "attn_svd", "attn_tensor"]
NEED_CALIBRATION = {"pca", "attn_tensor"}  # they fit on, or measure on, the calibration batches
D, H = 16, 2


def test_the_five_attention_methods_are_the_swap_methods() -> None:
    swap = {name for name, cls in METHODS.items() if issubclass(cls, AttentionSwapMethod)}
    assert swap == set(METHOD_NAMES)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_model_without_attention_is_one_clear_error(name: str) -> None:
    resnet = build_backbone({"name": "resnet18"}, num_classes=2, in_chans=1, image_size=16)
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    with pytest.raises(
        LrkConfigError, match=rf"decomp={name} needs a backbone with attention modules .*ViT.*ResNet"
    ):
        build_method({"name": name}).apply(resnet, [random_images(2)])
    assert all(torch.equal(v, state[k]) for k, v in resnet.state_dict().items())


@pytest.mark.parametrize("name", ["pca", "attn_svd", "attn_tensor"])
def test_methods_that_reuse_dense_weights_refuse_another_attention(name: str) -> None:
    model = tiny_vit(D, H, depth=1)
    build_method({"name": "cholesky"}).apply(model, [random_images(2)])  # its attention has no qkv any more
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        LrkConfigError,
        match=rf"decomp={name} cannot swap 'blocks.0.attn' \(CholeskyAttention\): .*MultiHeadSelfAttention",
    ):
        build_method({"name": name, "ratio": 0.5}).apply(model, [random_images(2)])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize(("key", "value"), [("rank_multiple", 8), ("min_rank", 2), ("min_rank", 4)])
def test_rank_rounding_keys_must_stay_one(name: str, key: str, value: object) -> None:
    with pytest.raises(
        LrkConfigError, match=rf"decomp.{key}={value!r} is invalid for decomp={name}: it supports only 1"
    ):
        build_method({"name": name, key: value})
    build_method({"name": name, key: 1})
    build_method({"name": name, key: None})


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("count", [-1, 1.5, True, "2"])
def test_calibration_batches_must_be_a_count(name: str, count: object) -> None:
    least = 1 if name in NEED_CALIBRATION else 0
    with pytest.raises(
        LrkConfigError,
        match=rf"decomp.calibration_batches={count!r} is invalid.*it must be an integer >= {least}",
    ):
        build_method({"name": name, "calibration_batches": count})


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_zero_calibration_batches_only_where_the_method_can_do_without(name: str) -> None:
    if name in NEED_CALIBRATION:
        with pytest.raises(
            LrkConfigError, match=rf"calibration_batches=0 is invalid for decomp={name}: .* >= 1 \("
        ):
            build_method({"name": name, "calibration_batches": 0})
        model = tiny_vit(D, H, 1)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(LrkConfigError, match=rf"decomp={name} needs calibration batches .*got none: "):
            build_method({"name": name}).apply(model, [])
        assert all(type(m).__name__ == "MultiHeadSelfAttention" for _, m in attention_modules(model))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    else:
        method = build_method({"name": name, "calibration_batches": 0})
        model = tiny_vit(D, H, 1)
        report = method.apply(model, [])
        assert len(report.rows) == 1
        assert all(type(m).__name__ != "MultiHeadSelfAttention" for _, m in attention_modules(model))


# --- output_errors / run_batches ----------------------------------------------------------------------------
class Chain(nn.Module):
    """images [B, 1, T, 4] -> tokens [B, T, D] -> first -> second (two attention modules in a row)."""

    def __init__(self, first: AttentionBase, second: AttentionBase) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Linear(4, D).double()
        self.first = first
        self.second = second

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(self.embed(img.flatten(1, 2))))


def perturbed(module: AttentionBase, seed: int, drop: float = 0.0) -> AttentionBase:
    """A copy of ``module`` with noise on its weights (a stand-in for a replacement), dropout ``drop``."""
    new = type(module).from_attention(module, attn_drop=drop, proj_drop=drop)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return new


def image_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [
        scale * torch.randn(n, 1, 5, 4, generator=g, dtype=torch.float64) for n, scale in ((3, 1.0), (2, 4.0))
    ]


def pooled_error(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """sqrt(sum ||new - dense||^2 / sum ||dense||^2) over (new, dense) outputs, computed here."""
    diff = sum(float((new - dense).square().sum()) for new, dense in pairs)
    ref = sum(float(dense.square().sum()) for _, dense in pairs)
    return math.sqrt(diff / ref)


@pytest.mark.parametrize("swapped", [True, False])
def test_output_errors_compare_each_module_on_the_inputs_of_the_model(swapped: bool) -> None:
    """Relative Frobenius error pooled over batches, each module on the inputs the model gives it (the swapped
    model's when ``swapped``, the dense model's otherwise); the modules outside the model run in eval mode (their
    dropout would change the numbers) and get their modes back."""
    dense = {
        name: MultiHeadSelfAttention.from_attention(
            seeded_dense(D, H, seed=seed), attn_drop=0.5, proj_drop=0.5
        )
        for name, seed in (("first", 1), ("second", 2))
    }
    new = {"first": perturbed(dense["first"], 7, drop=0.5), "second": perturbed(dense["second"], 8, drop=0.5)}
    inside, outside = (new, dense) if swapped else (dense, new)
    model = Chain(inside["first"], inside["second"]).train()
    for m in outside.values():
        m.train()
    batches = image_batches()
    errors = output_errors(model, outside, batches, swapped=swapped)

    assert model.training and all(m.training for m in model.modules())
    assert all(m.training for m in outside.values())

    expected: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"first": [], "second": []}
    elsewhere = []  # the second module on the inputs of the other model
    with torch.no_grad():
        for m in [*new.values(), *dense.values()]:
            m.eval()
        for img in batches:
            x = model.embed(img.flatten(1, 2))
            out_new, out_dense = new["first"](x), dense["first"](x)
            expected["first"].append((out_new, out_dense))
            inner, other = (
                (out_new, out_dense) if swapped else (out_dense, out_new)
            )  # inner: as the model runs
            expected["second"].append((new["second"](inner), dense["second"](inner)))
            elsewhere.append((new["second"](other), dense["second"](other)))
    for name in ("first", "second"):
        assert errors[name] == pytest.approx(pooled_error(expected[name]), rel=1e-12)
        assert 0.01 < errors[name] < 1.0
    assert abs(pooled_error(elsewhere) - errors["second"]) > 1e-3 * errors["second"]  # the inputs matter


def test_output_errors_of_an_identical_module_and_without_batches() -> None:
    dense = seeded_dense(D, H, seed=1)
    same = type(dense).from_attention(dense)
    model = Chain(same, seeded_dense(D, H, seed=2))
    assert output_errors(model, {"first": dense}, image_batches()) == {"first": 0.0}
    assert output_errors(model, {"first": perturbed(dense, 7)}, []) == {"first": 0.0}


def test_relative_error_of_a_zero_reference() -> None:
    assert relative_error(4.0, 16.0) == 0.5
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1e-30, 0.0) == math.inf


def test_run_batches_counts_and_restores_modes() -> None:
    model = tiny_vit(D, H, 1).train()
    model.blocks[0].eval()  # a mixed state comes back as it was
    seen: list[bool] = []
    model.blocks[0].attn.register_forward_hook(lambda m, a, out: seen.append(m.training))
    labels = torch.zeros(2, dtype=torch.long)
    assert run_batches(model, [random_images(2), (random_images(2, seed=1), labels)]) == 2
    assert seen == [False, False]  # eval inside
    assert model.training and not model.blocks[0].training and not model.blocks[0].attn.training
    assert model.head.training


# --- monitor: no host reads of monitoring figures inside the fit's forwards ------------------------------------
class _HostReads(TorchDispatchMode):
    """Counts the host reads of tensor values (``aten._local_scalar_dense``: float(t), int(t), bool(t), .item())."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.count += 1
        return func(*args, **(kwargs or {}))


MONITORED = {  # the methods with a ``monitor`` key, a config whose forward would measure something
    "sdrm": {"subspace": "calibrated", "energy": 0.8},
    "attn_svd": {"rank": 3},
    "attn_tensor": {"rank": 3},
}


@pytest.mark.parametrize("name", list(MONITORED))
def test_monitor_is_off_by_default_and_the_report_is_measured_all_the_same(name: str) -> None:
    """``monitor: false`` (the default, in the method and in conf/decomp/<name>.yaml): the report rows are the
    same numbers as with ``monitor: true`` (measured on the calibration batches at apply, outside the fit)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(f"{Path(__file__).resolve().parent.parent}/conf/decomp/{name}.yaml")
    assert conf.monitor is False
    batches = [random_images(2, seed=1), random_images(2, seed=2)]
    rows = {}
    for monitor in (False, True):
        model = tiny_vit(D, H, 2)
        method = build_method({"name": name, **MONITORED[name], "monitor": monitor})
        assert method.settings["monitor"] is monitor
        rows[monitor] = method.apply(model, batches).rows
        assert all(m.monitor is monitor for _, m in attention_modules(model))  # apply gave the setting back
    keys = ("rank", "rel_error", "energy")
    off, on = ([r[k] for r in rows[m] for k in keys] for m in (False, True))
    assert off == pytest.approx(on, rel=1e-9)
    assert all(0 < r["rel_error"] < 1 and 0 < r["energy"] < 1 for r in rows[False])


@pytest.mark.parametrize("name", list(MONITORED))
def test_an_unmonitored_forward_reads_no_monitoring_figure_from_the_device(name: str) -> None:
    """The same forward with ``monitor`` on and off: off, it does exactly the host reads of the decomposition
    itself (the ranks it needs; none at all for a calibrated SDRM basis); on, two more per measurement (the
    norms of the monitored figure), and the run metrics then carry it."""
    model = tiny_vit(D, H, 1)
    build_method({"name": name, **MONITORED[name]}).apply(model, [random_images(2, seed=1)])
    ((_, module),) = attention_modules(model)
    x = torch.randn(3, 17, D, generator=torch.Generator().manual_seed(4))
    reads = {}
    for monitor in (False, True):
        module.monitor = monitor
        with torch.no_grad(), _HostReads() as counter:
            module(x)
        reads[monitor] = counter.count
    measurements = 1  # one monitored figure per forward (attn_tensor scope=batch: one Tucker per forward)
    assert reads[True] - reads[False] == 2 * measurements
    if name == "sdrm":
        assert reads[False] == 0
    method = build_method({"name": name, **MONITORED[name]})
    figures = {"sdrm": "decomp/energy", "attn_svd": "decomp/rel_error_mean", "attn_tensor": "decomp/energy"}
    figure = figures[name]
    module.stats.reset()
    module.monitor = False
    module(x)
    assert figure not in method.runtime_metrics(model)
    module.monitor = True
    module(x)
    assert figure in method.runtime_metrics(model)


# --- the config rules run once, in the method ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("sdrm", "check_settings"),
        ("pca", "check_settings"),
        ("attn_tensor", "check_settings"),
        ("attn_svd", "check_rule"),
    ],
)
def test_the_config_rules_run_once_per_apply(name: str, rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The method checks its settings once (in its constructor); building the two replacement modules does not
    run the config rules again."""
    import importlib
    import inspect

    module = importlib.import_module(f"lrk.decomp.attention.{name}")
    calls = []
    original = getattr(module, rule)
    monkeypatch.setattr(module, rule, lambda *a, **k: calls.append(1) or original(*a, **k))
    method = build_method({"name": name})
    method.apply(tiny_vit(D, H, 2), [random_images(2)])
    assert len(calls) == 1
    # and the module it builds holds no copy of them: a layer raises no config error (it has no config)
    layer = importlib.import_module(f"lrk.layers.attention.{name}")
    source = inspect.getsource(layer)
    assert "LrkConfigError" not in source and f"def {rule}" not in source


def test_sdrm_checks_adamatrix_options_without_building_a_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    import lrk.linalg.adamatrix as ada

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the config check built an AdaMatrixSolver")

    monkeypatch.setattr(ada.AdaMatrixSolver, "__init__", refuse)
    method = build_method({"name": "sdrm", "solver": "adamatrix", "adamatrix": {"lr": 0.5, "tol": None}})
    assert method.settings["adamatrix"] == {"lr": 0.5}
    with pytest.raises(LrkConfigError, match=r"decomp.adamatrix=\{'lr': -1\} is invalid: lr=-1 is invalid"):
        build_method({"name": "sdrm", "solver": "adamatrix", "adamatrix": {"lr": -1}})
    with pytest.raises(LrkConfigError, match=r"decomp.adamatrix=.* is invalid: option speed= is invalid"):
        build_method({"name": "sdrm", "solver": "adamatrix", "adamatrix": {"speed": 2}})
