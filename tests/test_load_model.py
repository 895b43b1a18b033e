"""A compressed model loads back: the structure in every checkpoint, ``lrk.load_model``, ``train=false
ckpt_path=<run dir>`` without the decomposition config, and one clear error for everything that does not fit."""

from __future__ import annotations

import io
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, TINY, compose_train
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf, open_dict
from torch import nn

import lrk
from lrk.decomp import METHODS, SVDLinear, build_method
from lrk.errors import LrkConfigError
from lrk.models import build_backbone
from lrk.pipeline.structure import (
    StructureCheckpoint,
    find_checkpoint,
    load_checkpoint,
    read_structure,
    restore_model,
    skeleton,
    structure_payload,
)
from lrk.summary import read_summary
from lrk.train import run

CONF_DECOMP = REPO / "conf" / "decomp"
OUTPUTS: dict[str, torch.Tensor] = {}  # run dir -> the tested model's outputs on IMAGES (GrabOutputs)


def images(in_chans: int = 1, size: int = 16, n: int = 4) -> torch.Tensor:
    return torch.randn(n, in_chans, size, size, generator=torch.Generator().manual_seed(7))


class GrabOutputs(Callback):
    """Keeps the LightningModule's model outputs at the end of the test, i.e. with the tested checkpoint's weights."""

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        dm = trainer.datamodule
        model = pl_module.model.eval()
        with torch.no_grad():
            OUTPUTS[str(trainer.default_root_dir)] = model(images(dm.in_chans, dm.image_size)).cpu()


def tiny(tmp: Path, *overrides: str, run_name: str) -> Any:
    cfg = compose_train([*TINY, *overrides], tmp)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / run_name)
    return cfg


