"""LoopLM: the whole looped language model (DESIGN "flow of a token").

    e   = prelude(embed(ids))                       run once (embed_norm: prelude(n₀(embed(ids))))
    h_0 = e  (or noise)
    h_t = core(inject(h_{t−1}, e))   t = 1..T       the same N layers every step
          (with step_norm: h_t = norm(core(…)), Ouro's final norm closing each step;
           injection, loop-index signal and depth LoRA: looplm.model.loop)
    r_t = readout(h_t) = norm(coda(h_t))             (just h_t for Ouro: already normed)
    logits_t = head(r_t),   λ_t = σ(w·r_t + b)       per-step prediction and exit gate

With mHC hyper-connections (``model.hyper_connections`` = n ≥ 2) the state between the
building blocks is n residual streams, flattened to [B, S, n·D] so that callers handle it like
any state (the D-wise loop mechanics apply per stream); the embedding enters as n copies and
the readout norms the streams' mean.  With block attention residuals each stack pass (the
prelude, one core step, the coda) starts a ``DepthSources`` from its input and ends with its
output query (``stack_outputs``); see looplm.model.residual.

With ``act_mixing`` (OpenMythos) the gate reads the state, λ_t = σ(w·h_t + b), as ACT's
halting probability, and the readout is r_t = norm(coda(m_t)) for the ACT mixture
m_t = Σ_{s≤t} w_s h_s of the states so far (``exit.act_mixing_step``): what the source outputs
when run for t loop steps.  The mixture travels through the ``LoopCarry`` of the call.

The building blocks (``embed_input``, ``core_step``, ``readout``, ``logits``, ``gate_logits``)
are public so the decoder can run a token step by step and stop early; ``forward`` is the
plain loop over them and the reference every faster path is tested against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from looplm.checkpoint.atomic import atomic_directory
from looplm.checkpoint.directory import checkpoint_entry, write_model_files
from looplm.config import ModelConfig
from looplm.errors import LoopLMError, is_int, is_number
from looplm.model.block import Layer
from looplm.model.carry import LoopCarry
from looplm.model.exit import act_mixing_step, act_weights, exit_distribution, log_exit_distribution
from looplm.model.loop import DepthLoRA, NoiseState, loop_index_signal, make_injection
from looplm.model.moe import MoE
from looplm.model.norms import make_norm
from looplm.model.residual import DepthAttention, DepthSources
from looplm.model.rope import RotaryEmbedding
from looplm.precision import without_autocast


@dataclass
class LoopOutput:
    """Per-step results of one forward pass.

    hidden_states: T tensors [B, S, D], the readout state r_t of each step.
    gate_logits:   [T, B, S] exit-gate logits z_t, or None when the model has no gate.
    Logits are computed on demand (``logits(t)``) so training never holds T × [B, S, V].
    """

    hidden_states: list[torch.Tensor]
    gate_logits: torch.Tensor | None
    model: "LoopLM"
    aux_loss: torch.Tensor | None = None  # MoE auxiliary balancing loss, already weighted

    @property
    def steps(self) -> int:
        return len(self.hidden_states)

    def logits(self, step: int | None = None) -> torch.Tensor:
        """[B, S, V] logits of 1-based ``step`` (default: the last step run)."""
        if step is not None and not (is_int(step) and 1 <= step <= self.steps):
            raise LoopLMError(f"step must be in 1..{self.steps} (the loop steps this forward ran; 1-based), got"
                              f" {step!r}")
        return self.model.logits(self.hidden_states[(step or self.steps) - 1])

    @property
    def step_logits(self) -> torch.Tensor:
        """[T, B, S, V] logits of every step (memory heavy: prefer ``logits(t)``)."""
        return torch.stack([self.logits(t) for t in range(1, self.steps + 1)])

    @property
    def exit_probs(self) -> torch.Tensor:
        """λ_t [T, B, S]."""
        return torch.sigmoid(self._gate())

    @property
    def exit_distribution(self) -> torch.Tensor:
        """p(t) [T, B, S], sums to 1 over t."""
        return exit_distribution(self._gate())

    @property
    def log_exit_distribution(self) -> torch.Tensor:
        return log_exit_distribution(self._gate())

    def act(self, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ACT over the exit gate read as halting probabilities (``exit.act_weights``):
        the halting-weighted readout Σ_t w_t r_t [B, S, D], the weights [T, B, S] and the
        halting steps [B, S]."""
        if self.model.config.act_mixing:
            raise LoopLMError("model.act_mixing: every readout already is the ACT mixture of the loop states; read"
                              " a step's logits (objective last or stage1, fixed steps or Q-exit), not ACT over them")
        threshold = self.model.config.act_threshold if threshold is None else threshold
        if not (is_number(threshold) and 0 < threshold <= 1):
            raise LoopLMError(f"the ACT threshold must be a number in (0, 1], got {threshold!r}")
        weights, halting = act_weights(self._gate(), threshold)
        state = sum(weight.unsqueeze(-1) * hidden for weight, hidden in zip(weights, self.hidden_states))
        return state, weights, halting

    def _gate(self) -> torch.Tensor:
        if self.gate_logits is None:
            raise LoopLMError("this model has no exit gate (model.exit_gate=false)")
        return self.gate_logits


