"""One transformer layer: attention + SwiGLU with pre-norm or Ouro's sandwich norm.

pre:       h = h + attn(n₁(h));          h = h + ffn(n₂(h))
sandwich:  h = h + n_b(attn(n_a(h)));    h = h + n_d(ffn(n_c(h)))     (REFERENCE §1)
"""

import torch
from torch import nn

from looplm.config import ModelConfig
from looplm.model.attention import Attention
from looplm.model.ffn import SwiGLU
from looplm.model.gdn import GatedDeltaNet
from looplm.model.rwkv import RWKVSlotMixer
from looplm.model.mla import MultiHeadLatentAttention
from looplm.model.moe import MoE
from looplm.model.norms import RMSNorm


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, kind: str = "A"):
        super().__init__()
        dim, eps = config.d_model, config.norm_eps
        zero = config.zero_centered_norm
        self.attn_norm = RMSNorm(dim, eps, zero)
        # The token mixer: attention of the configured kind, or Gated DeltaNet (kind "G").
        self.kind = kind
        if kind == "G":
            self.attn = GatedDeltaNet(config)
        elif kind == "R":
            self.attn = RWKVSlotMixer(config)
        else:
            self.attn = MultiHeadLatentAttention(config) if config.attention == "mla" else Attention(config)
        self.ffn_norm = RMSNorm(dim, eps, zero)
        self.ffn = SwiGLU(dim, config.ffn_hidden) if config.ffn == "dense" else MoE(config)
        sandwich = config.norm == "sandwich"
        self.attn_post_norm = RMSNorm(dim, eps, zero) if sandwich else nn.Identity()
        self.ffn_post_norm = RMSNorm(dim, eps, zero) if sandwich else nn.Identity()

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_store: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """h: [B, S, D] → [B, S, D].  mask: which cached keys each row may attend to (bool,
        broadcastable to [B, 1, S, keys]; the batched engine's right-aligned rows), or None."""
        h = h + self.attn_post_norm(self.attn(self.attn_norm(h), cos, sin, kv_store, start, mask))
        return h + self.ffn_post_norm(self.ffn(self.ffn_norm(h)))
