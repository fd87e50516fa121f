"""Per-token cross-entropy of a linear head, fused: L_i = logsumexp(W h_i) − (W h_i)[y_i].

``linear_cross_entropy`` gives the same losses and gradients as
``F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")`` (the reference in
``objectives.per_step_token_losses``; ``tests/test_fused_ce.py`` holds them equal) with fewer
passes over the [rows, V] logits, which dominate a small model's training step after the
matmuls:
- forward: one matmul per row chunk written into a preallocated buffer, which is turned into
  softmax probabilities in place (max, exp, sum, divide) and kept for backward; the loss is
  log Σ exp + max − the target's logit;
- backward: row chunk by row chunk, dL/dlogits = (p − onehot(y))·g is formed in one small
  reused buffer, followed by the matmuls for dL/dh and dL/dW.  No log-softmax output, no
  zero-filled one-hot gradient, no second [rows, V] buffer; the saved probabilities are left
  intact, so backward can run again (``retain_graph``, gradcheck).
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 4096
BACKWARD_CHUNK_ROWS = 1024  # rows of dL/dlogits held at once: a small buffer, reused


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        probs = hidden.new_empty(rows, weight.shape[0])
        losses = hidden.new_empty(rows)
        for start in range(0, rows, CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, rows)
            block = probs[start:end]
            torch.mm(hidden[start:end], weight.t(), out=block)
            target_logits = block.gather(1, targets[start:end, None]).squeeze(1)
            top = block.amax(dim=1, keepdim=True)
            total = block.sub_(top).exp_().sum(dim=1, keepdim=True)  # in place: exp(logits − max)
            block.div_(total)  # softmax probabilities, kept for backward
            losses[start:end] = (total.log() + top).squeeze(1) - target_logits
        ctx.save_for_backward(hidden, weight, targets, probs)
        ctx.consumed = False
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, targets, probs = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        buffer = probs.new_empty(min(BACKWARD_CHUNK_ROWS, probs.shape[0]), probs.shape[1])
        for start in range(0, probs.shape[0], BACKWARD_CHUNK_ROWS):
            end = min(start + BACKWARD_CHUNK_ROWS, probs.shape[0])
            scale = grad_losses[start:end, None]
            grad_logits = torch.mul(probs[start:end], scale, out=buffer[:end - start])
            grad_logits.scatter_add_(1, targets[start:end, None], -scale)  # (p − onehot(y))·g
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), hidden[start:end])
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Losses [M] of logits hidden [M, D] @ weight[V, D]ᵀ against targets [M] (all valid ids)."""
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight, targets.contiguous())
