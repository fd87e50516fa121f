"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) ⊙ up(x)), x: [B, S, D]."""

import torch
from torch import nn
from torch.nn import functional as F


class SwiGLU(nn.Module):
    """Gate and up projections share one matmul (one [D, 2F] weight) for speed."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)
