"""OpenMythos models (the ``open-mythos`` package's ``OpenMythos``) → looplm models.

OpenMythos is looplm's faithful ``openmythos`` configuration (docs/ARCHITECTURES.md): dense
pre-norm prelude layers, one recurrent block with MoE looped ``max_loop_iters`` times under

    x = n(h + loop_index_signal(t) + e);  y = block(x);  y ← y + lora(y, t);  h ← A ⊙ h + B ⊙ e + y

(``injection=lti_residual``, ``depth_lora_position=output``), ACT over the loop states with a
halting head on h (``act_mixing``), dense coda layers, a final RMSNorm and the head tied to the
embedding.  ``config_from_mythos`` maps a ``MythosConfig``'s fields; ``state_from_mythos`` its
state dict (tensor names below, source ← looplm):

    embed.weight, norm.weight                     the same names (head.weight is the tied embedding)
    prelude.i / coda.i .attn_norm, .ffn_norm      the same names
    ….attn.wq, wk, wv (GQA)                       ….attn.qkv.weight rows [q | k | v]
    ….attn.q_down, q_norm, kv_down, kv_norm, kv_up (MLA)   the same names
    ….attn.q_up_nope, q_up_rope (MLA)             ….attn.q_up.weight, per head [nope | rope]
    ….attn.wo                                     ….attn.out.weight
    ….ffn.gate, up, down (dense)                  ….ffn.gate_up.weight rows [gate | up], ….ffn.down
    recurrent.block.*                             core.0.* (routed experts stacked into
                                                  experts_gate_up [E, D, 2F] and experts_down [E, F, D],
                                                  shared experts fused into one SwiGLU, router_bias →
                                                  balance_bias)
    recurrent.injection.log_A, log_dt, B          injection.log_a, log_dt, b
    recurrent.norm                                injection.input_norm
    recurrent.act.halt                            exit_gate
    recurrent.lora.down, B, scale                 depth_lora.down, up (= Bᵀ), scale

RoPE: the source rotates adjacent pairs (2i, 2i + 1) with frequency i; looplm rotates (i, i + r/2).
The same permutation of the rotated query and key dims turns one into the other and leaves every
score unchanged, so the query and key rows that RoPE reads are permuted on the way in.
"""

from __future__ import annotations

import torch

from looplm.config import ModelConfig
from looplm.errors import LoopLMError


def config_from_mythos(mythos) -> ModelConfig:
    """The looplm config of a ``MythosConfig`` (any object with its fields)."""
    dim, heads = mythos.dim, mythos.n_heads
    if mythos.attn_type not in ("gqa", "mla"):
        raise LoopLMError(f"OpenMythos attn_type {mythos.attn_type!r} is neither gqa nor mla")
    return ModelConfig(
        vocab_size=mythos.vocab_size, d_model=dim, n_heads=heads, n_kv_heads=mythos.n_kv_heads,
        n_prelude_layers=mythos.prelude_layers, n_core_layers=1, n_coda_layers=mythos.coda_layers,
        loop_steps=mythos.max_loop_iters, max_seq_len=mythos.max_seq_len, rope_theta=float(mythos.rope_theta),
        attention="mla" if mythos.attn_type == "mla" else "mha", mla_kv_rank=mythos.kv_lora_rank,
        mla_q_rank=mythos.q_lora_rank, mla_rope_dim=mythos.qk_rope_head_dim, mla_nope_dim=mythos.qk_nope_head_dim,
        mla_value_dim=mythos.v_head_dim, norm="pre", step_norm=False, tie_embeddings=True, exit_gate=True,
        act_threshold=mythos.act_threshold, injection="lti_residual", loop_index_embedding=True,
        depth_lora_rank=mythos.lora_rank, depth_lora_position="output", act_mixing=True, ffn="moe",
        moe_scope="core", ffn_hidden=dim * 4 // 3, n_experts=mythos.n_experts,
        n_shared_experts=mythos.n_shared_experts, moe_top_k=mythos.n_experts_per_tok, expert_hidden=mythos.expert_dim,
        shared_expert_hidden=mythos.expert_dim * mythos.n_experts_per_tok, dropout=mythos.dropout)


def rotate_half_order(dim: int) -> torch.Tensor:
    """Index of the source dim that feeds each looplm RoPE dim: [0, 2, 4, …, 1, 3, 5, …]."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def _per_head(weight: torch.Tensor, heads: int, order: torch.Tensor) -> torch.Tensor:
    """Rows [heads · d, in] with each head's d rows reordered by ``order``."""
    return weight.view(heads, -1, weight.shape[-1])[:, order].reshape(weight.shape)


