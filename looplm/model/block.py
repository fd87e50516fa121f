"""One transformer layer: a token mixer + an FFN with pre-norm or Ouro's sandwich norm.

pre:       h = h + attn(n₁(h));          h = h + ffn(n₂(h))
sandwich:  h = h + n_b(attn(n_a(h)));    h = h + n_d(ffn(n_c(h)))     (docs/MATH.md §1)

The norms are ``model.norm_type`` (RMSNorm or LayerNorm).  With ``model.dropout`` p > 0, each
sublayer's output passes dropout (p) in training before it is added (OpenMythos's residual
dropout; attention also drops attention weights).  With ``model.moe_scope = core`` only core
layers get the MoE FFN; prelude and coda layers keep the dense SwiGLU.

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
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.model.attention import Attention
from looplm.model.bitlinear import ternary_layers
from looplm.model.carry import LoopCarry
from looplm.model.ffn import ChannelMix, SwiGLU
from looplm.model.gdn import GatedDeltaNet
from looplm.model.global_gates import GlobalGates
from looplm.model.mla import MultiHeadLatentAttention
from looplm.model.moe import MoE
from looplm.model.norms import RMSNorm, make_norm
from looplm.model.residual import sublayer_residuals
from looplm.model.rwkv import RWKVSlotMixer
from looplm.registry import Registry

# The choices a layer is built from (looplm.registry): the attention kind (model.attention), the
# token mixer of each layer_pattern letter, and the feed-forward kind (model.ffn).
ATTENTIONS = Registry("attention kind")
ATTENTIONS.update(mha=Attention, gated=Attention, mla=MultiHeadLatentAttention)
MIXERS = Registry("layer kind")  # factories (config, looped) -> token mixer
MIXERS.update(A=lambda config, looped: ATTENTIONS[config.attention.kind](config),
              G=lambda config, looped: GatedDeltaNet(config, looped),
              R=lambda config, looped: RWKVSlotMixer(config))
FFNS = Registry("feed-forward kind")  # factories (config) -> FFN
FFNS.update(dense=lambda config: SwiGLU(config.d_model, config.ffn_hidden), moe=MoE,
            channelmix=lambda config: ChannelMix(config.d_model, config.ffn_hidden))


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, kind: str = "A", looped: bool = False, index: int = 0):
        """index: the layer's place in its stack (block attention residuals group sub-layers by it)."""
        super().__init__()
        dim = config.d_model
        self.attn_norm = make_norm(config)
        self.kind = kind
        self.attn = MIXERS[kind](config, looped)
        self.ffn_norm = make_norm(config)
        ffn = "dense" if config.ffn.kind == "moe" and config.moe_scope == "core" and not looped else config.ffn.kind
        self.ffn = FFNS[ffn](config)
        self.shifted_ffn = config.ffn.kind == "channelmix"
        sandwich = config.norm.placement == "sandwich"
        self.attn_post_norm = make_norm(config) if sandwich else nn.Identity()
        self.ffn_post_norm = make_norm(config) if sandwich else nn.Identity()
        self.dropout = config.dropout
        self.global_gates = GlobalGates(dim) if looped and config.global_gates else None
        self.attn_residual, self.ffn_residual = sublayer_residuals(config, index)
        ternary = config.ternary == "all" or (config.ternary == "core" and looped)
        if ternary:
            ternary_layers(self.attn)
            ternary_layers(self.ffn)
        # The pre-norms whose output goes straight into a projection (attention's qkv, SwiGLU's
        # gate_up): under CPU bf16 autocast they hand out bf16 (RMSNorm.feeds_matmul).
        if self.global_gates is None and not ternary:
            if isinstance(self.attn, Attention) and isinstance(self.attn_norm, RMSNorm):
                self.attn_norm.feeds_matmul = True
            if type(self.ffn) is SwiGLU and isinstance(self.ffn_norm, RMSNorm):
                self.ffn_norm.feeds_matmul = True

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
        mixed = self.attn(x, cos, sin, kv_store, start, carry)
        attention = self.attn_post_norm(mixed)
        h = h + self._drop(attention) if self.attn_residual is None else \
            self.attn_residual.write(h, self._drop(attention), context)
        x, context = (h, None) if self.ffn_residual is None else self.ffn_residual.read(h)
        x = self.ffn_norm(x)
        if gates is not None:
            x = gates.mix(x, state, gates.g_ffn, carry)
        ffn = self.ffn_post_norm(self.ffn(x, ffn_store) if self.shifted_ffn else self.ffn(x))
        if gates is not None:
            gates.record(carry, state, attention, ffn)
        return (h + self._drop(ffn) if self.ffn_residual is None
                else self.ffn_residual.write(h, self._drop(ffn), context))

    def _drop(self, update: torch.Tensor) -> torch.Tensor:
        """Residual dropout of a sublayer's output (training only; none at p = 0)."""
        return F.dropout(update, self.dropout, self.training) if self.dropout else update
