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


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 max_steps: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.config = config
        self.max_len = max_len or config.max_seq_len
        self.max_steps = max_steps or config.loop_steps
        self.per_step = config.n_core_layers + config.n_coda_layers
        slots = config.n_prelude_layers + self.max_steps * self.per_step
        if config.attention == "mla":  # the latent c and the rotated rope key, one "head" each
            key_shape = (slots, batch_size, 1, self.max_len, config.mla_kv_rank)
            value_shape = (slots, batch_size, 1, self.max_len, config.mla_rope_dim)
        else:
            key_shape = value_shape = (slots, batch_size, config.n_kv_heads, self.max_len, config.head_dim)
        self.keys = torch.zeros(key_shape, device=device, dtype=dtype)
        self.values = torch.zeros(value_shape, device=device, dtype=dtype)
        self.length = 0

    def slot(self, stage: str, layer: int, step: int = 0) -> int:
        prelude = self.config.n_prelude_layers
        if stage == "prelude":
            return layer
        offset = 0 if stage == "core" else self.config.n_core_layers
        return prelude + step * self.per_step + offset + layer

    def store(self, stage: str, layer: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage views [B, H_kv, max_len, hd] of one slot, written in place by attention."""
        index = self.slot(stage, layer, step)
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
        still attend to it at every depth.
        """
        first = self.config.n_prelude_layers
        source = slice(first + source_step * self.per_step, first + (source_step + 1) * self.per_step)
        for step in target_steps:
            target = slice(first + step * self.per_step, first + (step + 1) * self.per_step)
            self.keys[target, :, :, start:end] = self.keys[source, :, :, start:end]
            self.values[target, :, :, start:end] = self.values[source, :, :, start:end]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // (self.keys.shape[1] * self.max_len)