def check_token_tensor(ids, vocab_size: int, name: str = "ids", values: bool = True) -> None:
    """``ids`` must be a [batch, sequence] integer tensor of token ids in [0, vocab_size).  The ids
    themselves are checked only where ``values`` and they are on the CPU: reading them is a host
    sync, which a training step must not make (the trainer checks its data when it loads it), and
    off a GPU it would stall the device; there the embedding itself asserts."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
        shape = f"a {ids.dim()}-D {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LoopLMError(f"{name} must be a [batch, sequence] tensor of token ids (torch.long), got {shape}: use"
                          " ids[None] for one sequence and .long() for other dtypes")
    if values and ids.device.type == "cpu" and ids.numel():
        low, high = torch.aminmax(ids)
        if int(low) < 0 or int(high) >= vocab_size:
            bad = int(low) if int(low) < 0 else int(high)
            raise LoopLMError(f"{name} hold the token id {bad}, outside the model's vocabulary [0, {vocab_size}): use"
                              " the tokenizer the model was trained with")


class LoopLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_norm = make_norm(config) if config.embed_norm else None
        self.prelude = nn.ModuleList(Layer(config, config.layer_kind(i), index=i)
                                     for i in range(config.n_prelude_layers))
        self.core = nn.ModuleList(Layer(config, config.layer_kind(i), looped=True, index=i)
                                  for i in range(config.n_core_layers))
        self.coda = nn.ModuleList(Layer(config, config.layer_kind(i), index=i) for i in range(config.n_coda_layers))
        self.streams = config.residual_streams
        # Block attention residuals: each non-empty stack's output query over its depth sources.
        self.stack_outputs = nn.ModuleDict(
            {stack: DepthAttention(config) for stack in ("prelude", "core", "coda") if getattr(self, stack)}
        ) if config.attnres_block_size else None
        self.norm = make_norm(config)
        self.exit_gate = nn.Linear(config.d_model, 1) if config.exit_gate else None
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.rope_dim, config.max_seq_len, config.rope_theta)
        # Loop mechanics (looplm.model.loop); absent modules for Ouro's plain loop.
        self.injection = make_injection(config)
        self.noise = NoiseState(config) if config.initial_state == "noise" else None
        self.depth_lora = DepthLoRA(config) if config.depth_lora_rank else None
        self.moe_layers = tuple(module for module in self.modules() if isinstance(module, MoE))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, σ) weights; residual outputs scaled by 1/√(2·layer applications) (GPT-2)."""
        config = self.config
        applications = config.n_prelude_layers + config.n_core_layers * config.loop_steps + config.n_coda_layers
        for name, parameter in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.zeros_(parameter) if config.zero_centered_norm else nn.init.ones_(parameter)
            elif name.endswith("norm.bias"):
                nn.init.zeros_(parameter)
            elif name.startswith("exit_gate"):
                nn.init.zeros_(parameter)
            elif name.endswith(("attn.out.weight", "down.weight", "experts_down")):
                nn.init.normal_(parameter, std=config.init_std / math.sqrt(2 * applications))
            else:
                nn.init.normal_(parameter, std=config.init_std)
        for module in self.modules():  # modules with their own initialisation override the above
            if hasattr(module, "reset_extra_parameters"):
                module.reset_extra_parameters()

    def rebuild_derived_buffers(self, device) -> None:
        """Recompute the buffers derived from the config and not saved (RoPE tables, the eval
        noise table): after building on the meta device and assigning loaded weights."""
        config = self.config
        self.rope = RotaryEmbedding(config.rope_dim, config.max_seq_len, config.rope_theta).to(device)
        if self.noise is not None:
            self.noise = NoiseState(config).to(device)
        for module in self.modules():
            if hasattr(module, "rebuild_buffers"):
                module.rebuild_buffers(device)

    def set_rope_theta(self, theta: float) -> None:
        """Use RoPE base θ from now on (a stage of ``train.rope_theta_schedule``); the config, and
        so every checkpoint written after, records it."""
        self.config = dataclasses.replace(self.config, rope_theta=theta)
        self.rope = RotaryEmbedding(self.config.rope_dim, self.config.max_seq_len, theta).to(self.rope.cos.device)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embedding else total

    def save(self, directory, tokenizer=None, weights: dict | None = None) -> Path:
        """Write config.json + model.safetensors (+ tokenizer.json) atomically; ``looplm.load``
        reads it.  ``weights``: the full state dict when this model holds only shards (FSDP)."""
        weights = self.state_dict() if weights is None else weights
        return atomic_directory(Path(directory),
                                lambda staging: write_model_files(self.config, weights, staging, tokenizer),
                                replaceable=checkpoint_entry)

    def _check_positions(self, start: int, length: int) -> None:
        if start + length > self.config.max_seq_len:
            raise LoopLMError(
                f"sequence of {start + length} tokens exceeds the context of {self.config.max_seq_len}"
                " (model.max_seq_len): shorten the input")

    def _split(self, h: torch.Tensor | None) -> torch.Tensor | None:
        """[..., n·D] → the n streams [..., n, D] (mHC); unchanged with one stream."""
        return h if h is None or self.streams == 1 else h.unflatten(-1, (self.streams, self.config.d_model))

    def _join(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.streams == 1 else h.flatten(-2)

    def _stack(self, stack: str, layers, h: torch.Tensor, cos, sin, cache, step: int | torch.Tensor,
               start: int | torch.Tensor, carry: LoopCarry | None = None) -> torch.Tensor:
        """One pass of ``h`` through a stack's layers (their cache slots at loop step ``step``)."""
        if not layers:
            return h
        state = DepthSources((h,)) if self.stack_outputs is not None else h
        for index, layer in enumerate(layers):
            state = layer(state, cos, sin, cache.layer_storage(stack, index, step) if cache else None, start, carry)
        return self.stack_outputs[stack].read(state)[0] if self.stack_outputs is not None else state

    def embed_input(self, ids: torch.Tensor, start: int | torch.Tensor = 0, cache=None) -> torch.Tensor:
        """ids [B, S] → e [B, S, D] (n·D with n streams): embedding then the prelude layers (run
        once per token).

        start (here and in ``initial_state``, ``core_step``, ``readout``): the first position, or
        [B] positions of one token per row, each at its own position (the scheduler's rows).
        cache: anything whose ``layer_storage(stage, layer, step)`` hands each layer its storage
        (``looplm.cache``)."""
        if not isinstance(start, torch.Tensor):
            self._check_positions(start, ids.shape[1])
        h = self.embed(ids)
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        if self.streams > 1:
            h = h.unsqueeze(-2).expand(*h.shape[:-1], self.streams, h.shape[-1])
        cos, sin = self.rope.tables(start, ids.shape[1])
        return self._join(self._stack("prelude", self.prelude, h, cos, sin, cache, 0, start))

    def initial_state(self, e: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """h₀ from the prelude output e [B, S, D]: e itself, or noise (``initial_state=noise``)."""
        return e if self.noise is None else self.noise(e, start)

    def core_step(self, h: torch.Tensor, step: int | torch.Tensor, start: int | torch.Tensor = 0, cache=None,
                  injected: torch.Tensor | None = None, carry: LoopCarry | None = None) -> torch.Tensor:
        """One loop step (0-based ``step``, or [B] steps of one token per row): loop-index signal,
        injection of ``injected`` (the prelude output e; needed unless the loop is plain), the
        core layers, depth LoRA, then the step norm if configured (see ``looplm.model.loop``).
        carry: what the same tokens' earlier steps left (``LoopCarry``: one per call, steps run
        in order from 0; ``RowCarry`` for rows at their own steps); required by model.loop_mc,
        model.global_gates, model.kv_append_first and model.act_mixing."""
        config = self.config
        if carry is not None:
            carry.step = step
        elif self.needs_carry:
            raise LoopLMError("model.loop_mc, model.global_gates, model.kv_append_first and model.act_mixing read"
                              " earlier loop steps: pass carry=LoopCarry() to core_step (one per call)")
        if self.injection is not None and injected is None:
            raise LoopLMError(f"model.injection={config.injection} needs the prelude output: pass injected=e")
        h, injected = self._split(h), self._split(injected)
        signal = None
        if config.loop_index_embedding:
            signal = loop_index_signal(step, config.d_model, h.device, h.dtype)  # [D], or [R, 1, D] per row
            if isinstance(step, torch.Tensor) and h.dim() == 4:
                signal = signal.unsqueeze(-2)
        residual = self.injection is not None and self.injection.residual
        if residual:  # OpenMythos: the core reads n(h + signal + e); h enters the update on its own
            core_input = self.injection.core_input(h, injected, signal)
        else:
            if signal is not None:
                h = h + signal
            if self.injection is not None:
                h = self.injection(h, injected)
            core_input = h
        cos, sin = self.rope.tables(start, h.shape[1])
        update = self._stack("core", self.core, core_input, cos, sin, cache, step, start, carry)
        if self.depth_lora is not None:
            update = update + self.depth_lora(update if self.depth_lora.reads_output else core_input, step)
        if residual:
            update = self.injection.combine(h, injected, update)
        if config.act_mixing:
            previous = carry.latest(self.exit_gate)  # the same token's previous step (rows at step 0: zeros)
            halt_logits = self.exit_gate(update).squeeze(-1)
            carry.put(self.exit_gate, (halt_logits, *act_mixing_step(None if previous is None else previous[1:],
                                                                      update, halt_logits, config.act_threshold)))
        return self._join(self.norm(update) if config.step_norm else update)

    def readout(self, h: torch.Tensor, step: int | torch.Tensor, start: int | torch.Tensor = 0, cache=None,
                carry: LoopCarry | None = None) -> torch.Tensor:
        """State after a loop step → the normed state [B, S, D] the head and the exit gate read.
        With act_mixing the coda reads the ACT mixture of the states so far, from ``carry`` (the
        one ``core_step`` was given for this step)."""
        if self.config.act_mixing:
            if carry is not None:
                carry.step = step
            h = self._carried(carry)[3]
        if not self.coda and self.streams == 1:
            return h if self.config.step_norm else self.norm(h)
        h = self._split(h)
        if self.coda:
            cos, sin = self.rope.tables(start, h.shape[1])
            h = self._stack("coda", self.coda, h, cos, sin, cache, step, start)
        return self.norm(h.mean(dim=-2) if self.streams > 1 else h)

    def logits(self, readout: torch.Tensor) -> torch.Tensor:
        """[..., D] → [..., V]."""
        return F.linear(readout, self.head_weight)

    def gate_logits(self, readout: torch.Tensor, carry: LoopCarry | None = None) -> torch.Tensor:
        """[..., D] → exit-gate logits z [...], in the weights' dtype even under bf16 autocast:
        the exit distribution's log-space math and the exit decision read them.  With act_mixing
        the gate has read the step's state already: its logits come from ``carry`` (shaped like
        ``readout`` without its last dim)."""
        if self.config.act_mixing:
            return self._carried(carry)[0].reshape(readout.shape[:-1])
        return without_autocast(self.exit_gate, readout, self.exit_gate.weight.dtype).squeeze(-1)

    def _carried(self, carry: LoopCarry | None) -> tuple:
        """act_mixing: (halting logits, cumulative, halted, mixture) of the step running now."""
        if carry is None:
            raise LoopLMError("model.act_mixing reads the ACT state of the step: pass the carry given to core_step")
        return carry.current(self.exit_gate)

    def balance_experts(self) -> None:
        """Update every MoE layer's balancing bias from the loads its forwards counted (the trainer
        calls this once per optimiser step; ``looplm.model.moe``)."""
        for layer in self.moe_layers:
            layer.apply_balance()

    @property
    def needs_carry(self) -> bool:
        """Whether a loop step reads the same positions' earlier steps (``LoopCarry``)."""
        return (self.config.loop_mc or self.config.global_gates or self.config.kv_append_first
                or self.config.act_mixing)

    def forward(self, ids: torch.Tensor, steps: int | None = None, cache=None,
                backprop_steps: int | None = None) -> LoopOutput:
        """Run ``steps`` loop steps (default: the trained T; more extrapolates) on ids [B, S].

        With a cache, positions continue from ``cache.length`` and the cache advances by S.
        backprop_steps k (truncated backprop, Huginn/Parcae): the first steps − k steps run under
        ``torch.no_grad`` (their readouts and gates are constants), so gradients flow through the
        last k steps only; the forward values are unchanged.
        """
        steps = self.config.loop_steps if steps is None else steps
        if not is_int(steps) or steps < 1:
            raise LoopLMError(f"steps must be an int >= 1, got {steps!r}")
        if backprop_steps is not None and (not is_int(backprop_steps) or backprop_steps < 0):
            raise LoopLMError(f"backprop_steps must be an int >= 0 (0 or None: every step), got {backprop_steps!r}")
        check_token_tensor(ids, self.config.vocab_size, values=not self.training)
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_steps(steps)
        e = self.embed_input(ids, start, cache)
        h = self.initial_state(e, start)
        hidden_states, gates = [], []
        frozen = steps - backprop_steps if backprop_steps else 0
        carry = LoopCarry() if self.needs_carry else None
        for step in range(steps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= frozen):
                h = self.core_step(h, step, start, cache, e, carry=carry)
                readout = self.readout(h, step, start, cache, carry=carry)
                hidden_states.append(readout)
                if self.exit_gate is not None:
                    gates.append(self.gate_logits(readout, carry))
            if cache is not None:
                cache.after_step(step, start, start + ids.shape[1])
        if cache is not None:
            cache.finish(start, start + ids.shape[1], steps)
            cache.advance(ids.shape[1])
        aux = [loss for module in self.moe_layers for loss in module.pop_aux_losses()]
        return LoopOutput(hidden_states, torch.stack(gates) if gates else None, self,
                          torch.stack(aux).sum() if aux else None)
