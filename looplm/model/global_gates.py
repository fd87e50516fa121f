"""nanochat's global gates (nanochat-rs, ``SharedLoopBlock``: "global gate mechanisms (g_qk,
g_ffn) with sigmoid mixing", "global state accumulates as average of attention + FFN
outputs").  Our reading, per core layer and per token, with s the 0-based loop step:

    c_s     = ½ (Δattn_s + Δffn_s)            the layer's two residual updates at step s
    G_s     = (1/s) Σ_{s' < s} c_{s'}         the global state: their running mean (none at s = 0)
    x_attn  = σ(g_qk)  ⊙ n₁(h) + (1 − σ(g_qk))  ⊙ G_s      the attention's input
    x_ffn   = σ(g_ffn) ⊙ n₂(h) + (1 − σ(g_ffn)) ⊙ G_s      the FFN's input

with g_qk, g_ffn ∈ R^D learned (zero at initialisation: an equal mix).  At step 0 there is no
global state and the layer is the plain layer.  G is per token and per step, so it never
crosses positions (causal by construction) and a decoder carries it across one token's steps
only (``looplm.model.carry``: a ``LoopCarry``, or a ``RowCarry`` for decode rows at different
steps, which mixes only the rows past their first step); nothing is cached between tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from looplm.errors import LoopLMError
from looplm.model.carry import LoopCarry


class GlobalGates(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.g_qk = nn.Parameter(torch.zeros(dim))
        self.g_ffn = nn.Parameter(torch.zeros(dim))

    def reset_extra_parameters(self) -> None:
        with torch.no_grad():
            self.g_qk.zero_()
            self.g_ffn.zero_()

    def state(self, carry: LoopCarry | None) -> torch.Tensor | None:
        """G_s of the current step, or None at step 0."""
        if carry is None:
            raise LoopLMError("model.global_gates carries a state across loop steps: run the layer through"
                              " LoopLM.core_step with a LoopCarry")
        return carry.latest(self)

    @staticmethod
    def mix(x: torch.Tensor, state: torch.Tensor | None, gate: torch.Tensor, carry) -> torch.Tensor:
        """σ(gate) ⊙ x + (1 − σ(gate)) ⊙ state (x itself where there is no state yet)."""
        if state is None:
            return x
        weight = torch.sigmoid(gate)
        mixed = weight * x + (1 - weight) * state
        return mixed if carry.started is None else torch.where(carry.started, mixed, x)

    def record(self, carry: LoopCarry, state: torch.Tensor | None, attention: torch.Tensor,
               ffn: torch.Tensor) -> None:
        """G_{s+1} = (s · G_s + c_s) / (s + 1) with c_s = ½ (attention + ffn)."""
        update = 0.5 * (attention + ffn)
        if state is None:
            carry.put(self, update)
            return
        step = carry.step if isinstance(carry.step, int) else carry.step.view(-1, 1, 1).to(update.dtype)
        mean = (step * state + update) / (step + 1)
        carry.put(self, mean if carry.started is None else torch.where(carry.started, mean, update))
