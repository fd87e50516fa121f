"""Upcycling: start a looped model from a checkpoint of another shape (``train.upcycle_from``).

The source's layers, read as one flat list ``prelude + core + coda``, fill the target's layers
in one of two ways (``plan_upcycle``):

- **re-split** (same total layer count P + C + K): the flat list is cut again at the target's
  prelude / core / coda sizes.  A plain L-layer LM (loop_steps 1) becomes the core of a looped
  model, or a prelude / core / coda sandwich.
- **repetition** (same prelude and coda, target core = k × source core): each target core layer
  is a copy of a source core layer, in ``cycle`` order (c₁…c_N c₁…c_N: the source's loop
  unrolled k times) or ``interleave`` order (c₁ c₁ c₂ c₂ …).

Everything else is copied where both models have it: embedding, final norm, exit gate, head (a
tied source head becomes an untied target head), injection of the same kind, depth LoRA of the
same rank (scale rows past the source's T repeat its last row, as the clamped index did).  New
parts keep their initialisation, except an injection the source lacked, set so that step 1
starts from the input exactly as the source did: ``concat`` W = [I 0] (u = h at every step),
``lti`` and ``diagonal`` input weight 1 − A so that u = A·h + (1 − A)·e (u = e at step 1, where
h₀ = e).  New depth LoRA adds zero (its up-projection starts at zero).

When is the upcycled model the same function?  ``UpcyclePlan.source_steps(m)`` answers it
symbolically: it writes out the operations on the path to the step-m logits of the target
(layers named by the source layer they were copied from, step norms, injections, loop-index
signals, LoRA deltas) and those of the source at m·k steps (k = 1 for a re-split), and reports
k·m when the two lists are identical, else None.  For example a plain L-layer LM re-split into
a core of L layers reproduces the source at step 1; a core of N layers with ``step_norm=false``
unrolled (cycle) into 2N layers reproduces the source's T = 2m at T = m; with Ouro's
``step_norm`` it does not (the source normalises between its steps, the target cannot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from looplm.config import ModelConfig
from looplm.errors import LoopLMError

# Fields that decide what a layer computes (and its tensor shapes): they must agree.
LAYER_FIELDS = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "attention", "norm", "norm_eps",
                "zero_centered_norm", "rope_theta", "rope_fraction", "mla_kv_rank", "mla_q_rank", "mla_rope_dim",
                "rwkv_slots", "rwkv_decay_rank", "mc_segment_size", "mc_top_k", "ffn", "n_experts",
                "n_shared_experts", "moe_top_k", "expert_hidden", "ternary", "hyper_connections",
                "attnres_block_size", "kv_append_first", "norm_type", "embed_norm", "moe_scope",
                "shared_expert_hidden", "mla_nope_dim", "mla_value_dim", "act_mixing", "depth_lora_position")
STACKS = ("prelude", "core", "coda")
IDENTITY_LIKE = ("concat", "lti", "diagonal")


def _stack_sizes(config: ModelConfig) -> tuple[int, int, int]:
    return config.n_prelude_layers, config.n_core_layers, config.n_coda_layers


def _flat_layers(config: ModelConfig) -> list[tuple[str, int]]:
    """[(stack, index within the stack)] in the order prelude, core, coda."""
    return [(stack, index) for stack, size in zip(STACKS, _stack_sizes(config)) for index in range(size)]


@dataclass
class UpcyclePlan:
    """Which source layer fills each target layer (``layers``: "core.3" → "core.1"), and k."""

    source: ModelConfig
    target: ModelConfig
    layers: dict[str, str]
    repeat: int
    new_depth_lora: bool = False  # the target's depth LoRA is not copied: it starts adding zero

    @property
    def identity_like_injection(self) -> bool:
        """The target's injection is new and set to pass h₀ = e through at step 1."""
        return self.source.injection == "identity" and self.target.injection in IDENTITY_LIKE

    def source_steps(self, steps: int = 1) -> int | None:
        """Source loop steps whose logits the target reproduces at ``steps``, or None."""
        source_ops = _operations(self.source, {f"{s}.{i}": f"{s}.{i}" for s, i in _flat_layers(self.source)},
                                 self.repeat * steps, self.source.loop_steps, identity_like=False,
                                 lora_adds_zero=False)
        target_ops = _operations(self.target, self.layers, steps, self.source.loop_steps,
                                 identity_like=self.identity_like_injection, lora_adds_zero=self.new_depth_lora)
        return self.repeat * steps if source_ops == target_ops else None


def _operations(config: ModelConfig, names: dict[str, str], steps: int, source_loop_steps: int,
                identity_like: bool, lora_adds_zero: bool) -> list[tuple]:
    """The operations from ids to the logits of loop step ``steps``, layers named by ``names``."""
    prelude, core, coda = ([names[f"{stack}.{i}"] for i in range(size)]
                           for stack, size in zip(STACKS, _stack_sizes(config)))
    ops: list[tuple] = [("layer", name) for name in prelude]
    if config.initial_state == "noise":
        ops.append(("noise", config.max_seq_len, config.initial_noise_std))
    for step in range(steps):
        if config.loop_index_embedding:
            ops.append(("loop_index", step))
        passes_through = config.injection == "identity" or (
            identity_like and (config.injection == "concat" or (step == 0 and config.initial_state == "prelude")))
        if not passes_through:
            ops.append(("inject", config.injection))
        ops += [("layer", name) for name in core]
        if config.depth_lora_rank and not lora_adds_zero:
            # the LoRA row used at this step, as an index into the source's scale rows
            ops.append(("lora", min(step, config.loop_steps - 1, source_loop_steps - 1)))
        if config.act_mixing:  # the readout mixes the states of every step so far
            ops.append(("act_mix",))
        if config.step_norm:
            ops.append(("norm",))
    ops += [("layer", name) for name in coda]
    if coda or not config.step_norm:
        ops.append(("norm",))
    return ops


