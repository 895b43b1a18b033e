"""Dense and compressed models in onnxruntime and in PyTorch eager, side by side (issue 13, item 4).

Randomly initialised backbones built by name (``lrk.models.build_backbone`` from ``conf/backbone/<name>.yaml``):
ResNet-18 and lrk's ``vit_tiny`` (``--quick``: ``vit_edge`` alone, its dynamo exports are the quickest;
``--models`` picks others), each compressed by the registered methods as
``python train.py decomp=<name> decomp.ratio=0.5`` composes them (``conf/decomp/<name>.yaml``; default targets):

============  ====================================================================================================
variant       what
============  ====================================================================================================
dense         the backbone as built
svd           ``decomp=svd ratio=0.5``
tucker        ``decomp=tucker ratio=0.5`` (Tucker-2 for the k x k convs, SVD for 1x1 and Linear layers)
merged        ``tucker`` after ``lrk.export.merge_for_inference``: :func:`lrk.decomp.merge.merge_model` (the Fig. 3
              bottleneck merge of accelerating_lrd_paper and the exact pair folds; a ResNet-18's BasicBlocks have
              nothing to merge, so there it is the BN folding alone) and :func:`lrk.decomp.merge.fold_batchnorm`
              (exact in eval mode). A ViT has no BN and nothing mergeable: no merged variant.
dense+bnfold  the dense ResNet with its BNs folded: the fair reference for ``merged``
============  ====================================================================================================

Each variant is exported with ``lrk.export.export_onnx`` (dynamo exporter, dynamic batch; TorchScript fallback,
named in the table), loaded in an onnxruntime ``CPUExecutionProvider`` session on torch's thread count, checked
against PyTorch (max abs logit difference on random images, tolerance ``lrk.export.ATOL_REL`` of the logit scale)
and timed at batch 1 and 32 (``--batches``): for each batch size, every variant's onnxruntime session and torch eager forward
(``torch.inference_mode``) run alternately in one process (:func:`lrk.measure.alternating_latency`, the order
rotated each round, after warm-up). Figures: median ms; ``ort x`` = torch / onnxruntime of the same variant
(paired, median of the per-round ratios); ``vs dense`` = dense / variant within the same runtime (paired).

The machine is shared: single latencies are noisy; read the paired ratios. The load average is printed.

    python benchmarks/export_latency.py --quick       # vit_edge, 64 px, 10 classes, batches 1 and 8, 2 rounds
    python benchmarks/export_latency.py --threads 1   # 224 px, 1000 classes, 5 rounds: ~5 min on 2 shared cores
                                                      # (2 threads on busy cores: torch's OpenMP stalls, 15+ min)

Prints the tables and ends with one line of JSON holding every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import decomp_config, load_average
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from lrk.decomp import build_method
from lrk.decomp.merge import fold_batchnorm
from lrk.export import ATOL_REL, INPUT, OUTPUT, export_onnx, merge_for_inference, ort_session
from lrk.measure import alternating_latency, count_params, paired_ratio
from lrk.models import build_backbone

CONF = Path(__file__).resolve().parents[1] / "conf"


def backbone(name: str, classes: int, size: int) -> nn.Module:
    cfg = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")
    torch.manual_seed(0)
    return build_backbone(cfg, num_classes=classes, in_chans=3, image_size=size).eval()


def variants(name: str, classes: int, size: int, calib: list[torch.Tensor]) -> dict[str, nn.Module]:
    dense = backbone(name, classes, size)
    out: dict[str, nn.Module] = {"dense": dense}
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in dense.modules())
    if has_bn:
        out["dense+bnfold"] = fold_batchnorm(dense)
    for method in ("svd", "tucker"):
        model = copy.deepcopy(dense)
        build_method(decomp_config({"name": method, "ratio": 0.5})).apply(model, calib)
        out[method] = model.eval()
    if has_bn:
        out["merged"], _ = merge_for_inference(out["tucker"], calib)
    return out


def run_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    size, classes = args.size, args.classes
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, size, size, generator=g)]
    x = {b: torch.randn(b, 3, size, size, generator=g) for b in args.batches}
    models = variants(name, classes, size, calib)
    rows: dict[str, Any] = {}
    sessions = {}
    for key, model in models.items():
        start = time.perf_counter()
        exported = export_onnx(model, x[args.batches[0]], tmp / f"{name}_{key}.onnx")
        session = ort_session(exported.path)
        big = x[args.batches[-1]]
        with torch.inference_mode():
            ref = model(big)
        out = torch.from_numpy(session.run([OUTPUT], {INPUT: big.numpy()})[0])
        diff = float((out - ref).abs().max())
        rows[key] = {
            "params": count_params(model),
            "exporter": exported.exporter,
            "export_s": time.perf_counter() - start,
            "max_abs_diff": diff,
            "tolerance": ATOL_REL * max(1.0, float(ref.abs().max())),
        }
        sessions[key] = session
    for b in args.batches:
        feed = {INPUT: x[b].numpy()}
        fns = {}
        for key, model in models.items():
            fns[f"ort:{key}"] = lambda s=sessions[key], feed=feed: s.run([OUTPUT], feed)

            def eager(model: nn.Module = model, xb: torch.Tensor = x[b]) -> None:
                with torch.inference_mode():
                    model(xb)

            fns[f"torch:{key}"] = eager
        stats = alternating_latency(fns, repeats=args.repeats, warmup=args.warmup)
        for key in models:
            rows[key][f"b{b}"] = {
                "ort_ms": 1000 * stats[f"ort:{key}"].median_s,
                "torch_ms": 1000 * stats[f"torch:{key}"].median_s,
                "ort_speedup": 1.0 / paired_ratio(stats, f"ort:{key}", f"torch:{key}"),
                "ort_vs_dense": 1.0 / paired_ratio(stats, f"ort:{key}", "ort:dense"),
                "torch_vs_dense": 1.0 / paired_ratio(stats, f"torch:{key}", "torch:dense"),
            }
    return rows


def print_table(console: Console, name: str, rows: dict[str, Any], args: argparse.Namespace) -> None:
    table = Table(
        title=f"{name} at {args.size} px, {args.classes} classes: median ms ({args.repeats} rounds)"
    )
    for col in ("variant", "params", "exporter", "max|ort-torch|"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for b in args.batches:
        for col in ("ort ms", "torch ms", "ort x", "ort vs dense", "torch vs dense"):
            table.add_column(f"b{b} {col}", justify="right")
    for key, row in rows.items():
        cells = [key, f"{row['params']:,}", row["exporter"], f"{row['max_abs_diff']:.1e}"]
        for b in args.batches:
            r = row[f"b{b}"]
            cells += [
                f"{r['ort_ms']:.2f}",
                f"{r['torch_ms']:.2f}",
                f"{r['ort_speedup']:.2f}",
                f"{r['ort_vs_dense']:.2f}",
                f"{r['torch_vs_dense']:.2f}",
            ]
        table.add_row(*cells)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="64 px, 10 classes, batches 1 and 8, vit_edge, 2 rounds (smoke test)",
    )
    parser.add_argument("--size", type=int, default=None, help="image size (default 224; --quick 64)")
    parser.add_argument("--batches", type=int, nargs=2, default=None, help="two batch sizes (default 1 32)")
    parser.add_argument("--classes", type=int, default=None, help="classes (default 1000; --quick 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and onnxruntime threads (default torch's)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="backbones (default resnet18 vit_tiny; --quick resnet18 vit_edge)",
    )
    args = parser.parse_args()
    args.size = args.size or (64 if args.quick else 224)
    args.batches = sorted(args.batches or ([1, 8] if args.quick else [1, 32]))
    args.classes = args.classes or (10 if args.quick else 1000)
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    console = Console(width=220)
    load_before = load_average()
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or (["vit_edge"] if args.quick else ["resnet18", "vit_tiny"]):
            results[name] = run_model(name, args, Path(tmp))
            print_table(console, name, results[name], args)
    worst = max(
        row["max_abs_diff"] / row["tolerance"] for model in results.values() for row in model.values()
    )
    console.print(
        f"all exports within tolerance: {worst <= 1.0} (worst diff / tolerance {worst:.2g}); threads "
        f"{torch.get_num_threads()}; load average {load_before:.2f} -> {load_average():.2f}"
    )
    print(
        json.dumps(
            {
                "benchmark": "export_latency",
                "size": args.size,
                "classes": args.classes,
                "repeats": args.repeats,
                "batches": args.batches,
                "threads": torch.get_num_threads(),
                "load_average": [load_before, load_average()],
                "within_tolerance": worst <= 1.0,
                "seconds": time.perf_counter() - start,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
