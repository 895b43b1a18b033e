"""FLOPs per image of whole models under every attention method, against the dense model, on real images.

Each model is built as ``python train.py decomp=<name> data=<data>`` builds it: the backbone of
``conf/backbone/<backbone>.yaml``, the method's ``apply`` with the default calibration batches of the data, and
then ``lrk.measure.count_flops`` on one batch of ``data.batch_size`` images of the validation split, divided by
the batch size: the figures ``ModelStats`` logs as

- ``model/flops``: every matmul / convolution / attention product (2 per multiply-add) and the factorizations
  below; elementwise ops, softmax and norms left out;
- ``model/flops_attention``: the part inside ``F.scaled_dot_product_attention`` (QK^T and AV, counted by lrk
  because torch's counter gives 0 for it on the CPU); a method that forms its T x T products with plain matmuls
  has them in ``model/flops`` only;
- ``model/flops_factorization``: eigh / SVD / QR / Cholesky inside the forward (Golub & Van Loan operation
  counts, ``lrk/measure/flops.py``), at the batch the method runs with; part of ``model/flops``.

The weights are the untrained initialisation: SDRM's and PCA's energy ranks depend on the activations, so their
FLOPs are those of this model on these images. A count, not a timing: the machine's load does not matter.

    python benchmarks/model_flops.py --quick      # synthetic images, a 2-block ViT, seconds
    python benchmarks/model_flops.py              # vit_edge on 64 px elpv (the main job's model)

Prints a table and ends with one line of JSON holding every figure.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from lrk.data import build_datamodule
from lrk.decomp import METHODS, build_method
from lrk.decomp.attention.base import AttentionSwapMethod
from lrk.measure import count_flops, count_params
from lrk.models import build_backbone

CONF = Path(__file__).resolve().parents[1] / "conf"
QUICK = [
    "data=synthetic",
    "data.num_samples=96",
    "data.image_size=32",
    "data.batch_size=16",
    "backbone.dim=64",
    "backbone.depth=2",
    "backbone.num_heads=2",
]


def attention_methods() -> list[str]:
    """Every registered attention method (the registry, not a hand-kept list)."""
    return sorted(name for name, cls in METHODS.items() if issubclass(cls, AttentionSwapMethod))


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def model_flops(decomp: str, overrides: list[str]) -> dict[str, float]:
    """The ``model/*`` FLOP figures of one grid point (see the module docstring)."""
    cfg = composed([f"decomp={decomp}", *overrides])
    torch.manual_seed(int(cfg.seed))
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare()
    model = build_backbone(
        cfg.backbone,
        num_classes=datamodule.num_classes,
        in_chans=datamodule.in_chans,
        image_size=datamodule.image_size,
    )
    count = cfg.decomp.get("calibration_batches")
    method = build_method(OmegaConf.to_container(cfg.decomp, resolve=True))
    report = method.apply(model, datamodule.calibration_batches(4 if count is None else int(count)))
    images = next(iter(datamodule.val_dataloader()))[0][: int(cfg.data.batch_size)]
    flops = count_flops(model, images)
    batch = images.shape[0]
    return {
        "model/params": float(count_params(model)),
        "model/flops": flops.total / batch,
        "model/flops_attention": flops.attention / batch,
        "model/flops_factorization": flops.factorization / batch,
        "decomp/rank_mean": float(report.metrics().get("decomp/rank_mean", float("nan"))),
        "batch": float(batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic 32 px images, a 2-block ViT")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data.image_size=96")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = (QUICK if args.quick else ["data=surface_defect"]) + list(args.overrides)
    rows = {name: model_flops(name, overrides) for name in ["none", *attention_methods()]}
    dense = rows["none"]["model/flops"]

    table = Table(title=f"FLOPs per image, {' '.join(overrides)} (counted on one batch of real images)")
    for column in ("decomp", "model/flops", "x dense", "attention (SDPA)", "factorization", "rank mean"):
        table.add_column(column, justify="left" if column == "decomp" else "right")
    for name, row in rows.items():
        table.add_row(
            name,
            f"{row['model/flops'] / 1e6:.1f} M",
            f"{row['model/flops'] / dense:.3f}",
            f"{row['model/flops_attention'] / 1e6:.2f} M",
            f"{row['model/flops_factorization'] / 1e6:.3f} M",
            "" if name == "none" else f"{row['decomp/rank_mean']:.1f}",
        )
    Console().print(table)
    print(json.dumps({"benchmark": "model_flops", "overrides": overrides, "rows": rows}))


if __name__ == "__main__":
    main()
