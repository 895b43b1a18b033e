"""lrk.measure against independent numbers: FLOPs (attention and factorizations), params, size, clocks,
alternating latency, inference latency, memory; and the ModelStats callback that reports them."""

from __future__ import annotations

import ast
import importlib
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lrk.lit.callbacks import ModelStats, PhaseTimer, example_batch
from lrk.measure import (
    FlopCount,
    FlopCounter,
    LatencyStats,
    ModuleTimer,
    Stopwatch,
    alternating_latency,
    count_flops,
    count_params,
    measure_inference,
    module_size_mb,
    paired_min,
    paired_ratio,
    peak_memory_mb,
    profiled_peak_mb,
    ratio,
    reset_peak_memory,
)
from lrk.models import build_backbone

CONF = Path(__file__).parents[1] / "conf" / "backbone"
# the module, not the function lrk.measure.clock that the package exports under the same name
clock_module = importlib.import_module("lrk.measure.clock")


class SDPA(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q)


class Call(nn.Module):
    """Wraps a function of the input as a module (count_flops takes modules)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return self.fn(x)


@pytest.fixture
def fake_clock(monkeypatch):
    """perf_counter returning 0, 1, 2, ...: every timed interval between two readings lasts 1 s."""
    ticks = itertools.count()
    monkeypatch.setattr(clock_module, "perf_counter", lambda: float(next(ticks)))


def spd(batch: int, n: int) -> torch.Tensor:
    a = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(0))
    return a @ a.mT + n * torch.eye(n)


def test_measure_imports_only_torch_the_stdlib_and_itself():
    allowed = {"torch", "lrk", "__future__"} | set(sys.stdlib_module_names)
    for path in (Path(__file__).parents[1] / "lrk" / "measure").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                top = name.split(".")[0]
                inside = top != "lrk" or name == "lrk.measure" or name.startswith("lrk.measure.")
                assert top in allowed and inside, f"{path.name} imports {name}"


# ----------------------------------------------------------------------------------------------- FLOPs


def test_sdpa_on_cpu_counts_both_products():
    q = torch.randn(1, 4, 65, 32)
    expected = 2 * 2 * 1 * 4 * 65 * 65 * 32  # Q K^T and A V, 2 FLOPs per multiply-add
    assert expected == 2_163_200
    flops = count_flops(SDPA(), q)
    assert flops.total == expected and flops.attention == expected and flops.factorization == 0
    assert flops.by_op == {"aten._scaled_dot_product_flash_attention_for_cpu": expected}


def test_sdpa_math_path_is_attention_once():
    # the math kernel decomposes into bmm, which torch counts: the attention figure must not add it again
    q = torch.randn(2, 3, 17, 8)
    with sdpa_kernel(SDPBackend.MATH):
        flops = count_flops(SDPA(), q)
    expected = 2 * 2 * 2 * 3 * 17 * 17 * 8
    assert flops.total == expected == flops.attention
    assert set(flops.by_op) == {"aten.bmm"}


def test_sdpa_with_different_value_width_and_key_length():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 5)
    flops = count_flops(Call(lambda q: F.scaled_dot_product_attention(q, k, v)), q)
    assert flops.attention == 2 * 2 * 3 * 10 * 6 * (8 + 5)


def test_linear_by_hand_and_nothing_else():
    layer = nn.Linear(7, 5)
    flops = count_flops(layer, torch.randn(3, 7))
    assert flops.total == 2 * 3 * 7 * 5  # bias add (elementwise) not counted
    assert flops.attention == 0 and flops.factorization == 0 and flops.batch_size == 3
    assert flops.per_image().total == pytest.approx(2 * 7 * 5)
    assert flops.per_image(7).total == pytest.approx(2 * 3 * 5)


def test_count_flops_restores_training_mode_and_takes_argument_tuples():
    layer = nn.Bilinear(4, 3, 2).train()
    count_flops(layer, (torch.randn(5, 4), torch.randn(5, 3)))
    assert layer.training
    with pytest.raises(ValueError, match="batch"):
        FlopCount(1.0, 0.0, 0.0).per_image(0)


def vit_edge(image_size: int = 64, num_classes: int = 2) -> tuple[nn.Module, dict]:
    options = OmegaConf.to_container(OmegaConf.load(CONF / "vit_edge.yaml"))
    model = build_backbone(
        OmegaConf.create(options), num_classes=num_classes, in_chans=1, image_size=image_size
    )
    return model, options


def test_vit_edge_flops_include_attention():
    model, cfg = vit_edge()
    flops = count_flops(model, torch.zeros(2, 1, 64, 64)).per_image()
    # independent count from the preset: patch 8 on 64 px (auto), T = 8 * 8 patches + the class token
    dim, depth, heads, patch = cfg["dim"], cfg["depth"], cfg["num_heads"], 8
    hidden, tokens, head_dim = int(dim * cfg["mlp_ratio"]), (64 // patch) ** 2 + 1, dim // heads
    attention = depth * heads * 2 * (2 * tokens * tokens * head_dim)
    linear = tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2 (multiply-adds)
    dense = 2 * (64 * dim * patch * patch) + depth * 2 * linear + 2 * dim * 2  # patch conv, blocks, head
    assert flops.attention == pytest.approx(attention, rel=1e-12)
    assert flops.total - flops.attention == pytest.approx(dense, rel=1e-12)
    assert flops.attention / 1e6 == pytest.approx(13.0, abs=0.05)
    assert flops.dense / 1e6 == pytest.approx(103.3, abs=0.05)
    assert flops.total / 1e6 == pytest.approx(116.3, abs=0.05)
    assert flops.factorization == 0


def test_resnet50_matches_torchvision_reference():
    torch.manual_seed(0)
    model = build_backbone(
        OmegaConf.load(CONF / "resnet50.yaml"), num_classes=1000, in_chans=3, image_size=224
    )
    assert count_params(model) == 25_557_032
    flops = count_flops(model, torch.zeros(1, 3, 224, 224))
    assert flops.total == pytest.approx(2 * 4.089e9, rel=0.005)  # 4.09 G multiply-adds
    assert flops.attention == 0 and flops.factorization == 0


def test_inference_mode_counts_the_same():
    model, _ = vit_edge(32)
    x = torch.zeros(1, 1, 32, 32)
    with torch.inference_mode():
        inside = count_flops(model, x)
    assert inside.total == count_flops(model, x).total and inside.attention > 0


@pytest.mark.parametrize("inference", [False, True])
def test_factorization_formulas(inference):
    n, b = 6, 3
    a = spd(b, n)
    tall = torch.randn(b, 9, 4)
    cases = [
        (torch.linalg.eigh, a, b * 9 * n**3),
        (torch.linalg.eigvalsh, a, b * 4 * n**3 / 3),
        (torch.linalg.cholesky, a, b * n**3 / 3),
        (torch.linalg.inv, a, b * 2 * n**3),
        # Householder R of 9 x 4: 2 m n^2 - 2 n^3 / 3; the thin Q as much again; R only for mode r
        (lambda t: torch.linalg.qr(t), tall, b * 2 * (2 * 9 * 16 - 2 * 64 / 3)),
        (lambda t: torch.linalg.qr(t, mode="r"), tall, b * (2 * 9 * 16 - 2 * 64 / 3)),
        # thin SVD with U, V: R-SVD 6 m n^2 + 20 n^3 = 2144 < Golub-Reinsch 14 m n^2 + 8 n^3 = 2528
        (
            lambda t: torch.linalg.svd(t, full_matrices=False),
            tall,
            b * 2144,
        ),
        (torch.linalg.svdvals, tall, b * min(2 * 9 * 16 + 2 * 64, 4 * 9 * 16 - 4 * 64 / 3)),
        (
            lambda t: torch.linalg.svd(t.mT, full_matrices=False),
            tall,
            b * 2144,
        ),  # a wide matrix: the transpose
    ]
    for fn, x, expected in cases:
        if inference:
            with torch.inference_mode():
                flops = count_flops(Call(fn), x)
        else:
            flops = count_flops(Call(fn), x)
        assert flops.factorization == pytest.approx(expected, abs=1.0), fn
        assert flops.total == flops.factorization and flops.attention == 0


def test_factorization_beside_products_and_counter_for_backward():
    x = torch.randn(4, 5, 3)

    def gram_eigh(t: torch.Tensor) -> torch.Tensor:
        gram = t.mT @ t  # [4, 3, 3]: 2 * 4 * 3 * 5 * 3 FLOPs of bmm
        return torch.linalg.eigh(gram).eigenvectors

    flops = count_flops(Call(gram_eigh), x)
    assert flops.factorization == pytest.approx(4 * 9 * 27, abs=1)
    assert flops.total == pytest.approx(flops.factorization + 2 * 4 * 3 * 5 * 3, abs=1)

    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    with FlopCounter() as counter:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    fwd = 2 * 2 * 9 * 9 * (4 + 4)
    bwd = 2 * 2 * 9 * 9 * (3 * 4 + 2 * 4)  # recomputed scores, dV, dP, dQ, dK
    assert counter.count().attention == fwd
    assert counter.count().total == fwd + bwd


# ------------------------------------------------------------------------------------------ params, size


def test_count_params_counts_shared_once_and_trainable():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    assert count_params(model) == 20 + 10
    model[3].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 20 + 2


def test_module_size_mb_counts_params_and_buffers():
    model = nn.Sequential(nn.Linear(10, 10), nn.BatchNorm1d(10))
    # Linear 110 + BN affine 20 floats; BN buffers: mean and var (10 floats each) + num_batches_tracked (int64)
    expected = ((110 + 20 + 20) * 4 + 8) / 2**20
    assert module_size_mb(model) == pytest.approx(expected)
    assert module_size_mb(model.double()) == pytest.approx(((110 + 20 + 20) * 8 + 8) / 2**20)


# ------------------------------------------------------------------------------------- clocks, latency


def test_stopwatch_and_module_timer_time_outer_calls_once(fake_clock):
    with Stopwatch() as watch:
        pass
    assert watch.seconds == 1.0
    inner = nn.Identity()
    outer = nn.Sequential(inner, nn.Identity())
    with ModuleTimer([outer, inner]) as timer:
        outer(torch.zeros(1))
        inner(torch.zeros(1))
    assert timer.calls == 2 and timer.seconds == 2.0  # outer once (its inner call nested), inner alone once
    outer(torch.zeros(1))
    assert timer.calls == 2  # hooks removed on exit


def test_alternating_latency_rotates_the_order_after_warmup():
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    stats = alternating_latency(fns, repeats=2, warmup=1)
    assert "".join(order) == "abc" + "bca" + "cab"
    assert all(len(s.times) == 2 for s in stats.values())
    with pytest.raises(ValueError, match="repeats"):
        alternating_latency(fns, repeats=0)


def test_ratio_helpers_on_known_times():
    stats = {"base": LatencyStats((1.0, 2.0, 4.0)), "fast": LatencyStats((0.5, 1.5, 1.0))}
    assert ratio(stats, "base") == {"base": 1.0, "fast": 0.5}
    assert ratio(stats, "base", "min_s")["fast"] == 0.5
    assert paired_ratio(stats, "fast", "base") == 0.5  # median of 0.5, 0.75, 0.25
    assert stats["base"].mean_s == pytest.approx(7 / 3)


def test_paired_min_returns_each_minimum(fake_clock):
    a, b = paired_min(lambda: None, lambda: None, repeats=3)
    assert a == b == 1.0


def test_measure_inference_times_batches_after_warmup(fake_clock):
    model = nn.Linear(3, 2).train()
    seen: list[int] = []
    model.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    loader = [
        (torch.zeros(4, 3), None),
        (torch.zeros(2, 3), None),
    ]  # shorter than warm-up + timed: passed again
    metrics = measure_inference(model, loader, max_batches=3, warmup_batches=1)
    assert seen == [4, 2, 4, 2]  # 1 warm-up + 3 timed
    assert metrics["time/infer_ms"] == pytest.approx(1000.0)  # 1 s per batch on the fake clock
    assert metrics["time/throughput_ips"] == pytest.approx((2 + 4 + 2) / 3.0)
    assert model.training
    assert measure_inference(model, [], max_batches=2) == {}


# ---------------------------------------------------------------------------------------------- memory


def test_memory_helpers_on_cpu():
    reset_peak_memory("cpu")
    assert peak_memory_mb(torch.device("cpu")) > 10  # the Python process with torch loaded
    peak = profiled_peak_mb(lambda: torch.ones(2**20))  # 4 MiB of float32
    assert 4.0 <= peak < 64.0


# ------------------------------------------------------------------------------------- ModelStats callback


class BatchFactorizing(nn.Module):
    """A Linear then, like SDRM, one eigh of the whole batch's Gram matrix per forward."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        self.stats = SimpleNamespace(forwards=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x.flatten(1))
        torch.linalg.eigh(y.T @ y)
        self.stats.forwards += 1
        return y


