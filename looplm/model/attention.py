"""Multi-head / grouped-query causal self-attention with RoPE, on torch SDPA.

Shapes: x [B, S, D]; q [B, H, S, hd]; k, v [B, H_kv, S, hd]; H_kv divides H (GQA).
With a cache, this call's keys and values are written into the slot's preallocated storage
at positions [start, start+S) and the queries attend over [0, start+S).
"""

import torch
from torch import nn
from torch.nn import functional as F

from looplm.model.rope import apply_rope


def causal_mask_with_offset(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Boolean [queries, keys] mask, True = may attend: query i sits at key position keys−queries+i."""
    offset = keys - queries
    query_positions = torch.arange(queries, device=device).unsqueeze(1) + offset
    return torch.arange(keys, device=device).unsqueeze(0) <= query_positions


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_store: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        """kv_store: this layer-and-step's cache storage, each [B, H_kv, max_len, hd], or None."""
        batch, length, _ = x.shape
        query_key, v = self.qkv(x).view(batch, length, -1, self.head_dim).transpose(1, 2).split(
            [self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=1)
        # One rotation for queries and keys together: half the elementwise ops of two calls.
        q, k = apply_rope(query_key, cos, sin).split([self.n_heads, self.n_kv_heads], dim=1)
        gqa = self.n_kv_heads != self.n_heads
        if kv_store is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=gqa)
        else:
            key_store, value_store = kv_store
            end = start + length
            key_store[:, :, start:end] = k
            value_store[:, :, start:end] = v
            mask = None if length == 1 else causal_mask_with_offset(length, end, x.device)
            o = F.scaled_dot_product_attention(q, key_store[:, :, :end], value_store[:, :, :end],
                                               attn_mask=mask, enable_gqa=gqa)
        return self.out(o.transpose(1, 2).reshape(batch, length, -1))
