"""Lightning DDP (lrk.distributed): 2 CPU processes through train.py against one process with the same global batch,
rank-zero writes, the cross-rank reductions, bad device counts, a dead rank, resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lrk.distributed import check_devices
from lrk.errors import LrkConfigError
from lrk.layers.attention.sdrm import SDRMStats
from lrk.summary import read_summary
from lrk.train import run

REPO = Path(__file__).resolve().parent.parent

#: the tiny run of tests/conftest.py (TINY; later overrides win) made exact-able across process counts: split sizes 48/16/16 (even, so
#: DistributedSampler pads nothing), no shuffling (rank r gets images r, r+2, ...: each global batch of 2B is the
#: union of the two ranks' batches of B), no augmentation, no dropout, equal class weights (the mean of the ranks'
#: mean losses is then the global mean loss, and DDP's averaged gradient the one-process gradient)
EXACT = [
    *TINY,
    "data.num_samples=80",
    "data.val_fraction=0.2",
    "data.test_fraction=0.2",
    "data.augment=false",
    "+data.shuffle=false",
    "data.class_weighting=none",
]
B = 8  # images per rank and batch


def train_py(run_dir: Path, *overrides: str, env: dict[str, str] | None = None, timeout: float = 240):
    """``python train.py`` in a subprocess with its run dir at ``run_dir`` (logs under its parent)."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    environ.update(PROJECT_ROOT=str(run_dir.parent), WANDB_SILENT="true", **(env or {}))
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=str(REPO),
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_cfg, tmp_path):
    ddp_dir = tmp_path / "ddp"
    done = train_py(ddp_dir, *EXACT, f"data.batch_size={B}", "trainer=ddp_cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    single = tiny_cfg(*EXACT, f"data.batch_size={2 * B}", run="single")
    single_metrics = run(single)

    # one summary, by rank zero, of a run on 2 ranks; the tables once; rank 1 ran (its own log) but wrote nothing
    files = sorted(p.name for p in ddp_dir.iterdir())
    assert files.count("summary.json") == 1 and not [f for f in files if ".tmp" in f]
    assert "train_ddp_process_1.log" in files and "confusion_matrix.csv" in files
    summary = read_summary(ddp_dir)
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["extra"]["distributed"] == {"world_size": 2, "max_abs_diff": {"fit": 0.0, "test": 0.0}}
    ddp = summary["metrics"]
    # the confusion matrix counts every test image once (nothing padded, nothing counted per rank)
    confusion = summary["extra"]["test_confusion_matrix"]
    assert sum(map(sum, confusion)) == summary["extra"]["data"]["split_sizes"]["test"] == 16
    rows = (ddp_dir / "confusion_matrix.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(confusion)

    for key in ("train/loss", "val/loss", "test/loss"):
        assert ddp[key] == pytest.approx(single_metrics[key], abs=1e-5), key
    for key in (
        "train/acc",
        "val/acc",
        "val/bal_acc",
        "val/f1",
        "test/acc",
        "test/bal_acc",
        "test/acc_majority",
    ):
        assert ddp[key] == pytest.approx(single_metrics[key], abs=1e-6), key
    assert ddp["model/params"] == single_metrics["model/params"]
    ours, theirs = model_weights(ddp_dir), model_weights(Path(single.paths.output_dir))
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    # 6 AdamW steps: the sums of the two ranks' gradients differ from one process's in the last bits, and Adam's
    # first steps (m / sqrt(v)) magnify that on near-zero gradients: measured 6e-6 at most, on qkv.bias
    assert worst < 5e-5, f"trained weights differ by {worst}"
    moved = max((ours[k] - model_weights_init(single)[k]).abs().max().item() for k in ours)
    assert moved > 1e-3  # the weights trained (the equality above is not that of two untouched models)


def model_weights_init(cfg) -> dict[str, torch.Tensor]:
    """The freshly built model of ``cfg`` (seeded as run does) as ``model.*`` entries."""
    import lightning as L

    from lrk.data import build_datamodule
    from lrk.models import build_backbone

    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg.data)
    dm.prepare()
    model = build_backbone(
        cfg.backbone, num_classes=dm.num_classes, in_chans=dm.in_chans, image_size=dm.image_size
    )
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def test_each_rank_reads_its_share_of_the_split(tiny_cfg):
    """Under DDP the datamodule's own DistributedSampler: rank r gets images r, r + 2, ... in split order with
    ``data.shuffle=false``; shuffled, the two shares still split the train set exactly."""
    from types import SimpleNamespace

    from lrk.data import build_datamodule

    def images(shuffle: str, rank: int | None) -> torch.Tensor:
        overrides = [o for o in EXACT if "shuffle" not in o]
        dm = build_datamodule(tiny_cfg(*overrides, f"data.batch_size={B}", f"+data.shuffle={shuffle}").data)
        dm.prepare()
        if rank is not None:
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, accelerator=None)
        return torch.cat([x for x, _ in dm.train_dataloader()])

    whole = images("false", None)
    assert torch.equal(images("false", 0), whole[0::2]) and torch.equal(images("false", 1), whole[1::2])
    shuffled = torch.cat([images("true", 0), images("true", 1)])
    assert not torch.equal(shuffled, torch.cat([whole[0::2], whole[1::2]]))  # the order did change
    key = lambda x: sorted(map(tuple, x.flatten(1).tolist()))  # noqa: E731
    assert key(shuffled) == key(whole)  # every train image once, on one rank


