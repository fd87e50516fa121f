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
Under bf16 autocast (``matmul_dtype``) the matmuls take bf16 operands and the softmax buffer,
losses and gradients stay float32: the same values as autocast's ``F.linear`` followed by
``F.cross_entropy`` (which autocast runs in float32).
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 4096
BACKWARD_CHUNK_ROWS = 1024  # rows of dL/dlogits held at once: a small buffer, reused


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                matmul_dtype: torch.dtype | None) -> torch.Tensor:
        rows = hidden.shape[0]
        # The matmul operands (bf16 under autocast); the softmax and the loss stay in hidden's dtype.
        operand, head = (hidden, weight) if matmul_dtype is None else (hidden.to(matmul_dtype), weight.to(matmul_dtype))
        probs = hidden.new_empty(rows, weight.shape[0])
        losses = hidden.new_empty(rows)
        for start in range(0, rows, CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, rows)
            block = probs[start:end]
            _product(operand[start:end], head.t(), block)
            target_logits = block.gather(1, targets[start:end, None]).squeeze(1)
            top = block.amax(dim=1, keepdim=True)
            total = block.sub_(top).exp_().sum(dim=1, keepdim=True)  # in place: exp(logits − max)
            block.div_(total)  # softmax probabilities, kept for backward
            losses[start:end] = (total.log() + top).squeeze(1) - target_logits
        ctx.save_for_backward(operand, head, targets, probs)
        ctx.input_dtype = hidden.dtype
        ctx.consumed = False
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        operand, head, targets, probs = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = probs.new_empty(operand.shape, dtype=ctx.input_dtype) if need_hidden else None
        grad_weight = probs.new_zeros(head.shape) if need_weight else None
        buffer = probs.new_empty(min(BACKWARD_CHUNK_ROWS, probs.shape[0]), probs.shape[1])
        for start in range(0, probs.shape[0], BACKWARD_CHUNK_ROWS):
            end = min(start + BACKWARD_CHUNK_ROWS, probs.shape[0])
            scale = grad_losses[start:end, None]
            grad_logits = torch.mul(probs[start:end], scale, out=buffer[:end - start])
            grad_logits.scatter_add_(1, targets[start:end, None], -scale)  # (p − onehot(y))·g
            grad_logits = grad_logits.to(head.dtype)
            if need_hidden:
                _product(grad_logits, head, grad_hidden[start:end])
            if need_weight:
                _product(grad_logits.t(), operand[start:end], grad_weight, accumulate=True)
        return grad_hidden, grad_weight, None, None


def _product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out = a @ b (out += a @ b with ``accumulate``), in place when the dtypes agree; a bf16
    product is rounded to bf16 once (as autocast's matmul output is), then widened into ``out``."""
    if a.dtype == out.dtype:
        out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    elif accumulate:
        out.add_(torch.mm(a, b))
    else:
        out.copy_(torch.mm(a, b))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Losses [M] of logits hidden [M, D] @ weight[V, D]ᵀ against targets [M] (all valid ids).

    matmul_dtype (bf16 under autocast): the matmuls' operand dtype; the logits are rounded to
    it as autocast's ``F.linear`` rounds them, while the softmax, the losses and the gradients
    of hidden and weight stay in their own dtypes (float32)."""
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight, targets.contiguous(), matmul_dtype)
