"""Mixture-of-experts SwiGLU FFN: shared experts + top-k routed experts (docs/MATH.md §6).

    scores  = softmax(router(x))                         [N, E]
    chosen  = top-k of (router(x) + balance_bias)        the bias steers choice, not weights
    weights = scores[chosen] / Σ scores[chosen]
    y       = shared(x) + Σ_k weights_k · expert_{chosen_k}(x)

Dispatch sorts the N·k (token, expert) assignments by expert and gathers the tokens in that
order.  While loads are even enough (E × the largest load ≤ 2 × the assignments), the rows
are placed into [E, capacity, D] slots and all experts run in two batched matmuls; otherwise
each expert runs once on its contiguous slice.  The results are weighted and added back per
token with one ``index_add_``.  No per-(k, expert) masks over all tokens, no dropped tokens.
``dense_reference`` computes every expert on every token with a dense [N, E]
weight matrix; ``tests/test_moe.py`` holds the two equal.

Balancing (aux-loss-free, DeepSeek-V3): in training each forward only *counts* the loads
(tokens routed to each expert, summed over every call — a core layer runs once per loop step);
once per optimiser step the trainer calls ``apply_balance``, which moves the bias by
``moe_bias_update_rate`` · sign(mean load − load) per expert, outside autograd, and resets the
count.  Updating inside the forward would let loop step t+1 route with a bias computed from the
whole batch's step-t loads — later tokens included, which breaks causality — and would apply the
rate T times per step.  Loads are summed over ranks when torch.distributed is initialised, so
every rank keeps the same bias.
An optional Switch-style auxiliary loss E · Σ_e f_e · P_e, scaled by
``moe_aux_loss_weight``, is collected by ``LoopLM.forward`` into ``LoopOutput.aux_loss``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.model.ffn import SwiGLU

PADDED_WASTE_LIMIT = 2.0  # batched matmuls while E · max load <= this × assignments


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, hidden = config.d_model, config.expert_hidden
        self.n_experts, self.top_k, self.hidden = config.n_experts, config.moe_top_k, hidden
        self.bias_update_rate = config.moe_bias_update_rate
        self.aux_loss_weight = config.moe_aux_loss_weight
        self.router = nn.Linear(dim, config.n_experts, bias=False)
        self.experts_gate_up = nn.Parameter(torch.empty(config.n_experts, dim, 2 * hidden))
        self.experts_down = nn.Parameter(torch.empty(config.n_experts, hidden, dim))
        # The shared experts, each of width shared_expert_hidden, run as one SwiGLU of their summed width.
        self.shared = (SwiGLU(dim, config.shared_expert_hidden * config.n_shared_experts)
                       if config.n_shared_experts else None)
        self.register_buffer("balance_bias", torch.zeros(config.n_experts))
        self.aux_losses: list[torch.Tensor] = []
        self.pending_load: torch.Tensor | None = None  # tokens per expert since the last apply_balance

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] → chosen experts [N, k], their weights [N, k], router probabilities [N, E]."""
        logits = self.router(x)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        chosen = torch.topk(logits.detach().float() + self.balance_bias, self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        weights = weights / weights.sum(-1, keepdim=True)
        return chosen, weights.to(x.dtype), scores

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.experts_gate_up[index]).split(self.hidden, dim=-1)
        return (F.silu(gate) * up) @ self.experts_down[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen, weights, scores = self.route(x)
        flat_experts = chosen.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        tokens = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        gathered = x.index_select(0, tokens)
        capacity = int(counts.max())
        if self.n_experts * capacity <= PADDED_WASTE_LIMIT * flat_experts.numel():
            expert_outputs = self._padded_experts(gathered, counts, capacity)
        else:  # a skewed router: padding would waste more than it saves
            expert_outputs = torch.cat([self.expert(index, piece)
                                        for index, piece in enumerate(gathered.split(counts.tolist()))
                                        if piece.shape[0]])
        routed = expert_outputs * weights.reshape(-1)[order, None]
        y = torch.zeros_like(x).index_add_(0, tokens, routed)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training:
            self._balance(counts, scores)
        return y.view(shape)

    def _padded_experts(self, gathered: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
        """All experts in two batched matmuls: sorted rows → [E, capacity, D] slots → back."""
        starts = torch.cumsum(counts, 0) - counts
        expert_of_row = torch.repeat_interleave(torch.arange(self.n_experts, device=counts.device), counts)
        slot = expert_of_row * capacity + torch.arange(gathered.shape[0], device=counts.device) - starts[expert_of_row]
        padded = gathered.new_zeros(self.n_experts * capacity, gathered.shape[1]).index_copy(0, slot, gathered)
        gate, up = torch.bmm(padded.view(self.n_experts, capacity, -1), self.experts_gate_up).split(self.hidden, -1)
        out = torch.bmm(F.silu(gate) * up, self.experts_down)
        return out.reshape(self.n_experts * capacity, -1).index_select(0, slot)

    def dense_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same output computed the plain way: every expert on every token, dense weights."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen, weights, _ = self.route(x)
        dense = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device).scatter(1, chosen, weights)
        y = sum(dense[:, index, None] * self.expert(index, x) for index in range(self.n_experts))
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)

    def _balance(self, counts: torch.Tensor, scores: torch.Tensor) -> None:
        if self.aux_loss_weight > 0:
            fraction = counts.to(scores.dtype) / counts.sum()
            self.aux_losses.append(self.aux_loss_weight * self.n_experts * (fraction * scores.mean(0)).sum())
        if self.bias_update_rate > 0:
            load = counts.detach().to(self.balance_bias.dtype)
            self.pending_load = load if self.pending_load is None else self.pending_load + load

    @torch.no_grad()
    def apply_balance(self) -> None:
        """Move the balancing bias once from the loads counted since the last call (see the module
        docstring); a no-op when nothing was counted."""
        if self.pending_load is None:
            return
        load, self.pending_load = self.pending_load, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.balance_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def pop_aux_losses(self) -> list[torch.Tensor]:
        losses, self.aux_losses = self.aux_losses, []
        return losses
