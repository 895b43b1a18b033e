"""The LightningModule every run of the grid trains: an image classifier around any backbone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)


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
    ``logits`` is the model's output on ``images`` (already computed: a term that needs more, e.g. the
    distillation head, computes it itself from ``lit.model``)."""

    name: str

    def __call__(
        self, lit: LitClassifier, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor: ...


class LitClassifier(L.LightningModule):
    """Class-weighted cross-entropy, AdamW with warm-up + cosine schedule, torchmetrics at every split.

    Logs ``train/loss train/acc val/loss val/acc val/acc_best val/bal_acc val/f1`` and at test
    ``test/loss test/acc test/bal_acc test/f1 test/recall/<class>`` and ``test/acc_majority`` (the accuracy of
    always predicting the test split's most frequent class: the trivial baseline); the test confusion matrix is kept
    in :attr:`test_confusion` (rows: true class, columns: predicted class).
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
    ) -> None:
        super().__init__()
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            logits, labels, weight=self.class_weights, label_smoothing=self.hparams.label_smoothing
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self._loss(logits, labels)
        for term in self.loss_terms:
            value = term(self, images, labels, logits)
            self.log(f"train/{term.name}", value.detach(), on_step=False, on_epoch=True)
            loss = loss + value
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val/loss", self._loss(logits, labels), on_step=False, on_epoch=True, prog_bar=True)
        self.val_metrics.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(values, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute())

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("test/loss", self._loss(logits, labels), on_step=False, on_epoch=True)
        self.test_metrics.update(logits, labels)
        self.test_recall.update(logits, labels)
        self.test_confmat.update(logits, labels)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        recalls = self.test_recall.compute()
        self.log_dict({f"test/recall/{name}": recalls[i] for i, name in enumerate(self.class_names)})
        confusion = self.test_confmat.compute()
        self.test_confusion = confusion.cpu().tolist()
        # the trivial baseline: always predict the test split's most frequent class
        counts = confusion.sum(dim=1).float()
        self.log("test/acc_majority", counts.max() / counts.sum().clamp_min(1))
        for metric in (self.test_metrics, self.test_recall, self.test_confmat):
            metric.reset()

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
