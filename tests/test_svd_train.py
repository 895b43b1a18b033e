"""decomp=svd_train (SVD training, seeds/svd_training_abstract.txt): the SVD-form layers, the regularisers, pruning by
the energy rule, the bad inputs, and a tiny run of its schedule end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrk.decomp import build_method
from lrk.errors import LrkConfigError
from lrk.layers.svd import SVDConv2d, SVDLinear
from lrk.layers.svd_train import SpatialSVDConv2d, SVDTrainConv2d, SVDTrainLinear, spatial_matrix
from lrk.lit.regularizers import OrthogonalityRegularizer, SparsityRegularizer
from lrk.pipeline.structure import load_model
from lrk.summary import read_summary
from lrk.train import run

TOL = 1e-5  # max |diff| relative to max |y|, float32

CONVS = {
    "3x3-s2-p1": lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1),
    "3x5-dil-reflect-nobias": lambda: nn.Conv2d(
        6, 10, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1), padding_mode="reflect", bias=False
    ),
    "1x1": lambda: nn.Conv2d(6, 10, 1),
}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


def _perturb(layer: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every factor off its SVD (U, V no longer orthonormal; some s negative)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# --- the layers ------------------------------------------------------------------------------------------------
def test_full_rank_linear_equals_the_dense_layer_at_init() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(16, 24)
    layer = SVDTrainLinear.from_dense(dense)
    x = torch.randn(5, 16)
    assert layer.ranks == (16,)
    assert _close(layer(x), dense(x)) and _close(layer.dense_weight(), dense.weight)
    u, s, v = (t.detach().double() for t in layer.svd_factors())
    torch.testing.assert_close(u.T @ u, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    reference = np.linalg.svd(dense.weight.detach().double().numpy(), compute_uv=False)
    np.testing.assert_allclose(s.numpy(), reference, rtol=1e-5)


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_full_rank_conv_equals_the_dense_layer_at_init(conv: str, decomposition: str) -> None:
    torch.manual_seed(0)
    dense = CONVS[conv]()
    layer = SVDTrainConv2d.from_dense(dense, decomposition=decomposition)
    s_out, c_in, kh, kw = dense.weight.shape
    expected_rank = min(s_out, c_in * kh * kw) if decomposition == "channel" else min(s_out * kw, c_in * kh)
    assert layer.ranks == (expected_rank,)
    x = torch.randn(2, 6, 11, 9)
    assert _close(layer(x), dense(x))
    assert _close(layer.dense_weight(), dense.weight)
    folded = layer.fold()
    assert type(folded) is nn.Conv2d and _close(folded(x), dense(x))
    for attr in ("stride", "padding", "dilation", "padding_mode"):
        assert getattr(folded, attr) == getattr(dense, attr), attr
    if decomposition == "spatial" and kh * kw > 1:  # the k x 1 and 1 x k factors of the paper's spatial form
        assert layer.w0.kernel_size == (kh, 1) and layer.w1.kernel_size == (1, kw)


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_svd_factors_are_the_matricized_kernel(decomposition: str) -> None:
    """U diag(s) V^T of the layer's factors is the kernel matricized as the docstring says (the spatial matrix
    built here by explicit loops over (s, j) x (c, i))."""
    torch.manual_seed(1)
    dense = nn.Conv2d(3, 4, (2, 3))
    layer = SVDTrainConv2d.from_dense(dense, decomposition=decomposition)
    _perturb(layer)
    u, s, v = (t.detach().double() for t in layer.svd_factors())
    w = layer.dense_weight().detach().double()
    if decomposition == "channel":
        matrix = w.reshape(4, -1)
    else:
        matrix = torch.zeros(4 * 3, 3 * 2, dtype=torch.float64)
        for so in range(4):
            for j in range(3):
                for c in range(3):
                    for i in range(2):
                        matrix[so * 3 + j, c * 2 + i] = w[so, c, i, j]
        torch.testing.assert_close(spatial_matrix(w), matrix)
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, matrix, rtol=1e-6, atol=1e-6)


def test_flops_equal_the_flop_counter_and_fold_svd_is_the_two_factor_layer() -> None:
    torch.manual_seed(0)
    cases = [
        (SVDTrainLinear.from_dense(nn.Linear(16, 24)), torch.randn(5, 7, 16), SVDLinear),
        (SVDTrainConv2d.from_dense(CONVS["3x3-s2-p1"]()), torch.randn(2, 6, 11, 9), SVDConv2d),
        (
            SVDTrainConv2d.from_dense(CONVS["3x5-dil-reflect-nobias"](), decomposition="spatial"),
            torch.randn(2, 6, 11, 9),
            SpatialSVDConv2d,
        ),
    ]
    for layer, x, two in cases:
        _perturb(layer)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            y = layer(x)
        assert layer.flops(tuple(x.shape)) == counter.get_total_flops() > 0
        folded = layer.fold("svd")
        assert type(folded) is two and folded.ranks == layer.ranks
        with torch.no_grad():
            assert _close(folded(x), y) and _close(layer.fold()(x), y)
    with pytest.raises(ValueError, match="keep='first'"):
        cases[0][0].fold("first")


def test_spatial_two_factor_layer_is_the_truncated_svd_of_the_spatial_matrix() -> None:
    torch.manual_seed(0)
    dense = CONVS["3x3-s2-p1"]()
    matrix = spatial_matrix(dense.weight.detach().double()).numpy()
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    layer = SpatialSVDConv2d.from_dense(dense, 4)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    np.testing.assert_allclose(
        spatial_matrix(layer.dense_weight().detach().double()).numpy(), best, rtol=1e-5, atol=1e-6
    )
    full = SpatialSVDConv2d.from_dense(dense, min(matrix.shape))
    x = torch.randn(2, 6, 11, 9)
    assert _close(full(x), dense(x))
    with pytest.raises(ValueError, match="=19 is invalid"):
        SpatialSVDConv2d.from_dense(dense, 19)


def test_prune_keeps_the_largest_singular_values_with_their_signs() -> None:
    torch.manual_seed(0)
    layer = SVDTrainLinear.from_dense(nn.Linear(8, 6))
    with torch.no_grad():
        layer.s.copy_(torch.tensor([0.5, -3.0, 0.1, 2.0, -0.05, 1.0]))
    _perturb(layer, scale=0.1)
    u, s, v = (t.detach().double().numpy() for t in layer.svd_factors())
    keep = np.argsort(-np.abs(s))[:3]
    expected = u[:, keep] @ np.diag(s[keep]) @ v[:, keep].T
    pruned = layer.prune(3)
    assert isinstance(pruned, SVDLinear) and pruned.ranks == (3,)
    np.testing.assert_allclose(
        pruned.dense_weight().detach().double().numpy(), expected, rtol=1e-5, atol=1e-6
    )
    # sqrt(|s|) on both factors: the columns of w1 and the rows of w0 have the same norms as U_K, V_K times sqrt|s|
    root = np.sqrt(np.abs(s[keep]))
    np.testing.assert_allclose(
        np.linalg.norm(pruned.w0.weight.detach().double().numpy(), axis=1),
        root * np.linalg.norm(v[:, keep], axis=0),
        rtol=1e-5,
    )


# --- the regularisers -----------------------------------------------------------------------------------------
def _svd_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        SVDTrainConv2d.from_dense(nn.Conv2d(3, 5, 3, padding=1)),
        SVDTrainConv2d.from_dense(nn.Conv2d(5, 4, 3, padding=1), decomposition="spatial"),
        nn.Flatten(),
        SVDTrainLinear.from_dense(nn.Linear(4 * 4 * 4, 6)),
        nn.Linear(6, 2),  # a dense layer: no factors, not regularised
    )
    _perturb(model, seed=3)
    return model


def _factors_by_hand(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(U, s, V) of each SVD-form layer, read from the parameters here (not through ``svd_factors``)."""
    conv, spatial, linear = model[0], model[1], model[3]
    r0, r1 = conv.s.numel(), spatial.s.numel()
    out = [(conv.w1.weight.reshape(5, r0), conv.s, conv.w0.weight.reshape(r0, 27).T)]
    u1 = torch.stack([spatial.w1.weight[:, :, 0, j] for j in range(3)], dim=1).reshape(
        4 * 3, r1
    )  # rows (s, j)
    out.append((u1, spatial.s, spatial.w0.weight[:, :, :, 0].reshape(r1, 5 * 3).T))
    out.append((linear.w1.weight, linear.s, linear.w0.weight.T))
    return out