class TinyData:
    in_chans, image_size = 1, 2

    def __init__(self, n: int, batch_size: int, loaders: bool = True) -> None:
        self.batch_size = batch_size
        self._data = TensorDataset(torch.randn(n, 1, 2, 2), torch.zeros(n, dtype=torch.long))
        if not loaders:
            self.val_dataloader = None

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._data, batch_size=self.batch_size)


def test_model_stats_counts_factorizations_at_the_run_batch_size():
    d, batch = 4, 5
    model = BatchFactorizing(d)
    module = SimpleNamespace(model=model, device=torch.device("cpu"), params_dense=None)
    metrics = ModelStats.measure(module, TinyData(n=12, batch_size=batch))
    per_image_linear = 2 * d * d
    per_image_gram = 2 * d * d  # 2 B d^2 / B
    assert metrics["model/flops_factorization"] == pytest.approx(9 * d**3 / batch)
    assert metrics["model/flops"] == pytest.approx(per_image_linear + per_image_gram + 9 * d**3 / batch)
    assert metrics["model/flops_attention"] == 0
    assert metrics["model/params"] == d * d and metrics["model/compression"] == 1.0
    assert model.stats.forwards == 0  # the counting forward left the run statistics alone
    # without a loader: one zero image, so the factorization is paid by one image
    fallback = ModelStats.measure(module, TinyData(n=12, batch_size=batch, loaders=False))
    assert fallback["model/flops_factorization"] == pytest.approx(9 * d**3)


