"""The LightningModule every run of the grid trains: an image classifier around any backbone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)
from torchvision.transforms import v2

from lrk.errors import LrkConfigError


def _split_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, balanced accuracy (mean per-class recall) and macro F1 under one prefix."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "bal_acc": MulticlassAccuracy(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``min_factor``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@runtime_checkable
class LossTerm(Protocol):
    """An extra term of the training loss, attached to :class:`LitClassifier` (``loss_terms``) instead of code
    inside the training step: a regulariser (SVD training's orthogonality and sparsity) or a distillation loss.

    ``name`` is logged as ``train/<name>``; the call returns the *weighted* term, a scalar added to the loss.
    ``logits`` is the model's output on ``images`` (already computed); ``labels`` are the step's targets: class
    indices, or ``[B, K]`` soft targets when mixup/cutmix is on. Two optional attributes change the step:

    * ``label_weight`` (float, default 1): the weight of LitClassifier's label cross-entropy in the loss (the
      term takes the rest, e.g. DeiT's 1/2 or 1 - lambda);
    * ``uses_dist_head`` (bool, default False): the model has ``forward_heads`` (a DeiT): the label CE is taken on
      the class head, and ``lit.head_logits`` holds ``(class-head logits, distillation-head logits)`` of the
      step for the term to read (DeiT Sec. 4: one head per target)."""

    name: str

    def __call__(
        self, lit: LitClassifier, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor: ...


def soft_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Class-weighted cross-entropy with soft targets ``[B, K]`` (mixup/cutmix), normalised like torch's weighted
    mean: ``sum_i sum_c w_c t'_ic (-log p_ic) / sum_i sum_c w_c t_ic`` with ``t' = (1 - eps) t + eps / K``.
    On one-hot targets it equals ``F.cross_entropy(logits, labels, weight, label_smoothing=eps)``."""
    num_classes = logits.shape[1]
    weight = torch.ones(num_classes, device=logits.device) if weight is None else weight.to(logits.device)
    targets = targets.to(logits.dtype)
    smoothed = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    nll = -torch.log_softmax(logits, dim=1)
    return (nll * smoothed * weight).sum() / (targets * weight).sum()


def ema_avg_fn(decay: float):
    """EMA update with a warm-up of the decay: ``avg <- d avg + (1 - d) param`` with
    ``d = min(decay, (1 + n) / (10 + n))`` after n updates (the ``num_updates`` rule of TensorFlow's
    ExponentialMovingAverage), so that a short run's average is not dominated by its first, untrained steps."""

    def avg_fn(
        averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor | int
    ) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged * d + current * (1.0 - d)

    return avg_fn


class EMAWeights(WeightAveraging):
    """Lightning's :class:`WeightAveraging` with :func:`ema_avg_fn` (``model.ema_decay``): the average is
    updated after every optimizer step, swapped in for validation, saved as the checkpoints' weights and copied
    into the model when the fit ends (so the test and ``lrk.load_model`` see the EMA weights). The average is a
    copy of the LightningModule without its loss terms (a teacher is not copied)."""

    def __init__(self, decay: float) -> None:
        super().__init__(avg_fn=ema_avg_fn(decay))
        self.decay = decay

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        terms = getattr(pl_module, "loss_terms", None)
        if terms is not None:
            pl_module.loss_terms = []
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            if terms is not None:
                pl_module.loss_terms = terms


def _check_recipe(mixup_alpha: float, cutmix_alpha: float, ema_decay: float | None) -> None:
    for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise LrkConfigError(
                f"model.{key}={value!r} is invalid: it must be a number >= 0 (0 = off; e.g. 0.8)"
            )
    if ema_decay is not None and (
        isinstance(ema_decay, bool) or not isinstance(ema_decay, int | float) or not 0.0 < ema_decay < 1.0
    ):
        raise LrkConfigError(
            f"model.ema_decay={ema_decay!r} is invalid: it must be in (0, 1), e.g. 0.999, or null (off)"
        )


class LitClassifier(L.LightningModule):
    """Class-weighted cross-entropy, AdamW with warm-up + cosine schedule, torchmetrics at every split.

    Training recipe (``conf/model/default.yaml``): ``label_smoothing``; ``mixup_alpha`` / ``cutmix_alpha``
    (torchvision's MixUp / CutMix on the training batch, one of the two at random when both are > 0; the targets
    become soft and the class weights still apply, :func:`soft_cross_entropy`); ``ema_decay`` (an exponential
    moving average of the weights, :class:`EMAWeights`, used for validation, the checkpoints and the test).

    Logs ``train/loss train/acc val/loss val/acc val/acc_best val/bal_acc val/f1`` and at test
    ``test/loss test/acc test/bal_acc test/f1 test/recall/<class>`` and ``test/acc_majority`` (the accuracy of
    always predicting the test split's most frequent class: the trivial baseline); the test confusion matrix is kept
    in :attr:`test_confusion` (rows: true class, columns: predicted class).

    Under DDP every logged tensor is reduced over the ranks (``sync_dist=True``: the mean of the ranks' epoch
    means, the global mean when the ranks hold equal shares); the torchmetrics sync their states themselves, so
    the values computed from them are already those of all ranks' samples.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        class_weights: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_epochs: int = 1,
        min_lr: float = 1e-5,
        label_smoothing: float = 0.0,
        loss_terms: Sequence[LossTerm] = (),
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        _check_recipe(mixup_alpha, cutmix_alpha, ema_decay)
        self.save_hyperparameters(ignore=["model", "class_weights", "loss_terms"])
        self.model = model
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        weights = torch.ones(num_classes) if class_weights is None else torch.as_tensor(class_weights)
        self.register_buffer("class_weights", weights.float())
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = _split_metrics(num_classes, "val/")
        self.test_metrics = _split_metrics(num_classes, "test/")
        self.test_recall = MulticlassRecall(num_classes, average=None)
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed fit knows its best
        self.test_confusion: list[list[int]] | None = None
        # set by lrk.train; lrk.pipeline.structure.StructureCheckpoint stores them in every checkpoint
        self.params_dense: int | None = None
        self.decomp_method: str | None = None
        self.decomp_layers: list[dict[str, Any]] = []
        # plain list, not submodules: a term's modules (a teacher) stay out of this module's state_dict
        self.loss_terms: list[LossTerm] = list(loss_terms)
        #: (class-head, distillation-head) logits of the current training step, for terms with uses_dist_head
        self.head_logits: tuple[torch.Tensor, torch.Tensor | None] | None = None
        mixers = [v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes)] if mixup_alpha > 0 else []
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
        self.mix: v2.Transform | None = (
            None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim == 2:  # soft targets (mixup / cutmix)
            return soft_cross_entropy(logits, labels, self.class_weights, self.hparams.label_smoothing)
        return nn.functional.cross_entropy(
            logits, labels, weight=self.class_weights, label_smoothing=self.hparams.label_smoothing
        )

    def _split_heads(self) -> bool:
        return any(getattr(term, "uses_dist_head", False) for term in self.loss_terms)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        if self._split_heads():
            cls_logits, dist_logits = self.model.forward_heads(images)
            if dist_logits is None:
                raise LrkConfigError(
                    "model.teacher distils into a distillation token, but the model has none: set "
                    "backbone.distilled=true (a ViT)"
                )
            self.head_logits = (cls_logits, dist_logits)
            logits = (cls_logits + dist_logits) / 2  # the inference rule, for train/acc
            label_logits = cls_logits
        else:
            self.head_logits = None
            logits = label_logits = self(images)
        label_weight = 1.0
        for term in self.loss_terms:
            label_weight *= float(getattr(term, "label_weight", 1.0))
        loss = label_weight * self._loss(label_logits, targets)
        for term in self.loss_terms:
            value = term(self, images, targets, logits)
            self.log(f"train/{term.name}", value.detach(), on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + value
        self.head_logits = None
        self.train_acc(logits, targets.argmax(dim=1) if targets.ndim == 2 else targets)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log(
            "val/loss",
            self._loss(logits, labels),
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
        )
        self.val_metrics.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(values, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("test/loss", self._loss(logits, labels), on_step=False, on_epoch=True, sync_dist=True)
        self.test_metrics.update(logits, labels)
        self.test_recall.update(logits, labels)
        self.test_confmat.update(logits, labels)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        recalls = self.test_recall.compute()
        self.log_dict(
            {f"test/recall/{name}": recalls[i] for i, name in enumerate(self.class_names)}, sync_dist=True
        )
        confusion = self.test_confmat.compute()
        self.test_confusion = confusion.cpu().tolist()
        # the trivial baseline: always predict the test split's most frequent class
        counts = confusion.sum(dim=1).float()
        self.log("test/acc_majority", counts.max() / counts.sum().clamp_min(1), sync_dist=True)
        for metric in (self.test_metrics, self.test_recall, self.test_confmat):
            metric.reset()

    def configure_callbacks(self) -> list[Callback]:
        """:class:`EMAWeights` for a fit when ``ema_decay`` is set (none for test-only trainers: they test the
        weights the fit left, which are the average)."""
        decay = self.hparams.get("ema_decay")
        trainer = self._trainer
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        return [EMAWeights(decay)] if decay is not None and fitting else []

    def configure_optimizers(self) -> dict:
        """AdamW over the parameters that require grad only: factors frozen by ``decomp.freeze``
        (accelerating_lrd_paper Sec. 2.2) get no optimizer state and no weight decay. The two groups are built
        the same way from the same model on resume, so a checkpoint's optimizer state loads back."""
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            # norms, biases, tokens and position embeddings are not decayed (ViT/DeiT recipe)
            if parameter.ndim <= 1 or name.endswith(("cls_token", "dist_token", "pos_embed")):
                no_decay.append(parameter)
            else:
                decay.append(parameter)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = max(1, self.trainer.max_epochs or 1)
        warmup_steps = min(total_steps // 2, round(total_steps * hp.warmup_epochs / max_epochs))
        min_factor = min(1.0, hp.min_lr / hp.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_factor)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