def test_orthogonality_regularizer_value_and_gradient_by_hand() -> None:
    model = _svd_model()
    term = OrthogonalityRegularizer(0.7)
    assert term.name == "reg_orth"
    value = term(SimpleNamespace(model=model), None, None, torch.zeros(2))
    expected = 0.0
    for u, _, v in _factors_by_hand(model):
        un, vn = u.detach().double().numpy(), v.detach().double().numpy()
        expected += np.linalg.norm(un.T @ un - np.eye(un.shape[1])) ** 2
        expected += np.linalg.norm(vn.T @ vn - np.eye(vn.shape[1])) ** 2
    assert float(value) == pytest.approx(0.7 * expected, rel=1e-5)
    value.backward()
    # d/dU ||U^T U - I||_F^2 = 4 U (U^T U - I), by hand; the linear layer's U is w1.weight, V^T is w0.weight
    linear = model[3]
    u, v = linear.w1.weight.detach().double(), linear.w0.weight.detach().double().T
    eye = torch.eye(u.shape[1], dtype=torch.float64)
    torch.testing.assert_close(
        linear.w1.weight.grad.double(), 0.7 * 4 * u @ (u.T @ u - eye), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        linear.w0.weight.grad.double(), (0.7 * 4 * v @ (v.T @ v - eye)).T, rtol=1e-4, atol=1e-6
    )
    assert linear.s.grad is None or float(linear.s.grad.abs().max()) == 0
    assert model[4].weight.grad is None  # the dense layer is not regularised


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_sparsity_regularizer_value_and_gradient_by_hand(kind: str) -> None:
    model = _svd_model()
    term = SparsityRegularizer(0.3, kind)
    assert term.name == "reg_sparse"
    value = term(SimpleNamespace(model=model), None, None, torch.zeros(2))
    expected, grads = 0.0, []
    for _, s, _ in _factors_by_hand(model):
        sn = s.detach().double().numpy()
        l1, l2 = np.abs(sn).sum(), math.sqrt((sn**2).sum())
        hoyer = l1 / l2
        d_hoyer = np.sign(sn) / l2 - l1 * sn / l2**3  # d(||s||_1 / ||s||_2) / ds
        expected += {"l1": l1, "hoyer": hoyer, "hoyer_square": hoyer**2}[kind]
        grads.append({"l1": np.sign(sn), "hoyer": d_hoyer, "hoyer_square": 2 * hoyer * d_hoyer}[kind])
    assert float(value) == pytest.approx(0.3 * expected, rel=1e-5)
    value.backward()
    for (_, s, _), grad in zip(_factors_by_hand(model), grads, strict=True):
        np.testing.assert_allclose(s.grad.double().numpy(), 0.3 * grad, rtol=1e-4, atol=1e-7)


