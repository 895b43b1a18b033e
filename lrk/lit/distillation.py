"""Knowledge distillation from a teacher, as one :class:`~lrk.lit.module.LossTerm` (``model.teacher``).

DeiT (Touvron et al. 2021, Sec. 4), with student logits Z_s, teacher logits Z_t, softmax psi, labels y:

* hard-label distillation (``mode="hard"``, DeiT's default), L_global^hardDistill
  = 1/2 L_CE(psi(Z_s), y) + 1/2 L_CE(psi(Z_s), y_t) with y_t = argmax_c Z_t(c);
* soft distillation (``mode="soft"``), L_global
  = (1 - lambda) L_CE(psi(Z_s), y) + lambda tau^2 KL(psi(Z_s / tau), psi(Z_t / tau)).

With a distillation token (``head="dist"``, ``backbone.distilled=true``) the label term is taken on the class head
and the teacher term on the distillation head (DeiT Sec. 4, "Distillation token"); at inference the model
averages the two heads. Without one (``head="logits"``) both terms are taken on the model's single output: the
classic knowledge-distillation loss (Hinton et al. 2015), which also distils a dense model into its compressed
version during fine-tuning.

How lrk reads the paper:

* the label term is :class:`~lrk.lit.module.LitClassifier`'s own (class-weighted, label-smoothed, mixup-aware)
  cross-entropy; this term sets its weight (``label_weight``: 1/2 hard, 1 - lambda soft) and returns the
  teacher term only, already weighted (1/2 or lambda tau^2);
* KL(psi(Z_s/tau), psi(Z_t/tau)) is read as the usual KD divergence sum_c p_t log(p_t / p_s) of the student
  from the teacher, averaged over the batch (DeiT's public code divides the sum by the number of logits instead,
  i.e. also by the class count);
* ``alpha`` (lambda) applies to the soft mode only: hard distillation weighs both terms 1/2, as the equation;
* the teacher term carries no class weights (the teacher's own output is the target).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lrk.errors import LrkConfigError

if TYPE_CHECKING:
    from lrk.lit.module import LitClassifier

MODES = ("hard", "soft")
HEADS = ("dist", "logits")


def check_distillation(mode: str, temperature: float, alpha: float) -> None:
    """``model.distillation``, ``model.distill_temperature`` and ``model.distill_alpha``: a config error
    naming the bad value and what is valid."""
    if mode not in MODES:
        raise LrkConfigError(f"model.distillation={mode!r} is invalid: valid modes are {', '.join(MODES)}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise LrkConfigError(
            f"model.distill_temperature={temperature!r} is invalid: it must be a number > 0 (DeiT: 3.0)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
        raise LrkConfigError(
            f"model.distill_alpha={alpha!r} is invalid: it must be in [0, 1] (DeiT soft: 0.1)"
        )


class DistillationLoss:
    """The teacher term of DeiT's hard or soft distillation loss (module docstring), a ``LossTerm`` named
    ``distill`` (logged as ``train/distill``).

    ``teacher``: any module mapping the student's input images to ``[B, num_classes]`` logits; it is put in
    eval mode, its parameters stop requiring grad, it runs under ``torch.no_grad`` and is moved to the images'
    device on first use. It is held here, not as a submodule, so it stays out of the student's checkpoints.
    ``head``: ``dist`` distils into the distillation head of a model with ``forward_heads`` (DeiT), ``logits``
    into the single output.
    """

    name = "distill"

    def __init__(
        self,
        teacher: nn.Module,
        mode: str = "hard",
        temperature: float = 3.0,
        alpha: float = 0.1,
        head: str = "dist",
    ) -> None:
        check_distillation(mode, temperature, alpha)
        if head not in HEADS:
            raise ValueError(f"head={head!r} is invalid: valid heads are {', '.join(HEADS)}")
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.mode, self.temperature, self.alpha, self.head = mode, float(temperature), float(alpha), head
        #: the share of LitClassifier's label cross-entropy in the loss (1/2 hard, 1 - lambda soft)
        self.label_weight = 0.5 if mode == "hard" else 1.0 - self.alpha
        #: LitClassifier takes its label CE on the class head and hands the distillation head to this term
        self.uses_dist_head = head == "dist"

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Z_t: the teacher's logits, without gradient, on the images' device."""
        first = next(iter(self.teacher.parameters()), None)
        if first is not None and first.device != images.device:
            self.teacher.to(images.device)
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad():
            return self.teacher(images).float()

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The weighted teacher term for student logits ``student`` (Z_s) and teacher logits ``teacher`` (Z_t)."""
        if self.mode == "hard":
            return 0.5 * F.cross_entropy(student, teacher.argmax(dim=1))
        tau = self.temperature
        kl = F.kl_div(
            F.log_softmax(student / tau, dim=1),
            F.log_softmax(teacher / tau, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return self.alpha * tau * tau * kl

    def __call__(
        self, lit: LitClassifier, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        student = logits
        if self.uses_dist_head:
            heads = lit.head_logits
            if heads is None or heads[1] is None:
                raise LrkConfigError(
                    "model.teacher with head='dist' needs a student with a distillation token "
                    "(backbone.distilled=true on a ViT)"
                )
            student = heads[1]
        return self.loss(student.float(), self.teacher_logits(images))