def plan_upcycle(source: ModelConfig, target: ModelConfig, order: str = "cycle") -> UpcyclePlan:
    """Map target layers to source layers (module docstring), or raise a one-line LoopLMError."""
    if order not in ("cycle", "interleave"):
        raise LoopLMError(f"upcycle order must be cycle or interleave, got {order!r}")
    for name in LAYER_FIELDS:
        if getattr(source, name) != getattr(target, name):
            raise LoopLMError(f"upcycling keeps each layer's shape: the source has model.{name}="
                              f"{getattr(source, name)!r}, the target {getattr(target, name)!r}; set --model.{name}"
                              f" {getattr(source, name)}")
    if not source.tie_embeddings and target.tie_embeddings:
        raise LoopLMError("the source has its own LM head but the target ties it to the embedding: set"
                          " --model.tie_embeddings false")
    (p, c, k), (tp, tc, tk) = _stack_sizes(source), _stack_sizes(target)
    if tp + tc + tk == p + c + k:
        pairs = list(zip(_flat_layers(target), _flat_layers(source)))
        repeat = 1
    elif (tp, tk) == (p, k) and tc % c == 0:
        repeat = tc // c
        core = [("core", j % c) if order == "cycle" else ("core", j // repeat) for j in range(tc)]
        sources = [("prelude", i) for i in range(p)] + core + [("coda", i) for i in range(k)]
        pairs = list(zip(_flat_layers(target), sources))
    else:
        raise LoopLMError(f"cannot map {p}+{c}+{k} prelude+core+coda source layers onto {tp}+{tc}+{tk}: keep the"
                          " total layer count (re-split), or the prelude and coda with a core that is a multiple"
                          f" of {c} layers (repetition)")
    layers = {}
    for (target_stack, j), (source_stack, i) in pairs:
        if target.layer_kind(j) != source.layer_kind(i):
            raise LoopLMError(f"target layer {target_stack}.{j} is of kind {target.layer_kind(j)} but its source"
                              f" {source_stack}.{i} is {source.layer_kind(i)}: change model.layer_pattern")
        layers[f"{target_stack}.{j}"] = f"{source_stack}.{i}"
    new_lora = bool(target.depth_lora_rank) and target.depth_lora_rank != source.depth_lora_rank
    return UpcyclePlan(source, target, layers, repeat, new_lora)


def upcycle_state_dict(source_model, target_config: ModelConfig, order: str = "cycle",
                       initial: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A state dict for ``LoopLM(target_config)`` built from ``source_model``'s weights.

    ``initial``: the target's freshly initialised state dict (parts the source lacks keep these
    values); default: a new ``LoopLM(target_config)``."""
    from looplm.model.lm import LoopLM

    plan = plan_upcycle(source_model.config, target_config, order)
    if initial is None:
        initial = LoopLM(target_config).state_dict()
    weights = {name: tensor.detach() for name, tensor in source_model.state_dict().items()}
    state = {name: tensor.detach().clone() for name, tensor in initial.items()}
    for name in state:
        head, _, rest = name.partition(".")
        if head in STACKS:
            index, _, tensor = rest.partition(".")
            source_name = f"{plan.layers[f'{head}.{index}']}.{tensor}"
        elif name == "head.weight" and "head.weight" not in weights:
            source_name = "embed.weight"
        elif head == "depth_lora" and plan.new_depth_lora:
            continue
        else:
            source_name = name
        if source_name in weights and not (head == "injection" and plan.identity_like_injection):
            state[name] = _fit(weights[source_name], state[name], name)
    if plan.identity_like_injection:
        for name, tensor in _input_passing_injection(state, target_config).items():
            state[name] = tensor.to(state[name])
    return state


def _fit(source: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """The source tensor for target ``name``; a depth-LoRA scale gets rows for the target's T."""
    if name == "depth_lora.scale" and source.shape != target.shape:
        rows = torch.arange(target.shape[0], device=source.device).clamp_max(source.shape[0] - 1)
        return source[rows].to(target)
    if source.shape != target.shape:
        raise LoopLMError(f"cannot upcycle {name}: the source has shape {tuple(source.shape)}, the target"
                          f" {tuple(target.shape)}")
    return source.to(target, copy=True)


def _input_passing_injection(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Injection weights giving u = h (concat) or u = A·h + (1 − A)·e (lti, diagonal)."""
    from looplm.model.loop import make_injection

    injection = make_injection(config)
    injection.load_state_dict({name[len("injection."):]: tensor for name, tensor in state.items()
                               if name.startswith("injection.")})
    with torch.no_grad():
        if config.injection == "concat":
            dim = config.d_model
            return {"injection.adapter.weight": torch.cat([torch.eye(dim), torch.zeros(dim, dim)], dim=1)}
        if config.injection == "lti":
            return {"injection.b": 1 - injection.decay().float()}
        rate = torch.nn.functional.softplus(injection.dt.float())  # diagonal: Δ ⊙ B e with B = diag((1 − Ā) / Δ)
        return {"injection.b.weight": torch.diag((1 - injection.decay().float()) / rate)}


def upcycle(source_model, target_config: ModelConfig, order: str = "cycle"):
    """A new ``LoopLM(target_config)`` holding ``source_model``'s weights (``upcycle_state_dict``)."""
    from looplm.model.lm import LoopLM

    model = LoopLM(target_config).to(next(source_model.parameters()).device)
    model.load_state_dict(upcycle_state_dict(source_model, target_config, order, model.state_dict()))
    return model