@pytest.fixture(scope="module")
def svd_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, float], Path]]:
    """One decomp=svd run (2 epochs, tiny): its run dir, metrics and the tmp root, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("svd")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the evaluations below: identical float sums
    try:
        cfg = tiny(tmp, "decomp=svd", "trainer.max_epochs=2", run_name="svd")
        with open_dict(cfg):
            cfg.callbacks.grab = {"_target_": f"{__name__}.GrabOutputs"}
        metrics = run(cfg)
    finally:
        torch.set_num_threads(threads)
    yield Path(cfg.paths.output_dir), metrics, tmp


# --- (a) train=false ckpt_path=<run dir> reproduces the run's test metrics -------------------------------------
def test_eval_run_reproduces_the_test_metrics_without_the_decomp_config(svd_run):
    run_dir, first, tmp = svd_run
    original = read_summary(run_dir)
    evaluated = tiny(tmp, "train=false", f"ckpt_path={run_dir}", run_name="eval")  # decomp: the default none
    assert evaluated.decomp.name == "none"
    second = run(evaluated)
    test_metrics = {k: v for k, v in first.items() if k.startswith("test/")}
    assert {"test/acc", "test/bal_acc", "test/f1", "test/loss"} <= set(test_metrics)
    assert {k: second[k] for k in test_metrics} == test_metrics  # exactly, not approximately
    summary = read_summary(evaluated.paths.output_dir)
    assert summary["status"] == "completed" and "train/loss" not in second
    # the checkpoint the run tested (summary.json), not last.ckpt, and the compressed model's sizes
    assert summary["extra"]["tested_checkpoint"] == original["extra"]["tested_checkpoint"]
    assert summary["extra"]["restored_from"]["model_class"] == "lrk.models.vit.VisionTransformer"
    for key in ("model/params", "model/params_dense", "model/compression", "model/flops"):
        assert second[key] == first[key], key
    assert second["model/params"] < second["model/params_dense"]
    # the original run's per-layer report rows and their decomp/* metrics
    assert summary["decomp_layers"] == original["decomp_layers"] and summary["decomp_layers"]
    assert {k: v for k, v in second.items() if k.startswith("decomp/")} == {
        k: v for k, v in first.items() if k.startswith("decomp/")
    }
    assert summary["extra"]["test_confusion_matrix"] == original["extra"]["test_confusion_matrix"]


def test_eval_run_on_a_weights_only_checkpoint_still_rebuilds_from_the_config(svd_run):
    run_dir, first, tmp = svd_run
    checkpoint = torch.load(find_checkpoint(run_dir), map_location="cpu", weights_only=True)
    del checkpoint["lrk_structure"]  # as written before lrk stored structures
    old = tmp / "old.ckpt"
    torch.save(checkpoint, old)
    second = run(tiny(tmp, "train=false", f"ckpt_path={old}", "decomp=svd", run_name="eval_old"))
    assert second["test/acc"] == first["test/acc"] and second["test/loss"] == first["test/loss"]


def test_eval_run_with_a_decomp_config_is_a_clear_error(svd_run):
    run_dir, _, tmp = svd_run
    cfg = tiny(tmp, "train=false", f"ckpt_path={run_dir}", "decomp=svd", run_name="eval_decomp")
    with pytest.raises(
        LrkConfigError, match=r"already holds its model's structure \(decomp=svd\): drop decomp=svd"
    ):
        run(cfg)
    assert read_summary(cfg.paths.output_dir)["status"] == "failed"


def test_eval_run_on_other_data_names_the_mismatch(svd_run):
    run_dir, _, tmp = svd_run
    cfg = tiny(tmp, "train=false", f"ckpt_path={run_dir}", "data.label_mode=types", run_name="eval_types")
    with pytest.raises(LrkConfigError, match="num_classes=2 but the data of this run has num_classes=4"):
        run(cfg)


def test_cli_eval_on_other_data_is_one_error_line(svd_run):
    run_dir, _, tmp = svd_run
    tiny_cli = [o for o in TINY if not o.startswith(("callbacks.", "trainer."))]
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        *tiny_cli,
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp / 'cli_logs'}",
        "train=false",
        f"ckpt_path={run_dir}",
        "data.channels=3",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("lrk: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "in_chans=1 but the data of this run has in_chans=3" in errors[0] and str(run_dir) in errors[0]


# --- (b) lrk.load_model ------------------------------------------------------------------------------------------
def test_load_model_gives_the_tested_model_in_eval_mode(svd_run):
    run_dir, first, _ = svd_run
    model = lrk.load_model(run_dir)
    assert isinstance(model, nn.Module) and not model.training
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert any(isinstance(m, SVDLinear) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == first["model/params"]
    with torch.no_grad():
        out = model(images())
    assert torch.equal(out, OUTPUTS[str(run_dir)])  # the LightningModule's outputs with the tested weights


def test_checkpoints_carry_a_small_plain_typed_structure(svd_run):
    run_dir, _, _ = svd_run
    summary = read_summary(run_dir)
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(
            ckpt, map_location="cpu", weights_only=True
        )  # Lightning's safe loader reads it
        payload = checkpoint["lrk_structure"]
        assert payload["format"] == 1 and payload["lrk_version"] == lrk.__version__
        assert isinstance(payload["skeleton"], bytes) and len(payload["skeleton"]) < 100_000
        assert payload["data"] == {"num_classes": 2, "in_chans": 1, "image_size": 16}
        assert payload["classes"] == summary["extra"]["data"]["class_names"]
        assert payload["decomp_method"] == "svd" and payload["decomp_layers"] == summary["decomp_layers"]
        assert payload["params_dense"] == summary["metrics"]["model/params_dense"]
    assert read_structure(run_dir) is not None


def test_find_checkpoint_prefers_the_tested_then_best_then_last(svd_run, tmp_path):
    run_dir, _, _ = svd_run
    assert find_checkpoint(run_dir) == Path(read_summary(run_dir)["extra"]["tested_checkpoint"])
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"")
    assert find_checkpoint(tmp_path / "run") == ckpts / "last.ckpt"
    (ckpts / "best-epoch003.ckpt").write_bytes(b"")
    assert find_checkpoint(tmp_path / "run") == ckpts / "best-epoch003.ckpt"
    # a moved run dir: the recorded absolute path is gone, its file name is found in checkpoints/
    (ckpts / "best-epoch001.ckpt").write_bytes(b"")
    (tmp_path / "run" / "summary.json").write_text(
        '{"extra": {"tested_checkpoint": "/gone/best-epoch001.ckpt"}}'
    )
    assert find_checkpoint(tmp_path / "run") == ckpts / "best-epoch001.ckpt"
    assert find_checkpoint(ckpts / "last.ckpt") == ckpts / "last.ckpt"


# --- (c) every registered method's structure round-trips -------------------------------------------------------
class TinyConvNet(nn.Module):
    """k x k convolutions (Tucker-2, CP), BatchNorm statistics, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(
        {"name": "vit", "dim": 16, "depth": 2, "num_heads": 2}, num_classes=2, in_chans=1, image_size=16
    )


