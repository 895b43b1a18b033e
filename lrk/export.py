"""``python -m lrk.export <run dir> --format onnx [--merge]``: a run's compressed model as ONNX, checked and timed in
onnxruntime (issue 13, item 4).

1. The model comes back from the run's checkpoint with :func:`lrk.pipeline.structure.restore_model` (the structure
   rides in every lrk checkpoint: ``lrk.load_model``), checked against the run's data (summary.json
   ``config.data``, rebuilt with :func:`lrk.data.build_datamodule`: the same split, the same normalisation).
2. Exportable? Attention methods that compute a decomposition inside every forward (an eigh/SVD/QR of the batch's
   activations: SDRM with ``subspace=batch``, PCA with ``basis=batch``, ``attn_svd``, ``attn_tensor``) have no ONNX
   operator for it: one forward is traced for the factorization ops of :data:`lrk.measure.FACTORIZATION_OPS` and
   the export stops with one error naming the modules and the option that exports (SDRM: ``decomp.subspace=
   calibrated``; PCA: ``decomp.basis=calibrated``; ``attn_svd`` and ``attn_tensor`` have none). Every weight method
   (svd, tucker, branched tucker, cp, tt, trawl, merged models) and Cholesky attention compute nothing of the kind
   and export.
3. ``--merge``: what the acceleration issue's merging gives for inference (:mod:`lrk.decomp.merge`):
   :func:`~lrk.decomp.merge.merge_model` (ResNet bottlenecks whose conv2 is factorized: accelerating_lrd_paper
   Fig. 3, an approximation whose batch norms are re-fitted on calibration batches of the train split; and the
   exact folds of a factorized layer into a pointwise layer beside it), then
   :func:`~lrk.decomp.merge.fold_batchnorm` (every eval-mode BN into the conv before it, exact). A model in which
   neither finds anything (a ViT) is an error. The bottleneck merge changes the function without fine-tuning:
   export.json records the logits' change and both accuracies (train with ``decomp.merge=true`` for a fine-tuned
   merged model; its checkpoint is already merged and exports without ``--merge``).
4. ``torch.onnx.export`` with the dynamo exporter (``torch.export`` + onnxscript) and a dynamic batch axis; when
   that fails, the TorchScript exporter (``dynamic_axes``); export.json says which one was used and why.
5. onnxruntime (``CPUExecutionProvider``) runs the run's **test images** in batches of ``--batch``; its logits are
   compared with PyTorch eager's on the same batches. Tolerance: ``max |logits_ort - logits_torch| <=
   ATOL_REL * max(1, max |logits_torch|)`` with ATOL_REL = 1e-4 (float32 kernels reorder sums: measured differences
   on the tiny test models are ~1e-7 of the logit scale); a larger difference writes export.json and then fails.
   Argmax agreement and both accuracies are recorded too.
6. Latency, onnxruntime against torch eager (``torch.inference_mode``, eval), at batch 1 and ``--batch`` on real
   test images, alternating in one process (:func:`lrk.measure.alternating_latency`), both on the same number of
   threads (torch's, ``--threads``). On a machine whose cores other jobs share, use ``--threads 1``: measured
   here with a load of ~9 on 2 cores, torch's two OpenMP threads made a tiny model's batch-32 forward 67x slower
   (463 ms against 6.9 ms on one thread) while onnxruntime lost 8x.

Writes ``<out>.onnx`` (default ``<run dir>/export/model.onnx``, ``model_merged.onnx`` with ``--merge``) and
``export.json`` beside it. Bad input (no run dir, no summary.json or checkpoint, an unknown format, a method with
no exportable path, ``--merge`` with nothing to merge) is one ``lrk: error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lrk.errors import LrkConfigError
from lrk.measure import FACTORIZATION_OPS, alternating_latency, count_params, paired_ratio

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
#: tolerance of the logits check, relative to the logit scale max(1, max |logits|)
ATOL_REL = 1e-4
INPUT, OUTPUT = "images", "logits"
#: weights above this many bytes go to a ``<file>.data`` beside the .onnx (protobuf files stop at 2 GiB)
EXTERNAL_BYTES = 1_500_000_000
#: attention class -> the option that makes it exportable (None: no option does), for the error message
EXPORT_OPTIONS: dict[str, str | None] = {
    "SDRMAttention": "decomp.subspace=calibrated (V_r fitted once on the calibration batches and frozen: no t-SVD "
    "at run time)",
    "PCAAttention": "decomp.basis=calibrated (each head's basis fitted once on the calibration batches and frozen)",
    "SVDOutputAttention": None,
    "TensorAttention": None,
}
_NO_OPTION = {
    "SVDOutputAttention": "decomp=attn_svd truncates every forward's attention output by an eigh: no option freezes it",
    "TensorAttention": "decomp=attn_tensor decomposes every forward's attention tensor (TensorLy): no option "
    "freezes it",
}


# --- is the model exportable ----------------------------------------------------------------------------------
class _FactorizationSpy(TorchDispatchMode):
    """Records the factorization ops (eigh, SVD, QR, ...) each innermost module calls in one forward."""

    def __init__(self, current: list[str]) -> None:
        super().__init__()
        self.current = current
        self.calls: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in FACTORIZATION_OPS or getattr(func, "overloadpacket", None) in FACTORIZATION_OPS:
            where = self.current[-1] if self.current else ""
            self.calls.setdefault(where, set()).add(str(getattr(func, "overloadpacket", func)))
        return func(*args, **(kwargs or {}))


def factorizing_modules(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[str, list[str]]]:
    """Module name -> (class name, factorization ops) for every module whose own forward computes a decomposition
    (:data:`lrk.measure.FACTORIZATION_OPS`) on ``example``; attributed to the outermost module of a class named in
    :data:`EXPORT_OPTIONS` where there is one, else to the innermost module running."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    handles = []

    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:  # a forward hook returning a value would replace the module's output
        stack.pop()

    for module, name in names.items():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: enter(name)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o: leave()))
    spy = _FactorizationSpy(stack)
    try:
        with torch.no_grad(), spy:
            model(example)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    found: dict[str, tuple[str, list[str]]] = {}
    for where, ops in spy.calls.items():
        owner = where
        parts = where.split(".")
        for i in range(1, len(parts) + 1):  # the outermost known attention module on the path
            prefix = ".".join(parts[:i])
            if type(modules.get(prefix)).__name__ in EXPORT_OPTIONS:
                owner = prefix
                break
        cls = type(modules.get(owner, model)).__name__
        previous = found.get(owner, (cls, []))[1]
        found[owner] = (cls, sorted(set(previous) | ops))
    return found


