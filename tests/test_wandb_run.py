"""W&B as a dashboard source: the attributes of a real offline run (group, job type, tags, flattened config, summary
definitions, read back from ``wandb.run`` before it finishes) and the workspace spec of ``lrk.wandb_dashboard``,
built and checked offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, TINY, compose_train
from omegaconf import open_dict

import lrk.train
from lrk.errors import LrkConfigError
from lrk.wandb_dashboard import build_workspace, check_spec, main, searched_keys, workspace_spec
from lrk.wandb_run import TAG_MAX, run_tags, wandb_settings

pytest.importorskip("wandb")
pytest.importorskip("wandb_workspaces")


def plain(value: Any) -> Any:
    return dict(value) if hasattr(value, "keys") else value


@pytest.fixture
def captured(monkeypatch) -> dict[str, Any]:
    """What ``wandb.run`` holds when lrk.train finishes it (the attributes are gone after ``wandb.finish``)."""
    got: dict[str, Any] = {}
    real = lrk.train._finish_wandb

    def capture(status: str) -> None:
        import wandb

        run = wandb.run
        if run is not None:
            got.update(group=run.group, job_type=run.job_type, tags=list(run.tags), config=dict(run.config))
            got["summary"] = {k: plain(v) for k, v in dict(run.summary).items()}
            got["dir"] = run.dir
        real(status)

    monkeypatch.setattr(lrk.train, "_finish_wandb", capture)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return got


def test_an_offline_run_carries_group_job_type_tags_config_and_summaries(tmp_path, captured):
    overrides = [o for o in TINY if o != "logger=csv"]
    overrides += ["logger=many", "decomp=svd", "decomp.rank=4", "tags=[mine]", "task_name=exp1"]
    cfg = compose_train(overrides, tmp_path)
    with open_dict(cfg):  # as the lrk sweeper hands a trial (++optuna.study=..., ++optuna.trial=...)
        cfg.optuna.study = "study_a"
        cfg.optuna.trial = 3
    metrics = lrk.train.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert captured, "no W&B run was started"
    assert captured["group"] == "study_a"  # a sweep's trials are grouped under the study name
    assert captured["job_type"] == "svd"
    assert captured["tags"] == [
        "data:synthetic",
        "backbone:vit_edge",
        "decomp:svd",
        "stage:init",
        "trial:3",
        "mine",
    ]
    config = captured["config"]
    assert config["decomp/rank"] == 4 and config["decomp/name"] == "svd"
    assert config["model/lr"] == cfg.model.lr and config["data/image_size"] == 16
    assert config["optuna/study"] == "study_a"
    # summaries against the CSV log of the same run: best val/acc, lowest val/loss, last test/* and time/*
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    val_loss = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val_acc) == 2  # two epochs
    summary = captured["summary"]
    assert summary["val/acc"] == {"max": pytest.approx(max(val_acc))}
    assert summary["val/loss"] == {"min": pytest.approx(min(val_loss))}
    assert summary["test/acc"] == pytest.approx(metrics["test/acc"])
    assert summary["time/train_s"] == pytest.approx(metrics["time/train_s"])
    assert summary["model/params"] == metrics["model/params"]
    # the offline run is on disk for `wandb sync`
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_outside_a_sweep_the_group_is_the_experiment(tmp_path):
    cfg = compose_train(
        [*TINY, "task_name=exp2", "decomp=tucker", "decomp.stage=post", f"tags=[{'x' * 80}]"], tmp_path
    )
    node = {"group": cfg.task_name, "job_type": cfg.decomp.name, "tags": list(cfg.tags)}
    settings = wandb_settings(cfg, node)
    assert settings["group"] == "exp2" and settings["job_type"] == "tucker"
    assert settings["tags"] == [
        "data:synthetic",
        "backbone:vit_edge",
        "decomp:tucker",
        "stage:post",
        "x" * TAG_MAX,
    ]
    assert settings["config"]["decomp/stage"] == "post" and "decomp" not in settings["config"]
    # duplicates dropped, order kept (the backbone is Hydra's choice here: the config composed above)
    assert run_tags({"data": {"name": "d"}, "backbone": {"name": "vit"}, "tags": ["a", "a"]}) == [
        "data:d",
        "backbone:vit_edge",
        "decomp:none",
        "stage:init",
        "a",
    ]


# --- the workspace ------------------------------------------------------------------------------------------------
def expected_columns(search: str) -> list[str]:
    """The accessors of a search's parallel-coordinates panel, read from its yaml here: every param whose value
    is a sweep (not null, not a fixed value) as a flattened config key, then its objectives and test/acc."""
    node = yaml.safe_load((REPO / "conf" / "hparams_search" / f"{search}.yaml").read_text())
    params = node["hydra"]["sweeper"]["params"]
    keys = []
    for key, value in params.items():
        if isinstance(value, str) and value.split("(")[0].strip() in {"interval", "choice", "range", "tag"}:
            name = f"{key}/name" if (REPO / "conf" / key).is_dir() else key.replace(".", "/")
            keys.append(f"config:{name}.value")
    objectives = node.get("optimized_metric", "val/bal_acc")
    objectives = objectives if isinstance(objectives, list) else [objectives]
    return keys + [f"summary:{m}" for m in dict.fromkeys([*objectives, "test/acc"])]


def panels(spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {s["name"]: s["panels"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}


def test_the_workspace_spec_has_the_panels_of_the_metric_vocabulary():
    workspace = build_workspace("team", "lrk", "lrk view", ["sdrm_energy", "pareto_decomp"])
    spec = check_spec(workspace)  # serialised and parsed back without the network
    assert spec["entity"] == "team" and spec["project"] == "lrk" and spec["displayName"] == "lrk view"
    by_section = panels(spec)
    assert list(by_section) == [
        "Accuracy vs compression",
        "Where the time goes",
        "Learning",
        "Search: sdrm_energy",
        "Search: pareto_decomp",
    ]
    scatter = by_section["Accuracy vs compression"]
    assert {p["viewType"] for p in scatter} == {"Scatter Plot"}
    assert ("summary:model/compression", "summary:test/acc") in {
        (p["config"]["xAxis"], p["config"]["yAxis"]) for p in scatter
    }
    bars = by_section["Where the time goes"][0]
    assert bars["viewType"] == "Bar Chart"
    assert bars["config"]["metrics"] == ["time/rr_s", "time/mha_s", "time/train_s", "time/val_s"]
    lines = by_section["Learning"]
    assert {p["viewType"] for p in lines} == {"Run History Line Plot"}
    assert any("val/acc" in p["config"]["metrics"] for p in lines)
    for search in ("sdrm_energy", "pareto_decomp"):
        (parallel,) = by_section[f"Search: {search}"]
        assert parallel["viewType"] == "Parallel Coordinates Plot"
        assert [c["accessor"] for c in parallel["config"]["columns"]] == expected_columns(search)
    logs = {c["accessor"]: c["log"] for c in by_section["Search: sdrm_energy"][0]["config"]["columns"]}
    assert logs["config:model/lr.value"] is True and logs["config:decomp/energy.value"] is None
    # runs grouped by W&B group (experiment / study), then job type (decomposition)
    grouping = spec["spec"]["section"]["runSets"][0]["grouping"]
    assert [g["name"] for g in grouping] == ["group", "jobType"]


def test_searched_keys_leave_fixed_values_out():
    assert searched_keys("sdrm_energy") == {
        "decomp/energy": False,
        "decomp/block_size": False,
        "model/lr": True,
    }


def test_the_command_dry_run_writes_the_spec(tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert main(["--entity", "e", "--project", "p", "--dry-run", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())

    def content(s: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:  # panels get fresh random ids
        return [(n, [(p["viewType"], p["config"]) for p in ps]) for n, ps in panels(s).items()]

    assert content(spec) == content(workspace_spec(build_workspace("e", "p")))
    assert len(panels(spec)) == 3 + len(list((REPO / "conf" / "hparams_search").glob("*.yaml")))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "--entity and --project missing"),
        (["--entity", "e"], "--project missing"),
        (["--project", "p", "--dry-run"], "--entity missing"),
        (["--entity", "e", "--project", "p", "--search", "nope", "--dry-run"], "--search nope is neither"),
        (["--entity", " ", "--project", "p", "--dry-run"], "--entity is empty"),
    ],
)
def test_bad_dashboard_input_is_one_error_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lrk: error: ") and needle in err[0], err


def test_a_search_file_without_params_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimized_metric: val/acc\n")
    with pytest.raises(LrkConfigError, match=r"has no hydra\.sweeper\.params"):
        searched_keys(bad)
