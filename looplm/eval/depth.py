"""Quality per loop depth.

``loss_by_step``: mean cross-entropy of each step's readout over fixed batches, with the
mean exit step E_p[t] and exit entropy H(p) of the gate.
``accuracy_by_step``: exact-match accuracy of each step on a task's held-out set, scored by
teacher forcing, which equals greedy generation (see ``EvalSet``).
"""

from __future__ import annotations

import torch

from looplm.training.objectives import compute_loss


@torch.no_grad()
def loss_by_step(model, batches, steps: int | None = None) -> dict:
    was_training = model.training
    model.eval()
    totals, exit_step, entropy, tokens = None, 0.0, 0.0, 0
    device = next(model.parameters()).device
    for inputs, targets in batches:
        output = model(inputs.to(device), steps=steps)
        result = compute_loss(output, targets.to(device), objective="mean")
        weight = int(result.tokens)
        totals = result.step_losses * weight if totals is None else totals + result.step_losses * weight
        exit_step += float(result.mean_exit_step) * weight
        entropy += float(result.exit_entropy) * weight
        tokens += weight
    model.train(was_training)
    losses = (totals / max(tokens, 1)).tolist()
    return {"loss_by_step": losses, "mean_exit_step": exit_step / max(tokens, 1),
            "exit_entropy": entropy / max(tokens, 1)}


@torch.no_grad()
def accuracy_by_step(model, eval_set, steps: int | None = None, batch_size: int = 256) -> list[float]:
    """Fraction of held-out examples whose whole answer (+ eos) is right, for steps 1..steps."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    steps = steps or model.config.loop_steps
    correct = torch.zeros(steps)
    for begin in range(0, len(eval_set), batch_size):
        inputs = eval_set.inputs[begin:begin + batch_size].to(device)
        targets = eval_set.targets[begin:begin + batch_size].to(device)
        mask = eval_set.answer_mask[begin:begin + batch_size].to(device)
        output = model(inputs, steps=steps)
        for step in range(1, steps + 1):
            right = (output.logits(step).argmax(-1) == targets) | ~mask
            correct[step - 1] += right.all(dim=1).sum().item()
    model.train(was_training)
    return (correct / max(len(eval_set), 1)).tolist()