def check_exportable(model: nn.Module, example: torch.Tensor, method: str | None = None) -> None:
    """Raise one :class:`LrkConfigError` when a module of ``model`` computes a decomposition inside its forward,
    naming the modules and the option that exports (``method``: the run's decomposition, for the message)."""
    found = factorizing_modules(model, example)
    if not found:
        return
    classes = sorted({cls for cls, _ in found.values()})
    names = sorted(found)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    ops = sorted({op for _, o in found.values() for op in o})
    hints = []
    for cls in classes:
        option = EXPORT_OPTIONS.get(cls)
        if option:
            hints.append(f"{cls} exports with {option}")
        else:
            hints.append(_NO_OPTION.get(cls, f"{cls} has no exportable option known to lrk"))
    raise LrkConfigError(
        f"decomp={method or '?'} cannot be exported to ONNX: {shown} ({', '.join(classes)}) compute "
        f"{', '.join(ops)} inside every forward, which ONNX has no operator for; "
        + "; ".join(hints)
        + ". Every weight method (svd, tucker, cp, tt, trawl, merged) and decomp=cholesky export"
    )


# --- merging ------------------------------------------------------------------------------------------------
def merge_for_inference(
    model: nn.Module, batches: Sequence[torch.Tensor]
) -> tuple[nn.Module, dict[str, Any]]:
    """``--merge`` (module docstring, item 3): :func:`lrk.decomp.merge.merge_model` on ``batches`` (in place on a
    copy), then :func:`lrk.decomp.merge.fold_batchnorm`. Returns the merged model (eval) and what was done; nothing
    to merge and no BN to fold is an error."""
    import copy

    from lrk.decomp.merge import fold_batchnorm, merge_model, weight_layers

    merged = copy.deepcopy(model).eval()
    report = merge_model(merged, list(batches))
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    folded = fold_batchnorm(merged)
    bns_left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    if not report.rows and bns == bns_left:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in report.skipped[:3])
        raise LrkConfigError(
            f"--merge finds nothing to merge in this {type(model).__name__}: no ResNet Bottleneck with a factorized "
            "conv2, no factorized layer beside a pointwise layer, and no batch norm after a conv to fold"
            + (f" ({reasons})" if reasons else " (a ViT has none of them)")
            + "; export without --merge"
        )
    info = {
        "merged_units": [row["name"] for row in report.rows],
        "exact_units": [row["name"] for row in report.rows if row.get("exact")],
        "merge_logits_rel_error": report.model_rel_error,
        "bn_folded": bns - bns_left,
        "weight_layers_before": weight_layers(model),
        "weight_layers_after": weight_layers(folded),
        "params_before": count_params(model),
        "params_after": count_params(folded),
        "calibration_batches": len(batches),
    }
    return folded.eval(), info


