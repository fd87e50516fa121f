"""Ouro checkpoints (ByteDance Ouro 1.4B / 2.6B, Hugging Face layout) ↔ looplm models.

An Ouro model is looplm's Ouro special case exactly (docs/MATH.md §1, Ouro's public
``modeling_ouro.py``): per layer a sandwich-normed attention and SwiGLU,

    h = h + input_layernorm_2(attn(input_layernorm(h)))
    h = h + post_attention_layernorm_2(mlp(post_attention_layernorm(h)))

the stack of ``num_hidden_layers`` layers run ``total_ut_steps`` times, ``model.norm`` closing
every step (its output is both that step's readout and the next step's input), the exit gate
λ_t = σ(early_exit_gate(h_t)) and ``lm_head`` on the normed state.  Attention is MHA/GQA with
rotate-half RoPE and no biases; the MLP is down(silu(gate(x)) ⊙ up(x)).

Tensor names (Ouro ← looplm; looplm fuses q/k/v and gate/up into one matmul each):

    model.embed_tokens.weight                     embed.weight
    model.layers.N.input_layernorm.weight         core.N.attn_norm.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight  core.N.attn.qkv.weight    rows [q | k | v]
    model.layers.N.self_attn.o_proj.weight        core.N.attn.out.weight
    model.layers.N.input_layernorm_2.weight       core.N.attn_post_norm.weight
    model.layers.N.post_attention_layernorm.weight   core.N.ffn_norm.weight
    model.layers.N.mlp.{gate,up}_proj.weight      core.N.ffn.gate_up.weight rows [gate | up]
    model.layers.N.mlp.down_proj.weight           core.N.ffn.down.weight
    model.layers.N.post_attention_layernorm_2.weight core.N.ffn_post_norm.weight
    model.norm.weight                             norm.weight
    model.early_exit_gate.{weight,bias}           exit_gate.{weight,bias}
    lm_head.weight                                head.weight   (absent when tied)

Weights are read in any float dtype and converted to float32 (looplm runs fp32 on CPU);
``early_exit_threshold`` is an inference setting, the ``--q`` of ``looplm generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from looplm.checkpoint.stored import first_missing_layer, meta_model, warn_non_finite
from looplm.config import ModelConfig
from looplm.errors import LoopLMError, is_int, is_number, listed
from looplm.interop.directory import check_destination, check_source, copy_tokenizer_files
from looplm.interop.safetensors_io import read_json, read_tensors, write_tensors

CONFIG_FILE = "config.json"
# Ouro's own modeling code (not shipped by transformers) is found through auto_map.
OURO_AUTO_MAP = {"AutoConfig": "configuration_ouro.OuroConfig", "AutoModel": "modeling_ouro.OuroModel",
                 "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}
_REQUIRED_KEYS = {"vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
                  "num_attention_heads": int, "num_key_value_heads": int, "rms_norm_eps": float,
                  "rope_theta": float, "max_position_embeddings": int}
# Renamed one to one (Ouro suffix within a layer → looplm suffix).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.o_proj.weight": "attn.out.weight",
    "input_layernorm_2.weight": "attn_post_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.down_proj.weight": "ffn.down.weight",
    "post_attention_layernorm_2.weight": "ffn_post_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "model.early_exit_gate.weight": "exit_gate.weight", "model.early_exit_gate.bias": "exit_gate.bias",
              "lm_head.weight": "head.weight"}


def _config_value(raw: dict, key: str, kind: type, where: str):
    value = raw[key]
    numeric = is_number(value)
    if not numeric or (kind is int and not isinstance(value, int)):
        raise LoopLMError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _flag(raw: dict, key: str, where: str) -> bool:
    """A true/false key (absent or null: false); "false" as a string is not false."""
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise LoopLMError(f"{where}: {key} must be true or false, got {value!r}")
    return bool(value)


def _rope_type(raw: dict, where: str) -> str:
    """rope_scaling's kind: "default" when absent; transformers spells it rope_type, older configs type."""
    scaling = raw.get("rope_scaling")
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        raise LoopLMError(f"{where}: rope_scaling must be a mapping or null, got {scaling!r}")
    return scaling.get("rope_type", scaling.get("type", "default"))


