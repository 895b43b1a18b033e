"""ONNX export (lrk.export): every weight method round-trips through onnxruntime with PyTorch's logits, merged models
too; attention methods that factorize inside the forward stop with one error naming the option that exports; a
trained run exports end to end, checked here against an independent onnxruntime session; every bad input is one
clear error."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TINY, compose_train
from generic_fixtures import MODELS, calibration, images, rel_diff
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import lrk
from lrk.data import build_datamodule
from lrk.decomp import METHODS, build_method
from lrk.decomp.merge import fold_batchnorm
from lrk.decomp.weight.base import WeightMethod
from lrk.errors import LrkConfigError
from lrk.export import (
    ATOL_REL,
    INPUT,
    OUTPUT,
    check_exportable,
    export_onnx,
    export_run,
    factorizing_modules,
    main,
    merge_for_inference,
    ort_session,
)
from lrk.layers.base import FactorizedLayer
from lrk.models import MultiHeadSelfAttention
from lrk.summary import read_summary
from lrk.train import run

#: every registered weight method with the keys of its generic ``lossy`` case (a real low-rank model), plus the
#: branched Tucker variant
WEIGHT_CASES = [
    pytest.param(name, dict(cls.generic_cases["lossy"]), model, id=f"{name}-{model}")
    for name, cls in sorted(METHODS.items())
    if issubclass(cls, WeightMethod)
    for model in ("vit", "resnet")
] + [pytest.param("tucker", {"rank": 2, "branches": 2}, "resnet", id="tucker_branched-resnet")]
#: the case that stays in the default run (the rest: ``-m slow``; each takes 2-20 s of dynamo export on 2 busy cores)
FAST = {"svd-resnet"}


def ort_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    """An onnxruntime session of its own (not lrk's), CPU provider, on ``x``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def within_tolerance(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((out - ref).abs().max()) <= ATOL_REL * max(1.0, float(ref.abs().max()))


def inputs_for(model_name: str, n: int, seed: int) -> torch.Tensor:
    if model_name == "vit":
        return images(n, seed)
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("method", "keys", "model_name"),
    [p if p.id in FAST else pytest.param(*p.values, marks=pytest.mark.slow, id=p.id) for p in WEIGHT_CASES],
)
def test_every_weight_method_round_trips_through_onnxruntime(tmp_path, method, keys, model_name):
    dense = MODELS[model_name]()
    model = copy.deepcopy(dense)
    build_method({"name": method, **keys}).apply(model, calibration())
    model.eval()
    assert any(isinstance(m, FactorizedLayer) for m in model.modules()), "the method factorized nothing"
    exported = export_onnx(model, inputs_for(model_name, 2, 0), tmp_path / "m.onnx")
    assert exported.exporter == "dynamo"
    for n, seed in ((1, 5), (5, 6)):  # the batch axis is dynamic: other sizes than the example's
        x = inputs_for(model_name, n, seed)
        with torch.no_grad():
            ref, dense_out = model(x), dense(x)
        out = ort_logits(exported.path, x)
        assert out.shape == ref.shape
        assert within_tolerance(out, ref), float((out - ref).abs().max())
        # the graph holds the factorized model, not the dense one (the lossy case changes the logits)
        assert rel_diff(out, dense_out) > 0.05


