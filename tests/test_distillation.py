"""DeiT distillation (``model.teacher``, lrk.lit.distillation): the loss against a hand computation (hard and soft,
with and without a distillation token), the teacher frozen through a real training step, the teacher checks
(lrk.pipeline.teacher.build_teacher), and a teacher run + distilled student run through lrk.train end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrk.errors import LrkConfigError
from lrk.lit import LitClassifier
from lrk.lit.distillation import DistillationLoss, check_distillation
from lrk.models import build_backbone
from lrk.pipeline.teacher import build_teacher, distillation_terms

WEIGHTS = torch.tensor([0.7, 1.6, 1.1])


def quiet(lit: LitClassifier) -> LitClassifier:
    lit.log = lambda *args, **kwargs: None  # no trainer: logging is not what is tested here
    return lit


def hand_ce(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """Weighted cross-entropy sum_i w_yi (-log p_i,yi) / sum_i w_yi, from exp and log of plain floats."""
    total, norm = 0.0, 0.0
    for row, label in zip(z.tolist(), y.tolist(), strict=True):
        log_sum = math.log(sum(math.exp(v) for v in row))
        weight = 1.0 if w is None else float(w[label])
        total += weight * (log_sum - row[label])
        norm += weight
    return total / norm


def hand_kl(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> float:
    """mean_i sum_c p_t log(p_t / p_s) at temperature tau, from plain floats."""
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist(), strict=True):
        ps = [math.exp(v / tau) for v in s_row]
        pt = [math.exp(v / tau) for v in t_row]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(t * math.log(t / s) for s, t in zip(ps, pt, strict=True))
    return total / len(zs)


def linear_pair(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    return student, teacher, x, y


# --- the loss ------------------------------------------------------------------------------------------------
def test_hard_distillation_without_token_is_half_ce_labels_plus_half_ce_teacher_argmax() -> None:
    student, teacher, x, y = linear_pair()
    term = DistillationLoss(teacher, mode="hard", head="logits")
    lit = quiet(LitClassifier(student, num_classes=3, class_weights=WEIGHTS, loss_terms=[term]))
    loss = lit.training_step((x, y), 0)
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
    y_t = zt.argmax(dim=1)
    assert not torch.equal(y_t, y)  # the teacher disagrees with the labels somewhere: both terms matter
    expected = 0.5 * hand_ce(zs, y, WEIGHTS) + 0.5 * hand_ce(zs, y_t)  # the teacher term has no class weights
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("tau", "alpha"), [(3.0, 0.1), (1.0, 0.5), (0.5, 1.0)])
def test_soft_distillation_without_token_matches_the_deit_formula(tau: float, alpha: float) -> None:
    student, teacher, x, y = linear_pair(1)
    term = DistillationLoss(teacher, mode="soft", temperature=tau, alpha=alpha, head="logits")
    lit = quiet(LitClassifier(student, num_classes=3, class_weights=WEIGHTS, loss_terms=[term]))
    loss = lit.training_step((x, y), 0)
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
    expected = (1 - alpha) * hand_ce(zs, y, WEIGHTS) + alpha * tau**2 * hand_kl(zs, zt, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def tiny_deit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = {"name": "vit", "dim": 16, "depth": 1, "num_heads": 2, "distilled": True}
    return build_backbone(cfg, num_classes=3, in_chans=1, image_size=8)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_with_a_distillation_token_labels_train_the_class_head_and_the_teacher_the_dist_head(
    mode: str,
) -> None:
    student = tiny_deit()
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    term = DistillationLoss(teacher, mode=mode, temperature=2.0, alpha=0.3, head="dist")
    lit = quiet(LitClassifier(student, num_classes=3, class_weights=WEIGHTS, loss_terms=[term]))
    loss = lit.training_step((x, y), 0)
    with torch.no_grad():
        z_cls, z_dist = student.forward_heads(x)
        zt = teacher(x)
    if mode == "hard":
        expected = 0.5 * hand_ce(z_cls, y, WEIGHTS) + 0.5 * hand_ce(z_dist, zt.argmax(dim=1))
    else:
        expected = 0.7 * hand_ce(z_cls, y, WEIGHTS) + 0.3 * 4.0 * hand_kl(z_dist, zt, 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the gradient of the teacher term reaches the distillation head only, the label CE's the class head only
    loss.backward()
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    student.zero_grad()
    term(lit_with_heads(lit, x), x, y, None).backward()
    assert student.head.weight.grad is None or student.head.weight.grad.abs().sum() == 0
    assert student.head_dist.weight.grad.abs().sum() > 0


def lit_with_heads(lit: LitClassifier, x: torch.Tensor) -> LitClassifier:
    lit.head_logits = lit.model.forward_heads(x)
    return lit


def test_without_teacher_a_deit_still_trains_on_the_mean_of_its_heads() -> None:
    """No loss term: today's behaviour (one CE on the averaged output) is kept."""
    student = tiny_deit()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    loss = quiet(LitClassifier(student, num_classes=3)).training_step((x, y), 0)
    with torch.no_grad():
        z_cls, z_dist = student.forward_heads(x)
    assert loss.item() == pytest.approx(hand_ce((z_cls + z_dist) / 2, y), rel=1e-5)