def looplm_config_from_ouro(raw: dict, where: str = "Ouro config") -> ModelConfig:
    """The ModelConfig of an Ouro ``config.json``; features looplm lacks are refused by name."""
    if raw.get("model_type", "ouro") != "ouro":
        raise LoopLMError(f"{where}: model_type is {raw['model_type']!r}, not 'ouro': not an Ouro checkpoint")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise LoopLMError(f"{where} lacks {missing[0]}: not a complete Ouro config.json")
    values = {key: _config_value(raw, key, kind, where) for key, kind in _REQUIRED_KEYS.items()}
    heads = values["num_attention_heads"]
    layer_types = raw.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise LoopLMError(f"{where}: layer_types must be a list of layer kinds, got {layer_types!r}")
    unsupported = {
        "hidden_act": raw.get("hidden_act", "silu") != "silu",
        "rope_scaling": _rope_type(raw, where) != "default",
        "use_sliding_window": _flag(raw, "use_sliding_window", where),
        "layer_types": any(kind != "full_attention" for kind in layer_types),
        "attention_bias": _flag(raw, "attention_bias", where),
        "mlp_bias": _flag(raw, "mlp_bias", where),
        "head_dim": heads > 0 and ((raw.get("head_dim") or values["hidden_size"] // heads) * heads
                                   != values["hidden_size"]),
    }
    for key, refused in unsupported.items():
        if refused:
            raise LoopLMError(f"{where}: {key}={raw.get(key)!r} is not supported by looplm (it needs SiLU, plain RoPE,"
                              " full attention without biases, head_dim = hidden_size / num_attention_heads)")
    steps = raw.get("total_ut_steps", 4)
    if not is_int(steps):
        raise LoopLMError(f"{where}: total_ut_steps must be an integer, got {steps!r}")
    tied = _flag(raw, "tie_word_embeddings", where)
    try:
        return ModelConfig(
            vocab_size=values["vocab_size"], d_model=values["hidden_size"], n_heads=heads,
            n_kv_heads=values["num_key_value_heads"], ffn_hidden=values["intermediate_size"],
            n_core_layers=values["num_hidden_layers"], loop_steps=steps,
            max_seq_len=values["max_position_embeddings"], rope_theta=values["rope_theta"],
            norm="sandwich", norm_eps=values["rms_norm_eps"], step_norm=True,
            tie_embeddings=tied, exit_gate=True)
    except LoopLMError as error:
        raise LoopLMError(f"{where}: {error}") from None


def check_ouro_shaped(config: ModelConfig) -> None:
    """Refuse a looplm config that an Ouro checkpoint cannot express, naming the setting."""
    differences = {
        "n_prelude_layers": config.n_prelude_layers != 0, "n_coda_layers": config.n_coda_layers != 0,
        "norm": config.norm.placement != "sandwich", "step_norm": not config.step_norm,
        "exit_gate": not config.exit_gate, "attention": config.attention.kind != "mha",
        "layer_pattern": set(config.layer_pattern) - {"A"} != set(), "ffn": config.ffn.kind != "dense",
        "rope_fraction": config.rope_fraction != 1.0, "zero_centered_norm": config.zero_centered_norm,
        "injection": config.injection != "identity", "initial_state": config.initial_state != "prelude",
        "loop_index_embedding": config.loop_index_embedding, "depth_lora_rank": config.depth_lora_rank != 0,
        "global_gates": config.global_gates, "loop_mc": config.loop_mc,
    }
    for key, differs in differences.items():
        if differs:
            raise LoopLMError(f"model.{key}={getattr(config, key)!r} has no Ouro equivalent: only Ouro-shaped"
                              " models (sandwich norm, step norm, exit gate, MHA/GQA, dense SwiGLU, no prelude/coda,"
                              " plain loop) convert to Ouro")


def ouro_config_from_looplm(config: ModelConfig, tokenizer=None) -> dict:
    """An Ouro ``config.json`` for an Ouro-shaped looplm config (``check_ouro_shaped``)."""
    check_ouro_shaped(config)
    raw = {
        "architectures": ["OuroForCausalLM"], "auto_map": dict(OURO_AUTO_MAP), "model_type": "ouro",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_core_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": None, "tie_word_embeddings": config.tie_embeddings,
        "total_ut_steps": config.loop_steps, "early_exit_threshold": 1.0, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": config.n_core_layers,
        "layer_types": ["full_attention"] * config.n_core_layers, "attention_dropout": 0.0,
        "initializer_range": config.init_std, "use_cache": True, "torch_dtype": "float32",
    }
    if tokenizer is not None:
        raw.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return raw


def ouro_state_from_looplm(model) -> dict[str, torch.Tensor]:
    """Ouro-named tensors of an Ouro-shaped LoopLM (fused q/k/v and gate/up split apart)."""
    config = model.config
    check_ouro_shaped(config)
    state = model.state_dict()
    inverse_top = {looplm: ouro for ouro, looplm in _TOP_NAMES.items()}
    tensors = {inverse_top[name]: state[name] for name in inverse_top if name in state}
    head_dim = config.head_dim
    for index in range(config.n_core_layers):
        ours, theirs = f"core.{index}.", f"model.layers.{index}."
        for suffix, looplm_suffix in _LAYER_NAMES.items():
            tensors[theirs + suffix] = state[ours + looplm_suffix]
        q, k, v = state[ours + "attn.qkv.weight"].split(
            [config.n_heads * head_dim, config.n_kv_heads * head_dim, config.n_kv_heads * head_dim])
        gate, up = state[ours + "ffn.gate_up.weight"].split(config.ffn_hidden)
        tensors.update({theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
                        theirs + "self_attn.v_proj.weight": v, theirs + "mlp.gate_proj.weight": gate,
                        theirs + "mlp.up_proj.weight": up})
    return tensors


def looplm_state_from_ouro(tensors: dict[str, torch.Tensor], config: ModelConfig,
                           where: str = "Ouro weights") -> dict[str, torch.Tensor]:
    """LoopLM state dict (float32) from Ouro-named tensors; names and shapes are checked first."""
    from looplm.model.lm import LoopLM

    tensors = {name: tensor for name, tensor in tensors.items() if not name.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings and "lm_head.weight" in tensors:
        embedding = tensors.get("model.embed_tokens.weight")
        if embedding is not None and not torch.equal(tensors["lm_head.weight"], embedding):
            raise LoopLMError(f"{where}: lm_head.weight differs from model.embed_tokens.weight although"
                              " tie_word_embeddings is true: set it to false in config.json")
        tensors = {name: tensor for name, tensor in tensors.items() if name != "lm_head.weight"}
    missing_layer = first_missing_layer(tensors, "model.layers.", config.n_core_layers)
    if missing_layer is not None:
        raise LoopLMError(f"{where} hold no tensors of model.layers.{missing_layer}, which num_hidden_layers ="
                          f" {config.n_core_layers} needs: the checkpoint is incomplete")
    model = meta_model(lambda: LoopLM(config), where)
    expected = {name: tensor.shape for name, tensor in ouro_state_from_looplm(model).items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        raise LoopLMError(f"{where} lack {listed(missing, 1)}: the checkpoint is incomplete")
    if unexpected:
        raise LoopLMError(f"{where} hold {unexpected[0]}, which an Ouro model of this config.json does not have")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise LoopLMError(f"{where}: {name} has shape {tuple(tensors[name].shape)},"
                              f" config.json says {tuple(shape)}")
        if not tensors[name].is_floating_point():
            raise LoopLMError(f"{where}: {name} has dtype {tensors[name].dtype}, expected floating point weights")
    tensors = {name: tensor.float() for name, tensor in tensors.items()}
    warn_non_finite(tensors, f"{where} hold non-finite values")
    state = {looplm: tensors[ouro] for ouro, looplm in _TOP_NAMES.items() if ouro in tensors}
    for index in range(config.n_core_layers):
        ours, theirs = f"core.{index}.", f"model.layers.{index}."
        for suffix, looplm_suffix in _LAYER_NAMES.items():
            state[ours + looplm_suffix] = tensors[theirs + suffix]
        state[ours + "attn.qkv.weight"] = torch.cat([tensors[theirs + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        state[ours + "ffn.gate_up.weight"] = torch.cat([tensors[theirs + "mlp.gate_proj.weight"],
                                                        tensors[theirs + "mlp.up_proj.weight"]])
    return state


def load_ouro(source: str | Path):
    """A LoopLM (eval mode, float32) from an Ouro checkpoint directory (single file or sharded)."""
    from looplm.model.lm import LoopLM

    source = check_source(source)
    config = looplm_config_from_ouro(read_json(source / CONFIG_FILE, "an Ouro checkpoint"),
                                     f"{str(source / CONFIG_FILE)!r}")
    state = looplm_state_from_ouro(read_tensors(source), config, f"the weights in {str(source)!r}")
    with torch.device("meta"):
        model = LoopLM(config)
    model.load_state_dict(state, assign=True)
    model.rebuild_derived_buffers("cpu")
    return model.eval()


def save_ouro(model, directory: str | Path, tokenizer_source: str | Path | None = None,
              max_shard_bytes: int | None = None) -> Path:
    """Write an Ouro-shaped LoopLM as an Ouro checkpoint directory, atomically (replacing one)."""
    from looplm.checkpoint.atomic import atomic_directory
    from looplm.checkpoint.directory import checkpoint_entry

    config = ouro_config_from_looplm(model.config, _tokenizer_or_none(tokenizer_source))
    tensors = ouro_state_from_looplm(model)

    def write(staging: Path) -> None:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_tensors(tensors, staging, max_shard_bytes)
        if tokenizer_source is not None:
            copy_tokenizer_files(Path(tokenizer_source), staging)

    return atomic_directory(Path(directory), write, replaceable=checkpoint_entry)


def _tokenizer_or_none(directory: str | Path | None):
    from looplm.data.tokenizer import Tokenizer

    if directory is None or not (Path(directory) / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_file(directory)


def convert_ouro_to_looplm(source: str | Path, destination: str | Path, force: bool = False) -> Path:
    """``looplm convert ouro SRC DST``: an Ouro checkpoint → a looplm checkpoint directory
    (config.json + model.safetensors + the tokenizer files, copied through)."""
    from looplm.checkpoint.atomic import atomic_directory
    from looplm.checkpoint.directory import checkpoint_entry, write_model_files

    source = check_source(source)
    destination = check_destination(source, destination, force)
    model = load_ouro(source)

    def write(staging: Path) -> None:
        write_model_files(model.config, model.state_dict(), staging)
        copy_tokenizer_files(source, staging)

    return atomic_directory(destination, write, replaceable=checkpoint_entry)


def convert_looplm_to_ouro(source: str | Path, destination: str | Path, max_shard_bytes: int | None = None,
                           force: bool = False) -> Path:
    """``looplm convert to-ouro SRC DST``: a looplm checkpoint (or run directory) → an Ouro
    checkpoint directory, sharded when ``max_shard_bytes`` is given."""
    from looplm.checkpoint.directory import resolve_checkpoint
    from looplm.model.loading import load_model

    source = check_source(source)
    checkpoint = resolve_checkpoint(source)
    destination = check_destination(checkpoint, destination, force)
    model = load_model(checkpoint)
    return save_ouro(model, destination, checkpoint, max_shard_bytes)
