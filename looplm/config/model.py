"""``ModelConfig``: a looped LM fully described, its settings grouped by concern.

ids → embed → prelude layers (once) → core layers × ``loop.loop_steps`` → coda → norm → head.

The top level holds the shape (vocabulary, width, layer counts, context) and a few model-wide
switches; every other setting lives in the group of its concern::

    attention  kind (mha, gated, mla), heads, RoPE, MLA widths, K/V layout
    mixer      the token-mixer pattern (A/G/R) and the settings of Gated DeltaNet and RWKV layers
    loop       loop steps and loop mechanics (injection, start state, loop index, depth LoRA, gates)
    residual   how sub-layer outputs join the residual stream (mHC streams, block attention residuals)
    ffn        kind (dense, moe, channelmix), widths and the mixture of experts
    exit       the exit gate, ACT, and the inference defaults a model carries
    norm       placement (pre, sandwich), type (rms, layer), eps and variants

Every setting also keeps its flat name, the one a checkpoint's ``config.json`` and the command
line (``--model.n_heads 8``) use: ``config.n_heads`` reads ``config.attention.n_heads``, and
``ModelConfig(n_heads=8)`` sets it.  Three flat names name a group's kind: ``model.attention``
is ``attention.kind``, ``model.ffn`` is ``ffn.kind``, ``model.norm`` is ``norm.placement``.  On
disk a config stays flat (``to_dict``), so files written before the groups existed load as they
are; ``from_mapping`` also reads the grouped form (``{"attention": {"kind": "mla"}}``).
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from looplm.config.values import check, check_finite, coerce
from looplm.errors import LoopLMError, is_int, is_number, listed

NORM_PLACEMENTS = ("pre", "sandwich")
INJECTIONS = ("identity", "additive", "lti", "diagonal", "concat", "lti_residual")
INITIAL_STATES = ("prelude", "noise")
FFN_KINDS = ("dense", "moe", "channelmix")
ATTENTION_KINDS = ("mha", "gated", "mla")
LAYER_KINDS = ("A", "G", "R")
NORM_TYPES = ("rms", "layer")
DEPTH_LORA_POSITIONS = ("input", "output")
MOE_SCOPES = ("all", "core")
TERNARY_SCOPES = ("none", "core", "all")  # which layers' projections are ternary (looplm.model.bitlinear)
# Sanity bounds: beyond these a value is a typo, and building the model would exhaust memory
# before saying so (the RoPE tables alone are max_seq_len × head dims).
MAX_CONTEXT = 2**20
MAX_VOCAB = 2**24
MAX_SETTING = 2**24  # any whole-number setting (sizes, counts): beyond it torch's int64 shapes overflow
MAX_ROPE_ENTRIES = 2**28  # max_seq_len × RoPE dims: each of the cos and sin tables at most 1 GiB of float32

EXIT_SPECS = {"static": False, "act": False, "q": True, "hidden": True, "kl": True, "ppl": True}  # takes a number?


def parse_exit_spec(spec: str) -> tuple[str, float | None]:
    """An exit policy's one-string form (``static``, ``act``, ``q:0.5``, ``hidden:0.05``,
    ``kl:0.01``, ``ppl:3``) as (kind, number or None); the policy itself checks the number's
    range (``looplm.exit_policy.parse_exit_policy``)."""
    name, _, value = spec.partition(":")
    try:
        number = float(value) if value else None
    except ValueError:
        raise LoopLMError(f"exit policy {spec!r}: {value!r} is not a number") from None
    if name not in EXIT_SPECS or EXIT_SPECS[name] != (number is not None):
        raise LoopLMError(f"unknown exit policy {spec!r}: use static, q:<q>, hidden:<eps>, kl:<eps>, ppl:<x> or act")
    return name, number


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    check(value in allowed, f"model.{key} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(eq=False)
class _Group:
    """One concern's settings.  ``NAMED_BY`` is the field that the group's own flat name sets
    (``model.attention`` → ``attention.kind``); comparing a group with a string is refused, so code
    written for the flat ``config.attention == "mla"`` fails loudly instead of reading False."""

    NAMED_BY: ClassVar[str | None] = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            raise TypeError(f"a ModelConfig group is not a string: compare its .{self.NAMED_BY or 'field'} with"
                            f" {other!r}")
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, item.name) == getattr(other, item.name) for item in fields(self))

    __hash__ = None  # type: ignore[assignment]  # mutable, like the config that holds it

    def check(self, model: "ModelConfig") -> None:
        """Derive what is left out and validate; ``model`` is the whole config (shared sizes)."""


@dataclass(eq=False)
class AttentionConfig(_Group):
    """Attention layers (docs/MATH.md §1): kind, heads, RoPE, MLA's widths, the K/V layout."""

    NAMED_BY: ClassVar[str | None] = "kind"

    kind: str = "mha"  # mha; gated (Qwen3.5's output gate); mla (DeepSeek's latent attention)
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads; fewer = grouped-query attention
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's dims RoPE rotates
    mla_kv_rank: int = 64
    mla_q_rank: int = 0  # 0 = no query compression
    mla_rope_dim: int = 16
    mla_nope_dim: int | None = None  # None = head_dim (OpenMythos sets its own widths)
    mla_value_dim: int | None = None
    kv_append_first: bool = False  # nanochat's append-first K/V (looplm.cache)

    def check(self, model: "ModelConfig") -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _one_of(self.kind, ATTENTION_KINDS, "attention")
        check(self.n_heads >= 1 and model.d_model % self.n_heads == 0,
              f"model.n_heads={self.n_heads} must divide model.d_model={model.d_model}")
        check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
              f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        check(model.head_dim % 2 == 0, f"model.d_model / model.n_heads = {model.head_dim} must be even for RoPE")
        check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        if self.kind == "mla":
            check(self.mla_kv_rank >= 1, f"model.mla_kv_rank must be >= 1, got {self.mla_kv_rank}")
            check(self.mla_q_rank >= 0,
                  f"model.mla_q_rank must be >= 0 (0 = no query compression), got {self.mla_q_rank}")
            check(self.mla_rope_dim >= 2 and self.mla_rope_dim % 2 == 0,
                  f"model.mla_rope_dim must be even and >= 2, got {self.mla_rope_dim}")
        check(0 < self.rope_fraction <= 1 and model.rope_dim >= 2,
              f"model.rope_fraction must be in (0, 1] and rotate at least 2 of the {model.head_dim} head"
              f" dims, got {self.rope_fraction}")
        rotated = "mla_rope_dim" if self.kind == "mla" else "d_model / n_heads"
        check(model.max_seq_len * model.rope_dim <= MAX_ROPE_ENTRIES,
              f"model.max_seq_len x RoPE dims = {model.max_seq_len} x {model.rope_dim} is more than 2^28: the RoPE"
              f" tables would take {model.max_seq_len * model.rope_dim * 4 / 2**30:.0f} GiB each; lower max_seq_len"
              f" or {rotated}")
        if self.mla_nope_dim is None:
            self.mla_nope_dim = model.head_dim
        if self.mla_value_dim is None:
            self.mla_value_dim = model.head_dim
        for name in ("mla_nope_dim", "mla_value_dim"):
            check(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(eq=False)
class MixerConfig(_Group):
    """Which token mixer each layer uses, and the settings of the non-attention mixers."""

    layer_pattern: str = ""  # A = attention, G = Gated DeltaNet, R = RWKV-style; repeated; "" = all A
    # Memory caching of Gated DeltaNet states along the sequence (segments, top-k, detached states)
    mc_segment_size: int = 0
    mc_top_k: int = 2
    mc_detach: bool = False
    # ... and along the loop (looplm.model.gdn): core GDN layers read earlier loops' states.
    loop_mc: bool = False
    loop_mc_top_k: int = 2
    loop_mc_detach: bool = True
    rwkv_slots: int = 4
    rwkv_decay_rank: int = 8

    def check(self, model: "ModelConfig") -> None:
        check(set(self.layer_pattern) <= set(LAYER_KINDS),
              f"model.layer_pattern may only use {', '.join(LAYER_KINDS)} (A = attention, G = Gated DeltaNet,"
              f" R = RWKV-style slot-memory mixer), got {self.layer_pattern!r}")
        check(self.mc_segment_size >= 0 and self.mc_top_k >= 1,
              f"model.mc_segment_size must be >= 0 (0 = off) and model.mc_top_k >= 1, got {self.mc_segment_size},"
              f" {self.mc_top_k}")
        check(not self.mc_segment_size or "G" in self.layer_pattern,
              "model.mc_segment_size caches Gated DeltaNet states: add G layers to model.layer_pattern")
        check(not self.mc_detach or self.mc_segment_size, "model.mc_detach detaches the cached segment states of"
              " memory caching: set model.mc_segment_size too")
        check(self.loop_mc_top_k >= 1, f"model.loop_mc_top_k must be >= 1, got {self.loop_mc_top_k}")
        check(not self.loop_mc or "G" in {model.layer_kind(i) for i in range(model.n_core_layers)},
              "model.loop_mc caches the core's Gated DeltaNet states across loops: give model.layer_pattern a G"
              " among the core layers")
        check(self.rwkv_slots >= 1 and self.rwkv_decay_rank >= 1,
              f"model.rwkv_slots and model.rwkv_decay_rank must be >= 1, got {self.rwkv_slots},"
              f" {self.rwkv_decay_rank}")


@dataclass(eq=False)
class LoopConfig(_Group):
    """The loop (docs/MATH.md §5): how many steps, and what feeds each step.  The defaults are
    Ouro's plain loop and add no parameters."""

    loop_steps: int = 4
    # Ouro: the final norm closes every loop step; its output is that step's readout and the next input.
    step_norm: bool = True
    injection: str = "identity"
    initial_state: str = "prelude"
    initial_noise_std: float = 1.0
    loop_index_embedding: bool = False
    depth_lora_rank: int = 0
    depth_lora_position: str = "input"  # OpenMythos reads depth LoRA at the block's output
    # nanochat's global gates (looplm.model.global_gates): core layers mix a running mean of
    # their earlier steps' sublayer outputs into the attention and FFN inputs.
    global_gates: bool = False

    def check(self, model: "ModelConfig") -> None:
        check(self.loop_steps >= 1, f"model.loop_steps must be >= 1, got {self.loop_steps}")
        _one_of(self.injection, INJECTIONS, "injection")
        _one_of(self.initial_state, INITIAL_STATES, "initial_state")
        check(not (self.initial_state == "noise" and self.injection == "identity"),
              "model.initial_state=noise needs an injection other than identity (the loop would never see"
              " the input): set model.injection")
        check(self.initial_noise_std > 0, f"model.initial_noise_std must be > 0, got {self.initial_noise_std}")
        check(self.depth_lora_rank >= 0, f"model.depth_lora_rank must be >= 0, got {self.depth_lora_rank}")
        _one_of(self.depth_lora_position, DEPTH_LORA_POSITIONS, "depth_lora_position")
        check(not self.loop_index_embedding or model.d_model >= 16,
              f"model.loop_index_embedding needs d_model >= 16 (it uses d_model/8 channels), got {model.d_model}")
        check(not (self.injection == "lti_residual" and self.loop_index_embedding and model.d_model // 8 % 2),
              f"model.injection=lti_residual with model.loop_index_embedding needs d_model / 8 even (a sine and a"
              f" cosine per frequency), got d_model={model.d_model}")


@dataclass(eq=False)
class ResidualConfig(_Group):
    """How sub-layer outputs join the hidden state: the plain residual sum by default, mHC
    hyper-connections with n streams (looplm.model.residual), or block attention residuals."""

    hyper_connections: int = 0  # 0 or 1 = off
    attnres_block_size: int = 0  # 0 = off

    def check(self, model: "ModelConfig") -> None:
        check(self.hyper_connections >= 0,
              f"model.hyper_connections must be >= 0 (0 or 1 = off), got {self.hyper_connections}")
        check(self.attnres_block_size >= 0,
              f"model.attnres_block_size must be >= 0 (0 = off), got {self.attnres_block_size}")
        check(not (self.hyper_connections > 1 and self.attnres_block_size),
              "model.hyper_connections and model.attnres_block_size both replace the residual sum: choose one")


@dataclass(eq=False)
class FFNConfig(_Group):
    """Feed-forward: dense SwiGLU, a mixture of experts (looplm.model.moe), or lrnnSMDDS's
    ChannelMix (a one-step token shift, then SwiGLU; looplm.model.ffn)."""

    NAMED_BY: ClassVar[str | None] = "kind"

    kind: str = "dense"
    ffn_hidden: int | None = None  # None = SwiGLU at ~8/3·d_model, rounded up to 64
    n_experts: int = 8
    n_shared_experts: int = 1
    moe_top_k: int = 2
    expert_hidden: int | None = None  # None = ffn_hidden
    shared_expert_hidden: int | None = None  # None = expert_hidden
    moe_scope: str = "all"  # "core": MoE in the core layers only (OpenMythos)
    moe_bias_update_rate: float = 1e-3
    moe_aux_loss_weight: float = 0.0

    def check(self, model: "ModelConfig") -> None:
        if self.ffn_hidden is None:
            # SwiGLU at ~8/3·D keeps the FFN's parameter count equal to a 4·D GELU MLP.
            self.ffn_hidden = 64 * math.ceil(8 * model.d_model / 3 / 64)
        if self.expert_hidden is None:
            self.expert_hidden = self.ffn_hidden
        if self.shared_expert_hidden is None:
            self.shared_expert_hidden = self.expert_hidden
        check(self.ffn_hidden >= 1, f"model.ffn_hidden must be >= 1, got {self.ffn_hidden}")
        _one_of(self.kind, FFN_KINDS, "ffn")
        _one_of(self.moe_scope, MOE_SCOPES, "moe_scope")
        if self.kind == "moe":
            check(self.n_experts >= 1, f"model.n_experts must be >= 1, got {self.n_experts}")
            check(1 <= self.moe_top_k <= self.n_experts,
                  f"model.moe_top_k must be in [1, n_experts={self.n_experts}], got {self.moe_top_k}")
            check(self.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
            check(self.expert_hidden >= 1, f"model.expert_hidden must be >= 1, got {self.expert_hidden}")
            check(self.moe_bias_update_rate >= 0 and self.moe_aux_loss_weight >= 0,
                  "model.moe_bias_update_rate and model.moe_aux_loss_weight must be >= 0")
        check(self.shared_expert_hidden >= 1, f"model.shared_expert_hidden must be >= 1, got"
              f" {self.shared_expert_hidden}")


@dataclass(eq=False)
class ExitConfig(_Group):
    """Early exit: Ouro's exit gate, ACT, and the inference defaults a model carries (exit policy
    in the one-string form, least and most loop steps, 0 = the trained T), which decoders use when
    the caller names no policy."""

    exit_gate: bool = True
    act_threshold: float = 0.99
    # OpenMythos: mix the loop states by their ACT halting weights before the coda.
    act_mixing: bool = False
    default_exit: str = "static"
    min_loop_steps: int = 1
    max_loop_steps: int = 0

    def check(self, model: "ModelConfig") -> None:
        check(0 < self.act_threshold <= 1, f"model.act_threshold must be in (0, 1], got {self.act_threshold}")
        from looplm.exit_policy import MAX_STEPS_FACTOR, parse_exit

        most = MAX_STEPS_FACTOR * model.loop_steps  # what a decoder runs at most
        check(self.min_loop_steps >= 1 and 0 <= self.max_loop_steps <= most
              and self.min_loop_steps <= (self.max_loop_steps or model.loop_steps),
              f"model.min_loop_steps must be >= 1 and at most model.max_loop_steps (0 = the trained T ="
              f" {model.loop_steps}), which is at most {most}, got {self.min_loop_steps}, {self.max_loop_steps}")
        parse_exit_spec(self.default_exit)  # a one-line error for a policy that does not parse
        try:
            parse_exit(self.default_exit)  # and for one whose number is out of its range
        except LoopLMError as error:
            raise LoopLMError(f"model.default_exit {self.default_exit!r}: {error}") from None
        check(not self.act_mixing or (self.exit_gate and not model.step_norm),
              "model.act_mixing reads halting probabilities from the loop state with the exit gate: it needs"
              " model.exit_gate=true and model.step_norm=false")


@dataclass(eq=False)
class NormConfig(_Group):
    """Normalisation: where the norms sit and what they are."""

    NAMED_BY: ClassVar[str | None] = "placement"

    placement: str = "sandwich"  # pre: before each sub-layer; sandwich: before and after (Ouro)
    norm_type: str = "rms"  # layer: LayerNorm with bias (lrnnSMDDS)
    norm_eps: float = 1e-6
    zero_centered_norm: bool = False  # weight stored as w - 1 (Qwen3.5)
    embed_norm: bool = False  # a norm right after the embedding (lrnnSMDDS)

    def check(self, model: "ModelConfig") -> None:
        _one_of(self.placement, NORM_PLACEMENTS, "norm")
        _one_of(self.norm_type, NORM_TYPES, "norm_type")
        check(self.norm_eps >= 0, f"model.norm_eps must be >= 0, got {self.norm_eps}")


# Group name → class, in the order a config prints and saves.
GROUPS: dict[str, type[_Group]] = {"attention": AttentionConfig, "mixer": MixerConfig, "loop": LoopConfig,
                                   "residual": ResidualConfig, "ffn": FFNConfig, "exit": ExitConfig,
                                   "norm": NormConfig}


@dataclass(init=False)
class ModelConfig:
    """A looped LM, fully described (module docstring): the shape at the top level, every other
    setting in its group.  Built from flat keyword arguments (``ModelConfig(n_heads=8,
    attention="mla")``), groups (``ModelConfig(attention=AttentionConfig(kind="mla"))``) or both;
    flat arguments apply over the groups.  Validated on construction: a bad value raises one line
    that names its flat key."""

    vocab_size: int = 259
    d_model: int = 128
    n_prelude_layers: int = 0
    n_core_layers: int = 2
    n_coda_layers: int = 0
    max_seq_len: int = 256
    tie_embeddings: bool = True
    init_std: float = 0.02
    dropout: float = 0.0
    # Ternary weights (BitNet b1.58 QAT, looplm.model.bitlinear) in the mixers and FFNs of the
    # "core" or "all" layers.
    ternary: str = "none"
    # lrnnSMDDS: the model's size chosen from the corpus size by the trainer (looplm.training.auto_size).
    auto_size: bool = False
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mixer: MixerConfig = field(default_factory=MixerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)
    norm: NormConfig = field(default_factory=NormConfig)

    def __init__(self, **values: Any) -> None:
        for name, group_class in GROUPS.items():
            given = values.pop(name, None)
            if isinstance(given, group_class):
                group = copy.copy(given)  # its own copy: dataclasses.replace hands over the old config's groups
            elif isinstance(given, dict):
                group = group_class(**given)
            elif given is None:
                group = group_class()
            elif group_class.NAMED_BY is not None:
                group = group_class(**{group_class.NAMED_BY: given})
            else:
                raise LoopLMError(f"ModelConfig({name}=...) takes a {group_class.__name__} or a mapping, got {given!r}")
            setattr(self, name, group)
        for item in TOP_LEVEL:
            setattr(self, item.name, values.pop(item.name, item.default))
        for key, value in values.items():
            if key not in FLAT_KEYS:
                raise LoopLMError(f"unknown config key model.{key}: see ModelConfig.keys() for the valid ones")
            group, name = FLAT_KEYS[key]
            setattr(getattr(self, group), name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        _check_types(self.items())
        check_finite(self.items(), "model")
        check(self.vocab_size >= 2, f"model.vocab_size must be >= 2, got {self.vocab_size}")
        check(self.d_model >= 1, f"model.d_model must be >= 1, got {self.d_model}")
        for name in ("n_prelude_layers", "n_coda_layers"):
            check(getattr(self, name) >= 0, f"model.{name} must be >= 0, got {getattr(self, name)}")
        check(self.n_core_layers >= 1, f"model.n_core_layers must be >= 1, got {self.n_core_layers}")
        check(1 <= self.max_seq_len <= MAX_CONTEXT,
              f"model.max_seq_len must be in [1, {MAX_CONTEXT}], got {self.max_seq_len}")
        check(self.vocab_size <= MAX_VOCAB, f"model.vocab_size must be <= {MAX_VOCAB}, got {self.vocab_size}")
        for key, value in self.items():
            check(KEY_TYPES[key] is not int or not is_int(value) or value <= MAX_SETTING,
                  f"model.{key} must be <= {MAX_SETTING}, got {value}")
        check(self.init_std >= 0, f"model.init_std must be >= 0, got {self.init_std}")
        _one_of(self.ternary, TERNARY_SCOPES, "ternary")
        check(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")
        for name in GROUPS:
            getattr(self, name).check(self)

    # --- flat keys: the file format and the command line -------------------------------------------------------

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every flat key, in the order ``to_dict`` writes them."""
        return tuple(KEY_TYPES)

    def items(self) -> list[tuple[str, Any]]:
        """(flat key, value) of every setting."""
        return [(key, self.get(key)) for key in KEY_TYPES]

    def get(self, key: str) -> Any:
        """The value of one flat key (``"attention"`` is the attention kind, not the group)."""
        if key in FLAT_KEYS:
            group, name = FLAT_KEYS[key]
            return getattr(getattr(self, group), name)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The flat form that checkpoints, GGUF metadata and the C runtime store."""
        return dict(self.items())

    @classmethod
    def from_mapping(cls, raw: dict, section: str = "model") -> "ModelConfig":
        """Build from a mapping of flat keys, groups (``{"attention": {"kind": "mla"}}``) or both;
        unknown keys, keys given twice and values of the wrong type raise one line."""
        flat = flat_model_values(raw, section)
        return cls(**{key: coerce(value, KEY_TYPES[key], f"{section}.{key}") for key, value in flat.items()})

    # --- derived -----------------------------------------------------------------------------------------------

    def layer_kind(self, index: int) -> str:
        """"A" (attention), "G" (Gated DeltaNet) or "R" (RWKV-style mixer) for layer ``index`` of a stack: the
        ``layer_pattern`` repeated (empty = all attention)."""
        pattern = self.mixer.layer_pattern
        return pattern[index % len(pattern)] if pattern else "A"

    @property
    def rope_dim(self) -> int:
        """Head dims RoPE rotates (the first ones; even): head_dim × rope_fraction, or MLA's
        separate rope slice."""
        if self.attention.kind == "mla":
            return self.attention.mla_rope_dim
        return 2 * int(self.head_dim * self.attention.rope_fraction / 2)

    @property
    def plain_loop(self) -> bool:
        """True for Ouro's loop: the state alone feeds each step, nothing step-dependent added."""
        loop = self.loop
        return (loop.injection == "identity" and loop.initial_state == "prelude" and not loop.loop_index_embedding
                and loop.depth_lora_rank == 0 and not loop.global_gates and self.ternary == "none"
                and self.residual_streams == 1 and not self.residual.attnres_block_size
                and not self.attention.kv_append_first)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention.n_heads

    @property
    def residual_streams(self) -> int:
        """Parallel residual streams of the hidden state: model.hyper_connections, else 1."""
        return max(self.residual.hyper_connections, 1)


TOP_LEVEL = tuple(item for item in fields(ModelConfig) if item.name not in GROUPS)
# Flat key → (group, field) for every grouped setting; a group's own name sets its NAMED_BY field.
FLAT_KEYS: dict[str, tuple[str, str]] = {
    (group if item.name == group_class.NAMED_BY else item.name): (group, item.name)
    for group, group_class in GROUPS.items() for item in fields(group_class)}
# Flat key → declared type, top level first, then the groups in order.
KEY_TYPES: dict[str, Any] = {
    **{item.name: typing.get_type_hints(ModelConfig)[item.name] for item in TOP_LEVEL},
    **{key: typing.get_type_hints(GROUPS[group])[name] for key, (group, name) in FLAT_KEYS.items()}}


def _check_types(items: list[tuple[str, Any]]) -> None:
    """Each setting of the type its key declares (Python callers pass values as they are; files and
    the command line go through ``coerce``): "false" is not False, 2.5 is not a count."""
    for key, value in items:
        expected = KEY_TYPES[key]
        if expected is bool:
            good = isinstance(value, bool)
        elif expected is int:
            good = is_int(value)
        elif expected is float:
            good = is_number(value)
        elif expected is str:
            good = isinstance(value, str)
        else:
            continue
        if not good:
            raise LoopLMError(f"model.{key} must be {expected.__name__}, got {value!r}"
                              f" ({type(value).__name__})")


def flat_model_values(raw: dict, section: str = "model") -> dict[str, Any]:
    """A model section with its groups spelled out as flat keys (values not yet typed):
    ``{"attention": {"kind": "mla", "n_heads": 8}}`` → ``{"attention": "mla", "n_heads": 8}``.
    Unknown keys and a key given both flat and in its group raise one line.  Sections are merged
    (preset → file → command line) in this flat form, so a group given later replaces only the
    keys it names."""
    check(isinstance(raw, dict), f"config section {section!r} must be a mapping")
    flat: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        check(key not in flat, f"{section}.{key} is given twice (flat and in its group): give it once")
        flat[key] = value

    for key, value in raw.items():
        if key in GROUPS and isinstance(value, dict):
            group_class = GROUPS[key]
            names = {item.name for item in fields(group_class)}
            for name, inner in value.items():
                check(name in names, f"unknown config key {section}.{key}.{name}: valid keys are"
                      f" {', '.join(sorted(names))}")
                put(key if name == group_class.NAMED_BY else name, inner)
        else:
            check(key in KEY_TYPES,
                  f"unknown config key {section}.{key}: valid keys are {', '.join(sorted(KEY_TYPES))}")
            put(key, value)
    return flat


def flat_dotted(dotted: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides with grouped model keys spelled flat: ``model.attention.n_heads`` →
    ``model.n_heads``, ``model.attention.kind`` → ``model.attention``; other keys as given."""
    result = {}
    for key, value in dotted.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "model" and parts[1] in GROUPS:
            (flat_key,) = flat_model_values({parts[1]: {parts[2]: value}})
            key = f"model.{flat_key}"
        result[key] = value
    return result


def _flat_property(key: str, group: str, name: str) -> property:
    def read(self: ModelConfig) -> Any:
        return getattr(getattr(self, group), name)

    def write(self: ModelConfig, value: Any) -> None:
        setattr(getattr(self, group), name, value)

    return property(read, write, doc=f"model.{key}: ``{group}.{name}``")


for _key, (_group, _name) in FLAT_KEYS.items():
    if _key not in GROUPS:  # model.attention / ffn / norm are the groups themselves as attributes
        setattr(ModelConfig, _key, _flat_property(_key, _group, _name))


def model_differences(wanted: ModelConfig, other: ModelConfig, limit: int = 4) -> str:
    """The settings where ``other`` differs from ``wanted``, as "d_model 256 instead of 32, n_heads 8
    instead of 4" (the first ``limit``, then how many more)."""
    return listed([f"{key} {other.get(key)!r} instead of {value!r}" for key, value in wanted.items()
                   if other.get(key) != value], limit)
