"""LitClassifier.loss_terms: extra loss terms are added to the training loss and logged as train/<name>."""

from __future__ import annotations

import torch
from torch import nn

from lrk.lit import LitClassifier, LossTerm


class WeightNorm:
    """weight * ||W||_F^2 of the linear model: a term whose value and gradient are known by hand."""

    name = "reg_norm"

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, lit, images, labels, logits):
        return self.weight * lit.model.weight.pow(2).sum()


def test_loss_term_is_added_to_the_loss_and_its_gradient_reaches_the_weights() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    images, labels = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    term = WeightNorm(0.5)
    assert isinstance(term, LossTerm)
    lit = LitClassifier(model, num_classes=2, loss_terms=[term])
    lit.log = lambda *args, **kwargs: None  # no trainer: logging is not what is tested here
    loss = lit.training_step((images, labels), 0)
    expected_ce = nn.functional.cross_entropy(model(images), labels)
    torch.testing.assert_close(loss, expected_ce + 0.5 * model.weight.pow(2).sum())
    loss.backward()
    reference = model.weight.detach().clone().requires_grad_(True)
    ref_loss = nn.functional.cross_entropy(images @ reference.T, labels) + 0.5 * reference.pow(2).sum()
    ref_loss.backward()
    torch.testing.assert_close(model.weight.grad, reference.grad)


def test_loss_terms_stay_out_of_the_state_dict() -> None:
    teacher = nn.Linear(3, 2)

    class Distil:
        name = "distill"

        def __init__(self) -> None:
            self.teacher = teacher

        def __call__(self, lit, images, labels, logits):
            return (logits - self.teacher(images)).pow(2).mean()

    lit = LitClassifier(nn.Linear(3, 2), num_classes=2, loss_terms=[Distil()])
    assert not any(key.startswith("loss_terms") for key in lit.state_dict())
    assert set(lit.state_dict()) == set(LitClassifier(nn.Linear(3, 2), num_classes=2).state_dict())
