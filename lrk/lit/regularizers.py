"""SVD training's regularisers (seeds/svd_training_abstract.txt, Yang et al. 2020) as :class:`~lrk.lit.module.LossTerm`
objects for ``LitClassifier.loss_terms``: logged as ``train/reg_orth`` and ``train/reg_sparse``.

The abstract: "We add orthogonality regularization to the singular vectors, which ensure the valid form of SVD and
avoid gradient vanishing/exploding. Low-rank is encouraged by applying sparsity-inducing regularizers on the singular
values of each layer." lrk's forms (issue 11):

- orthogonality: ``weight * sum_l (||U_l^T U_l - I||_F^2 + ||V_l^T V_l - I||_F^2)``. The full paper (arXiv:2004.09031,
  not among the seeds) divides each layer's term by r_l^2, as we read it; lrk keeps the issue's unnormalised sum,
  so wide layers weigh more;
- sparsity ``R(s)`` on each layer's singular values: ``l1`` = sum_i |s_i|; ``hoyer`` = ||s||_1 / ||s||_2 (the Hoyer
  measure, scale-invariant, Hoyer 2004); ``hoyer_square`` = ||s||_1^2 / ||s||_2^2 (DeepHoyer's Hoyer-Square, Yang,
  Wen & Li, ICLR 2020). The paper uses L1 and Hoyer on s.

The SVD-form layers are found by a duck-typed protocol, not by class: every submodule of ``lit.model`` with a
``svd_factors()`` method returning ``(U, s, V)`` (U: m x r, s: r, V: n x r, in the autograd graph), as
:mod:`lrk.layers.svd_train`'s layers do (``lrk.lit`` may import only ``lrk.measure``, tests/test_architecture.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SPARSITY_KINDS = ("l1", "hoyer", "hoyer_square")
#: floor of ||s||_2 in the Hoyer ratios (a zero spectrum would divide by zero)
EPS = 1e-12


def svd_form_layers(model: nn.Module) -> list[Any]:
    """The submodules of ``model`` that expose ``svd_factors()`` (the SVD-form layers)."""
    return [m for m in model.modules() if callable(getattr(m, "svd_factors", None))]


def orthogonality(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``||U^T U - I||_F^2 + ||V^T V - I||_F^2`` for U (m x r), V (n x r)."""
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return (u.T @ u - eye).square().sum() + (v.T @ v - eye).square().sum()


def sparsity(s: torch.Tensor, kind: str) -> torch.Tensor:
    """R(s): ``l1`` sum |s_i|, ``hoyer`` ||s||_1 / ||s||_2, ``hoyer_square`` ||s||_1^2 / ||s||_2^2."""
    l1 = s.abs().sum()
    if kind == "l1":
        return l1
    l2 = torch.linalg.vector_norm(s).clamp_min(EPS)
    if kind == "hoyer":
        return l1 / l2
    if kind == "hoyer_square":
        return (l1 / l2).square()
    raise ValueError(f"sparsity kind={kind!r} is invalid: it must be one of {list(SPARSITY_KINDS)}")


def _check_weight(who: str, weight: Any) -> float:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not weight >= 0
        or weight == float("inf")
    ):
        raise ValueError(f"{who}: weight={weight!r} is invalid: it must be a finite number >= 0")
    return float(weight)


def _zero(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=logits.dtype, device=logits.device)


class _LayerRegularizer:
    """A LossTerm ``weight * value(model)`` over the model's SVD-form layers; ``weight=0`` computes nothing."""

    name = ""
    weight = 0.0

    def value(self, model: nn.Module) -> torch.Tensor | None:
        raise NotImplementedError

    def __call__(
        self, lit: Any, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        if self.weight == 0:
            return _zero(logits)
        value = self.value(lit.model)
        return _zero(logits) if value is None else self.weight * value


class OrthogonalityRegularizer(_LayerRegularizer):
    """``weight * sum over the SVD-form layers of ||U^T U - I||_F^2 + ||V^T V - I||_F^2``; logged
    ``train/reg_orth``. With ``weight=0`` nothing is computed (the logged term is 0)."""

    name = "reg_orth"

    def __init__(self, weight: float) -> None:
        self.weight = _check_weight(type(self).__name__, weight)

    def value(self, model: nn.Module) -> torch.Tensor | None:
        """The unweighted sum over the layers (None without any SVD-form layer)."""
        terms = [orthogonality(u, v) for u, _, v in (m.svd_factors() for m in svd_form_layers(model))]
        return torch.stack(terms).sum() if terms else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight:g})"


class SparsityRegularizer(_LayerRegularizer):
    """``weight * sum over the SVD-form layers of R(s)`` (``kind``: l1 | hoyer | hoyer_square, :func:`sparsity`);
    logged ``train/reg_sparse``. With ``weight=0`` nothing is computed (the logged term is 0)."""

    name = "reg_sparse"

    def __init__(self, weight: float, kind: str = "hoyer") -> None:
        self.weight = _check_weight(type(self).__name__, weight)
        if kind not in SPARSITY_KINDS:
            raise ValueError(
                f"{type(self).__name__}: kind={kind!r} is invalid: it must be one of {list(SPARSITY_KINDS)}"
            )
        self.kind = kind

    def value(self, model: nn.Module) -> torch.Tensor | None:
        """The unweighted sum over the layers (None without any SVD-form layer)."""
        terms = [sparsity(s, self.kind) for _, s, _ in (m.svd_factors() for m in svd_form_layers(model))]
        return torch.stack(terms).sum() if terms else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight:g}, kind={self.kind!r})"
