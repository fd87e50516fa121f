"""One transformer layer: a token mixer + an FFN with pre-norm or Ouro's sandwich norm.

pre:       h = h + attn(n₁(h));          h = h + ffn(n₂(h))
sandwich:  h = h + n_b(attn(n_a(h)));    h = h + n_d(ffn(n_c(h)))     (REFERENCE §1)

A core (looped) layer may also read the token's earlier loop steps through a ``LoopCarry``:
nanochat's global gates (looplm.model.global_gates) mix a running mean of its earlier
updates into both sublayer inputs, loop-axis memory caching (looplm.model.gdn) lets a
Gated DeltaNet mixer read its earlier loops' states, and append-first attention
(model.kv_append_first) reuses the step-1 keys and values.

With mHC hyper-connections or block attention residuals (looplm.model.residual) the sum
h + F(·) becomes each sub-layer's ``read`` of its input and ``write`` of its output; h is then
the n streams [B, S, n, D] or the stack's ``DepthSources``.  model.ternary turns the mixer's
and the FFN's projections into ``BitLinear`` (looplm.model.bitlinear).
"""

import torch
from torch import nn

from looplm.config import ModelConfig
from looplm.model.attention import Attention
from looplm.model.bitlinear import ternary_layers
from looplm.model.carry import LoopCarry
from looplm.model.ffn import ChannelMix, SwiGLU
from looplm.model.residual import sublayer_residuals
from looplm.model.gdn import GatedDeltaNet
from looplm.model.global_gates import GlobalGates
from looplm.model.rwkv import RWKVSlotMixer
from looplm.model.mla import MultiHeadLatentAttention
from looplm.model.moe import MoE
from looplm.model.norms import RMSNorm


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, kind: str = "A", looped: bool = False, index: int = 0):
        """index: the layer's place in its stack (block attention residuals group sub-layers by it)."""
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
        self.attn_residual, self.ffn_residual = sublayer_residuals(config, index)
        if config.ternary == "all" or (config.ternary == "core" and looped):
            ternary_layers(self.attn)
            ternary_layers(self.ffn)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, storage=None,
                start: int | torch.Tensor = 0, carry: LoopCarry | None = None) -> torch.Tensor:
        """h: [B, S, D] → [B, S, D].  storage: the cache slot's ``LayerStorage`` (the mixer's
        storage and, with ffn=channelmix, the FFN's previous input) or None; start: the first
        position (or [B] per row); carry: the tokens' earlier loop steps (core layers)."""
        kv_store, ffn_store = storage if storage is not None else (None, None)
        gates = self.global_gates
        state = gates.state(carry) if gates is not None else None
        x, context = (h, None) if self.attn_residual is None else self.attn_residual.read(h)
        x = self.attn_norm(x)
        if gates is not None:
            x = gates.mix(x, state, gates.g_qk, carry)
        if self.kind == "R":
            mixed = self.attn(x, cos, sin, kv_store, start)
        else:
            mixed = self.attn(x, cos, sin, kv_store, start, carry)
        attention = self.attn_post_norm(mixed)
        h = h + attention if self.attn_residual is None else self.attn_residual.write(h, attention, context)
        x, context = (h, None) if self.ffn_residual is None else self.ffn_residual.read(h)
        x = self.ffn_norm(x)
        if gates is not None:
            x = gates.mix(x, state, gates.g_ffn, carry)
        ffn = self.ffn_post_norm(self.ffn(x, ffn_store) if self.shifted_ffn else self.ffn(x))
        if gates is not None:
            gates.record(carry, state, attention, ffn)
        return h + ffn if self.ffn_residual is None else self.ffn_residual.write(h, ffn, context)