def test_sparsity_measures_on_a_hand_example() -> None:
    """s = (3, -4): ||s||_1 = 7, ||s||_2 = 5, Hoyer 7/5, Hoyer-Square 49/25."""
    layer = SVDTrainLinear.from_dense(nn.Linear(2, 2))
    with torch.no_grad():
        layer.s.copy_(torch.tensor([3.0, -4.0]))
    lit = SimpleNamespace(model=layer)
    for kind, expected in (("l1", 7.0), ("hoyer", 1.4), ("hoyer_square", 1.96)):
        assert float(SparsityRegularizer(1.0, kind)(lit, None, None, torch.zeros(1))) == pytest.approx(
            expected
        )
    assert float(SparsityRegularizer(0.0, "l1")(lit, None, None, torch.zeros(1))) == 0.0
    for bad in (-1.0, "x", float("inf")):
        with pytest.raises(ValueError, match="weight="):
            OrthogonalityRegularizer(bad)
    with pytest.raises(ValueError, match="kind='l2'"):
        SparsityRegularizer(1.0, "l2")


# --- pruning by the energy rule / a ratio ------------------------------------------------------------------------
def _energy_rank_numpy(s: np.ndarray, phi: float) -> int:
    """Smallest r with sum_{i<=r} s_(i)^2 >= phi sum s_i^2, |s| sorted in decreasing order (an independent loop)."""
    squared = np.sort(s**2)[::-1]
    total, running = squared.sum(), 0.0
    for r, value in enumerate(squared, start=1):
        running += value
        if running >= phi * total * (1 - 1e-12):
            return r
    return len(squared)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)  # the stem: not a target
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.head(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
@pytest.mark.parametrize("phi", [0.5, 0.8, 0.95, 1.0])
def test_pruning_keeps_exactly_the_ranks_of_the_energy_rule(phi: float, decomposition: str) -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    method = build_method({"name": "svd_train", "decomposition": decomposition, "prune_energy": phi})
    report = method.apply(model)
    assert [r["name"] for r in report.rows] == ["conv2", "conv3", "fc1"]
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(5)
    spectra = {}
    for row in report.rows:  # "trained" singular values: arbitrary magnitudes and signs
        layer = modules[row["name"]]
        with torch.no_grad():
            layer.s.copy_(torch.randn(layer.s.shape, generator=g) * torch.logspace(0, -2, layer.s.numel()))
        spectra[row["name"]] = layer.s.detach().double().numpy()
    x = torch.randn(2, 1, 4, 4)
    pruned = method.prune(model, report)
    for row in pruned.rows:
        s = spectra[row["name"]]
        expected = _energy_rank_numpy(s, phi)
        assert row["ranks"] == [expected] and row["rank"] == expected, row["name"]
        assert row["rank_full"] == len(s)
        assert row["params_after"] == sum(p.numel() for p in modules_after(model)[row["name"]].parameters())
        kept = np.sort(s**2)[::-1][:expected].sum() / (s**2).sum()
        assert row["s_energy"] == pytest.approx(kept) and kept >= phi - 1e-9
    assert model(x).shape == (2, 3)
    assert not any(isinstance(m, (SVDTrainLinear, SVDTrainConv2d)) for m in model.modules())


def modules_after(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def test_prune_ratio_meets_the_parameter_fraction_or_folds_the_layer_back() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    method = build_method({"name": "svd_train", "prune_ratio": 0.5, "targets": ["conv3", "fc1"]})
    report = method.apply(model)
    pruned = method.prune(model, report)
    rows = {r["name"]: r for r in pruned.rows}
    fc1 = rows["fc1"]  # 12 x 128 (+12): r (128 + 12) + 12 within 0.5 x (1 +- 0.1) of 1548
    assert abs(fc1["params_after"] / fc1["params_before"] / 0.5 - 1) <= 0.1
    assert fc1["params_after"] == fc1["rank"] * (128 + 12) + 12
    conv3 = rows["conv3"]  # 8 x 72: r (72 + 8) + 8 of 584: r = 4 gives 0.562, r = 3 0.425: unreachable
    assert conv3["kind"] == "dense (ratio unreachable)" and conv3["params_after"] == conv3["params_before"]
    assert type(model.conv3) is nn.Conv2d and isinstance(model.fc1, SVDLinear)
    assert pruned.metrics()["decomp/layers_dense"] == 1.0


# --- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"orth_weight": -1.0}, "decomp.orth_weight"),
        ({"orth_weight": "big"}, "decomp.orth_weight"),
        ({"sparsity_weight": -0.001}, "decomp.sparsity_weight"),
        ({"sparsity_weight": True}, "decomp.sparsity_weight"),
        ({"prune_energy": 0.0}, "decomp.prune_energy"),
        ({"prune_energy": 1.01}, "decomp.prune_energy"),
        ({"prune_energy": "all"}, "decomp.prune_energy"),
        ({"prune_ratio": 2}, "decomp.prune_ratio"),
        ({"prune_energy": 0.9, "prune_ratio": 0.5}, "prune_energy=0.9, prune_ratio=0.5"),
        ({"default_prune_energy": None}, "neither"),
        ({"sparsity": "l0"}, "decomp.sparsity"),
        ({"decomposition": "tucker"}, "decomp.decomposition"),
        ({"schedule": "multistage"}, "decomp.schedule"),
        ({"train_epochs": 1.5}, "decomp.train_epochs"),
        ({"rank_search": "latency"}, "decomp.rank_search"),
    ],
)
def test_bad_keys_are_one_clear_error(keys: dict, named: str) -> None:
    with pytest.raises(LrkConfigError, match=named.replace(".", r"\.")):
        build_method({"name": "svd_train", **keys})


