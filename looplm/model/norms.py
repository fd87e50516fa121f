"""RMSNorm: y = x / sqrt(mean(x²) + ε) · w.

Two implementations of the same math: ``F.rms_norm`` (the reference) and ``rms_norm_fused``,
an autograd function with a hand-written backward that runs about 1.7× faster on a CPU
(fewer passes over x: one reduction for the scale, one saved normalised x̂, and
dx = (g·w − x̂·mean(g·w·x̂)) / rms).  A looped model applies ~4 norms per layer per loop
step, so this is a few per cent of a training step.  ``tests/test_model.py`` holds the two
equal in values and gradients.  Under bf16 autocast the norm runs in float32 (its input cast up,
its output float32): the mean of x² over thousands of bf16 values would otherwise carry bf16's
rounding into every layer's scale (``looplm.precision.without_autocast``).
"""

import torch
from torch import nn
from torch.nn import functional as F

from looplm.precision import without_autocast


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        inverse_rms = torch.rsqrt(mean_square.add_(eps))
        normed = x * inverse_rms
        ctx.save_for_backward(normed, inverse_rms, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, inverse_rms, weight = ctx.saved_tensors
        grad_normed = grad * weight
        projection = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1).div_(normed.shape[-1])
        grad_x = torch.addcmul(grad_normed, normed, projection, value=-1).mul_(inverse_rms)
        grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with the fast backward (same dtype for x and weight)."""
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (Zhang & Sennrich 2019). x: [..., D].

    zero_centered (Qwen3.5): the scale is 1 + w with w initialised to zero, so weight decay
    pulls the scale toward 1 rather than 0.
    """

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    @property
    def scale(self) -> torch.Tensor:
        return 1.0 + self.weight if self.zero_centered else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under bf16 autocast the statistics and the output stay in the weight's dtype (float32).
        return without_autocast(self._normalise, x, self.weight.dtype)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale
        if torch.is_grad_enabled() and x.dtype == scale.dtype:
            return rms_norm_fused(x, scale, self.eps)
        return F.rms_norm(x, (x.shape[-1],), scale, self.eps)
