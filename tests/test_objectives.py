import pytest
import torch

from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.training.objectives import compute_loss, per_step_token_losses

from conftest import tiny_config


def test_stage1_matches_hand_computation(tiny_model):
    ids = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    targets[0, :3] = -100
    output = tiny_model(ids)
    result = compute_loss(output, targets, "stage1", entropy_beta=0.3)
    mask = targets != -100
    expected, count = 0.0, 0
    lambdas = torch.sigmoid(output.gate_logits)
    for b in range(2):
        for s in range(8):
            if not mask[b, s]:
                continue
            survival, p = 1.0, []
            for t in range(3):
                p.append(lambdas[t, b, s] * survival if t < 2 else survival)
                survival = survival * (1 - lambdas[t, b, s])
            p = torch.stack(p)
            losses = torch.stack([torch.nn.functional.cross_entropy(output.logits(t + 1)[b, s], targets[b, s])
                                  for t in range(3)])
            expected += (p * losses).sum() + 0.3 * (p * p.log()).sum()
            count += 1
    assert result.loss.item() == pytest.approx(expected.item() / count, rel=1e-5)
    assert result.tokens == count


def test_last_and_mean_objectives(tiny_model):
    ids = torch.randint(0, 64, (2, 6))
    targets = torch.randint(0, 64, (2, 6))
    output = tiny_model(ids)
    token_losses = per_step_token_losses(output, targets)
    assert compute_loss(output, targets, "last").loss.item() == pytest.approx(token_losses[-1].mean().item(), rel=1e-6)
    assert compute_loss(output, targets, "mean").loss.item() == pytest.approx(token_losses.mean().item(), rel=1e-6)


def test_stage1_gradient_check():
    """Autograd of the Stage I loss agrees with finite differences (float64, tiny model)."""
    torch.manual_seed(0)
    model = LoopLM(tiny_config(d_model=8, n_heads=2, n_core_layers=1, vocab_size=11, max_seq_len=8)).double()
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    ids = torch.randint(0, 11, (1, 4))
    targets = torch.randint(0, 11, (1, 4))
    parameters = [model.exit_gate.weight, model.core[0].ffn.down.weight, model.embed.weight]

    def loss_of(*values):
        originals = [p.data for p in parameters]
        for parameter, value in zip(parameters, values):
            parameter.data = value
        try:
            return compute_loss(model(ids), targets, "stage1", 0.1).loss
        finally:
            for parameter, original in zip(parameters, originals):
                parameter.data = original

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in parameters)
    # Swap tensors in functionally so gradcheck sees the loss as a function of these inputs.
    def functional(*values):
        from torch.func import functional_call
        state = {name: value for name, value in zip(
            ["exit_gate.weight", "core.0.ffn.down.weight", "embed.weight"], values)}
        return compute_loss(functional_call(model, state, (ids,)), targets, "stage1", 0.1).loss

    assert torch.autograd.gradcheck(functional, inputs, eps=1e-6, atol=1e-5)


def test_gate_receives_gradient_only_under_stage1(tiny_model):
    ids = torch.randint(0, 64, (2, 6))
    targets = torch.randint(0, 64, (2, 6))
    compute_loss(tiny_model(ids), targets, "stage1").loss.backward()
    assert tiny_model.exit_gate.weight.grad.abs().sum() > 0
    tiny_model.zero_grad()
    compute_loss(tiny_model(ids), targets, "last").loss.backward()
    assert tiny_model.exit_gate.weight.grad is None or tiny_model.exit_gate.weight.grad.abs().sum() == 0


def test_stage1_without_gate_is_a_user_error():
    model = LoopLM(tiny_config(exit_gate=False))
    with pytest.raises(LoopLMError):
        compute_loss(model(torch.zeros(1, 3, dtype=torch.long)), torch.zeros(1, 3, dtype=torch.long), "stage1")


def test_stage1_of_one_gateless_step_is_its_cross_entropy():
    """An unlooped model without a gate (the faithful lrnn preset) trains under the default objective."""
    torch.manual_seed(0)
    model = LoopLM(tiny_config(exit_gate=False, loop_steps=1))
    ids = torch.randint(0, 64, (2, 9))
    output = model(ids[:, :-1])
    expected = torch.nn.functional.cross_entropy(output.logits(1).flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(compute_loss(output, ids[:, 1:], "stage1").loss, expected)
    with pytest.raises(LoopLMError, match="stage1 needs an exit gate"):
        compute_loss(model(ids[:, :-1], steps=2), ids[:, 1:], "stage1")