def test_a_rank_other_than_zero_writes_no_file(tiny_cfg, monkeypatch):
    """What ranks 1.. skip: summary.json and the tables (rank read as Lightning sets it from LOCAL_RANK)."""
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    cfg = tiny_cfg(
        "trainer.max_epochs=1", "decomp=svd", "decomp.rank=4", "callbacks.inference_benchmark=null"
    )
    metrics = run(cfg)
    assert metrics["test/acc"] >= 0
    run_dir = Path(cfg.paths.output_dir)
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / "decomp_layers.csv").exists() and not (run_dir / "confusion_matrix.csv").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    cfg = tiny_cfg(
        "trainer.max_epochs=1",
        "decomp=svd",
        "decomp.rank=4",
        "callbacks.inference_benchmark=null",
        run="zero",
    )
    run(cfg)
    assert (Path(cfg.paths.output_dir) / "decomp_layers.csv").is_file()
    assert read_summary(cfg.paths.output_dir)["status"] == "completed"


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"accelerator": "cpu", "devices": (os.cpu_count() or 1) + 1}, "at most"),
        ({"accelerator": "cpu", "devices": 0}, "trainer.devices=0"),
        ({"accelerator": "cpu", "devices": True}, "trainer.devices=True"),
    ],
)
def test_device_counts_beyond_the_machine_are_refused(trainer, message):
    with pytest.raises(LrkConfigError, match=message.replace("(", r"\(")):
        check_devices(trainer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_ddp_without_cuda_is_one_error_before_training(tiny_cfg):
    cfg = tiny_cfg("trainer=ddp")
    with pytest.raises(
        LrkConfigError,
        match=re.escape("trainer.strategy=lrk.distributed.DDPStrategy with trainer.accelerator=gpu"),
    ):
        run(cfg)
    summary = read_summary(cfg.paths.output_dir)
    assert summary["status"] == "failed" and "CUDA" in summary["error"]
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_too_many_cpu_processes_is_one_error_before_training(tiny_cfg):
    cfg = tiny_cfg("trainer=ddp_cpu", f"trainer.devices={(os.cpu_count() or 1) + 1}")
    with pytest.raises(LrkConfigError, match=f"trainer.devices={(os.cpu_count() or 1) + 1} is invalid"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


# --- collectives on 2 gloo processes (torch.multiprocessing, no Lightning) ----------------------------------
def _collectives(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from lrk.distributed import align_with_rank_zero, structure_fingerprint
    from lrk.layers.attention.stats import reduce_across_ranks, reduced_stats

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    # statistics: rank r ran r + 1 forwards of rank 2 + r, 10 s and 1 s of t-SVDs, last error only on rank 1
    st = SDRMStats(forwards=rank + 1, factorizations=rank + 1, rank_sum=float((rank + 1) * (2 + rank)))
    st.rr_seconds = 10.0 if rank == 0 else 1.0
    st.last_rel_error = 0.5 if rank == 1 else None
    (reduced,) = reduce_across_ranks([st])
    module = nn.Module()
    module.stats = st
    with reduced_stats(module):
        inside = module.stats.factorizations
    # models: the same structure, values that differ by 0.25 on rank 1
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.add_(0.25 * rank)
    diff = align_with_rank_zero(model)
    result = {
        "forwards": reduced.forwards,
        "rank_mean": reduced.rank_sum / reduced.factorizations,
        "rr_seconds": reduced.rr_seconds,
        "last_rel_error": reduced.last_rel_error,
        "own_after": module.stats.factorizations,
        "inside": inside,
        "diff": diff,
        "weight": model.weight.tolist(),
        "fingerprint": structure_fingerprint(model),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_statistics_and_weights_are_combined_over_two_processes(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    # fork: the children start with lrk imported (spawn re-imports torch: ~10 s per process on 2 busy cores)
    torch.multiprocessing.start_processes(
        _collectives, args=(2, init, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["forwards"] == 1 + 2  # counts add
        assert res["rank_mean"] == pytest.approx(
            (1 * 2 + 2 * 3) / 3
        )  # the mean over all ranks' factorizations
        assert res["rr_seconds"] == 10.0  # the slowest rank's time
        assert res["last_rel_error"] == 0.5  # the mean over the ranks that have one
        assert res["inside"] == 3 and res["own_after"] == rank + 1  # reduced inside the block only
        assert res["diff"] == pytest.approx(0.25)
    assert results[0]["weight"] == results[1]["weight"]  # rank zero's values everywhere after the check
    assert results[0]["fingerprint"] == results[1]["fingerprint"]


def test_pruning_decision_of_rank_zero_stops_every_rank():
    """A rank other than zero has no trial; the decision rank zero broadcasts ends its fit too."""
    optuna = pytest.importorskip("optuna")
    from lrk.search.pruning import OptunaPruningCallback

    class Strategy:
        def __init__(self, value):
            self.value, self.calls = value, 0

        def broadcast(self, obj, src=0):
            self.calls += 1
            return self.value

    class Trainer:
        sanity_checking, world_size, is_global_zero, callback_metrics, current_epoch = False, 2, False, {}, 0

        def __init__(self, value):
            self.strategy = Strategy(value)

    callback = OptunaPruningCallback(monitor="val/acc")
    quiet = Trainer(None)
    callback.on_validation_end(quiet, None)  # rank zero did not prune: nothing happens
    assert quiet.strategy.calls == 1
    with pytest.raises(optuna.TrialPruned, match="trial 3 pruned"):
        callback.on_validation_end(Trainer("trial 3 pruned at step 1 (value 0.5)"), None)


# --- failures and resume (slow: several 2-process runs) ------------------------------------------------------
CALLBACKS = '''
import os
from lightning.pytorch.callbacks import Callback


class DieAt(Callback):
    """Rank ``rank`` ends its process (os._exit, as a killed process would) when epoch ``epoch`` starts."""

    def __init__(self, rank, epoch):
        self.rank, self.epoch = rank, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
            os._exit(3)


class CrashAt(Callback):
    """Every rank raises when epoch ``epoch`` starts (after last.ckpt of the epoch before was saved)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")
'''


@pytest.mark.slow
def test_a_dead_rank_fails_the_run_without_hanging(tmp_path):
    (tmp_path / "ddp_helpers.py").write_text(CALLBACKS)
    run_dir = tmp_path / "dead"
    done = train_py(
        run_dir,
        *EXACT,
        f"data.batch_size={B}",
        "trainer=ddp_cpu",
        "trainer.max_epochs=3",
        "trainer.strategy.timeout=30",
        "+callbacks.die={_target_: ddp_helpers.DieAt, rank: 1, epoch: 1}",
        env={"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])},
        timeout=120,  # far below the default timeout: the run must not wait for the dead rank
    )
    assert done.returncode != 0
    summary = read_summary(run_dir)
    assert summary["status"] == "failed", summary["error"]
    assert "rank 1" in summary["error"], summary["error"]
    print(summary["error"])


@pytest.mark.slow
def test_an_interrupted_ddp_fit_resumes_from_its_run_dir(tmp_path):
    (tmp_path / "ddp_helpers.py").write_text(CALLBACKS)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    common = [*EXACT, f"data.batch_size={B}", "trainer=ddp_cpu", "trainer.max_epochs=3"]
    crashed = tmp_path / "crashed"
    done = train_py(crashed, *common, "+callbacks.crash={_target_: ddp_helpers.CrashAt, epoch: 2}", env=env)
    assert done.returncode != 0
    assert read_summary(crashed)["status"] == "failed"
    assert (crashed / "checkpoints" / "last.ckpt").is_file()
    resumed = tmp_path / "resumed"
    done = train_py(resumed, *common, f"ckpt_path={crashed}", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_summary(resumed)["status"] == "completed"
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 2  # 0-based: three epochs in all, the last one trained after the resume
    lines = (resumed / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    epochs = {
        row.split(",")[header.index("epoch")]
        for row in lines[1:]
        if row.split(",")[header.index("train/loss")]
    }
    assert epochs == {"2"}, "the resumed fit trains only the missing epoch"


def test_distributed_heads_with_ddp_is_one_clear_error_before_training(tiny_cfg):
    from lrk.summary import read_summary
    from lrk.train import run

    cfg = tiny_cfg("trainer=ddp_cpu", "decomp=sdrm", "decomp.distributed_heads=true")
    with pytest.raises(LrkConfigError, match=r"distributed_heads=true with trainer\.strategy=ddp is invalid"):
        run(cfg)
    assert read_summary(cfg.paths.output_dir)["status"] == "failed"
