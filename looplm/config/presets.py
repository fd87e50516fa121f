"""Named model shapes: ``--preset NAME`` (``looplm.config.preset``), the model families of the
systems looplm follows (docs/ARCHITECTURES.md) and a few sizes.  Presets are flat ``ModelConfig``
keys, overridable with ``--model.KEY``."""

from __future__ import annotations

import typing

from looplm.config.model import ModelConfig
from looplm.errors import LoopLMError


# A preset gives the values it chooses and nothing else: sizes it leaves out (ffn_hidden,
# n_kv_heads, expert_hidden) are derived after the user's overrides are applied, so
# ``--preset tiny --model.d_model 64`` gets the FFN width of d_model 64.
def _preset_tiny() -> dict:
    return dict(vocab_size=259, d_model=128, n_heads=4, n_core_layers=2, loop_steps=4,
                       max_seq_len=128)


def _preset_small() -> dict:
    return dict(vocab_size=4096, d_model=512, n_heads=8, n_core_layers=8, loop_steps=4,
                       max_seq_len=1024)


def _preset_reference() -> dict:
    """The benchmark's reference shape: d 256, 4 heads, vocab 4096, 3 core layers × T 4."""
    return dict(vocab_size=4096, d_model=256, n_heads=4, n_core_layers=3, loop_steps=4,
                       max_seq_len=512)


def _preset_ouro(layers: int) -> dict:
    # Ouro 1.4B / 2.6B (docs/MATH.md §1): MHA 16 heads, SwiGLU 5632, vocab 49152, T = 4.
    return dict(vocab_size=49152, d_model=2048, n_heads=16, n_kv_heads=16, ffn_hidden=5632,
                       n_core_layers=layers, loop_steps=4, max_seq_len=4096, rope_theta=1e6,
                       norm="sandwich", step_norm=True, tie_embeddings=False)


def _family(**mechanics) -> dict:
    """A model family's loop mechanics at the ``small`` scale (d 512, 8 heads, vocab 4096)."""
    values = dict(vocab_size=4096, d_model=512, n_heads=8, max_seq_len=1024)
    values.update(mechanics)
    return dict(**values)


