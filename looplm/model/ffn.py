"""Feed-forward blocks, x: [B, S, D].

- ``SwiGLU`` (Shazeer 2020): down(silu(gate(x)) ⊙ up(x)).
- ``ChannelMix`` (lrnnSMDDS): a one-step token shift, then SwiGLU:
  xm_t = μ ⊙ x_t + (1 − μ) ⊙ x_{t−1},  μ = σ(channel_mix) per channel,  x_{−1} = 0;
  out_t = SwiGLU(xm_t).  Decoding carries the previous position's input x_{t−1}.
"""

import torch
from torch import nn
from torch.nn import functional as F

from looplm.kernels import ops


class SwiGLU(nn.Module):
    """Gate and up projections share one matmul (one [D, 2F] weight) for speed."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if ops.trains_on_cpu(gate_up):
            return self.down(_SwiGLUProduct.apply(gate_up))
        gate, up = gate_up.split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class _SwiGLUProduct(torch.autograd.Function):
    """silu(gate)·up of a training step on a CPU: ``looplm.kernels.ops.swiglu_rows`` (one pass in C,
    float32 math; its torch reference where the kernel does not serve) and its backward, saving
    only gate_up (torch's version saves silu's input and output and the product's operands)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        return ops.swiglu_rows(gate_up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        return ops.swiglu_grad_rows(gate_up, grad.contiguous().to(gate_up.dtype))


class ChannelMix(SwiGLU):
    """SwiGLU on the token-shifted input; ``channel_mix`` starts at 0.5 raw (μ = σ(0.5)), as the spec."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__(d_model, hidden)
        self.channel_mix = nn.Parameter(torch.empty(d_model))
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():
            self.channel_mix.fill_(0.5)

    def forward(self, x: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """previous: [B, D] input of the position before x's first one (the decode cache; updated
        in place to x's last position), or None (a sequence start: x_{−1} = 0)."""
        before = x.new_zeros(x.shape[0], 1, x.shape[-1]) if previous is None else previous[:, None].to(x.dtype)
        shifted = torch.cat([before, x[:, :-1]], dim=1)
        if previous is not None:
            previous.copy_(x[:, -1])
        mix = torch.sigmoid(self.channel_mix)
        return super().forward(mix * x + (1 - mix) * shifted)