# --- exporting ----------------------------------------------------------------------------------------------
@dataclass
class Exported:
    path: Path
    exporter: str  # "dynamo" | "torchscript"
    opset: int | None
    dynamic_batch: bool
    fallback_reason: str | None


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Exported:
    """``torch.onnx.export`` of ``model`` on ``example`` to ``path`` with a dynamic batch axis: the dynamo exporter
    first, the TorchScript exporter when it fails. Both failing is one :class:`LrkConfigError` with both reasons."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    # one self-contained file below protobuf's 2 GiB limit; the weights beside it (<path>.data) above
    external = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > EXTERNAL_BYTES
    Path(f"{path}.data").unlink(missing_ok=True)  # the weights of an earlier export to the same file
    errors: list[str] = []
    attempts: list[tuple[str, Callable[[], Any]]] = [
        (
            "dynamo",
            lambda: torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                verbose=False,
                external_data=external,
            ),
        ),
        (
            "torchscript",
            lambda: torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            ),
        ),
    ]
    for name, attempt in attempts:
        out = io.StringIO()
        try:
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(out):
                warnings.simplefilter("ignore")
                attempt()
            onnx_model = onnx.load(str(path))
            onnx.checker.check_model(onnx_model)
            opset = next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), None)
            return Exported(path, name, opset, True, "; ".join(errors) or None)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"{name} exporter: {type(exc).__name__}: {first[:300]}")
            log.info("ONNX export with the %s exporter failed: %s", name, errors[-1])
    raise LrkConfigError("torch.onnx.export failed with both exporters: " + " | ".join(errors))


def ort_session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``path`` on ``threads`` intra-op threads (default: torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_logits(
    model: nn.Module, session: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    """onnxruntime's logits against PyTorch eager's on ``batches`` of (images, labels): max abs difference, the
    tolerance ATOL_REL * max(1, max |logits|), argmax agreement and both accuracies."""
    diff, scale, agree, correct_t, correct_o, n = 0.0, 0.0, 0, 0, 0, 0
    with torch.inference_mode():
        for images, labels in batches:
            ref = model(images).float()
            out = torch.from_numpy(session.run([OUTPUT], {INPUT: images.numpy()})[0])
            diff = max(diff, float((out - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            correct_t += int((ref.argmax(1) == labels).sum())
            correct_o += int((out.argmax(1) == labels).sum())
            n += len(labels)
    tolerance = ATOL_REL * max(1.0, scale)
    return {
        "images": n,
        "max_abs_diff": diff,
        "logit_scale": scale,
        "tolerance": tolerance,
        "tolerance_rule": f"max|ort - torch| <= {ATOL_REL:g} * max(1, max|torch logits|)",
        "passed": bool(diff <= tolerance),
        "argmax_agreement": agree / n if n else math.nan,
        "acc_torch": correct_t / n if n else math.nan,
        "acc_onnxruntime": correct_o / n if n else math.nan,
    }


def latency(
    model: nn.Module,
    session: Any,
    images: torch.Tensor,
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int = 2,
) -> dict[str, Any]:
    """Per batch size: onnxruntime and torch eager timed alternately on the first images of ``images`` (repeated
    up to the batch size when there are fewer): median and min ms, and the paired speed-up t_torch / t_ort."""
    out: dict[str, Any] = {}
    for b in batch_sizes:
        reps = -(-b // len(images))
        x = images.repeat(reps, 1, 1, 1)[:b].contiguous()
        feed = {INPUT: x.numpy()}

        def torch_call(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        stats = alternating_latency(
            {"onnxruntime": lambda feed=feed: session.run([OUTPUT], feed), "torch": torch_call},
            repeats,
            warmup,
        )
        out[f"batch_{b}"] = {
            "onnxruntime_ms": 1000 * stats["onnxruntime"].median_s,
            "torch_ms": 1000 * stats["torch"].median_s,
            "onnxruntime_min_ms": 1000 * stats["onnxruntime"].min_s,
            "torch_min_ms": 1000 * stats["torch"].min_s,
            "speedup_ort_vs_torch": 1.0 / paired_ratio(stats, "onnxruntime", "torch"),
            "repeats": repeats,
        }
    return out


# --- the command ----------------------------------------------------------------------------------------------
def _run_dir(path: str | Path) -> tuple[Path, Path | None]:
    """(run dir, checkpoint file or None): a run dir, or a .ckpt inside ``<run dir>/checkpoints/``."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".ckpt":
        for parent in path.parents:
            if (parent / "summary.json").is_file():
                return parent, path
        raise LrkConfigError(f"{path} is not inside a run dir (no summary.json above it): give the run dir")
    if not path.is_dir():
        raise LrkConfigError(
            f"{path} is not a run dir: give the folder of one lrk run (it holds summary.json)"
        )
    if not (path / "summary.json").is_file():
        raise LrkConfigError(f"{path} has no summary.json: it is not the run dir of an lrk run")
    return path, None