def method_config(name: str, **extra: Any) -> Any:
    path = CONF_DECOMP / f"{name}.yaml"
    cfg = OmegaConf.load(path) if path.is_file() else OmegaConf.create({"name": name})
    return OmegaConf.merge(cfg, OmegaConf.create(extra))


def round_trip(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Payload + state dict, through torch.save and the weights-only loader, back to a model."""
    payload = structure_payload(model, {"num_classes": 2, "in_chans": 1, "image_size": 16})
    assert len(payload["skeleton"]) < 100_000
    buffer = io.BytesIO()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "lrk_structure": payload}, buffer)
    checkpoint = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    return restore_model(checkpoint, {"num_classes": 2, "in_chans": 1}).eval()


def assert_same_model(model: nn.Module, restored: nn.Module, x: torch.Tensor) -> None:
    assert [type(m) for m in restored.modules()] == [type(m) for m in model.modules()]
    # shared tensors (TRAWL's factors) stay shared: the same number of distinct parameters
    assert len(list(restored.parameters())) == len(list(model.parameters()))
    assert restored.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


WEIGHT_OR_ATTENTION = sorted(name for name in METHODS if name != "none")


@pytest.mark.parametrize("name", WEIGHT_OR_ATTENTION)
def test_every_method_round_trips_on_a_vit(name):
    x = images()
    model = vit()
    build_method(method_config(name)).apply(model, [x])
    model.eval()
    assert_same_model(model, round_trip(model, x), x)


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("sdrm", {"subspace": "calibrated"}),
        ("pca", {"basis": "calibrated"}),
        ("attn_tensor", {"decomposition": "cp"}),
    ],
)
def test_method_variants_with_calibrated_state_round_trip(name, extra):
    x = images()
    model = vit()
    build_method(method_config(name, **extra)).apply(model, [x])
    model.eval()
    assert_same_model(model, round_trip(model, x), x)


@pytest.mark.parametrize("name", ["tucker", "cp"])
def test_factorized_convolutions_round_trip(name):
    torch.manual_seed(0)
    model = TinyConvNet()
    x = images()
    model(x)  # BatchNorm running statistics (buffers) that differ from their initial values
    build_method(method_config(name, rank=3)).apply(model, [x])
    model.eval()
    assert_same_model(model, round_trip(model, x), x)


class TiedWithStats(nn.Module):
    """A tied weight, a non-persistent buffer, plain attributes that count forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.full((4,), 3.0), persistent=False)
        self.forwards = 0
        self.history = [1.5, 2.5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.b(self.a(x)) * self.scale


def test_skeleton_keeps_ties_non_persistent_buffers_and_attributes_but_no_hooks():
    torch.manual_seed(0)
    model = TiedWithStats()
    x = torch.randn(2, 4)
    model(x)
    calls = []
    model.a.register_forward_hook(lambda *args: calls.append(1))  # e.g. a callback's timer
    bare = skeleton(model)
    assert bare.a.weight.is_meta and not model.a.weight.is_meta  # the original keeps its weights
    assert not bare.a._forward_hooks and model.a._forward_hooks
    restored = round_trip(model, x)
    assert restored.a.weight is restored.b.weight and restored.a.weight.requires_grad
    assert torch.equal(restored.scale, torch.full((4,), 3.0))
    assert restored.forwards == 1 and restored.history == [1.5, 2.5]
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert len(calls) == 1  # the hook ran for the original's forward only


# --- (d) errors ----------------------------------------------------------------------------------------------
def tiny_checkpoint(model: nn.Module | None = None) -> dict[str, Any]:
    model = model if model is not None else vit()
    payload = structure_payload(model, {"num_classes": 2, "in_chans": 1, "image_size": 16})
    return {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lrk_structure": payload}


def test_a_folder_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrkConfigError, match=r"no checkpoint in .*empty: expected checkpoints/best-\*.ckpt"):
        lrk.load_model(tmp_path / "empty")
    with pytest.raises(LrkConfigError, match="does not exist"):
        lrk.load_model(tmp_path / "nothing")


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint\x00\x01")
    with pytest.raises(LrkConfigError, match=r"garbage.ckpt is not a checkpoint: torch.load failed"):
        lrk.load_model(garbage)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(LrkConfigError, match=r"tensor\.pt is not a checkpoint: it holds a Tensor"):
        lrk.load_model(tensor)


def test_a_plain_state_dict_has_no_structure(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(vit().state_dict(), path)
    assert read_structure(path) is None
    with pytest.raises(LrkConfigError, match=r"weights.pt has no lrk_structure: it is a plain state_dict"):
        lrk.load_model(path)


def test_other_data_facts_are_named():
    checkpoint = tiny_checkpoint()
    with pytest.raises(LrkConfigError, match="num_classes=2 but the data of this run has num_classes=5"):
        restore_model(checkpoint, {"num_classes": 5, "in_chans": 1})
    with pytest.raises(LrkConfigError, match="image_size=16 but the data of this run has image_size=32"):
        restore_model(checkpoint, {"num_classes": 2, "image_size": 32})
    restore_model(checkpoint, {"num_classes": 2, "in_chans": None})  # an unknown fact is not compared


def test_weights_that_do_not_fit_are_listed():
    checkpoint = tiny_checkpoint()
    state = checkpoint["state_dict"]
    del state["model.head.weight"]
    state["model.extra.weight"] = torch.zeros(1)
    state["model.head.bias"] = torch.zeros(7)
    with pytest.raises(LrkConfigError) as info:
        restore_model(checkpoint)
    message = str(info.value)
    assert "weights do not fit its lrk_structure" in message and "missing (1): head.weight" in message
    assert "unexpected (1): extra.weight" in message and "head.bias (7,) vs (2,)" in message


def test_another_structure_format_names_the_version():
    checkpoint = tiny_checkpoint()
    checkpoint["lrk_structure"].update(format=2, lrk_version="9.9")
    with pytest.raises(LrkConfigError, match=r"format 2 \(written by lrk 9.9\); this lrk .* reads format 1"):
        restore_model(checkpoint)


class Vanishing(nn.Module):
    """A class that a later version of the code no longer has."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


def test_a_class_that_no_longer_exists(monkeypatch):
    checkpoint = tiny_checkpoint(Vanishing())
    checkpoint["lrk_structure"]["lrk_version"] = "0.0.9"
    monkeypatch.delattr(sys.modules[__name__], "Vanishing")
    with pytest.raises(LrkConfigError) as info:
        restore_model(checkpoint)
    message = str(info.value)
    assert f"uses the class {__name__}.Vanishing" in message and "written by lrk 0.0.9" in message


def pickled_under(
    module_name: str, cls: type, obj: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """A checkpoint of ``obj`` whose skeleton names ``cls`` as ``module_name.<name>`` (a module that is gone
    when the test reads it)."""
    fake = types.ModuleType(module_name)
    setattr(fake, cls.__name__, cls)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, module_name, fake)
        patch.setattr(cls, "__module__", module_name)
        checkpoint = tiny_checkpoint(obj)
    assert module_name not in sys.modules and cls.__module__ != module_name
    return checkpoint


def test_a_class_that_moved_inside_lrk_is_found_by_name(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(SVDLinear(6, 5, rank=2))
    checkpoint = pickled_under("lrk.decomp.old_svd", SVDLinear, model, monkeypatch)
    restored = restore_model(checkpoint)
    assert isinstance(restored[0], SVDLinear)
    x = torch.randn(3, 6)
    assert torch.equal(restored(x), model(x))


def test_an_lrk_class_that_is_gone_is_named(monkeypatch):
    checkpoint = pickled_under("lrk.gone", Vanishing, Vanishing(), monkeypatch)
    with pytest.raises(
        LrkConfigError, match=r"uses the class lrk.gone.Vanishing, which this lrk .* does not have"
    ):
        restore_model(checkpoint)


def test_load_checkpoint_names_its_file_in_errors(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "epoch": 3}, path)
    assert load_checkpoint(path)["epoch"] == 3
    with pytest.raises(LrkConfigError, match=r"checkpoint .*old.ckpt has no lrk_structure"):
        restore_model(path)


class Unpicklable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.act = lambda x: x  # a lambda does not pickle


def test_a_model_whose_structure_cannot_be_stored_only_warns(caplog):
    from lrk.lit.module import LitClassifier

    callback = StructureCheckpoint()
    checkpoint: dict[str, Any] = {}
    callback.on_save_checkpoint(None, LitClassifier(vit(), num_classes=2), checkpoint)
    assert checkpoint["lrk_structure"]["data"] == {"num_classes": 2}  # no trainer: no datamodule facts
    checkpoint = {}
    with caplog.at_level("WARNING"):
        callback.on_save_checkpoint(None, LitClassifier(Unpicklable(), num_classes=2), checkpoint)
    assert "lrk_structure" not in checkpoint and "structure was not saved" in caplog.text