def bottleneck_resnet() -> nn.Module:
    """A small ResNet-50-style model (torchvision Bottlenecks [1, 1, 1, 1], width 16) with non-trivial BNs."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3, width_per_group=16)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model.eval()


@pytest.mark.slow
def test_a_merged_bottleneck_model_exports_and_matches(tmp_path):
    model = bottleneck_resnet()
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(8, 3, 32, 32, generator=g)]
    build_method({"name": "tucker", "ratio": 0.5}).apply(model, calib)
    merged, info = merge_for_inference(model.eval(), calib)
    assert len(info["merged_units"]) == 4  # one per Bottleneck
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())  # every BN folded
    assert info["bn_folded"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(3, 3, 32, 32, generator=g)
    exported = export_onnx(merged, x[:1], tmp_path / "merged.onnx")
    with torch.no_grad():
        ref = merged(x)
    assert within_tolerance(ort_logits(exported.path, x), ref)


def test_bn_folding_alone_is_exact(tmp_path):
    """``--merge`` on a ResNet of BasicBlocks (nothing to merge) folds the BNs: the same function in eval mode."""
    model = MODELS["resnet"]()
    merged, info = merge_for_inference(model, [inputs_for("resnet", 4, 1)])
    assert info["merged_units"] == [] and info["bn_folded"] > 0
    x = inputs_for("resnet", 4, 2)
    with torch.no_grad():
        assert within_tolerance(merged(x), model(x))
        assert torch.allclose(fold_batchnorm(model)(x), merged(x), atol=1e-6)


def test_merge_with_nothing_to_merge_is_one_error():
    with pytest.raises(LrkConfigError, match="--merge finds nothing to merge in this VisionTransformer"):
        merge_for_inference(MODELS["vit"](), [images(2)])


def swapped(method: str, **keys) -> nn.Module:
    model = MODELS["vit"]()
    build_method({"name": method, **keys}).apply(model, calibration())
    return model.eval()


@pytest.mark.parametrize(
    ("method", "keys", "option"),
    [
        ("sdrm", {}, "decomp.subspace=calibrated"),
        ("pca", {}, "decomp.basis=calibrated"),
        ("attn_svd", {}, "no option freezes it"),
        ("attn_tensor", {}, "no option freezes it"),
    ],
)
def test_attention_that_factorizes_in_the_forward_is_refused_naming_the_option(method, keys, option):
    model = swapped(method, **keys)
    attention = sorted(n for n, m in model.named_modules() if isinstance(m, MultiHeadSelfAttention))
    found = factorizing_modules(model, images(2))
    assert sorted(found) == attention  # every swapped module, attributed to the module itself
    with pytest.raises(LrkConfigError, match=option) as info:
        check_exportable(model, images(2), method)
    assert f"decomp={method} cannot be exported" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "keys"),
    [("sdrm", {"subspace": "calibrated", "energy": 0.9}), ("pca", {"basis": "calibrated"}), ("cholesky", {})],
)
def test_the_exportable_attention_paths_export_and_match(tmp_path, method, keys):
    model = swapped(method, **keys)
    check_exportable(model, images(2), method)
    assert factorizing_modules(model, images(2)) == {}
    exported = export_onnx(model, images(2), tmp_path / "a.onnx")
    x = images(3, seed=9)
    with torch.no_grad():
        ref = model(x)
    assert within_tolerance(ort_logits(exported.path, x), ref)


# --- a trained run, end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svd_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export_run")
    torch.set_num_threads(1)
    cfg = compose_train([*TINY, "trainer.max_epochs=1", "decomp=svd", "decomp.rank=4"], tmp)
    run(cfg)
    return Path(cfg.paths.output_dir)


@pytest.mark.slow
def test_a_trained_run_exports_and_its_check_is_right(svd_run, tmp_path):
    out = tmp_path / "x" / "model.onnx"
    result = export_run(svd_run, out=out, batch=4, max_images=10, repeats=1)
    written = json.loads((out.parent / "export.json").read_text())
    assert written["check"] == result["check"] and written["exporter"] == "dynamo"
    # independent: the run's test images rebuilt here, the model from lrk.load_model, a session of our own
    dm = build_datamodule(read_summary(svd_run)["config"]["data"])
    dm.prepare()
    x = torch.cat([b[0] for b in dm.test_dataloader()])[:10]
    model = lrk.load_model(svd_run)
    with torch.no_grad():
        ref = model(x)
    out_logits = ort_logits(out, x)
    assert result["check"]["images"] == 10
    assert result["check"]["max_abs_diff"] == pytest.approx(float((out_logits - ref).abs().max()), abs=1e-6)
    assert result["check"]["passed"] and result["check"]["argmax_agreement"] == 1.0
    assert set(result["latency"]) == {"batch_1", "batch_4"}
    assert all(v["onnxruntime_ms"] > 0 and v["torch_ms"] > 0 for v in result["latency"].values())
    # the session lrk uses reads the same file
    session = ort_session(out)
    assert np.allclose(session.run([OUTPUT], {INPUT: x.numpy()})[0], out_logits.numpy())


@pytest.mark.slow
def test_bad_run_inputs_are_one_clear_error(svd_run, tmp_path):
    with pytest.raises(LrkConfigError, match="is not a run dir"):
        export_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrkConfigError, match=r"has no summary\.json"):
        export_run(tmp_path / "empty")
    with pytest.raises(LrkConfigError, match="--format tflite is not supported: valid formats: onnx"):
        export_run(svd_run, "tflite")
    with pytest.raises(LrkConfigError, match="--batch=0 is invalid"):
        export_run(svd_run, batch=0)
    with pytest.raises(LrkConfigError, match=r"must end in \.onnx"):
        export_run(svd_run, out=tmp_path / "model.bin", measure=False)
    with pytest.raises(LrkConfigError, match="--merge finds nothing to merge"):
        export_run(svd_run, merge=True, out=tmp_path / "m.onnx", measure=False)
    # a run without its checkpoints
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(svd_run / "summary.json", bare / "summary.json")
    summary = json.loads((bare / "summary.json").read_text())
    summary.setdefault("extra", {}).pop("tested_checkpoint", None)
    (bare / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(LrkConfigError, match="has no checkpoint to export"):
        export_run(bare)


@pytest.mark.slow
def test_the_command_prints_one_error_line(svd_run, tmp_path, capsys):
    sdrm = tmp_path / "sdrm"
    cfg = compose_train([*TINY, "trainer.max_epochs=1", "decomp=sdrm"], sdrm)
    run(cfg)
    capsys.readouterr()
    for argv, needle in (
        ([str(tmp_path / "nope")], "is not a run dir"),
        ([cfg.paths.output_dir, "--no-latency"], "decomp.subspace=calibrated"),
        ([str(svd_run), "--format", "tflite"], "valid formats: onnx"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lrk: error: ") and needle in err[0], err
