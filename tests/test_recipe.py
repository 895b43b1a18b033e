"""Training-recipe keys of LitClassifier (conf/model/default.yaml): soft-target class-weighted cross-entropy,
mixup / cutmix on the batch, weight EMA used for validation and left in the model after the fit, bad values."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrk.errors import LrkConfigError
from lrk.lit import LitClassifier
from lrk.lit.module import ema_avg_fn, soft_cross_entropy

WEIGHTS = torch.tensor([0.5, 2.0, 1.0])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_soft_ce_on_one_hot_targets_is_torchs_weighted_label_smoothed_ce(eps: float) -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 3), torch.tensor([0, 1, 2, 2, 1, 0, 1])
    expected = F.cross_entropy(logits, labels, weight=WEIGHTS, label_smoothing=eps)
    got = soft_cross_entropy(logits, F.one_hot(labels, 3).float(), WEIGHTS, eps)
    torch.testing.assert_close(got, expected)


def test_soft_ce_of_mixed_targets_by_hand() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    lsm = [[v - math.log(sum(math.exp(u) for u in row)) for v in row] for row in logits.tolist()]
    w = WEIGHTS.tolist()
    num = -sum(w[c] * targets[i, c].item() * lsm[i][c] for i in range(2) for c in range(3))
    den = sum(w[c] * targets[i, c].item() for i in range(2) for c in range(3))
    assert soft_cross_entropy(logits, targets, WEIGHTS).item() == pytest.approx(num / den, rel=1e-6)


def quiet(lit: LitClassifier) -> LitClassifier:
    lit.log = lambda *args, **kwargs: None
    return lit


def test_mixup_mixes_images_and_targets_and_the_loss_uses_the_soft_targets() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    lit = quiet(LitClassifier(model, num_classes=3, class_weights=WEIGHTS, mixup_alpha=0.4))
    seen = {}
    original = lit._loss

    def spy(logits, targets):
        seen["targets"] = targets
        return original(logits, targets)

    lit._loss = spy
    torch.manual_seed(3)
    captured = {}
    hook = model.register_forward_pre_hook(lambda m, args: captured.setdefault("images", args[0]))
    loss = lit.training_step((x, y), 0)
    hook.remove()
    targets, images = seen["targets"], captured["images"]
    assert targets.shape == (6, 3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    # torchvision's MixUp: lam x + (1 - lam) x.roll(1), same lam for the targets
    lam = targets[0, y[0]].item() if y[0] != y[-1] else None
    assert lam is not None and 0.0 < lam < 1.0
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.roll(1, 0))
    expected_t = lam * F.one_hot(y, 3).float() + (1 - lam) * F.one_hot(y.roll(1, 0), 3).float()
    torch.testing.assert_close(targets, expected_t)
    torch.testing.assert_close(loss, soft_cross_entropy(model(images), expected_t, WEIGHTS))


def test_cutmix_pastes_a_box_of_the_rolled_batch() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    lit = quiet(LitClassifier(model, num_classes=3, cutmix_alpha=1.0))
    captured = {}
    hook = model.register_forward_pre_hook(lambda m, args: captured.setdefault("images", args[0]))
    torch.manual_seed(1)
    lit.training_step((x, y), 0)
    hook.remove()
    mixed = captured["images"]
    from_self = (mixed == x).all(dim=1)
    from_rolled = (mixed == x.roll(1, 0)).all(dim=1)
    assert (from_self | from_rolled).all()  # every pixel comes from the image or its rolled partner
    assert from_rolled.any()


def test_both_alphas_pick_one_of_mixup_and_cutmix() -> None:
    lit = LitClassifier(nn.Linear(2, 3), num_classes=3, mixup_alpha=0.8, cutmix_alpha=1.0)
    assert [type(t).__name__ for t in lit.mix.transforms] == ["MixUp", "CutMix"]
    assert LitClassifier(nn.Linear(2, 3), num_classes=3).mix is None


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("mixup_alpha", -0.1, r"model\.mixup_alpha=-0\.1 is invalid: it must be a number >= 0"),
        ("cutmix_alpha", "x", r"model\.cutmix_alpha='x' is invalid"),
        ("ema_decay", 1.0, r"model\.ema_decay=1\.0 is invalid: it must be in \(0, 1\)"),
        ("ema_decay", 0, r"model\.ema_decay=0 is invalid"),
    ],
)
def test_bad_recipe_values_are_config_errors(key, value, match) -> None:
    with pytest.raises(LrkConfigError, match=match):
        LitClassifier(nn.Linear(2, 3), num_classes=3, **{key: value})


def test_ema_decay_warms_up() -> None:
    avg = ema_avg_fn(0.99)
    a, c = torch.tensor(1.0), torch.tensor(0.0)
    assert avg(a, c, 0).item() == pytest.approx(0.1)  # d = 1/10
    assert avg(a, c, 90).item() == pytest.approx(91 / 100)
    assert avg(a, c, 10**6).item() == pytest.approx(0.99)


def test_ema_weights_are_validated_and_left_in_the_model_after_the_fit() -> None:
    """Track the weights after every optimizer step, compute the EMA by hand, and compare with what validation
    saw and with the weights the fit leaves."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    decay = 0.6
    history, validated = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(pl_module.model.weight.detach().clone())

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0:
                validated.append(pl_module.model.weight.detach().clone())

    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    lit = LitClassifier(model, num_classes=3, lr=0.1, ema_decay=decay, warmup_epochs=0)
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=[Record()], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(lit, DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))
    # by hand: the first update copies, then avg <- d avg + (1 - d) w with d = min(decay, (1 + n) / (10 + n))
    ema, expected_at_val = None, []
    for n, w in enumerate(history):
        if ema is None:
            ema = w.clone()
        else:
            d = min(decay, (1 + n) / (10 + n))  # n updates done before this one
            ema = d * ema + (1 - d) * w
        if (n + 1) % 4 == 0:  # 4 steps per epoch, validation after each epoch
            expected_at_val.append(ema.clone())
    assert len(history) == 8 and len(validated) == 2
    for seen, expected in zip(validated, expected_at_val, strict=True):
        torch.testing.assert_close(seen, expected)
    assert not torch.allclose(history[-1], ema)  # the EMA differs from the last weights ...
    torch.testing.assert_close(model.weight.detach(), ema)  # ... and is what the fit leaves


def test_recipe_keys_through_lrk_train(tiny_cfg) -> None:
    """mixup + cutmix + EMA in a real run: it completes; its checkpoint holds the EMA average as the model's
    weights (the raw weights beside them, under current_model_state), and lrk.load_model gives the average back."""
    from pathlib import Path

    from lrk.pipeline.structure import load_model
    from lrk.summary import read_summary
    from lrk.train import run

    cfg = tiny_cfg(
        "model.mixup_alpha=0.4", "model.cutmix_alpha=1.0", "model.ema_decay=0.9", "trainer.max_epochs=1"
    )
    metrics = run(cfg)
    summary = read_summary(Path(cfg.paths.output_dir))
    assert summary["status"] == "completed" and 0.0 <= metrics["test/bal_acc"] <= 1.0
    import torch

    from lrk.pipeline.structure import find_checkpoint

    checkpoint = torch.load(
        find_checkpoint(Path(cfg.paths.output_dir)), map_location="cpu", weights_only=False
    )
    average, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(average[k], current[k]) for k in average if k.startswith("model.blocks"))
    model = load_model(Path(cfg.paths.output_dir))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, average[f"model.{key}"])