def test_dist_head_term_on_a_model_without_token_is_a_config_error() -> None:
    student, teacher, x, y = linear_pair()
    lit = quiet(LitClassifier(student, num_classes=3, loss_terms=[DistillationLoss(teacher, head="dist")]))
    with pytest.raises((LrkConfigError, AttributeError)):
        lit.training_step((x, y), 0)


# --- the teacher is frozen -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_teacher_gets_no_gradient_and_keeps_its_weights_through_a_fit(mode: str) -> None:
    torch.manual_seed(0)
    student = tiny_deit()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    teacher.train()  # DistillationLoss puts it in eval mode: BatchNorm statistics must not move either
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    seen_grads = []

    class Watch(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            seen_grads.append([p.grad for p in teacher.parameters()])

    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    lit = LitClassifier(student, num_classes=3, loss_terms=[DistillationLoss(teacher, mode=mode)])
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=[Watch()],
    )  # fmt: skip
    trainer.fit(lit, DataLoader(data, batch_size=8))
    assert len(seen_grads) == 2 and all(g is None for grads in seen_grads for g in grads)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert "train/distill" in trainer.logged_metrics
    assert not any(k.startswith("loss_terms") or "teacher" in k for k in lit.state_dict())


# --- config checks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "tau", "alpha", "match"),
    [
        ("medium", 3.0, 0.1, r"model\.distillation='medium' is invalid: valid modes are hard, soft"),
        ("soft", 0.0, 0.1, r"model\.distill_temperature=0\.0 is invalid: it must be a number > 0"),
        ("soft", -1, 0.1, r"model\.distill_temperature=-1 is invalid"),
        ("soft", 3.0, 1.5, r"model\.distill_alpha=1\.5 is invalid: it must be in \[0, 1\]"),
    ],
)
def test_bad_distillation_keys_are_config_errors(mode, tau, alpha, match) -> None:
    with pytest.raises(LrkConfigError, match=match):
        check_distillation(mode, tau, alpha)
    with pytest.raises(LrkConfigError, match=match):
        DistillationLoss(nn.Linear(2, 2), mode=mode, temperature=tau, alpha=alpha)


def test_distilled_true_on_a_resnet_names_the_backbones_with_a_token() -> None:
    with pytest.raises(
        LrkConfigError, match=r"backbone\.distilled=True is invalid for backbone 'resnet18'.*vit"
    ):
        build_backbone({"name": "resnet18", "distilled": True}, num_classes=2, in_chans=1, image_size=16)


def test_missing_teacher_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(LrkConfigError, match=r"model\.teacher='.*nowhere' is invalid: .*does not exist"):
        build_teacher(tmp_path / "nowhere", 2, 1, 16)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(LrkConfigError, match=r"model\.teacher='.*empty_run' is invalid: no checkpoint"):
        build_teacher(tmp_path / "empty_run", 2, 1, 16)
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(LrkConfigError, match=r"model\.teacher='.*junk\.ckpt' is invalid: .*not a checkpoint"):
        build_teacher(junk, 2, 1, 16)


# --- end to end through lrk.train ----------------------------------------------------------------------------
TEACHER = ["backbone=resnet18", "trainer.max_epochs=1", "data.num_samples=64"]