def _test_batches(datamodule: Any, batch: int, max_images: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_images`` test images and labels of the run's data (its test loader, in order), in batches
    of ``batch``."""
    images, labels, seen = [], [], 0
    for x, y, *_ in datamodule.test_dataloader():
        images.append(x.float())
        labels.append(y)
        seen += len(x)
        if seen >= max_images:
            break
    if not images:
        raise LrkConfigError("the run's test split is empty: no images to check the export on")
    x, y = torch.cat(images)[:max_images], torch.cat(labels)[:max_images]
    return [(x[i : i + batch].contiguous(), y[i : i + batch]) for i in range(0, len(x), batch)]


def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    *,
    merge: bool = False,
    out: str | Path | None = None,
    batch: int = 32,
    max_images: int = 256,
    repeats: int = 10,
    calibration_batches: int = 4,
    measure: bool = True,
) -> dict[str, Any]:
    """Export the model of ``run_dir`` (module docstring); returns what export.json holds."""
    from lrk.data import build_datamodule
    from lrk.pipeline.structure import find_checkpoint, load_checkpoint, read_structure, restore_model
    from lrk.summary import read_summary

    if fmt not in FORMATS:
        raise LrkConfigError(f"--format {fmt} is not supported: valid formats: {', '.join(FORMATS)}")
    for key, value, low in (
        ("--batch", batch, 1),
        ("--max-images", max_images, 1),
        ("--repeats", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LrkConfigError(f"{key}={value!r} is invalid: it must be an integer >= {low}")
    start = time.perf_counter()
    run, ckpt = _run_dir(run_dir)
    summary = read_summary(run)
    data_cfg = (summary.get("config") or {}).get("data")
    if not isinstance(data_cfg, dict):
        raise LrkConfigError(f"{run}/summary.json has no config.data: cannot rebuild the run's test images")
    try:
        ckpt = ckpt or find_checkpoint(run)
    except LrkConfigError as exc:
        raise LrkConfigError(
            f"{run} has no checkpoint to export ({exc}); runs keep checkpoints/ unless their callbacks were "
            "disabled (callbacks=none): rerun with the default callbacks"
        ) from exc
    datamodule = build_datamodule(data_cfg)
    datamodule.prepare()
    checkpoint = load_checkpoint(ckpt)
    facts = {"num_classes": datamodule.num_classes, "in_chans": datamodule.in_chans}
    facts.update(image_size=datamodule.image_size, classes=datamodule.class_names)
    model = restore_model(checkpoint, expect=facts).eval()
    structure = read_structure(checkpoint) or {}
    method = structure.get("decomp_method") or ((summary.get("config") or {}).get("decomp") or {}).get("name")
    batches = _test_batches(datamodule, batch, max_images)
    example = batches[0][0][:2]
    check_exportable(model, example, method)

    merge_info = None
    exported_model = model
    if merge:
        calib = datamodule.calibration_batches(calibration_batches)
        exported_model, merge_info = merge_for_inference(model, calib)
        merge_info.update(_merge_effect(model, exported_model, batches))
    path = Path(out) if out else run / "export" / ("model_merged.onnx" if merge else "model.onnx")
    if path.suffix != ".onnx":
        raise LrkConfigError(f"--out {path} must end in .onnx")
    exported = export_onnx(exported_model, example, path)
    session = ort_session(path)
    check = compare_logits(exported_model, session, batches)
    result: dict[str, Any] = {
        "run_dir": str(run),
        "checkpoint": str(ckpt),
        "format": fmt,
        "onnx": str(path),
        "onnx_mb": sum(p.stat().st_size for p in (path, Path(f"{path}.data")) if p.is_file()) / 2**20,
        "exporter": exported.exporter,
        "exporter_fallback_reason": exported.fallback_reason,
        "opset": exported.opset,
        "dynamic_batch": exported.dynamic_batch,
        "decomp_method": method,
        "model_class": f"{type(exported_model).__module__}.{type(exported_model).__qualname__}",
        "params": count_params(exported_model),
        "merge": merge_info,
        "data": {
            "name": data_cfg.get("name"),
            "image_size": datamodule.image_size,
            "in_chans": datamodule.in_chans,
        },
        "check": check,
        "latency": None,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    if measure:
        images = torch.cat([b[0] for b in batches])
        result["latency"] = latency(exported_model, session, images, sorted({1, batch}), repeats)
    result["seconds"] = time.perf_counter() - start
    (path.parent / "export.json").write_text(json.dumps(result, indent=1, default=str))
    if not check["passed"]:
        raise LrkConfigError(
            f"onnxruntime's logits differ from PyTorch's by {check['max_abs_diff']:.3g} > tolerance "
            f"{check['tolerance']:.3g} ({check['tolerance_rule']}) on {check['images']} test images; see "
            f"{path.parent / 'export.json'}"
        )
    return result


def _merge_effect(
    model: nn.Module, merged: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    """How much ``--merge`` changed the model on the test batches (before any export)."""
    diff, ref, same, correct_a, correct_b, n = 0.0, 0.0, 0, 0, 0, 0
    with torch.inference_mode():
        for images, labels in batches:
            a, b = model(images), merged(images)
            diff += float((b.double() - a.double()).square().sum())
            ref += float(a.double().square().sum())
            same += int((a.argmax(1) == b.argmax(1)).sum())
            correct_a += int((a.argmax(1) == labels).sum())
            correct_b += int((b.argmax(1) == labels).sum())
            n += len(labels)
    return {
        "test_logits_rel_change": math.sqrt(diff / ref) if ref > 0 else 0.0,
        "test_argmax_agreement": same / n,
        "test_acc_before_merge": correct_a / n,
        "test_acc_after_merge": correct_b / n,
    }


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _table(result: dict[str, Any]) -> str:
    c = result["check"]
    lines = [
        f"exported {result['onnx']} ({result['onnx_mb']:.2f} MiB, {result['exporter']} exporter, opset "
        f"{result['opset']}, {result['params']:,} parameters)",
        f"check on {c['images']} test images: max |ort - torch| = {c['max_abs_diff']:.3g} (tolerance "
        f"{c['tolerance']:.3g}), argmax agreement {c['argmax_agreement']:.4f}, acc torch {c['acc_torch']:.4f}, "
        f"onnxruntime {c['acc_onnxruntime']:.4f}",
    ]
    if result.get("merge"):
        m = result["merge"]
        lines.append(
            f"merge: {len(m['merged_units'])} units merged, {m['bn_folded']} batch norms folded, weight layers "
            f"{m['weight_layers_before']} -> {m['weight_layers_after']}; test logits changed by "
            f"{m['test_logits_rel_change']:.3g} (rel), acc {m['test_acc_before_merge']:.4f} -> "
            f"{m['test_acc_after_merge']:.4f}"
        )
    for key, row in (result.get("latency") or {}).items():
        lines.append(
            f"{key}: onnxruntime {row['onnxruntime_ms']:.2f} ms, torch eager {row['torch_ms']:.2f} ms "
            f"(median of {row['repeats']}, alternating): onnxruntime {row['speedup_ort_vs_torch']:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrk.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dir", help="an lrk run dir (holds summary.json and checkpoints/), or a .ckpt in one"
    )
    parser.add_argument("--format", default="onnx", help="export format: onnx")
    parser.add_argument("--merge", action="store_true", help="merge layers and fold batch norms first")
    parser.add_argument("--out", help="the .onnx file (default <run dir>/export/model.onnx)")
    parser.add_argument(
        "--batch", type=int, default=32, help="batch of the check and the second latency (32)"
    )
    parser.add_argument("--max-images", type=int, default=256, help="test images the check runs on (256)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per batch size (10)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument(
        "--threads", type=int, help="torch and onnxruntime threads (default torch's; 1 on a shared machine)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise LrkConfigError(f"--threads={args.threads} is invalid: it must be an integer >= 1")
            torch.set_num_threads(args.threads)
        result = export_run(
            args.run_dir,
            args.format,
            merge=args.merge,
            out=args.out,
            batch=args.batch,
            max_images=args.max_images,
            repeats=args.repeats,
            measure=not args.no_latency,
        )
    except LrkConfigError as exc:
        print(f"lrk: error: {exc}", file=sys.stderr)
        return 2
    print(_table(result))
    print(f"wrote {Path(result['onnx']).parent / 'export.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
