"""The fused linear cross-entropy equals the plain head + F.cross_entropy: values, gradients
of hidden states and head, with ignored positions, across row chunks."""

import pytest
import torch
from torch.nn import functional as F

from looplm.model import LoopLM
from looplm.training import fused_ce
from looplm.training.fused_ce import linear_cross_entropy
from looplm.training.objectives import IGNORE_INDEX, compute_loss, per_step_token_losses

from conftest import tiny_config


@pytest.mark.parametrize("chunk", [3, 4096])
def test_equals_reference_values_and_gradients(monkeypatch, chunk):
    monkeypatch.setattr(fused_ce, "CHUNK_ROWS", chunk)
    monkeypatch.setattr(fused_ce, "BACKWARD_CHUNK_ROWS", chunk)
    hidden = torch.randn(10, 6, requires_grad=True)
    weight = torch.randn(13, 6, requires_grad=True)
    targets = torch.randint(0, 13, (10,))
    scale = torch.rand(10)
    fused = linear_cross_entropy(hidden, weight, targets)
    (fused * scale).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")
    (reference * scale).sum().backward()
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


@pytest.mark.parametrize("objective", ["stage1", "mean", "last"])
@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}])
def test_training_loss_and_gradients_match_the_reference_path(objective, overrides):
    torch.manual_seed(0)
    model = LoopLM(tiny_config(**overrides))
    ids = torch.randint(0, 64, (3, 9))
    targets = torch.randint(0, 64, (3, 9))
    targets[0, :4] = IGNORE_INDEX  # a task batch trains on some positions only
    targets[2] = IGNORE_INDEX

    def loss_and_grads(fused):
        model.zero_grad()
        output = model(ids)
        losses = per_step_token_losses(output, targets, fused=fused)
        result = compute_loss(output, targets, objective)
        result.loss.backward()
        return losses.detach(), result.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}

    fused_losses, fused_loss, fused_grads = loss_and_grads(True)
    losses, loss, grads = loss_and_grads(False)
    assert torch.all(fused_losses[:, targets == IGNORE_INDEX] == 0)
    torch.testing.assert_close(fused_losses, losses)
    torch.testing.assert_close(fused_loss, loss)
    assert fused_grads.keys() == grads.keys() and "embed.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)


def test_gradcheck_backpropagates_repeatedly():
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets), (hidden, weight))
