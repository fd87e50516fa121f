"""Multi-head / grouped-query causal self-attention with RoPE, on torch SDPA.

Shapes: x [B, S, D]; q [B, H, S, hd]; k, v [B, H_kv, S, hd]; H_kv divides H (GQA).
With a cache, the layer is handed a storage object (``looplm.cache``: ``write`` this call's
keys and values at their positions, ``attend`` over the keys each query may see); ``start`` is
the first position (an int, or [B] per row for one token per row at its own position).

``attention="gated"`` (Qwen3.5 / Qwen3-Next gated attention, docs/MATH.md §6): the query
projection is twice as wide and its second half, per head, is an output gate:
o = attend(q, k, v) ⊙ σ(gate); q and k are RMS-normed per head before RoPE.  Partial RoPE
(``rope_fraction``) rotates the first head dims only; both options work for either kind.

Append-first (nanochat's loop): at loop steps after the first, a core layer attends with the
current step's queries to the keys and values its first step computed — a ``SharedKV`` cache
slot (nothing is written), or, without a cache under ``model.kv_append_first``, the step-1
keys and values this call recorded in the ``LoopCarry``.
"""

import torch
from torch import nn
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.model.carry import LoopCarry
from looplm.model.norms import RMSNorm
from looplm.model.rope import apply_rope


def first_step_kv(module: nn.Module, carry: LoopCarry | None, keys: torch.Tensor, values: torch.Tensor,
                  append_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Append-first without a cache: step 1 records this call's keys and values in the carry and
    uses them; later steps use the recorded ones instead of their own (unchanged otherwise)."""
    if not append_first or carry is None:
        return keys, values
    if carry.step == 0:
        carry.put(module, (keys, values))
        return keys, values
    return carry.first(module)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d_model = config.d_model
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.gated = config.attention.kind == "gated"
        self.append_first = config.kv_append_first
        query_width = self.n_heads * self.head_dim * (2 if self.gated else 1)
        self.qkv = nn.Linear(d_model, query_width + 2 * self.n_kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)
        self.dropout = config.dropout  # on the attention weights, in training
        if self.gated:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.zero_centered_norm)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.zero_centered_norm)

    def _project(self, x: torch.Tensor):
        """x [B, S, D] → query_key [B, H + H_kv, S, hd], v [B, H_kv, S, hd], gate [B, S, H·hd] or None."""
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        projected = self.qkv(x)
        if not self.gated:
            query_key, v = projected.view(batch, length, -1, head_dim).transpose(1, 2).split(
                [heads + kv_heads, kv_heads], dim=1)
            return query_key, v, None
        query_gate, k, v = projected.split([2 * heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, gate = query_gate.view(batch, length, heads, 2 * head_dim).split(head_dim, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k.view(batch, length, kv_heads, head_dim)).transpose(1, 2)
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        return torch.cat([q, k], dim=1), v, gate.reshape(batch, length, heads * head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, store=None,
                start: int | torch.Tensor = 0, carry: LoopCarry | None = None) -> torch.Tensor:
        """store: this layer-and-step's cache storage (``write``/``attend``), or None (causal
        attention over x alone); carry: the call's earlier loop steps (append-first without a cache)."""
        batch, length, _ = x.shape
        query_key, v, gate = self._project(x)
        # One rotation for queries and keys together: half the elementwise ops of two calls.
        q, k = apply_rope(query_key, cos, sin).split([self.n_heads, self.n_kv_heads], dim=1)
        if store is None:
            k, v = first_step_kv(self, carry, k, v, self.append_first)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1,
                                               enable_gqa=self.n_kv_heads != self.n_heads,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            store.write(k, v, start)  # a shared slot (append-first after step 1) writes nothing
            o = store.attend(q, start)
        o = o.transpose(1, 2).reshape(batch, length, -1)
        return self.out(o * torch.sigmoid(gate) if self.gated else o)