def _layer(source: dict, prefix: str, config: ModelConfig, moe: bool) -> dict[str, torch.Tensor]:
    """One layer's tensors under looplm names (without the stack prefix)."""
    heads = config.n_heads
    out = {"attn_norm.weight": source[prefix + "attn_norm.weight"],
           "ffn_norm.weight": source[prefix + "ffn_norm.weight"],
           "attn.out.weight": source[prefix + "attn.wo.weight"]}
    if config.attention.kind == "mla":
        rope, nope = config.mla_rope_dim, config.mla_nope_dim
        order = rotate_half_order(rope)
        q_nope = source[prefix + "attn.q_up_nope.weight"].view(heads, nope, -1)
        q_rope = source[prefix + "attn.q_up_rope.weight"].view(heads, rope, -1)[:, order]
        kv_down = source[prefix + "attn.kv_down.weight"]
        out.update({
            "attn.q_down.weight": source[prefix + "attn.q_down.weight"],
            "attn.q_norm.weight": source[prefix + "attn.q_norm.weight"],
            "attn.q_up.weight": torch.cat([q_nope, q_rope], dim=1).reshape(-1, q_nope.shape[-1]),
            "attn.kv_down.weight": torch.cat([kv_down[:config.mla_kv_rank], kv_down[config.mla_kv_rank:][order]]),
            "attn.kv_norm.weight": source[prefix + "attn.kv_norm.weight"],
            "attn.kv_up.weight": source[prefix + "attn.kv_up.weight"]})
    else:
        order = rotate_half_order(config.head_dim)
        out["attn.qkv.weight"] = torch.cat([_per_head(source[prefix + "attn.wq.weight"], heads, order),
                                            _per_head(source[prefix + "attn.wk.weight"], config.n_kv_heads, order),
                                            source[prefix + "attn.wv.weight"]])
    if not moe:
        out["ffn.gate_up.weight"] = torch.cat([source[prefix + "ffn.gate.weight"], source[prefix + "ffn.up.weight"]])
        out["ffn.down.weight"] = source[prefix + "ffn.down.weight"]
        return out
    experts = range(config.n_experts)
    routed = prefix + "ffn.routed_experts."
    out.update({
        "ffn.router.weight": source[prefix + "ffn.router.weight"],
        "ffn.balance_bias": source[prefix + "ffn.router_bias"],
        "ffn.experts_gate_up": torch.stack([torch.cat([source[f"{routed}{e}.gate.weight"].T,
                                                       source[f"{routed}{e}.up.weight"].T], dim=1) for e in experts]),
        "ffn.experts_down": torch.stack([source[f"{routed}{e}.down.weight"].T for e in experts])})
    if config.n_shared_experts:
        shared = [f"{prefix}ffn.shared_experts.{j}." for j in range(config.n_shared_experts)]
        out["ffn.shared.gate_up.weight"] = torch.cat([source[s + "gate.weight"] for s in shared]
                                                     + [source[s + "up.weight"] for s in shared])
        out["ffn.shared.down.weight"] = torch.cat([source[s + "down.weight"] for s in shared], dim=1)
    return out


def state_from_mythos(source: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A LoopLM state dict (float32) from an OpenMythos state dict (module docstring)."""
    source = {name: tensor.detach().float() for name, tensor in source.items() if tensor.is_floating_point()}
    state = {"embed.weight": source["embed.weight"], "norm.weight": source["norm.weight"],
             "injection.log_a": source["recurrent.injection.log_A"],
             "injection.log_dt": source["recurrent.injection.log_dt"], "injection.b": source["recurrent.injection.B"],
             "injection.input_norm.weight": source["recurrent.norm.weight"],
             "exit_gate.weight": source["recurrent.act.halt.weight"],
             "exit_gate.bias": source["recurrent.act.halt.bias"]}
    if config.depth_lora_rank:
        state.update({"depth_lora.down.weight": source["recurrent.lora.down.weight"],
                      "depth_lora.up.weight": source["recurrent.lora.B"].T,
                      "depth_lora.scale": source["recurrent.lora.scale.weight"]})
    for stack, count in (("prelude", config.n_prelude_layers), ("coda", config.n_coda_layers)):
        for index in range(count):
            state.update({f"{stack}.{index}.{name}": tensor
                          for name, tensor in _layer(source, f"{stack}.{index}.", config, moe=False).items()})
    state.update({f"core.0.{name}": tensor
                  for name, tensor in _layer(source, "recurrent.block.", config, True).items()})
    return {name: tensor.contiguous() for name, tensor in state.items()}


def from_openmythos(mythos_model) -> "LoopLM":  # noqa: F821
    """A LoopLM (eval mode, float32) computing what an ``open_mythos.OpenMythos`` module computes."""
    from looplm.model.lm import LoopLM

    config = config_from_mythos(mythos_model.cfg)
    with torch.device("meta"):
        model = LoopLM(config)
    model.load_state_dict(state_from_mythos(mythos_model.state_dict(), config), assign=True)
    model.rebuild_derived_buffers("cpu")
    return model.eval()
