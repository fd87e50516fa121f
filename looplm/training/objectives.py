"""Training objectives over the per-step readouts (docs/MATH.md §2).

Per-step loss  L_t = cross-entropy(head(r_t), targets) per token, ignoring targets == −100.
stage1: Σ_t p(t)·L_t − β·H(p), H(p) = −Σ_t p(t) log p(t), per token then averaged (Ouro §3.3).
last:   L_T (a plain deep model trained at full depth).
mean:   (1/T) Σ_t L_t (every step supervised equally).
act:    CE(head(Σ_t w_t r_t)) + τ·(N + R), ACT (Graves) with the gate as halting probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from looplm.errors import LoopLMError, is_number
from looplm.model.lm import LoopOutput
from looplm.training.fused_ce import linear_cross_entropy

IGNORE_INDEX = -100


@dataclass
class LossResult:
    """loss: the scalar to backpropagate. step_losses [T]: mean L_t over trained tokens.
    mean_exit_step: E_p[t] averaged over tokens (0 without a gate). exit_entropy: mean H(p).
    exit_histogram [T]: p(t) averaged over trained tokens (None without a gate)."""

    loss: torch.Tensor
    step_losses: torch.Tensor
    mean_exit_step: torch.Tensor
    exit_entropy: torch.Tensor
    tokens: torch.Tensor  # trained tokens in the batch, a 0-d tensor (no wait for the device)
    exit_histogram: torch.Tensor | None = None


def per_step_token_losses(output: LoopOutput, targets: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """L_t per token: [T, B, S], zero where targets == −100.

    fused (default: wherever it applies) computes the losses of the trained positions only,
    through ``linear_cross_entropy``; False is the plain reference (the head on every
    position, then ``F.cross_entropy``).  Both give the same values and gradients.
    """
    steps, shape = output.steps, targets.shape
    flat_targets = targets.reshape(-1)
    weight = output.model.head_weight
    device_type = output.hidden_states[0].device.type
    autocast = torch.is_autocast_enabled(device_type)
    if fused is None:
        # Under torch.compile the reference is better: the compiler fuses it, and the trained
        # positions' data-dependent count would break the graph.
        fused = (output.hidden_states[0].dtype == weight.dtype or autocast) and not torch.compiler.is_compiling()
    # Under autocast the head's matmul runs in the autocast dtype, the softmax in float32.
    matmul_dtype = torch.get_autocast_dtype(device_type) if autocast else None
    if not fused:
        losses = [F.cross_entropy(output.logits(step).reshape(flat_targets.numel(), -1), flat_targets,
                                  ignore_index=IGNORE_INDEX, reduction="none")
                  for step in range(1, steps + 1)]
        return torch.stack(losses).view(steps, *shape)
    hidden = torch.stack(output.hidden_states).reshape(steps, flat_targets.numel(), -1)
    trained = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    if trained.numel() == flat_targets.numel():
        losses = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, flat_targets.repeat(steps),
                                      matmul_dtype)
        return losses.view(steps, *shape)
    picked = hidden.index_select(1, trained).reshape(-1, hidden.shape[-1])
    losses = linear_cross_entropy(picked, weight, flat_targets[trained].repeat(steps), matmul_dtype).view(steps, -1)
    return losses.new_zeros(steps, flat_targets.numel()).index_copy(1, trained, losses).view(steps, *shape)


def act_token_losses(output: LoopOutput, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ACT: cross-entropy of the head on the halting-weighted readout Σ_t w_t r_t, and the
    ponder cost N + R (halting step plus remainder; R carries the gradient), per token [B, S]."""
    state, weights, halting = output.act()
    remainder = weights.gather(0, (halting - 1).unsqueeze(0)).squeeze(0)
    flat = targets.reshape(-1)
    losses = F.cross_entropy(output.model.logits(state).reshape(flat.numel(), -1), flat,
                             ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    return losses, halting.to(remainder.dtype) + remainder


def stage2_gate_loss(output: LoopOutput, targets: torch.Tensor, k: float = 50.0, gamma: float = 0.005) -> LossResult:
    """Ouro Stage II (docs/MATH.md §3): train the exit gate alone on the measured improvement.

    With detached per-step losses L_t, the improvement of going one step deeper is
    I_{t+1} = max(0, L_t − L_{t+1}); the target continuation probability is
    w = σ(k (I_{t+1} − γ)), and the gate of step t (which decides whether step t + 1 runs, and
    sees only h_t) gets BCE(λ_t, 1 − w), for t = 1..T−1; the last step's gate decides nothing.
    (docs/MATH.md §3 indexes the improvement by the step that achieved it; pairing it with the
    gate that decides whether that step runs keeps the step-1 gate trained.)
    """
    if output.gate_logits is None:
        raise LoopLMError("Stage II trains the exit gate: the model has none (model.exit_gate=false)")
    mask = (targets != IGNORE_INDEX).to(output.hidden_states[0].dtype)
    tokens = mask.sum().clamp_min(1.0)
    with torch.no_grad():
        token_losses = per_step_token_losses(output, targets)
    step_losses = token_losses.sum(dim=(1, 2)) / tokens
    improvement = (token_losses[:-1] - token_losses[1:]).clamp_min(0.0)
    continue_target = torch.sigmoid(k * (improvement - gamma))
    bce = F.binary_cross_entropy_with_logits(output.gate_logits[:-1], 1.0 - continue_target, reduction="none")
    loss = (bce * mask).sum() / (tokens * max(output.steps - 1, 1))
    p = output.exit_distribution.detach()
    mean_exit = expected_exit_step(p, mask)
    entropy = ((-(p * p.clamp_min(1e-12).log()).sum(0)) * mask).sum() / tokens
    return LossResult(loss, step_losses, mean_exit, entropy, tokens.detach())


def expected_exit_step(exit_distribution: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E_p[t] (1-based steps) from p(t) [T, B, S], averaged over the positions where mask is 1."""
    steps = torch.arange(1, exit_distribution.shape[0] + 1, dtype=exit_distribution.dtype,
                         device=exit_distribution.device).view(-1, 1, 1)
    return ((exit_distribution * steps).sum(0) * mask).sum() / mask.sum().clamp_min(1.0)


def _check_targets(output: LoopOutput, targets) -> None:
    """targets: an integer tensor shaped like the forward's ids, each a token id or IGNORE_INDEX
    (the values are checked as ``check_token_tensor`` checks ids: on the CPU, outside training)."""
    shape = tuple(output.hidden_states[0].shape[:2])
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.long, torch.int32) \
            or tuple(targets.shape) != shape:
        got = f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise LoopLMError(f"targets must be a {list(shape)} tensor of token ids (torch.long) like the forward's ids,"
                          f" got {got}")
    if not output.model.training and targets.device.type == "cpu" and targets.numel():
        vocab = output.model.config.vocab_size
        bad = targets[(targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))]
        if bad.numel():
            raise LoopLMError(f"targets hold {int(bad[0])}, neither a token id in [0, {vocab}) nor {IGNORE_INDEX}"
                              " (an untrained position)")


COLLAPSED_SHARE = 0.99  # of the exit distribution on loop step 1: the deeper steps are no longer trained


def exit_collapse_warning(training_step: int, histogram: list[float] | None, step_losses: list[float],
                          entropy_beta: float) -> str | None:
    """One line when Stage I's exit distribution has collapsed onto loop step 1 (``COLLAPSED_SHARE``
    of its mass or more): the deeper steps' losses are then weighted by ~0, get almost no gradient
    and drift up, so the model stops using its loop (its loss at step T can end far above step
    1's) while the training loss, which follows step 1, looks healthy.  None otherwise."""
    if histogram is None or len(histogram) < 2 or histogram[0] < COLLAPSED_SHARE:
        return None
    return (f"at training step {training_step}, {100 * histogram[0]:.1f} % of the exit distribution is on loop step 1,"
            f" so loop steps 2..{len(histogram)} get almost no gradient (loss by step now"
            f" {' '.join(f'{loss:.2f}' for loss in step_losses)}): the model is not learning to use its loop."
            f" Raise train.entropy_beta (now {entropy_beta:g}), or train every step first with"
            " train.objective=mean")


def compute_loss(output: LoopOutput, targets: torch.Tensor, objective: str = "stage1",
                 entropy_beta: float = 0.1, act_ponder_weight: float = 0.01) -> LossResult:
    """Objective over a forward pass; targets [B, S] with −100 marking untrained positions."""
    _check_targets(output, targets)
    for name, value in (("entropy_beta", entropy_beta), ("act_ponder_weight", act_ponder_weight)):
        if not (is_number(value) and math.isfinite(value)):
            raise LoopLMError(f"{name} must be a finite number, got {value!r}")
    mask = (targets != IGNORE_INDEX).to(output.hidden_states[0].dtype)
    tokens = mask.sum().clamp_min(1.0)
    token_losses = per_step_token_losses(output, targets)
    step_losses = token_losses.sum(dim=(1, 2)) / tokens
    zero = step_losses.new_zeros(())
    mean_exit_step, entropy = zero, zero
    if output.gate_logits is not None:
        log_p = output.log_exit_distribution
        p = log_p.exp()
        token_entropy = -(p * log_p).sum(0)
        entropy = (token_entropy * mask).sum() / tokens
        mean_exit_step = expected_exit_step(p, mask)
        histogram = (p * mask).sum(dim=(1, 2)).detach() / tokens
    if objective == "stage1" and output.gate_logits is None and output.steps == 1:
        loss = step_losses[0]  # one step (an unlooped model without a gate): p(1) = 1, no entropy
    elif objective == "stage1":
        if output.gate_logits is None:
            raise LoopLMError("objective stage1 needs an exit gate: set model.exit_gate=true")
        expected = (p * token_losses).sum(0)
        loss = ((expected - entropy_beta * token_entropy) * mask).sum() / tokens
    elif objective == "last":
        loss = step_losses[-1]
    elif objective == "mean":
        loss = step_losses.mean()
    elif objective == "act":
        if output.gate_logits is None:
            raise LoopLMError("objective act needs an exit gate (it halts on the gate): set model.exit_gate=true")
        act_losses, ponder = act_token_losses(output, targets)
        loss = ((act_losses + act_ponder_weight * ponder) * mask).sum() / tokens
    else:
        raise LoopLMError(f"unknown objective {objective!r}: use stage1, last, mean or act")
    if output.aux_loss is not None:
        loss = loss + output.aux_loss
    return LossResult(loss, step_losses.detach(), mean_exit_step.detach(), entropy.detach(), tokens.detach(),
                      histogram if output.gate_logits is not None else None)
