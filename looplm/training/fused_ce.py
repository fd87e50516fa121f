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
The row passes (softmax and loss; the gradient of the logits) are ``looplm.kernels.ops``'s
``softmax_cross_entropy`` and ``cross_entropy_grad``: one pass over each row in C on a CPU,
their torch references elsewhere (and where the kernel is not built).
Under bf16 autocast (``matmul_dtype``) the matmuls take bf16 operands and the softmax buffer,
losses and gradients stay float32: the same values as autocast's ``F.linear`` followed by
``F.cross_entropy`` (which autocast runs in float32).
"""

from __future__ import annotations

import weakref

import torch

from looplm.kernels import ops

CHUNK_ROWS = 4096
BACKWARD_CHUNK_ROWS = 1024  # rows of dL/dlogits held at once: a small buffer, reused


class _BufferPool:
    """The [rows, V] probability buffer of the last graph that was freed, reused by the next
    forward.  A fresh 128 MB buffer each step (the reference shape's Stage I loss) costs the
    kernel's page faults on first touch, ~10 ms a step on a CPU; a buffer goes back to the pool
    only when its graph's context is freed (no backward can read it any more, ``retain_graph``
    included), and the pool keeps one buffer, the largest."""

    def __init__(self):
        self._free: torch.Tensor | None = None

    def take(self, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        free, self._free = self._free, None
        fits = free is not None and free.numel() >= rows * columns
        if fits and free.dtype == like.dtype and free.device == like.device:
            return free[:rows * columns].view(rows, columns)
        self._free = free
        return like.new_empty(rows * columns).view(rows, columns)

    def give_back_when_freed(self, ctx, buffer: torch.Tensor) -> None:
        weakref.finalize(ctx, self._give_back, buffer._base if buffer._base is not None else buffer)

    def _give_back(self, buffer: torch.Tensor) -> None:
        if self._free is None or buffer.numel() > self._free.numel():
            self._free = buffer


_POOL = _BufferPool()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                matmul_dtype: torch.dtype | None) -> torch.Tensor:
        rows = hidden.shape[0]
        # The matmul operands (bf16 under autocast); the softmax and the loss stay in hidden's dtype.
        operand, head = (hidden, weight) if matmul_dtype is None else (hidden.to(matmul_dtype), weight.to(matmul_dtype))
        probs = _POOL.take(rows, weight.shape[0], hidden)
        _POOL.give_back_when_freed(ctx, probs)
        losses = hidden.new_empty(rows)
        for start in range(0, rows, CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, rows)
            block = probs[start:end]
            # The chunk's logits: written straight into the buffer in float32; a bf16 product
            # stays bf16 (as autocast's matmul output is) and is widened by the softmax pass.
            if operand.dtype == probs.dtype:
                logits = torch.mm(operand[start:end], head.t(), out=block)
            else:
                logits = torch.mm(operand[start:end], head.t())
            # The softmax probabilities, in place in the buffer and kept for backward.
            losses[start:end] = ops.softmax_cross_entropy(logits, targets[start:end], block)
        ctx.save_for_backward(operand, head, targets, probs)
        ctx.input_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        operand, head, targets, probs = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = probs.new_empty(operand.shape, dtype=ctx.input_dtype) if need_hidden else None
        grad_weight = probs.new_zeros(head.shape) if need_weight else None
        # dL/dlogits in the matmuls' dtype (bf16 under autocast), a chunk of rows at a time.
        buffer = probs.new_empty(min(BACKWARD_CHUNK_ROWS, probs.shape[0]), probs.shape[1], dtype=head.dtype)
        grad_losses = grad_losses.to(probs.dtype).contiguous()
        for start in range(0, probs.shape[0], BACKWARD_CHUNK_ROWS):
            end = min(start + BACKWARD_CHUNK_ROWS, probs.shape[0])
            grad_logits = buffer[:end - start]
            ops.cross_entropy_grad(probs[start:end], grad_losses[start:end], targets[start:end], grad_logits)
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