def test_model_stats_on_a_vit_counts_attention():
    model, _ = vit_edge(32)
    module = SimpleNamespace(model=model, device=torch.device("cpu"), params_dense=2 * count_params(model))
    data = SimpleNamespace(in_chans=1, image_size=32, batch_size=2)  # no loader
    metrics = ModelStats.measure(module, data)
    flops = count_flops(model, torch.zeros(1, 1, 32, 32))
    assert metrics["model/flops"] == flops.total and metrics["model/flops_attention"] == flops.attention > 0
    assert metrics["model/compression"] == 2.0


def test_example_batch_takes_at_most_batch_size_images():
    assert example_batch(TinyData(n=3, batch_size=5)).shape == (3, 1, 2, 2)
    assert example_batch(TinyData(n=30, batch_size=5)).shape == (5, 1, 2, 2)
    assert example_batch(None) is None


def test_phase_timer_keeps_attention_seconds_across_resume(fake_clock):
    timer = PhaseTimer(attention_class="torch.nn.Identity")
    timer.load_state_dict({"train_s": 1.0, "val_s": 2.0, "mha_s": 3.0, "epochs": 1})
    model = nn.Sequential(nn.Identity(), nn.Linear(1, 1))
    timer.on_fit_start(None, SimpleNamespace(device=torch.device("cpu"), modules=model.modules))
    model(torch.zeros(1, 1))
    assert timer.mha_s == 4.0  # 3 s before the resume + one 1 s attention forward
    timer.on_fit_end(None, None)
    model(torch.zeros(1, 1))
    assert timer.state_dict()["mha_s"] == 4.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_attention_kernels_count_once():
    model, _ = vit_edge()
    x = torch.zeros(2, 1, 64, 64)
    cpu = count_flops(model, x)
    cuda = count_flops(model.cuda(), x.cuda())
    assert cuda.attention == cpu.attention and cuda.total == cpu.total
    half = count_flops(model.half(), x.cuda().half())  # the flash kernel
    assert half.attention == cpu.attention and half.total == cpu.total
