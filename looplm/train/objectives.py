"""Training objectives over the per-step readouts (REFERENCE §2).

Per-step loss  L_t = cross-entropy(head(r_t), targets) per token, ignoring targets == −100.
stage1: Σ_t p(t)·L_t − β·H(p), H(p) = −Σ_t p(t) log p(t), per token then averaged (Ouro §3.3).
last:   L_T (a plain deep model trained at full depth).
mean:   (1/T) Σ_t L_t (every step supervised equally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from looplm.errors import LoopLMError
from looplm.model.lm import LoopOutput

IGNORE_INDEX = -100


@dataclass
class LossResult:
    """loss: the scalar to backpropagate. step_losses [T]: mean L_t over trained tokens.
    mean_exit_step: E_p[t] averaged over tokens (0 without a gate). exit_entropy: mean H(p)."""

    loss: torch.Tensor
    step_losses: torch.Tensor
    mean_exit_step: torch.Tensor
    exit_entropy: torch.Tensor
    tokens: int


def per_step_token_losses(output: LoopOutput, targets: torch.Tensor) -> torch.Tensor:
    """L_t per token: [T, B, S], zero where targets == −100."""
    flat_targets = targets.reshape(-1)
    losses = [F.cross_entropy(output.logits(step).reshape(flat_targets.numel(), -1), flat_targets,
                              ignore_index=IGNORE_INDEX, reduction="none")
              for step in range(1, output.steps + 1)]
    return torch.stack(losses).view(output.steps, *targets.shape)


def compute_loss(output: LoopOutput, targets: torch.Tensor, objective: str = "stage1",
                 entropy_beta: float = 0.1) -> LossResult:
    """Objective over a forward pass; targets [B, S] with −100 marking untrained positions."""
    mask = (targets != IGNORE_INDEX).to(output.hidden_states[0].dtype)
    tokens = mask.sum().clamp_min(1.0)
    token_losses = per_step_token_losses(output, targets)
    step_losses = token_losses.sum(dim=(1, 2)) / tokens
    zero = step_losses.new_zeros(())
    mean_exit_step, entropy = zero, zero
    if output.gate_logits is not None:
        log_p = output.log_exit_distribution
        p = log_p.exp()
        step_index = torch.arange(1, output.steps + 1, device=p.device, dtype=p.dtype).view(-1, 1, 1)
        token_entropy = -(p * log_p).sum(0)
        entropy = (token_entropy * mask).sum() / tokens
        mean_exit_step = ((p * step_index).sum(0) * mask).sum() / tokens
    if objective == "stage1":
        if output.gate_logits is None:
            raise LoopLMError("objective stage1 needs an exit gate: set model.exit_gate=true")
        expected = (p * token_losses).sum(0)
        loss = ((expected - entropy_beta * token_entropy) * mask).sum() / tokens
    elif objective == "last":
        loss = step_losses[-1]
    elif objective == "mean":
        loss = step_losses.mean()
    else:
        raise LoopLMError(f"unknown objective {objective!r}: use stage1, last or mean")
    return LossResult(loss, step_losses.detach(), mean_exit_step.detach(), entropy.detach(), int(tokens.item()))