def train_teacher(tmp: Path, overrides: list[str]) -> Path:
    from conftest import TINY, compose_train
    from omegaconf import open_dict

    from lrk.train import run

    cfg = compose_train([o for o in TINY if not o.startswith("backbone")] + overrides, tmp)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "teacher")
    torch.set_num_threads(1)
    run(cfg)
    return tmp / "teacher"


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A tiny resnet18 teacher trained by lrk.train on synthetic data (binary, 16 px, grey)."""
    return train_teacher(tmp_path_factory.mktemp("teacher"), TEACHER)


def test_a_deit_student_learns_from_a_vit_teacher_run_dir(tmp_path: Path, tiny_cfg) -> None:
    """Seconds: a 2-block ViT teacher, then a distilled 1-block ViT student with model.teacher=<its run dir>."""
    from lrk.summary import read_summary
    from lrk.train import run

    vit = ["backbone=vit_edge", "backbone.dim=16", "backbone.depth=2", "backbone.num_heads=2"]
    teacher = train_teacher(tmp_path, [*vit, "trainer.max_epochs=1", "data.num_samples=48"])
    cfg = tiny_cfg(
        f"model.teacher={teacher}", "backbone.distilled=true", "trainer.max_epochs=1", "data.num_samples=48"
    )
    metrics = run(cfg)
    assert read_summary(Path(cfg.paths.output_dir))["status"] == "completed"
    assert metrics["train/distill"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("distilled", [True, False])
def test_a_student_learns_from_a_resnet_teacher_run_dir(teacher_run: Path, tiny_cfg, distilled: bool) -> None:
    from lrk.summary import read_summary
    from lrk.train import run

    cfg = tiny_cfg(
        f"model.teacher={teacher_run}", f"backbone.distilled={str(distilled).lower()}", "trainer.max_epochs=1",
        "data.num_samples=64", "model.distillation=soft" if not distilled else "model.distillation=hard",
    )  # fmt: skip
    metrics = run(cfg)
    summary = read_summary(Path(cfg.paths.output_dir))
    assert summary["status"] == "completed"
    assert metrics["train/distill"] > 0
    with (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open() as handle:
        assert "train/distill" in handle.readline().split(",")
    # the teacher stays out of the student's checkpoints: they load back as the student alone
    from lrk.pipeline.structure import load_model

    student = load_model(Path(cfg.paths.output_dir))
    assert type(student).__name__ == "VisionTransformer" and (student.head_dist is not None) == distilled


@pytest.mark.slow
def test_teacher_checks_against_the_data(teacher_run: Path) -> None:
    teacher = build_teacher(teacher_run, num_classes=2, in_chans=1, image_size=16)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher(torch.zeros(3, 1, 16, 16)).shape == (3, 2)
    with pytest.raises(
        LrkConfigError, match=r"model\.teacher=.*num_classes=2 but this run's data has num_classes=4"
    ):
        build_teacher(teacher_run, num_classes=4, in_chans=1, image_size=16)
    with pytest.raises(
        LrkConfigError, match=r"model\.teacher=.*in_chans=1 but this run's data has in_chans=3"
    ):
        build_teacher(teacher_run, num_classes=2, in_chans=3, image_size=16)
    # another image size: the images are resized for the teacher
    resized = build_teacher(teacher_run, num_classes=2, in_chans=1, image_size=24)
    x = torch.rand(2, 1, 24, 24)
    expected = teacher(nn.functional.interpolate(x, size=(16, 16), mode="bilinear"))
    torch.testing.assert_close(resized(x), expected)
    ckpt = json.loads((teacher_run / "summary.json").read_text())["extra"].get("tested_checkpoint")
    assert ckpt is None or Path(ckpt).is_file()


def test_distillation_terms_follow_the_config(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    model = tiny_deit()
    off = OmegaConf.create({"train": True, "model": {"teacher": None, "distillation": "hard"}})
    assert distillation_terms(off, model, 3, 1, 8) == []
    bad = OmegaConf.create({"train": True, "model": {"teacher": None, "distillation": "hrad"}})
    with pytest.raises(LrkConfigError, match=r"model\.distillation='hrad'"):
        distillation_terms(bad, model, 3, 1, 8)  # checked even with no teacher
