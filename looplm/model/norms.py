"""RMSNorm: y = x / sqrt(mean(x²) + ε) · w;  LayerNorm: y = (x − mean(x)) / sqrt(var(x) + ε) · w + b.

``make_norm`` builds the residual-stream norm a config asks for (``model.norm_type``: ``rms``,
or ``layer`` — LayerNorm with a bias and the biased variance, as lrnnSMDDS).

Two implementations of the same math: ``F.rms_norm`` (the reference) and ``rms_norm_fused``,
an autograd function with a hand-written backward (one saved normalised x̂, and
dx = (g·w − x̂·mean(g·w·x̂)) / rms) whose row passes are ``looplm.kernels.ops.rms_norm_rows`` and
``rms_norm_grad_rows``: one pass per row in C for float32 on a CPU, their torch references
elsewhere.  A looped model applies ~4 norms per layer per loop step, so the passes over the
activations the C saves are a tenth of a small model's training step.  ``tests/test_model.py`` holds the two
equal in values and gradients.  Under bf16 autocast the norm runs in float32 (its input cast up,
its output float32): the mean of x² over thousands of bf16 values would otherwise carry bf16's
rounding into every layer's scale (``looplm.precision.without_autocast``).
"""

import torch
from torch import nn
from torch.nn import functional as F

from looplm.kernels import ops
from looplm.precision import without_autocast


class _RMSNormFunction(torch.autograd.Function):
    # Under torch.compile the torch references are traced (and fused by the compiler); a C call
    # would break the graph.
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        rows = ops.rms_norm_rows_reference if torch.compiler.is_compiling() else ops.rms_norm_rows
        out, normed, inverse_rms = rows(x.contiguous(), weight.contiguous(), eps, out_dtype or x.dtype)
        ctx.save_for_backward(normed, inverse_rms, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, inverse_rms, weight = ctx.saved_tensors
        rows = ops.rms_norm_grad_rows_reference if torch.compiler.is_compiling() else ops.rms_norm_grad_rows
        grad_x, grad_weight = rows(grad.contiguous(), normed, inverse_rms, weight.contiguous(), ctx.needs_input_grad[1])
        return grad_x, grad_weight, None, None


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

    # Set by a layer whose next operation on this norm's output is a matmul (a projection):
    # under CPU bf16 autocast the norm then hands out its float32 output already rounded to bf16,
    # the value autocast's cast would give, one pass instead of two (and its gradient arrives bf16).
    feeds_matmul = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.feeds_matmul and ops.trains_on_cpu(x) and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and self.weight.dtype == torch.float32):
            with torch.autocast("cpu", enabled=False):
                return _RMSNormFunction.apply(x.float(), self.scale, self.eps, torch.bfloat16)
        # Under bf16 autocast the statistics and the output stay in the weight's dtype (float32).
        return without_autocast(self._normalise, x, self.weight.dtype)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale
        if torch.is_grad_enabled() and x.dtype == scale.dtype:
            return rms_norm_fused(x, scale, self.eps)
        return F.rms_norm(x, (x.shape[-1],), scale, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension (Ba et al. 2016), x: [..., D]: the biased variance,
    a scale w (1 + w when zero_centered) and a bias b starting at 0."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    @property
    def scale(self) -> torch.Tensor:
        return 1.0 + self.weight if self.zero_centered else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.bias, self.eps)


def make_norm(config, dim: int | None = None) -> nn.Module:
    """The residual-stream norm of ``config`` (``norm_type``, ``norm_eps``, ``zero_centered_norm``)
    over ``dim`` channels (default d_model)."""
    kind = LayerNorm if config.norm_type == "layer" else RMSNorm
    return kind(config.d_model if dim is None else dim, config.norm_eps, config.zero_centered_norm)
