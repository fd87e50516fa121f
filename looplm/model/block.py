"""One transformer layer: a token mixer + an FFN with pre-norm or Ouro's sandwich norm.

pre:       h = h + attn(n₁(h));          h = h + ffn(n₂(h))
sandwich:  h = h + n_b(attn(n_a(h)));    h = h + n_d(ffn(n_c(h)))     (REFERENCE §1)

A core (looped) layer may also read the token's earlier loop steps through a ``LoopCarry``:
nanochat's global gates (looplm.model.global_gates) mix a running mean of its earlier
updates into both sublayer inputs, and loop-axis memory caching (looplm.model.gdn) lets a
Gated DeltaNet mixer read its earlier loops' states.
"""

import torch
from torch import nn

from looplm.config import ModelConfig
from looplm.model.attention import Attention
from looplm.model.carry import LoopCarry
from looplm.model.ffn import ChannelMix, SwiGLU
from looplm.model.gdn import GatedDeltaNet
from looplm.model.global_gates import GlobalGates
from looplm.model.rwkv import RWKVSlotMixer
from looplm.model.mla import MultiHeadLatentAttention
from looplm.model.moe import MoE
from looplm.model.norms import RMSNorm


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, kind: str = "A", looped: bool = False):
        super().__init__()
        dim, eps = config.d_model, config.norm_eps
        zero = config.zero_centered_norm
        self.attn_norm = RMSNorm(dim, eps, zero)
        # The token mixer: attention of the configured kind, Gated DeltaNet ("G") or RWKV slots ("R").
        self.kind = kind
        if kind == "G":
            self.attn = GatedDeltaNet(config, looped)
        elif kind == "R":
            self.attn = RWKVSlotMixer(config)
        else:
            self.attn = MultiHeadLatentAttention(config) if config.attention == "mla" else Attention(config)
        self.ffn_norm = RMSNorm(dim, eps, zero)
        ffn_kinds = {"dense": lambda: SwiGLU(dim, config.ffn_hidden), "moe": lambda: MoE(config),
                     "channelmix": lambda: ChannelMix(dim, config.ffn_hidden)}
        self.ffn = ffn_kinds[config.ffn]()
        self.shifted_ffn = config.ffn == "channelmix"
        sandwich = config.norm == "sandwich"
        self.attn_post_norm = RMSNorm(dim, eps, zero) if sandwich else nn.Identity()
        self.ffn_post_norm = RMSNorm(dim, eps, zero) if sandwich else nn.Identity()
        self.global_gates = GlobalGates(dim) if looped and config.global_gates else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, storage=None,
                start: int | torch.Tensor = 0, carry: LoopCarry | None = None) -> torch.Tensor:
        """h: [B, S, D] → [B, S, D].  storage: the cache slot's ``LayerStorage`` (the mixer's
        storage and, with ffn=channelmix, the FFN's previous input) or None; start: the first
        position (or [B] per row); carry: the tokens' earlier loop steps (core layers)."""
        kv_store, ffn_store = storage if storage is not None else (None, None)
        gates = self.global_gates
        state = gates.state(carry) if gates is not None else None
        x = self.attn_norm(h)
        if gates is not None:
            x = gates.mix(x, state, gates.g_qk, carry)
        if self.kind == "G":
            mixed = self.attn(x, cos, sin, kv_store, start, carry)
        else:
            mixed = self.attn(x, cos, sin, kv_store, start)
        attention = self.attn_post_norm(mixed)
        h = h + attention
        x = self.ffn_norm(h)
        if gates is not None:
            x = gates.mix(x, state, gates.g_ffn, carry)
        ffn = self.ffn_post_norm(self.ffn(x, ffn_store) if self.shifted_ffn else self.ffn(x))
        if gates is not None:
            gates.record(carry, state, attention, ffn)
        return h + ffn