def test_bad_input_fails_the_run_before_training(tiny_cfg) -> None:
    cfg = tiny_cfg("decomp=svd_train", "decomp.orth_weight=-1")
    with pytest.raises(LrkConfigError, match=r"decomp\.orth_weight=-1"):
        run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert read_summary(run_dir)["status"] == "failed"
    assert not list(run_dir.rglob("*.ckpt"))


def test_the_schedule_is_refused_for_another_method(tiny_cfg) -> None:
    cfg = tiny_cfg("decomp=svd", "decomp.schedule=svd_train")
    with pytest.raises(LrkConfigError, match="schedule of decomp=svd_train only"):
        run(cfg)
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


# --- end to end ---------------------------------------------------------------------------------------------------
def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_a_tiny_run_trains_regularised_prunes_and_fine_tunes(tiny_cfg) -> None:
    cfg = tiny_cfg(
        "decomp=svd_train", "trainer.max_epochs=1", "decomp.finetune_epochs=1", "decomp.prune_energy=0.8"
    )
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed", summary["error"]
    rows = _csv_rows(run_dir)
    regularised = [r for r in rows if r.get("train/reg_orth")]
    assert regularised and all(r.get("train/reg_sparse") for r in regularised)
    assert float(regularised[0]["train/reg_sparse"]) > 0
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert len(steps) == 2 and steps == sorted(
        set(steps)
    )  # regularised epoch, then fine-tuning, one step axis
    layers = summary["decomp_layers"]
    assert [r["name"] for r in layers] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    for row in layers:
        assert row["rank_full"] == 32 and 1 <= row["rank"] <= 32 and row["ranks"] == [row["rank"]]
        assert row["params_after"] == row["rank"] * sum(row["shape"]) + row["shape"][0]  # SVDLinear with bias
    assert metrics["decomp/rank_mean"] == pytest.approx(sum(r["rank"] for r in layers) / 4)
    assert metrics["decomp/params_after"] == sum(r["params_after"] for r in layers)
    assert Path(summary["extra"]["tested_checkpoint"]).parent == run_dir / "checkpoints" / "finetune"


