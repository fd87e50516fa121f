"""Typed configuration: a model is fully described by its ``ModelConfig``.

``ModelConfig`` builds the network, ``TrainConfig`` drives the optimiser and schedule,
``DataConfig`` says where tokens come from.  All three are validated when constructed,
refuse unknown keys, and round-trip through JSON (saved in every checkpoint) or YAML.
Dotted overrides such as ``model.loop_steps=6`` patch a nested dict before construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from looplm.errors import LoopLMError
from looplm.precision import check_precision

NORM_PLACEMENTS = ("pre", "sandwich")
INJECTIONS = ("identity", "additive", "lti", "diagonal", "concat", "lti_residual")
INITIAL_STATES = ("prelude", "noise")
FFN_KINDS = ("dense", "moe", "channelmix")
ATTENTION_KINDS = ("mha", "gated", "mla")
LAYER_KINDS = ("A", "G", "R")
NORM_TYPES = ("rms", "layer")
DEPTH_LORA_POSITIONS = ("input", "output")
MOE_SCOPES = ("all", "core")
OBJECTIVES = ("stage1", "last", "mean", "act")
DEPTH_SAMPLING = ("fixed", "uniform", "poisson")
PARALLEL = ("none", "ddp", "fsdp")
LOG_SINKS = ("tensorboard", "wandb")  # optional, besides metrics.jsonl (looplm.training.loggers)
OPTIMIZERS = ("adamw", "muon")
UPCYCLE_ORDERS = ("cycle", "interleave")
TERNARY_SCOPES = ("none", "core", "all")  # which layers' projections are ternary (looplm.model.bitlinear)
FITTED_TOKENIZERS = ("bpe", "word", "char", "auto")  # built from the training text itself
# Sanity bounds: beyond these a value is a typo, and building the model would exhaust memory
# before saying so (the RoPE tables alone are max_seq_len × head dims).
MAX_CONTEXT = 2**20
MAX_VOCAB = 2**24


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise LoopLMError(message)


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


def _check_finite(config, section: str) -> None:
    """Every float field finite: a NaN or inf setting would train or decode to NaN without a word."""
    for item in fields(config):
        value = getattr(config, item.name)
        _check(not isinstance(value, float) or math.isfinite(value),
               f"{section}.{item.name} must be a finite number, got {value}")


@dataclass
class ModelConfig:
    """Shape of a looped LM (docs/MATH.md §1).

    ids → embed → prelude layers (once) → core layers × ``loop_steps`` → coda → norm → head.
    With ``step_norm`` (Ouro) the final RMSNorm closes every loop step and its output is both
    that step's readout and the next step's input.
    """

    vocab_size: int = 259
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    n_prelude_layers: int = 0
    n_core_layers: int = 2
    n_coda_layers: int = 0
    loop_steps: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0
    attention: str = "mha"
    layer_pattern: str = ""
    mc_segment_size: int = 0
    mc_top_k: int = 2
    # Loop-axis memory caching (looplm.model.gdn): core GDN layers read earlier loops' states.
    loop_mc: bool = False
    loop_mc_top_k: int = 2
    loop_mc_detach: bool = True
    # nanochat's global gates (looplm.model.global_gates): core layers mix a running mean of
    # their earlier steps' sublayer outputs into the attention and FFN inputs.
    global_gates: bool = False
    rwkv_slots: int = 4
    rwkv_decay_rank: int = 8
    mla_kv_rank: int = 64
    mla_q_rank: int = 0
    mla_rope_dim: int = 16
    zero_centered_norm: bool = False
    norm: str = "sandwich"
    norm_eps: float = 1e-6
    step_norm: bool = True
    tie_embeddings: bool = True
    exit_gate: bool = True
    act_threshold: float = 0.99
    init_std: float = 0.02
    # Loop mechanics (docs/MATH.md §5); the defaults are Ouro's plain loop and add no parameters.
    injection: str = "identity"
    initial_state: str = "prelude"
    initial_noise_std: float = 1.0
    loop_index_embedding: bool = False
    depth_lora_rank: int = 0
    # Feed-forward: dense SwiGLU, a mixture of experts (looplm.model.moe), or lrnnSMDDS's
    # ChannelMix (a one-step token shift, then SwiGLU; looplm.model.ffn).
    ffn: str = "dense"
    n_experts: int = 8
    n_shared_experts: int = 1
    moe_top_k: int = 2
    expert_hidden: int | None = None
    moe_bias_update_rate: float = 1e-3
    moe_aux_loss_weight: float = 0.0
    # Source-system features (docs/ARCHITECTURES.md).  Ternary weights (BitNet b1.58 QAT,
    # looplm.model.bitlinear) in the token mixers and FFNs of the "core" or "all" layers; mHC
    # hyper-connections with n residual streams (looplm.model.residual; 0 or 1 = off); block
    # attention residuals over groups of sub-layers (0 = off); detached segment states of
    # sequence-axis memory caching; nanochat's append-first K/V (looplm.cache); and the inference
    # defaults a model carries (exit policy in the one-string form, least and most loop steps,
    # 0 = the trained T), which decoders use when the caller names no policy.
    ternary: str = "none"
    hyper_connections: int = 0
    attnres_block_size: int = 0
    mc_detach: bool = False
    kv_append_first: bool = False
    default_exit: str = "static"
    min_loop_steps: int = 1
    max_loop_steps: int = 0
    # Faithful source variants (docs/ARCHITECTURES.md); the defaults change nothing.
    # lrnnSMDDS: LayerNorm with bias for every residual-stream norm, a norm right after the
    # embedding, and the model's size chosen from the corpus size by the trainer (looplm.training.auto_size).
    norm_type: str = "rms"
    embed_norm: bool = False
    auto_size: bool = False
    # OpenMythos (also injection=lti_residual): where depth LoRA reads, ACT mixing of the loop
    # states before the coda, MoE in the core only, dropout, MLA's own head widths.
    depth_lora_position: str = "input"
    act_mixing: bool = False
    moe_scope: str = "all"
    shared_expert_hidden: int | None = None
    dropout: float = 0.0
    mla_nope_dim: int | None = None
    mla_value_dim: int | None = None

    def __post_init__(self) -> None:
        _check_finite(self, "model")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            # SwiGLU at ~8/3·D keeps the FFN's parameter count equal to a 4·D GELU MLP.
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        _check(self.vocab_size >= 2, f"model.vocab_size must be >= 2, got {self.vocab_size}")
        _check(self.d_model >= 1, f"model.d_model must be >= 1, got {self.d_model}")
        _check(self.n_heads >= 1 and self.d_model % self.n_heads == 0,
               f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}")
        _check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
               f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        _check(self.head_dim % 2 == 0,
               f"model.d_model / model.n_heads = {self.head_dim} must be even for RoPE")
        _check(self.ffn_hidden >= 1, f"model.ffn_hidden must be >= 1, got {self.ffn_hidden}")
        for name in ("n_prelude_layers", "n_coda_layers"):
            _check(getattr(self, name) >= 0, f"model.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.n_core_layers >= 1, f"model.n_core_layers must be >= 1, got {self.n_core_layers}")
        _check(self.loop_steps >= 1, f"model.loop_steps must be >= 1, got {self.loop_steps}")
        _check(1 <= self.max_seq_len <= MAX_CONTEXT,
               f"model.max_seq_len must be in [1, {MAX_CONTEXT}], got {self.max_seq_len}")
        _check(self.vocab_size <= MAX_VOCAB, f"model.vocab_size must be <= {MAX_VOCAB}, got {self.vocab_size}")
        _check(self.norm in NORM_PLACEMENTS,
               f"model.norm must be one of {', '.join(NORM_PLACEMENTS)}, got {self.norm!r}")
        _check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        _check(0 < self.act_threshold <= 1, f"model.act_threshold must be in (0, 1], got {self.act_threshold}")
        _check(self.attention in ATTENTION_KINDS,
               f"model.attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        _check(set(self.layer_pattern) <= set(LAYER_KINDS),
               f"model.layer_pattern may only use {', '.join(LAYER_KINDS)} (A = attention, G = Gated DeltaNet,"
               f" R = RWKV-style slot-memory mixer), got {self.layer_pattern!r}")
        _check(self.mc_segment_size >= 0 and self.mc_top_k >= 1,
               f"model.mc_segment_size must be >= 0 (0 = off) and model.mc_top_k >= 1, got {self.mc_segment_size},"
               f" {self.mc_top_k}")
        _check(not self.mc_segment_size or "G" in self.layer_pattern,
               "model.mc_segment_size caches Gated DeltaNet states: add G layers to model.layer_pattern")
        _check(self.loop_mc_top_k >= 1, f"model.loop_mc_top_k must be >= 1, got {self.loop_mc_top_k}")
        _check(not self.loop_mc or "G" in {self.layer_kind(i) for i in range(self.n_core_layers)},
               "model.loop_mc caches the core's Gated DeltaNet states across loops: give model.layer_pattern a G"
               " among the core layers")
        _check(self.rwkv_slots >= 1 and self.rwkv_decay_rank >= 1,
               f"model.rwkv_slots and model.rwkv_decay_rank must be >= 1,"
               f" got {self.rwkv_slots}, {self.rwkv_decay_rank}")
        if self.attention == "mla":
            _check(self.mla_kv_rank >= 1, f"model.mla_kv_rank must be >= 1, got {self.mla_kv_rank}")
            _check(self.mla_q_rank >= 0,
                   f"model.mla_q_rank must be >= 0 (0 = no query compression), got {self.mla_q_rank}")
            _check(self.mla_rope_dim >= 2 and self.mla_rope_dim % 2 == 0,
                   f"model.mla_rope_dim must be even and >= 2, got {self.mla_rope_dim}")
        _check(0 < self.rope_fraction <= 1 and self.rope_dim >= 2,
               f"model.rope_fraction must be in (0, 1] and rotate at least 2 of the {self.head_dim} head"
               f" dims, got {self.rope_fraction}")
        _check(self.injection in INJECTIONS,
               f"model.injection must be one of {', '.join(INJECTIONS)}, got {self.injection!r}")
        _check(self.initial_state in INITIAL_STATES,
               f"model.initial_state must be one of {', '.join(INITIAL_STATES)}, got {self.initial_state!r}")
        _check(not (self.initial_state == "noise" and self.injection == "identity"),
               "model.initial_state=noise needs an injection other than identity (the loop would never see"
               " the input): set model.injection")
        _check(self.initial_noise_std > 0, f"model.initial_noise_std must be > 0, got {self.initial_noise_std}")
        _check(self.ffn in FFN_KINDS, f"model.ffn must be one of {', '.join(FFN_KINDS)}, got {self.ffn!r}")
        if self.expert_hidden is None:
            self.expert_hidden = self.ffn_hidden
        if self.ffn == "moe":
            _check(self.n_experts >= 1, f"model.n_experts must be >= 1, got {self.n_experts}")
            _check(1 <= self.moe_top_k <= self.n_experts,
                   f"model.moe_top_k must be in [1, n_experts={self.n_experts}], got {self.moe_top_k}")
            _check(self.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
            _check(self.expert_hidden >= 1, f"model.expert_hidden must be >= 1, got {self.expert_hidden}")
            _check(self.moe_bias_update_rate >= 0 and self.moe_aux_loss_weight >= 0,
                   "model.moe_bias_update_rate and model.moe_aux_loss_weight must be >= 0")
        _check(self.depth_lora_rank >= 0, f"model.depth_lora_rank must be >= 0, got {self.depth_lora_rank}")
        _check(not self.loop_index_embedding or self.d_model >= 16,
               f"model.loop_index_embedding needs d_model >= 16 (it uses d_model/8 channels), got {self.d_model}")
        _check(self.ternary in TERNARY_SCOPES,
               f"model.ternary must be one of {', '.join(TERNARY_SCOPES)}, got {self.ternary!r}")
        _check(self.hyper_connections >= 0, f"model.hyper_connections must be >= 0 (0 or 1 = off), got"
               f" {self.hyper_connections}")
        _check(self.attnres_block_size >= 0, f"model.attnres_block_size must be >= 0 (0 = off), got"
               f" {self.attnres_block_size}")
        _check(not (self.residual_streams > 1 and self.attnres_block_size),
               "model.hyper_connections and model.attnres_block_size both replace the residual sum: choose one")
        _check(not self.mc_detach or self.mc_segment_size, "model.mc_detach detaches the cached segment states of"
               " memory caching: set model.mc_segment_size too")
        _check(self.min_loop_steps >= 1 and self.max_loop_steps >= 0
               and (not self.max_loop_steps or self.min_loop_steps <= self.max_loop_steps),
               "model.min_loop_steps must be >= 1 and at most model.max_loop_steps (0 = the trained T), got"
               f" {self.min_loop_steps}, {self.max_loop_steps}")
        parse_exit_spec(self.default_exit)  # a one-line error for a policy that does not parse
        self._check_source_variants()

    def _check_source_variants(self) -> None:
        """The keys of the faithful source variants (the block of fields above ``__post_init__``)."""
        if self.shared_expert_hidden is None:
            self.shared_expert_hidden = self.expert_hidden
        if self.mla_nope_dim is None:
            self.mla_nope_dim = self.head_dim
        if self.mla_value_dim is None:
            self.mla_value_dim = self.head_dim
        for name, allowed in (("norm_type", NORM_TYPES), ("depth_lora_position", DEPTH_LORA_POSITIONS),
                              ("moe_scope", MOE_SCOPES)):
            _check(getattr(self, name) in allowed,
                   f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        _check(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")
        for name in ("shared_expert_hidden", "mla_nope_dim", "mla_value_dim"):
            _check(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        _check(not self.act_mixing or (self.exit_gate and not self.step_norm),
               "model.act_mixing reads halting probabilities from the loop state with the exit gate: it needs"
               " model.exit_gate=true and model.step_norm=false")
        _check(not (self.injection == "lti_residual" and self.loop_index_embedding and self.d_model // 8 % 2),
               f"model.injection=lti_residual with model.loop_index_embedding needs d_model / 8 even (a sine and a"
               f" cosine per frequency), got d_model={self.d_model}")

    def layer_kind(self, index: int) -> str:
        """"A" (attention), "G" (Gated DeltaNet) or "R" (RWKV-style mixer) for layer ``index`` of a stack: the
        ``layer_pattern`` repeated (empty = all attention)."""
        return self.layer_pattern[index % len(self.layer_pattern)] if self.layer_pattern else "A"

    @property
    def rope_dim(self) -> int:
        """Head dims RoPE rotates (the first ones; even): head_dim × rope_fraction, or MLA's
        separate rope slice."""
        if self.attention == "mla":
            return self.mla_rope_dim
        return 2 * int(self.head_dim * self.rope_fraction / 2)

    @property
    def plain_loop(self) -> bool:
        """True for Ouro's loop: the state alone feeds each step, nothing step-dependent added."""
        return (self.injection == "identity" and self.initial_state == "prelude" and not self.loop_index_embedding
                and self.depth_lora_rank == 0 and not self.global_gates and self.ternary == "none"
                and self.residual_streams == 1 and not self.attnres_block_size and not self.kv_append_first)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def residual_streams(self) -> int:
        """Parallel residual streams of the hidden state: model.hyper_connections, else 1."""
        return max(self.hyper_connections, 1)