# Model families of the systems looplm follows (docs/ARCHITECTURES.md); sizes are overridable with --model.*.
FAMILY_PRESETS: dict[str, typing.Callable[[], dict]] = {
    # Ouro: one stack looped, sandwich norm, the final norm closing every step, exit gate.
    "ouro": lambda: _family(n_core_layers=8, loop_steps=4, norm="sandwich", step_norm=True),
    # OpenMythos as the open-mythos package computes it: dense prelude 2 / one MoE recurrent block /
    # dense coda 2, MLA, h <- A h + B e + block(norm(h + e)), LoRA on the block output, ACT mixing
    # of the loop states before the coda (MythosConfig's structure at d 512).
    "openmythos": lambda: _family(n_prelude_layers=2, n_core_layers=1, n_coda_layers=2, loop_steps=16,
                                  rope_theta=500000.0, norm="pre", step_norm=False, injection="lti_residual",
                                  loop_index_embedding=True, depth_lora_rank=16, depth_lora_position="output",
                                  act_mixing=True, attention="mla", mla_kv_rank=128, mla_q_rank=384, mla_rope_dim=32,
                                  mla_nope_dim=64, mla_value_dim=64, ffn="moe", moe_scope="core", ffn_hidden=682,
                                  n_experts=16, moe_top_k=4, n_shared_experts=2, expert_hidden=128,
                                  shared_expert_hidden=512),
    # looplm's OpenMythos-style family: prelude / 4 core layers / coda, GQA, MoE everywhere, LTI
    # injection into the core's input, loop index, depth LoRA on the core input, Ouro's exit gate.
    "openmythos-looplm": lambda: _family(n_kv_heads=2, n_prelude_layers=1, n_core_layers=4, n_coda_layers=1,
                                         loop_steps=4, norm="pre", step_norm=False, injection="lti",
                                         loop_index_embedding=True, depth_lora_rank=16, ffn="moe", n_experts=16,
                                         moe_top_k=2, n_shared_experts=1, expert_hidden=512),
    # Huginn: prelude 2 / core 4 / coda 2, noise start, concat adapter, sandwich norm.
    "huginn": lambda: _family(n_prelude_layers=2, n_core_layers=4, n_coda_layers=2, loop_steps=8, norm="sandwich",
                              step_norm=False, injection="concat", initial_state="noise"),
    # Parcae: Huginn's layout with diagonal, stable-by-construction injection and pre-norm.
    "parcae": lambda: _family(n_prelude_layers=2, n_core_layers=4, n_coda_layers=2, loop_steps=8, norm="pre",
                              step_norm=False, injection="diagonal", initial_state="noise"),
    # nanochat loop: one local block before, one shared block looped (with its global gates), one after;
    # ternary weights in every block (BitNet b1.58 QAT), mHC residual streams, append-first K/V.
    "nanochat-loop": lambda: _family(n_prelude_layers=1, n_core_layers=1, n_coda_layers=1, loop_steps=4, norm="pre",
                                     step_norm=False, injection="additive", global_gates=True, ternary="all",
                                     hyper_connections=2, kv_append_first=True),
    # (its third size tier: d 256, H 8, decay rank 16, 4 slots, FFN 2.5 d), LayerNorm with bias,
    # a norm after the embedding, an untied head, no exit gate.
    "lrnn": lambda: _family(d_model=256, n_heads=8, max_seq_len=256, n_core_layers=6, loop_steps=1,
                            layer_pattern="R", rwkv_slots=4, rwkv_decay_rank=16, norm="pre", step_norm=False,
                            ffn="channelmix", ffn_hidden=640, norm_type="layer", embed_norm=True,
                            tie_embeddings=False, exit_gate=False),
    # looplm's looped lrnn: the same mixer and FFN, 2 core layers x 3 steps, RMSNorm, tied, exit gate.
    "lrnn-looped": lambda: _family(d_model=256, n_heads=8, max_seq_len=256, n_core_layers=2, loop_steps=3,
                                   layer_pattern="R", rwkv_slots=4, rwkv_decay_rank=16, norm="pre", step_norm=False,
                                   ffn="channelmix"),
    # LoopCached-Reasoning: the Qwen3.5 hybrid below with memory caching (SSC) on its GDN layers,
    # along the sequence (segments of 128, top-2, cached states detached) and along the loop (top-2
    # earlier loops, detached).
    "loopcached": lambda: _family(n_kv_heads=2, n_core_layers=4, loop_steps=4, layer_pattern="GGGA",
                                  attention="gated", rope_fraction=0.25, rope_theta=1e7, zero_centered_norm=True,
                                  norm="pre", step_norm=True, mc_segment_size=128, mc_top_k=2, mc_detach=True,
                                  loop_mc=True, loop_mc_top_k=2, loop_mc_detach=True),
    # Qwen3.5 hybrid in an Ouro loop: three Gated DeltaNet layers then one gated-attention layer.
    "qwen35-loop": lambda: _family(n_kv_heads=2, n_core_layers=4, loop_steps=4, layer_pattern="GGGA",
                                   attention="gated", rope_fraction=0.25, rope_theta=1e7, zero_centered_norm=True,
                                   norm="pre", step_norm=True),
}

PRESETS: dict[str, typing.Callable[[], dict]] = {
    "tiny": _preset_tiny,
    "small": _preset_small,
    "reference": _preset_reference,
    "ouro-1.4b": lambda: _preset_ouro(24),
    "ouro-2.6b": lambda: _preset_ouro(48),
    **FAMILY_PRESETS,
}


def preset_values(name: str) -> dict:
    """The ``ModelConfig`` values a named preset chooses (derived sizes left out); unknown names
    list the known ones."""
    if name not in PRESETS:
        raise LoopLMError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def preset(name: str) -> ModelConfig:
    """A named model shape."""
    return ModelConfig(**preset_values(name))