def test_stage_post_without_fine_tuning_tests_the_pruned_model(tiny_cfg) -> None:
    cfg = tiny_cfg(
        "decomp=svd_train",
        "decomp.stage=post",
        "trainer.max_epochs=1",
        "decomp.train_epochs=1",
        "decomp.finetune_epochs=0",
        "decomp.prune_ratio=0.5",
        "decomp.decomposition=spatial",
    )
    metrics = run(cfg)
    summary = read_summary(Path(cfg.paths.output_dir))
    assert summary["status"] == "completed", summary["error"]
    assert "dense/test/acc" in metrics and "test/acc" in metrics
    run_dir = Path(cfg.paths.output_dir)
    assert summary["extra"]["tested_checkpoint"] == str(run_dir / "checkpoints" / "pruned.ckpt")
    model = load_model(run_dir)  # the pruned model comes back from the run dir
    ranks = {n: m.ranks[0] for n, m in model.named_modules() if isinstance(m, SVDLinear)}
    assert ranks == {r["name"]: r["rank"] for r in summary["decomp_layers"]}
    layers = summary["decomp_layers"]
    assert all(abs(r["params_after"] / r["params_before"] / 0.5 - 1) <= 0.1 for r in layers)
    pruned_params = sum(r["params_after"] for r in layers)
    # model/params is counted from the pruned model: the dense model minus what pruning removed
    assert (
        metrics["model/params"]
        == metrics["model/params_dense"] - sum(r["params_before"] for r in layers) + pruned_params
    )
