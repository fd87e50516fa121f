"""Multi-head latent attention (DeepSeek-V2; docs/MATH.md §6), causal, with RoPE on a slice.

    queries  q = q_up(norm(q_down(x)))  (or one projection when mla_q_rank = 0)
             per head: [q_nope (d_nope) | q_rope (d_rope)]
             (d_nope = mla_nope_dim, d_v = mla_value_dim: each head_dim unless set)
    latent   [c (r_kv) | k_rope (d_rope)] = kv_down(x);  c ← norm(c)
    keys     per head: [k_nope | rope(k_rope)] with k_nope, v = kv_up(c) split per head
    scores   (q_nope·k_nope + rope(q_rope)·rope(k_rope)) / √(d_nope + d_rope)

The cache holds only c and rope(k_rope) per position: (r_kv + d_rope) floats per layer and
step instead of 2·H·head_dim.  Two ways to attend over a cached latent, equal in exact
arithmetic (``tests/test_mla.py``):
- recompute: up-project every cached c into k_nope and v, then ordinary attention (the
  reference; used for prompts and training);
- absorbed (decode, one new token): fold kv_up's key half into the query,
  q̃ = q_nope · W_uk (a vector in latent space), score against c directly, average c with
  the attention weights and up-project once with W_uv, so the per-token work does not
  re-expand the whole cache.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.model.attention import first_step_kv
from looplm.model.norms import RMSNorm
from looplm.model.rope import apply_rope


class MultiHeadLatentAttention(nn.Module):
    absorb_for_decode = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        d_model, eps = config.d_model, config.norm_eps
        self.n_heads = config.n_heads
        self.nope_dim, self.rope_dim, self.value_dim = config.mla_nope_dim, config.mla_rope_dim, config.mla_value_dim
        self.dropout = config.dropout  # on the attention weights, in training
        self.kv_rank = config.mla_kv_rank
        query_width = self.n_heads * (self.nope_dim + self.rope_dim)
        if config.mla_q_rank:
            self.q_down = nn.Linear(d_model, config.mla_q_rank, bias=False)
            self.q_norm = RMSNorm(config.mla_q_rank, eps, config.zero_centered_norm)
            self.q_up = nn.Linear(config.mla_q_rank, query_width, bias=False)
        else:
            self.q_proj = nn.Linear(d_model, query_width, bias=False)
        self.kv_down = nn.Linear(d_model, self.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, eps, config.zero_centered_norm)
        self.kv_up = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.value_dim), bias=False)
        self.out = nn.Linear(self.n_heads * self.value_dim, d_model, bias=False)
        self.append_first = config.kv_append_first

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, D] → q_nope [B, H, S, d_nope], rotated q_rope [B, H, S, d_rope]."""
        batch, length, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if hasattr(self, "q_down") else self.q_proj(x)
        q = q.view(batch, length, self.n_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, D] → what the cache stores: normed c [B, 1, S, r_kv], rotated k_rope [B, 1, S, d_rope]."""
        c, k_rope = self.kv_down(x).unsqueeze(1).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c), apply_rope(k_rope, cos, sin)

    def expand(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c [B, 1, L, r_kv] → k_nope [B, H, L, d_nope], v [B, H, L, d_v] (recomputed from the latent)."""
        batch, _, length, _ = c.shape
        kv = self.kv_up(c[:, 0]).view(batch, length, self.n_heads, -1).transpose(1, 2)
        return kv.split([self.nope_dim, self.value_dim], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, store=None,
                start: int | torch.Tensor = 0, carry=None) -> torch.Tensor:
        """store: the cache storage of the latent ("keys" [B, 1, max_len, r_kv]) and the rope key
        ("values" [B, 1, max_len, d_rope]): ``write`` this call's (a shared append-first slot writes
        nothing), ``read`` what each query sees; carry: as ``Attention``'s."""
        batch, length, _ = x.shape
        q_nope, q_rope = self._queries(x, cos, sin)
        c, k_rope = self.latent(x, cos, sin)
        mask = None
        if store is None:
            c, k_rope = first_step_kv(self, carry, c, k_rope, self.append_first)
        else:
            store.write(c, k_rope, start)
            c, k_rope, mask = store.read(start, length)
        # The absorbed form folds kv_up's float weight into the query; a ternary kv_up quantises
        # its input (the latent) per position, which only the recompute form reproduces.
        if store is not None and length == 1 and self.absorb_for_decode and type(self.kv_up) is nn.Linear:
            o = self._absorbed(q_nope, q_rope, c, k_rope, mask)
        else:
            k_nope, v = self.expand(c)
            q = torch.cat([q_nope, q_rope], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=store is None and length > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(batch, length, -1))

    def _absorbed(self, q_nope, q_rope, c, k_rope, key_mask=None) -> torch.Tensor:
        """One query position over the cached latent without expanding it: [B, H, 1, d_v]."""
        weight = self.kv_up.weight.view(self.n_heads, self.nope_dim + self.value_dim, self.kv_rank)
        key_up, value_up = weight.split([self.nope_dim, self.value_dim], dim=1)  # [H, d_nope | d_v, r_kv]
        q_latent = torch.einsum("bhsn,hnr->bhsr", q_nope, key_up)
        scores = (torch.einsum("bhsr,blr->bhsl", q_latent, c[:, 0])
                  + torch.einsum("bhsd,bld->bhsl", q_rope, k_rope[:, 0]))
        scores = scores * (self.nope_dim + self.rope_dim) ** -0.5
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        weights = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        return torch.einsum("bhsr,hvr->bhsv", torch.einsum("bhsl,blr->bhsr", weights, c[:, 0]), value_up)
