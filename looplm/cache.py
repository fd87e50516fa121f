"""KV cache keyed by (stage, layer, loop step) — REFERENCE §4, DESIGN practice 10.

A looped model needs separate keys and values for every loop step of every core layer:
slot = prelude layer, or P + step·(N + C) + layer for core (and coda) layers.  Storage is
preallocated once: keys, values [slots, B, H_kv, max_len, hd]; ``length`` counts the
positions filled so far (shared by every row of the batch).  For MLA the "keys" hold the
latent c [slots, B, 1, max_len, r_kv] and the "values" the rotated rope keys
[slots, B, 1, max_len, d_rope] (``looplm.model.mla``).
"""

from __future__ import annotations

import torch

from looplm.config import ModelConfig
from looplm.errors import LoopLMError


def recurrent_state_shapes(config: ModelConfig, kind: str, batch: int, max_len: int) -> list[tuple[int, ...]]:
    """Per-slot state shapes of a recurrent layer kind: GDN (conv inputs, state M, and with
    memory caching the segment-end states, segment keys and the open segment's key sum),
    RWKV (last 4 inputs, slot banks N, D)."""
    width, heads, dim = config.n_heads * config.head_dim, config.n_heads, config.head_dim
    if kind == "G":
        from looplm.model.gdn import CONV_KERNEL

        shapes = [(batch, 3 * width, CONV_KERNEL - 1), (batch, heads, dim, dim)]
        if config.mc_segment_size:
            segments = max(max_len // config.mc_segment_size, 1)
            shapes += [(batch, segments, heads, dim, dim), (batch, segments, heads, dim), (batch, heads, dim)]
        return shapes
    from looplm.model.rwkv import SHIFTS

    return [(batch, max(SHIFTS), config.d_model), (batch, config.rwkv_slots, config.d_model),
            (batch, config.rwkv_slots, config.d_model)]


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 max_steps: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.config = config
        self.max_len = max_len or config.max_seq_len
        self.max_steps = max_steps or config.loop_steps
        self.per_step = config.n_core_layers + config.n_coda_layers
        slots = config.n_prelude_layers + self.max_steps * self.per_step
        # Attention slots index keys/values; Gated DeltaNet slots index the recurrent states.
        self.kinds = [self._kind(slot) for slot in range(slots)]
        self.index = []
        for slot, kind in enumerate(self.kinds):
            self.index.append(sum(1 for earlier in self.kinds[:slot] if earlier == kind))
        attention_slots = self.kinds.count("A")
        if config.attention == "mla":  # the latent c and the rotated rope key, one "head" each
            key_shape = (attention_slots, batch_size, 1, self.max_len, config.mla_kv_rank)
            value_shape = (attention_slots, batch_size, 1, self.max_len, config.mla_rope_dim)
        else:
            key_shape = value_shape = (attention_slots, batch_size, config.n_kv_heads, self.max_len, config.head_dim)
        self.keys = torch.zeros(key_shape, device=device, dtype=dtype)
        self.values = torch.zeros(value_shape, device=device, dtype=dtype)
        # Recurrent layers keep fixed-size states per slot: [slots of that kind, B, ...] each.
        self.states = {kind: [torch.zeros(self.kinds.count(kind), *shape, device=device, dtype=dtype)
                              for shape in recurrent_state_shapes(config, kind, batch_size, self.max_len)]
                       for kind in ("G", "R")}
        self.length = 0

    @property
    def conv_states(self) -> torch.Tensor:
        return self.states["G"][0]

    @property
    def recurrent_states(self) -> torch.Tensor:
        return self.states["G"][1]

    def _kind(self, slot: int) -> str:
        prelude = self.config.n_prelude_layers
        if slot < prelude:
            return self.config.layer_kind(slot)
        layer = (slot - prelude) % self.per_step
        return self.config.layer_kind(layer if layer < self.config.n_core_layers else layer - self.config.n_core_layers)

    def slot(self, stage: str, layer: int, step: int = 0) -> int:
        prelude = self.config.n_prelude_layers
        if stage == "prelude":
            return layer
        offset = 0 if stage == "core" else self.config.n_core_layers
        return prelude + step * self.per_step + offset + layer

    def store(self, stage: str, layer: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage views of one slot, written in place by its layer: keys, values
        [B, H_kv, max_len, hd] for attention; conv inputs and recurrent state for GDN."""
        slot = self.slot(stage, layer, step)
        index = self.index[slot]
        if self.kinds[slot] != "A":
            return tuple(state[index] for state in self.states[self.kinds[slot]])
        return self.keys[index], self.values[index]

    def check_steps(self, steps: int) -> None:
        if steps > self.max_steps:
            raise LoopLMError(f"the cache was built for {self.max_steps} loop steps, asked for {steps}:"
                              " create it with max_steps >= steps")

    def advance(self, length: int) -> None:
        if self.length + length > self.max_len:
            raise LoopLMError(f"the cache holds {self.max_len} positions; {self.length + length} needed")
        self.length += length

    def copy_step(self, source_step: int, target_steps: range, start: int, end: int) -> None:
        """Copy the K/V of positions [start, end) at ``source_step`` into ``target_steps``.

        This is LAST_EXITED (REFERENCE §4): a token that exits at step e never computes the
        deeper steps, so its step-e keys and values stand in for them and later tokens can
        still attend to it at every depth.  A Gated DeltaNet layer has no per-position
        entries: its step-e state (which has absorbed the token) replaces the deeper steps'
        states, the recurrent analogue of the same rule.
        """
        first = self.config.n_prelude_layers
        for offset in range(self.per_step):
            source = first + source_step * self.per_step + offset
            for step in target_steps:
                target = first + step * self.per_step + offset
                if self.kinds[source] != "A":
                    for state in self.states[self.kinds[source]]:
                        state[self.index[target]] = state[self.index[source]]
                else:
                    self.keys[self.index[target], :, :, start:end] = self.keys[self.index[source], :, :, start:end]
                    self.values[self.index[target], :, :, start:end] = self.values[self.index[source], :, :, start:end]

    @property
    def nbytes(self) -> int:
        states = [tensor for tensors in self.states.values() for tensor in tensors]
        return sum(tensor.nbytes for tensor in (self.keys, self.values, *states))

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K/V per position (recurrent states do not grow with the sequence)."""
        return (self.keys.nbytes + self.values.nbytes) // (self.keys.shape[1] * self.max_len)
