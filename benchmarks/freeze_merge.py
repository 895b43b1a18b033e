"""Layer freezing and layer merging on ResNet-50 at 2x (accelerating_lrd_paper Secs. 2.2-2.3, Table 3).

Variants, all built in this one process from one randomly initialised ResNet-50 (no pretrained weights offline,
so accuracy is not measured here; the merge errors are those of a random-init network on random images):

- ``dense``: the backbone;
- ``lrd``: vanilla LRD, ``decomp=tucker`` at ``ratio 0.5`` with ``experiment=lrd_2x``'s targets (the stem, every
  bottleneck conv, the downsample convs and the fc: Tucker-2 for k x k, SVD for 1x1 and fc; Table 1's setting);
- ``freeze``: ``lrd`` with ``freeze: paper`` (Sec. 2.2: Tucker first + last 1x1 and SVD w0 frozen);
- ``merge``: ``lrd`` merged (Sec. 2.3, Fig. 3, :func:`lrk.decomp.merge.merge_model`, BNs re-fitted on two
  calibration batches): the stem, downsample convs and fc stay factorized (nothing to merge them into);
- ``merge conv2``: the paper's Fig. 3 setting, only every bottleneck's 3x3 conv2 decomposed (tucker, ratio 0.5,
  ``targets: [layer*.*.conv2]``, ``merge: true`` through the method): the dense model's 50 layers;
- for inference also ``dense+bnfold`` and ``merge conv2+bnfold`` (:func:`lrk.decomp.merge.fold_batchnorm`, every
  BN folded into its conv: exact in eval mode, the form one deploys).

Timed with :func:`lrk.measure.alternating_latency` (candidates in rotating order, round after round): one
training step (forward, cross-entropy, backward, AdamW step over the parameters that require grad, as
``LitClassifier.configure_optimizers`` builds it; train mode) at ``--train-batch``, and inference (eval, no grad)
at batch 1 and 32. Speed-ups ``+x %`` = ``t_ref / t - 1`` against the dense model (Table 3's reference) and against
vanilla LRD, two ways: the median over rounds of the per-round ratio (paired) and the ratio of the fastest rounds
(min, the figure least touched by other load on a shared machine); the table shows "med / min". Also: parameters (counted from the modules), trainable
parameters, layers (Conv2d + Linear: all, and the paper's count without the downsample convs), FLOPs of one image
(``lrk.measure.count_flops``), and the merge's measured errors before fine-tuning.

    python benchmarks/freeze_merge.py --quick   # a quarter-width ResNet-50 (same 50 layers) at 64 px, ~20 s
    python benchmarks/freeze_merge.py           # ResNet-50 at 224 px (minutes on 2 CPU cores)

Prints a table and ends with one line of JSON holding every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path

import torch
from _common import classifier_step, inference_call
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from lrk.decomp import build_method
from lrk.decomp.freeze import freeze_model
from lrk.decomp.merge import fold_batchnorm, main_path_layers, merge_model, weight_layers
from lrk.measure import alternating_latency, count_flops, count_params, paired_ratio
from lrk.models import build_backbone

CONF = Path(__file__).resolve().parents[1] / "conf"
#: accelerating_lrd_paper Table 3, ResNet-50 (speed-ups in % against the dense model)
PAPER = {
    "lrd": {"layers": 115, "train": 6.07, "infer": 6.82},
    "freeze": {"layers": 115, "train": 24.57, "infer": 6.82},
    "merge": {"layers": 50, "train": 43.64, "infer": 40.58},
}


def lrd_2x_decomp() -> dict:
    """The ``decomp`` node of ``train.py experiment=lrd_2x`` (tucker, ratio 0.5, its targets)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=lrd_2x"])
    return OmegaConf.to_container(cfg.decomp, resolve=True)


def build_dense(quick: bool, image: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    if quick:  # ResNet-50's depth and layer names at a quarter of its width
        return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=classes, width_per_group=16).eval()
    return build_backbone({"name": "resnet50"}, num_classes=classes, in_chans=3, image_size=image).eval()


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    return classifier_step(model, x, y, torch.optim.AdamW(params, lr=1e-4))


def speedups(stats: dict, names: list[str], ref: str) -> dict[str, float]:
    """+% speed of each candidate against ``ref`` (median over rounds of t_ref / t - 1)."""
    return {n: 100.0 * (1.0 / paired_ratio(stats, n, ref) - 1.0) for n in names}


