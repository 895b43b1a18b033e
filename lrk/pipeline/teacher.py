"""The teacher of ``model.teacher`` (DeiT distillation, :mod:`lrk.lit.distillation`): any lrk run's model,
loaded with :func:`lrk.pipeline.structure.load_model` and checked against this run's data before training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrk.errors import LrkConfigError
from lrk.lit.distillation import DistillationLoss, check_distillation
from lrk.pipeline.structure import find_checkpoint, load_checkpoint, read_structure, restore_model

log = logging.getLogger(__name__)


def build_teacher(path: str | Path, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """The model of the lrk run dir or checkpoint ``path`` in eval mode, without gradients, for a student on
    data of ``num_classes`` classes, ``in_chans`` channels and ``image_size`` pixels.

    A missing path, a run dir without a checkpoint, a file that is not an lrk checkpoint, or a teacher built for
    another number of classes or channels: one :class:`LrkConfigError` naming ``model.teacher``. A teacher
    trained at another image size gets the student's images resized to its own size (bilinear) in front of it.
    """
    where = f"model.teacher={str(path)!r}"
    try:
        file = find_checkpoint(path)
        checkpoint = load_checkpoint(file)
        structure = read_structure(checkpoint)
        teacher = restore_model(checkpoint)
    except LrkConfigError as exc:
        raise LrkConfigError(f"{where} is invalid: {exc}") from exc
    facts = dict((structure or {}).get("data") or {})
    expected = {"num_classes": num_classes, "in_chans": in_chans}
    differ = {k: facts[k] for k, v in expected.items() if facts.get(k) is not None and facts[k] != v}
    if differ:
        raise LrkConfigError(
            f"{where} is invalid: its model was trained for "
            + ", ".join(f"{k}={v}" for k, v in differ.items())
            + " but this run's data has "
            + ", ".join(f"{k}={expected[k]}" for k in differ)
            + ": the teacher must be trained on the same classes and image channels"
        )
    teacher_size = facts.get("image_size")
    if teacher_size is not None and teacher_size != image_size:
        log.info(
            "teacher %s was trained at %d px: the student's %d px images are resized for it",
            file,
            teacher_size,
            image_size,
        )
        teacher = nn.Sequential(nn.Upsample(size=(teacher_size, teacher_size), mode="bilinear"), teacher)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    # a probe batch catches what the stored facts cannot (older checkpoints without them)
    probe = torch.zeros(1, in_chans, image_size, image_size)
    try:
        with torch.no_grad():
            out = teacher(probe)
    except RuntimeError as exc:
        raise LrkConfigError(
            f"{where} is invalid: its model does not take this run's {in_chans}-channel {image_size} px images "
            f"({str(exc).splitlines()[0][:200]})"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LrkConfigError(
            f"{where} is invalid: its model gives outputs of shape {shape}, not [B, {num_classes}] logits for "
            f"this run's {num_classes} classes"
        )
    log.info(
        "teacher: %s (%s) from %s",
        type(teacher).__name__,
        f"{sum(p.numel() for p in teacher.parameters()):,} parameters",
        file,
    )
    return teacher


def distillation_terms(cfg: Any, model: nn.Module, num_classes: int, in_chans: int, image_size: int) -> list:
    """The loss terms ``cfg.model`` asks for: ``[DistillationLoss]`` when ``model.teacher`` is set (into the
    distillation head when the student has one, ``backbone.distilled=true``, else into its single output),
    else none. The distillation keys are checked in both cases, before anything trains."""
    node = cfg.model
    mode = node.get("distillation", "hard")
    temperature = node.get("distill_temperature", 3.0)
    alpha = node.get("distill_alpha", 0.1)
    check_distillation(mode, temperature, alpha)
    path = node.get("teacher")
    if path is None or not cfg.get("train", True):
        return []
    teacher = build_teacher(path, num_classes, in_chans, image_size)
    head = "dist" if getattr(model, "head_dist", None) is not None else "logits"
    return [DistillationLoss(teacher, mode=mode, temperature=temperature, alpha=alpha, head=head)]
