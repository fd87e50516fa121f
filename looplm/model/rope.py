"""Rotary position embedding (Su et al. 2021), rotate-half layout as in Llama and Ouro.

For a head vector x split in halves (x₁, x₂) at position p with angles θ_i = p · base^(−2i/d):
    rope(x) = (x₁ cos θ − x₂ sin θ,  x₂ cos θ + x₁ sin θ).
"""

import torch
from torch import nn

from looplm.kernels import ops


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_len). Tables: [max_len, head_dim]."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        inverse_frequency = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inverse_frequency)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, start: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start..start+length−1, each [length, head_dim]; for per-row
        positions start [B] (one token each), [B, 1, 1, head_dim]."""
        if isinstance(start, torch.Tensor):
            return self.cos[start].unsqueeze(1).unsqueeze(1), self.sin[start].unsqueeze(1).unsqueeze(1)
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, hd] by the tables cos, sin [S, r]: the first r dims (partial RoPE
    when r < hd; the rest pass through).  The rotation runs in x's dtype: under bf16 autocast the
    float32 tables are rounded to bf16 (as Llama-style code does) rather than promoting the
    queries and keys to float32, which would cost two more passes (the product in float32, then
    autocast's cast back to bf16 for attention); in float32 nothing changes.  Training on a CPU
    (gradients on, tables [S, r]) rotates in one C pass each way (``looplm.kernels.ops.rope``:
    float32 math, so bf16 input is rounded once, where the torch ops round each product)."""
    if ops.trains_on_cpu(x) and cos.dim() == 2 and x.dim() == 4:
        return _Rope.apply(x, cos, sin)
    return ops.rope_reference(x, cos, sin)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return ops.rope(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return ops.rope(grad, cos, sin, inverse=True), None, None