def min_speedups(stats: dict, names: list[str], ref: str) -> dict[str, float]:
    """+% speed from the fastest round of each (t_ref,min / t_min - 1): the figure least touched by other load."""
    return {n: 100.0 * (stats[ref].min_s / stats[n].min_s - 1.0) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="quarter-width ResNet-50 at 64 px (~20 s)")
    parser.add_argument("--image", type=int, default=None, help="image side (default 224, --quick 64)")
    parser.add_argument("--classes", type=int, default=None, help="classes (default 1000, --quick 10)")
    parser.add_argument(
        "--train-batch", type=int, default=None, help="training batch (default 16, --quick 8)"
    )
    parser.add_argument("--infer-batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --quick 3)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    image = args.image or (64 if args.quick else 224)
    classes = args.classes or (10 if args.quick else 1000)
    train_batch = args.train_batch or (8 if args.quick else 16)
    repeats = args.repeats or (3 if args.quick else 5)
    infer_batches = [int(b) for b in args.infer_batches.split(",") if b]
    torch.set_num_threads(args.threads)
    console = Console(width=260)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    model_name = "ResNet-50 (quarter width)" if args.quick else "ResNet-50"
    console.print(
        f"torch {torch.__version__}, {args.threads} thread(s), {model_name} at {image} px, {classes} classes, "
        f"train batch {train_batch}, {repeats} rounds, load average {load:.2f}"
    )
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, image, image, generator=g) for _ in range(2)]
    dense = build_dense(args.quick, image, classes)
    decomp = lrd_2x_decomp()
    keys = {"name": decomp["name"], "ratio": decomp["ratio"], "targets": decomp["targets"]}

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    lrd = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrd_report = build_method(keys).apply(lrd, calib)
    seconds["lrd"] = time.perf_counter() - start
    freeze = copy.deepcopy(lrd)
    frozen = freeze_model(freeze, "paper")
    start = time.perf_counter()
    merged = copy.deepcopy(lrd)
    originals = {r["name"]: dense.get_submodule(r["name"]) for r in lrd_report.rows}
    merge_report = merge_model(merged, calib, originals)
    seconds["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    merged2 = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report2 = build_method({**keys, "targets": ["layer*.*.conv2"], "merge": True}).apply(merged2, calib)
    seconds["merge conv2"] = time.perf_counter() - start
    models = {"dense": dense, "lrd": lrd, "freeze": freeze, "merge": merged, "merge conv2": merged2}

    figures: dict[str, dict] = {}
    for name, model in models.items():
        flops = count_flops(model.eval(), torch.zeros(1, 3, image, image))
        figures[name] = {
            "params": count_params(model),
            "trainable_params": count_params(model, trainable_only=True),
            "layers": weight_layers(model),
            "layers_paper": main_path_layers(model),
            "flops": float(flops.total),
        }
    rows2 = [r for r in report2.rows if r["kind"].startswith("merged bottleneck")]
    merge_errors = {
        "merge": {
            "blocks": len(merge_report.rows),
            "merge_rel_error_max": max(r["merge_rel_error"] for r in merge_report.rows),
            "rel_error_vs_dense_mean": sum(r["rel_error"] for r in merge_report.rows)
            / len(merge_report.rows),
            "lrd_rel_error_mean": sum(r["lrd_rel_error"] for r in merge_report.rows) / len(merge_report.rows),
            "model_rel_error_vs_lrd": merge_report.model_rel_error,
        },
        "merge conv2": {
            "blocks": len(rows2),
            "merge_rel_error_max": max(r["merge_rel_error"] for r in rows2),
            "rel_error_vs_dense_mean": sum(r["rel_error"] for r in rows2) / len(rows2),
            "lrd_rel_error_mean": sum(r["lrd_rel_error"] for r in rows2) / len(rows2),
        },
    }

    x = torch.randn(train_batch, 3, image, image, generator=g)
    y = torch.randint(0, classes, (train_batch,), generator=g)
    train_names = ["dense", "lrd", "freeze", "merge", "merge conv2"]
    for model in models.values():
        model.train()
    train_stats = alternating_latency(
        {n: train_step(models[n], x, y) for n in train_names}, repeats, warmup=1
    )
    for model in models.values():
        model.eval()
    infer_models = {
        **models,
        "dense+bnfold": fold_batchnorm(dense),
        "merge conv2+bnfold": fold_batchnorm(merged2),
    }
    infer_models.pop("freeze")  # the same inference as lrd (Sec. 2.2)
    infer_stats = {}
    for batch in infer_batches:
        xb = torch.randn(batch, 3, image, image, generator=g)
        infer_stats[batch] = alternating_latency(
            {n: inference_call(m, xb) for n, m in infer_models.items()}, repeats, warmup=1
        )

    results = {
        "config": {
            "quick": args.quick,
            "model": model_name,
            "image": image,
            "classes": classes,
            "train_batch": train_batch,
            "infer_batches": infer_batches,
            "repeats": repeats,
            "threads": args.threads,
            "targets": keys["targets"],
            "ratio": keys["ratio"],
            "method": keys["name"],
        },
        "load_avg_start": load,
        "load_avg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "models": figures,
        "frozen_layers": len(frozen),
        "build_s": seconds,
        "merge": merge_errors,
        "train_step_s": {n: train_stats[n].median_s for n in train_names},
        "train_speedup_vs_dense_pct": speedups(train_stats, train_names, "dense"),
        "train_speedup_vs_lrd_pct": speedups(train_stats, train_names, "lrd"),
        "train_step_min_s": {n: train_stats[n].min_s for n in train_names},
        "train_speedup_vs_dense_pct_min": min_speedups(train_stats, train_names, "dense"),
        "train_speedup_vs_lrd_pct_min": min_speedups(train_stats, train_names, "lrd"),
        "infer_s": {b: {n: s.median_s for n, s in st.items()} for b, st in infer_stats.items()},
        "infer_speedup_vs_dense_pct": {b: speedups(st, list(st), "dense") for b, st in infer_stats.items()},
        "infer_speedup_vs_lrd_pct": {b: speedups(st, list(st), "lrd") for b, st in infer_stats.items()},
        "infer_min_s": {b: {n: s.min_s for n, s in st.items()} for b, st in infer_stats.items()},
        "infer_speedup_vs_dense_pct_min": {
            b: min_speedups(st, list(st), "dense") for b, st in infer_stats.items()
        },
        "infer_speedup_vs_lrd_pct_min": {
            b: min_speedups(st, list(st), "lrd") for b, st in infer_stats.items()
        },
        "paper_resnet50_table3_pct_vs_dense": PAPER,
    }

    t = Table(
        title=f"{model_name} {image} px, tucker ratio 0.5 (experiment=lrd_2x targets; 'merge conv2': conv2 only)"
    )
    for col in [
        "variant",
        "params",
        "trainable",
        "GFLOPs",
        "layers (all)",
        "layers (paper)",
        "train step min",
        "vs dense med/min",
        "vs lrd med/min",
        *[f"infer b{b} min" for b in infer_batches],
        *[f"b{b} vs dense med/min" for b in infer_batches],
        *[f"b{b} vs lrd med/min" for b in infer_batches],
    ]:
        t.add_column(col, justify="left" if col == "variant" else "right")
    r = results

    def pct(med: dict, low: dict, name: str) -> str:
        return f"{med[name]:+.1f} / {low[name]:+.1f} %"

    for name in ["dense", "lrd", "freeze", "merge", "merge conv2", "dense+bnfold", "merge conv2+bnfold"]:
        f = figures.get(name) or figures[name.split("+")[0]]
        trained = name in r["train_step_s"]
        inf = name if name != "freeze" else "lrd"  # freezing leaves inference as it is (Sec. 2.2)
        t.add_row(
            name,
            f"{f['params'] / 1e6:.2f} M",
            f"{f['trainable_params'] / 1e6:.2f} M",
            f"{f['flops'] / 1e9:.3f}",
            str(f["layers"]),
            str(f["layers_paper"]),
            f"{r['train_step_min_s'][name] * 1e3:.0f} ms" if trained else "",
            pct(r["train_speedup_vs_dense_pct"], r["train_speedup_vs_dense_pct_min"], name)
            if trained
            else "",
            pct(r["train_speedup_vs_lrd_pct"], r["train_speedup_vs_lrd_pct_min"], name) if trained else "",
            *[f"{r['infer_min_s'][b][inf] * 1e3:.1f} ms" for b in infer_batches],
            *[
                pct(r["infer_speedup_vs_dense_pct"][b], r["infer_speedup_vs_dense_pct_min"][b], inf)
                for b in infer_batches
            ],
            *[
                pct(r["infer_speedup_vs_lrd_pct"][b], r["infer_speedup_vs_lrd_pct_min"][b], inf)
                for b in infer_batches
            ],
        )
    console.print(t)
    m = merge_errors
    console.print(
        f"merge (before fine-tuning, {len(calib)} calibration batches of random images, random-init weights): "
        f"lrd_2x targets {m['merge']['blocks']} blocks, max block error vs LRD {m['merge']['merge_rel_error_max']:.3f}, "
        f"mean vs dense {m['merge']['rel_error_vs_dense_mean']:.3f} (LRD alone {m['merge']['lrd_rel_error_mean']:.3f}), "
        f"logits vs LRD {m['merge']['model_rel_error_vs_lrd']:.3f}; conv2 targets: max vs LRD "
        f"{m['merge conv2']['merge_rel_error_max']:.3f}, mean vs dense {m['merge conv2']['rel_error_vs_dense_mean']:.3f}"
    )
    console.print(
        "paper Table 3 (ResNet-50, GPU, vs dense): LRD train +6.07 % infer +6.82 %; freezing train +24.57 %; "
        "merging train +43.64 % infer +40.58 %"
    )
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