@dataclass
class TrainConfig:
    """Optimiser, schedule and objective (docs/MATH.md §2, §5 training recipes)."""

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    objective: str = "stage1"
    entropy_beta: float = 0.1
    entropy_beta_final: float | None = None
    act_ponder_weight: float = 0.01
    stage: int = 1
    init: str | None = None
    stage2_k: float = 50.0
    stage2_gamma: float = 0.005
    # Depth sampling (Huginn / Parcae): loop steps drawn per optimiser step, backprop through the last k.
    depth_sampling: str = "fixed"
    depth_mean: float | None = None
    depth_min: int = 1
    depth_max: int | None = None
    backprop_steps: int = 0
    parallel: str = "none"
    activation_checkpointing: bool = False
    spike_factor: float = 0.0
    # Distillation (looplm.training.distill): a frozen teacher checkpoint.
    distill_teacher: str | None = None
    distill_teacher_steps: int | None = None
    distill_temperature: float = 1.0
    distill_alpha: float = 0.5
    distill_loop_penalty: float = 0.0
    # Recipes: loop-step curriculum (looplm.training.curriculum), upcycling (looplm.training.upcycle),
    # optimiser choice (looplm.training.optim).
    loop_curriculum_start: int = 0
    loop_curriculum_steps: int = 0
    upcycle_from: str | None = None
    upcycle_order: str = "cycle"
    optimizer: str = "adamw"
    muon_lr: float | None = None
    muon_momentum: float = 0.95
    eval_every: int = 200
    eval_batches: int = 4
    log_every: int = 10
    save_every: int = 0
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    # Float precision of the forward pass (looplm.precision): auto = bf16 autocast on CUDA, and on
    # CPUs with native bf16 (avx512_bf16, amx_bf16) for d_model >= 256; fp32 elsewhere.
    precision: str = "auto"
    compile: bool = False
    threads: int = 0
    # Logging (looplm.training.loggers): metrics.jsonl always; extra sinks, W&B names; MFU's denominator.
    log_to: str = ""
    wandb_project: str = "looplm"
    run_name: str | None = None
    peak_tflops: float = 0.0
    # Stage schedules: β stays entropy_beta before this step, then moves linearly to
    # entropy_beta_final at the last step; RoPE θ by step ("STEP:THETA,...", θ from each step on).
    entropy_beta_anneal_start: int = 0
    rope_theta_schedule: str = ""

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_last"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "threads"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
               f"train.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.stage in (1, 2), f"train.stage must be 1 (train the model) or 2 (train the exit gate only),"
               f" got {self.stage}")
        _check(self.stage == 1 or self.init, "train.stage=2 trains the exit gate of a trained model: give --init CKPT")
        _check(self.depth_sampling in DEPTH_SAMPLING,
               f"train.depth_sampling must be one of {', '.join(DEPTH_SAMPLING)}, got {self.depth_sampling!r}")
        _check(self.depth_min >= 1 and (self.depth_max is None or self.depth_max >= self.depth_min),
               f"train.depth_min must be >= 1 and <= train.depth_max, got {self.depth_min}, {self.depth_max}")
        _check(self.depth_mean is None or self.depth_mean > 0, f"train.depth_mean must be > 0, got {self.depth_mean}")
        _check(self.distill_temperature > 0, f"train.distill_temperature must be > 0, got {self.distill_temperature}")
        _check(0 <= self.distill_alpha <= 1, f"train.distill_alpha must be in [0, 1], got {self.distill_alpha}")
        _check(self.distill_loop_penalty >= 0,
               f"train.distill_loop_penalty must be >= 0, got {self.distill_loop_penalty}")
        _check(self.spike_factor == 0 or self.spike_factor > 1,
               f"train.spike_factor must be 0 (off) or > 1, got {self.spike_factor}")
        _check(self.backprop_steps >= 0, f"train.backprop_steps must be >= 0 (0 = all), got {self.backprop_steps}")
        check_precision(self.precision, "train.precision")
        _check(self.parallel in PARALLEL, f"train.parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        _check(self.objective in OBJECTIVES,
               f"train.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        _check(self.entropy_beta >= 0, f"train.entropy_beta must be >= 0, got {self.entropy_beta}")
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _check(self.loop_curriculum_start >= 0 and (not self.loop_curriculum_start or self.loop_curriculum_steps >= 1),
               "train.loop_curriculum_start (0 = off) needs train.loop_curriculum_steps >= 1, got"
               f" {self.loop_curriculum_start}, {self.loop_curriculum_steps}")
        _check(not (self.upcycle_from and self.init),
               "give either train.init (same shape) or train.upcycle_from (another shape), not both")
        _check(self.upcycle_order in UPCYCLE_ORDERS,
               f"train.upcycle_order must be one of {', '.join(UPCYCLE_ORDERS)}, got {self.upcycle_order!r}")
        _check(self.optimizer in OPTIMIZERS,
               f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _check(not (self.optimizer == "muon" and self.parallel == "fsdp"),
               "train.optimizer=muon is not supported with --parallel fsdp yet (sharded Muon is untested):"
               " use adamw, or --parallel ddp")
        _check(self.muon_lr is None or self.muon_lr > 0, f"train.muon_lr must be > 0, got {self.muon_lr}")
        _check(0 <= self.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        unknown_sinks = [name for name in self.log_sinks() if name not in LOG_SINKS]
        _check(not unknown_sinks, f"train.log_to takes a comma list of {', '.join(LOG_SINKS)} (metrics.jsonl is"
               f" always written), got {self.log_to!r}")
        _check(self.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (0 = look up the GPU), got {self.peak_tflops}")
        _check(self.entropy_beta_anneal_start >= 0,
               f"train.entropy_beta_anneal_start must be >= 0, got {self.entropy_beta_anneal_start}")
        self.rope_thetas()  # one-line errors for a schedule that does not parse

    def log_sinks(self) -> tuple[str, ...]:
        """train.log_to as names: "tensorboard,wandb" -> ("tensorboard", "wandb")."""
        return tuple(dict.fromkeys(name.strip().lower() for name in self.log_to.split(",") if name.strip()))

    def entropy_beta_at(self, step: int) -> float:
        """β for Stage I at optimiser step ``step``: entropy_beta until entropy_beta_anneal_start,
        then linear to entropy_beta_final at the last step (constant without a final value)."""
        if self.entropy_beta_final is None or step <= self.entropy_beta_anneal_start:
            return self.entropy_beta
        start = self.entropy_beta_anneal_start
        fraction = min((step - start) / max(self.steps - 1 - start, 1), 1.0)
        return self.entropy_beta + fraction * (self.entropy_beta_final - self.entropy_beta)

    def rope_thetas(self) -> list[tuple[int, float]]:
        """train.rope_theta_schedule as [(first step, θ)], ascending: "0:1e4,500:1e6"."""
        stages = []
        for item in filter(None, (part.strip() for part in self.rope_theta_schedule.split(","))):
            step, _, theta = item.partition(":")
            try:
                stages.append((int(step), float(theta)))
            except ValueError:
                raise LoopLMError(f"train.rope_theta_schedule takes STEP:THETA pairs separated by commas, got"
                                  f" {item!r}") from None
        steps = [step for step, _ in stages]
        _check(all(step >= 0 for step in steps) and steps == sorted(set(steps)),
               f"train.rope_theta_schedule needs distinct ascending steps >= 0, got {self.rope_theta_schedule!r}")
        _check(all(theta > 0 for _, theta in stages), f"train.rope_theta_schedule needs θ > 0, got"
               f" {self.rope_theta_schedule!r}")
        return stages

    def rope_theta_at(self, step: int, base: float) -> float:
        """RoPE θ at optimiser step ``step``: the last schedule entry at or before it, else ``base``."""
        theta = base
        for first, value in self.rope_thetas():
            if step >= first:
                theta = value
        return theta


@dataclass
class DataConfig:
    """Where training tokens come from: prepared shards, raw text files, or a built-in task."""

    path: str | None = None
    task: str | None = None
    task_options: dict = field(default_factory=dict)
    # byte, bpe (trained on the data), word / char / auto (fitted to the data: looplm.data.word_char),
    # or a tokenizer.json path.
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    text_field: str = "text"  # the field / column holding the text in .jsonl, .parquet and hf: data

    def __post_init__(self) -> None:
        _check_finite(self, "data")
        _check(not (self.path and self.task), "give either data.path or data.task, not both")
        _check(not (self.task and self.tokenizer in FITTED_TOKENIZERS),
               f"data.tokenizer={self.tokenizer} is fitted to text data; a task uses byte or a tokenizer.json")
        _check(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(isinstance(self.text_field, str) and self.text_field != "",
               f"data.text_field must name a field, got {self.text_field!r}")


@dataclass
class RunConfig:
    """Everything ``looplm train`` needs: model, training and data sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        _check(isinstance(raw, dict), "a run config must be a mapping with model/train/data sections")
        unknown = set(raw) - {"model", "train", "data"}
        if unknown:
            raise LoopLMError(f"unknown config section {sorted(unknown)[0]!r}: use model, train or data")
        return cls(
            model=from_dict(ModelConfig, raw.get("model", {}), "model"),
            train=from_dict(TrainConfig, raw.get("train", {}), "train"),
            data=from_dict(DataConfig, raw.get("data", {}), "data"),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(value: Any, kind: type, where: str) -> int | float:
    """Parse an int or float field; "1e-3" and 3.0 are accepted where they are exact."""
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise LoopLMError(f"{where} must be {wanted}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LoopLMError(f"{where} must be {wanted}, got {value!r}") from None
    if not math.isfinite(number):
        raise LoopLMError(f"{where} must be a finite number, got {value!r}")
    if kind is float:
        return number
    if not number.is_integer():
        raise LoopLMError(f"{where} must be an integer, got {value!r}")
    return int(number)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a JSON/YAML/CLI value into the field's declared type, or raise one line."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise LoopLMError(f"{where} must be true or false, got {value!r}")
    if annotation in (int, float):
        return _number(value, annotation, where)
    if annotation is str:
        return str(value)
    if annotation is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise LoopLMError(f"{where} must be a JSON object, got {value!r}") from None
        _check(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, raw: dict, section: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise LoopLMError."""
    _check(isinstance(raw, dict), f"config section {section!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    for key in raw:
        if key not in known:
            raise LoopLMError(
                f"unknown config key {section}.{key}: valid keys are {', '.join(sorted(known))}")
    values = {key: _coerce(value, hints[key], f"{section}.{key}") for key, value in raw.items()}
    return cls(**values)


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Patch a nested run-config dict with dotted keys: {"model.loop_steps": "6"}."""
    result = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        _check(len(parts) >= 2 and parts[0] in ("model", "train", "data"),
               f"override {dotted!r} must look like model.KEY, train.KEY or data.KEY")
        node = result.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result


def read_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict (one-line errors for missing/bad files)."""
    path = Path(path)
    _check(path.is_file(), f"config file {str(path)!r} not found: check the path")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # json and yaml raise many types; all mean "not parseable"
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LoopLMError(f"config file {str(path)!r} could not be parsed: {first_line}") from None
    return data or {}


# Keys of a checkpoint's config.json that describe the file, not the model: looplm's format
# marker and the Hugging Face metadata that makes the directory loadable by transformers
# (looplm.interop.hf_directory; save_pretrained adds transformers_version and dtype).
CHECKPOINT_METADATA_KEYS = ("format", "version", "architectures", "model_type", "auto_map", "transformers_version",
                            "dtype", "torch_dtype")


def model_config_from_json(path: str | Path) -> ModelConfig:
    """Load a checkpoint's ``config.json`` (a ModelConfig, unknown keys rejected)."""
    path = Path(path)
    _check(path.is_file(), f"missing {path.name} in {str(path.parent)!r}: not a looplm checkpoint")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoopLMError(f"{str(path)!r} is not valid JSON ({error.__class__.__name__}):"
                          " the checkpoint is corrupt") from None
    if not isinstance(raw, dict):
        raise LoopLMError(f"{str(path)!r} holds {type(raw).__name__ if raw is not None else 'null'}, not a model"
                          " config mapping: the checkpoint is corrupt")
    raw = {k: v for k, v in raw.items() if k not in CHECKPOINT_METADATA_KEYS}
    return from_dict(ModelConfig, raw, "model")


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


# Sizes ``ModelConfig`` derives when they are left out, and the fields each is derived from.
DERIVED_SIZES = {"n_kv_heads": ("n_heads",), "ffn_hidden": ("d_model",), "expert_hidden": ("ffn_hidden",),
                 "shared_expert_hidden": ("expert_hidden",), "mla_nope_dim": ("d_model", "n_heads"),
                 "mla_value_dim": ("d_model", "n_heads")}
# Keys a resumed run may change: they steer how long it runs, how it logs and saves, and where it
# runs, not the model, the data or the optimisation (docs/TRAINING.md).
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.save_every",
                     "train.keep_last", "train.log_to", "train.threads", "train.device", "train.parallel")


def drop_derived(model: dict, changed: set[str]) -> dict:
    """A full model section (e.g. a checkpoint's) without the derived sizes whose base is in
    ``changed``, so they are derived again from the new values.  A size counts as derived when it
    equals what the rest of its config derives for it; a size in ``changed`` stays."""
    result, dropped = dict(model), set()
    for name, bases in DERIVED_SIZES.items():
        if name in changed or name not in model or not set(bases) & (changed | dropped):
            continue
        dependents = {other for other, other_bases in DERIVED_SIZES.items() if name in other_bases}
        reference = from_dict(ModelConfig, {key: value for key, value in model.items()
                                            if key != name and key not in dependents}, "model")
        if getattr(reference, name) == model[name]:
            result.pop(name)
            dropped.add(name)
    return result


def _merge(base: dict, sections: dict) -> dict:
    """``sections`` over ``base``, section by section (a section's keys replace base's keys)."""
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def _flat(run: RunConfig) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in run.to_dict().items() for key, value in values.items()}


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "data.path" and a and b:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def assemble_run_config(*, preset_name: str | None = None, config_file: str | None = None,
                        source_model: dict | None = None, source_data: dict | None = None,
                        options: dict | None = None, overrides: dict[str, str] | None = None,
                        saved: Any = None, saved_where: str = "run_config.json") -> tuple[RunConfig, bool]:
    """Build a run config in the documented order: preset → config file → the source checkpoint's
    model and data (``--init``/``--upcycle``) → command-line options (``options``, dotted keys such
    as ``data.path``) → dotted ``overrides``.  Returns the config and whether the user chose the
    vocabulary (else the trainer fits it to the tokenizer).

    ``saved`` (``--resume``): the run's saved config is the base; whatever is given again must
    equal it, except ``RESUME_MAY_CHANGE``, else one line names the first difference."""
    dotted = {**(options or {}), **(overrides or {})}
    raw: dict = {}
    if preset_name:
        raw["model"] = preset_values(preset_name)
    if config_file:
        file_config = read_config_file(config_file)
        _check(isinstance(file_config, dict), f"config file {config_file!r} must hold a mapping with model/train/data"
               " sections")
        raw = _merge(raw, file_config)
    if source_model is not None and "model" not in raw:
        raw["model"] = drop_derived(source_model, {key[len("model."):] for key in dotted if key.startswith("model.")})
    if source_data is not None and "data" not in raw and not any(key.startswith("data.") for key in dotted):
        raw["data"] = source_data
    given = apply_overrides(raw, dotted)
    if saved is None:
        vocab_given = ("vocab_size" in raw.get("model", {}) and not preset_name) or "model.vocab_size" in dotted
        return RunConfig.from_dict(given), vocab_given
    try:
        run = RunConfig.from_dict(saved)
    except LoopLMError as error:
        raise LoopLMError(f"{saved_where} is damaged ({error}): resume is impossible; train a new run") from None
    requested = RunConfig.from_dict(_merge(saved, given))
    before = _flat(run)
    for key, value in _flat(requested).items():
        if not _same(key, value, before[key]) and key not in RESUME_MAY_CHANGE:
            raise LoopLMError(f"--{key} {value!r} differs from this run's {before[key]!r} (saved in {saved_where}):"
                              " leave it out to resume as saved, or train a new run into another --out")
    return requested, True
