"""Every choice of every grid axis composes with the root config and resolves."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("data", choices("data"))
@pytest.mark.parametrize("backbone", choices("backbone"))
def test_every_data_and_backbone_choice_composes(tmp_path: Path, data: str, backbone: str):
    cfg = compose_train([f"data={data}", f"backbone={backbone}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["name"] == data
    assert resolved["backbone"]["name"] in {"vit", backbone}
    assert resolved["callbacks"]["model_checkpoint"]["monitor"] == "val/bal_acc"


@pytest.mark.parametrize("group", ["decomp", "trainer", "logger", "callbacks", "experiment"])
def test_every_other_choice_composes(tmp_path: Path, group: str):
    for choice in choices(group):
        cfg = compose_train([f"{group}={choice}"], tmp_path)
        OmegaConf.to_container(cfg, resolve=True)


def test_defaults_are_the_headline_run(tmp_path: Path):
    cfg = compose_train([], tmp_path)
    assert (cfg.data.name, cfg.data.source, cfg.decomp.name) == ("surface_defect", "elpv", "none")
    assert (cfg.backbone.name, cfg.backbone.stem, cfg.backbone.depth) == ("vit", "conv", 4)  # vit_hybrid
    assert cfg.logger.wandb.offline is True and "csv" in cfg.logger


def test_a_list_of_optimized_metrics_monitors_the_first(tmp_path: Path):
    cfg = compose_train(["optimized_metric=[val/acc_best,model/params]"], tmp_path)
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc_best"


@pytest.mark.parametrize(
    ("variant", "decomp", "distilled"),
    [("nrr", "none", False), ("deit", "none", True), ("sdrm", "sdrm", False), ("trawl", "trawl", False)],
)
def test_sdrm_paper_variants_set_backbone_and_method(
    tmp_path: Path, variant: str, decomp: str, distilled: bool
):
    cfg = compose_train(["experiment=sdrm_paper", f"sdrm_variant={variant}"], tmp_path)
    assert (cfg.decomp.name, cfg.backbone.distilled) == (decomp, distilled)
    assert (cfg.data.name, cfg.data.class_weighting, cfg.task_name) == (
        "surface_defect",
        "inverse",
        "sdrm_paper",
    )


def test_vit_nla_sweeps_every_attention_method_that_exists(tmp_path: Path):
    from lrk.decomp import METHODS, build_method

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=vit_nla"], return_hydra_config=True)
    methods = cfg.hydra.sweeper.params.decomp.split(",")
    assert methods == ["none", "cholesky", "pca", "attn_svd", "attn_tensor"]
    for name in methods:
        assert name in METHODS
        build_method(compose_train(["experiment=vit_nla", f"decomp={name}"], tmp_path).decomp)
