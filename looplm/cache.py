"""KV cache keyed by (stage, layer, loop step) — docs/MATH.md §4.

A looped model needs keys and values for every loop step of every core layer: slot = prelude
layer, or P + step·(N + C) + layer for core (and coda) layers.  Which *storage* a slot uses is
the cache's **layout** (``KV_LAYOUTS``) — the memory/quality choice of Ouro Table 14 and Huginn:

- ``full``         one K/V per (step, layer); every token runs every step, so an exit only picks
                   the readout (the Ouro reference: exact, saves no compute).
- ``last_exited``  one K/V per (step, layer); a token that exits at step e skips steps e+1..T and
                   its step-e K/V is copied into the deeper steps (vllm-rlt).  The default.
- ``last``         one K/V per layer, shared by all steps: each position keeps the K/V of the last
                   step it ran (T× less memory).
- ``first``        one K/V per layer: each position keeps its step-1 K/V.
- ``avg``          one K/V per layer: each position keeps the mean of its K/V over the steps it ran.
- ``modulo``       K = ``modulo_slots`` K/Vs per layer (Huginn's fixed budget): step t uses group
                   t mod K; an exited token's K/V fills the groups it never reached.
- ``append_first`` one K/V per core layer, appended by loop step 1 only (nanochat's loop): at every
                   later step the core attention reads the step-1 K/V — of earlier tokens, of the
                   prompt during prefill, and of the token itself — and computes no K/V of its own
                   (the slot is a ``SharedKV``).  Coda layers keep one K/V per step (last_exited).
                   It differs from ``first``: under ``first`` every step of the current call still
                   writes and attends to its own K/V (prefill runs per-step K/V) and only the
                   finished positions keep step 1's; under ``append_first`` no step after the first
                   ever sees a K/V of its own step.  A model trained with ``model.kv_append_first``
                   computes exactly this in its full forward, and its caches always use this layout.

Within one call a position always attends to itself with the current step's K/V (the slot is
written before it is read); the layout decides what *later* tokens see.  Prefill runs the prompt
at full depth, so inside the prompt every step attends over that step's own K/V (Ouro: prefill
needs per-step caches), and the layout's rule is applied when the positions are finished.
Recurrent layers (Gated DeltaNet, RWKV slots) keep a fixed-size state per (step, layer) under
every layout: their state does not grow with the sequence; so does a ChannelMix FFN (its
previous position's input).

Storage is preallocated once: keys, values [storage slots, B, H_kv, max_len, hd]; ``length``
counts the positions filled so far (shared by every row of the batch).  For MLA the "keys" hold
the latent c [.., B, 1, max_len, r_kv] and the "values" the rotated rope keys
[.., B, 1, max_len, d_rope] (``looplm.model.mla``).  The batched engine places prompts of
different lengths right-aligned (``offsets`` = left padding per row; ``looplm.batch`` masks the
pad keys).
"""

from __future__ import annotations

import torch

from looplm.config import ModelConfig
from looplm.errors import LoopLMError
from looplm.kernels import ops
from looplm.model.row_attention import SharedKV

KV_LAYOUTS = ("last_exited", "full", "last", "first", "avg", "modulo", "append_first")
# Layouts whose tokens may skip the steps after their exit.
SKIPPING_LAYOUTS = ("last_exited", "last", "first", "avg", "modulo", "append_first")


def recurrent_state_shapes(config: ModelConfig, kind: str, batch: int, max_len: int) -> list[tuple[int, ...]]:
    """Per-slot state shapes of a recurrent layer kind: GDN (conv inputs, state M, with memory
    caching the segment-end states, segment keys and the open segment's key sum, and with
    loop-axis memory caching the running key sum), RWKV (last 4 inputs, slot banks N, D)."""
    width, heads, dim = config.n_heads * config.head_dim, config.n_heads, config.head_dim
    if kind == "G":
        from looplm.model.gdn import CONV_KERNEL

        shapes = [(batch, 3 * width, CONV_KERNEL - 1), (batch, heads, dim, dim)]
        if config.mc_segment_size:
            segments = max(max_len // config.mc_segment_size, 1)
            shapes += [(batch, segments, heads, dim, dim), (batch, segments, heads, dim), (batch, heads, dim)]
        if config.loop_mc:
            shapes.append((batch, heads, dim))  # the running key sum later loops route on
        return shapes
    from looplm.model.rwkv import SHIFTS

    return [(batch, max(SHIFTS), config.d_model), (batch, config.rwkv_slots, config.d_model),
            (batch, config.rwkv_slots, config.d_model)]


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 max_steps: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, layout: str = "last_exited", modulo_slots: int = 2):
        if layout not in KV_LAYOUTS:
            raise LoopLMError(f"the KV layout must be one of {', '.join(KV_LAYOUTS)}, got {layout!r}")
        if layout == "modulo" and modulo_slots < 1:
            raise LoopLMError(f"the modulo layout needs modulo_slots >= 1, got {modulo_slots}")
        self.config = config
        # A model whose loop attends to step-1 K/V has no other K/V to keep: its layout is fixed.
        self.layout = layout = "append_first" if config.kv_append_first else layout
        self.max_len = max_len or config.max_seq_len
        self.max_steps = max_steps or config.loop_steps
        self.per_step = config.n_core_layers + config.n_coda_layers
        # How many K/V groups the loop's attention layers keep, and which group step t uses.
        self.groups = {"full": self.max_steps, "last_exited": self.max_steps, "append_first": self.max_steps,
                       "modulo": min(modulo_slots, self.max_steps)}.get(layout, 1)
        slots = config.n_prelude_layers + self.max_steps * self.per_step
        self.kinds = [self._kind(slot) for slot in range(slots)]
        # slot → index into the storage of its kind; attention slots of steps in one group share.
        self.index, storage = [], {}
        counts = {"A": 0, "G": 0, "R": 0}
        for slot, kind in enumerate(self.kinds):
            key = (kind, slot)
            if kind == "A" and slot >= config.n_prelude_layers:
                step, offset = divmod(slot - config.n_prelude_layers, self.per_step)
                key = (kind, "loop", self.group(step, offset), offset)
            if key not in storage:
                storage[key] = counts[kind]
                counts[kind] += 1
            self.index.append(storage[key])
        if config.attention == "mla":  # the latent c and the rotated rope key, one "head" each
            key_shape = (counts["A"], batch_size, 1, self.max_len, config.mla_kv_rank)
            value_shape = (counts["A"], batch_size, 1, self.max_len, config.mla_rope_dim)
        else:
            key_shape = value_shape = (counts["A"], batch_size, config.n_kv_heads, self.max_len, config.head_dim)
        self.keys = torch.zeros(key_shape, device=device, dtype=dtype)
        self.values = torch.zeros(value_shape, device=device, dtype=dtype)
        # Recurrent layers keep fixed-size states per slot: [slots of that kind, B, ...] each.
        self.states = {kind: [torch.zeros(self.kinds.count(kind), *shape, device=device, dtype=dtype)
                              for shape in recurrent_state_shapes(config, kind, batch_size, self.max_len)]
                       for kind in ("G", "R")}
        # ChannelMix FFNs (every layer, ffn=channelmix) keep the previous position's FFN input.
        self.states["F"] = ([torch.zeros(slots, batch_size, config.d_model, device=device, dtype=dtype)]
                            if config.ffn == "channelmix" else [])
        # The loop's attention storage (shared by every layout rule below): indices into keys/values.
        self._loop_attention = sorted({self.index[slot] for slot, kind in enumerate(self.kinds)
                                       if kind == "A" and slot >= config.n_prelude_layers})
        self._saved = None  # first: step-1 K/V of the open positions; avg: their running sums
        self.length = 0
        # Right-aligned rows (batched engine): left padding per row; positions < offset are masked.
        self.offsets = torch.zeros(batch_size, dtype=torch.long, device=device)

    def group(self, step: int, offset: int = 0) -> int:
        """The K/V group loop step ``step`` (0-based) reads and writes under this layout, for the
        layer at ``offset`` in the loop's per-step slots (core layers first, then coda)."""
        if self.layout == "append_first" and offset < self.config.n_core_layers:
            return 0
        if self.groups == self.max_steps:
            return step
        return step % self.groups

    @property
    def skips(self) -> bool:
        """Whether tokens under this layout skip the steps after their exit (all but ``full``)."""
        return self.layout in SKIPPING_LAYOUTS

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

    def slot_storage(self, stage: str, layer: int, step: int = 0) -> tuple[torch.Tensor, ...]:
        """Storage views of one slot, written in place by its layer: keys, values
        [B, H_kv, max_len, hd] for attention; the recurrent states for G and R layers; then,
        with ffn=channelmix, the FFN's previous input [B, D]."""
        slot = self.slot(stage, layer, step)
        index = self.index[slot]
        if self.kinds[slot] != "A":
            mixer = tuple(state[index] for state in self.states[self.kinds[slot]])
        else:
            mixer = self.keys[index], self.values[index]
        return mixer + tuple(state[slot] for state in self.states["F"])

    def reads_first_step(self, stage: str, layer: int, step: int = 0) -> bool:
        """Whether the slot's attention reads step 1's K/V and writes none (append_first)."""
        return (self.layout == "append_first" and stage == "core" and step > 0
                and self.kinds[self.slot(stage, layer, step)] == "A")

    def store(self, stage: str, layer: int, step: int = 0):
        """``slot_storage`` as its layer takes it: an append-first attention slot after step 1 is a
        ``SharedKV`` (followed by the FFN's previous input with ffn=channelmix; ``Layer`` splits
        it off)."""
        storage = self.slot_storage(stage, layer, step)
        if not self.reads_first_step(stage, layer, step):
            return storage
        shared = SharedKV(*storage[:2])
        return shared if len(storage) == 2 else (shared,) + storage[2:]

    def check_steps(self, steps: int) -> None:
        if steps > self.max_steps:
            raise LoopLMError(f"the cache was built for {self.max_steps} loop steps, asked for {steps}:"
                              " create it with max_steps >= steps")

    def advance(self, length: int) -> None:
        if self.length + length > self.max_len:
            raise LoopLMError(f"the cache holds {self.max_len} positions; {self.length + length} needed")
        self.length += length

    # --- layout rules, called by every forward and decoder after each step and per token -----
    def after_step(self, step: int, start: int, end: int, rows: torch.Tensor | None = None) -> None:
        """Positions [start, end) of ``rows`` (None = all) finished loop step ``step``."""
        if self.layout not in ("first", "avg") or not self._loop_attention:
            return
        loop = self._loop_attention
        current = (self.keys[loop, :, :, start:end], self.values[loop, :, :, start:end])
        if rows is not None:
            current = tuple(tensor[:, rows] for tensor in current)
        if step == 0:
            if self._saved is None or self._saved[0].shape[-2] != end - start:
                self._saved = tuple(tensor.clone() for tensor in
                                    (self.keys[loop, :, :, start:end], self.values[loop, :, :, start:end]))
            for saved, tensor in zip(self._saved, current):
                if rows is None:
                    saved.copy_(tensor)
                else:
                    saved[:, rows] = tensor
        elif self.layout == "avg":
            for saved, tensor in zip(self._saved, current):
                if rows is None:
                    saved += tensor
                else:
                    saved[:, rows] += tensor

    def finish(self, start: int, end: int, steps_run: int | torch.Tensor) -> None:
        """Apply the layout's rule to positions [start, end) whose rows ran ``steps_run`` loop steps
        (an int, or a [B] tensor per row when a batch's rows exited at different steps)."""
        rows = self.offsets.shape[0]
        if isinstance(steps_run, int):
            per_row = [steps_run] * rows
            if steps_run < self.max_steps:
                self._fill_skipped(slice(None), steps_run, start, end)
        else:
            per_row = steps_run.expand(rows).tolist()
            for ran in sorted(set(per_row) - {self.max_steps}):  # one copy per exit step, all its rows
                self._fill_skipped(torch.tensor([row for row, value in enumerate(per_row) if value == ran],
                                                device=self.keys.device), ran, start, end)
        if self.layout in ("first", "avg") and self._loop_attention:
            loop = self._loop_attention
            keys, values = self._saved
            if self.layout == "avg":
                scale = torch.as_tensor(per_row, dtype=keys.dtype, device=keys.device).view(1, -1, 1, 1, 1)
                keys, values = keys / scale, values / scale
            self.keys[loop, :, :, start:end] = keys
            self.values[loop, :, :, start:end] = values

    def _fill_skipped(self, row, ran: int, start: int, end: int) -> None:
        """Rows (an index tensor or a slice) that stopped after ``ran`` steps: the steps they skipped
        get their last step's entries (LAST_EXITED, docs/MATH.md §4).  Recurrent states of deeper steps take the last state (which
        has absorbed the token), under every layout; attention groups the token never wrote take
        its last K/V (per-step layouts: the deeper steps; modulo: the groups not reached)."""
        first = self.config.n_prelude_layers
        for offset in range(self.per_step):
            source = first + (ran - 1) * self.per_step + offset
            kind = self.kinds[source]
            written = {self.group(step, offset) for step in range(ran)}
            done = set()
            for step in range(ran, self.max_steps):
                target = first + step * self.per_step + offset
                for state in self.states["F"]:
                    state[target, row] = state[source, row]
                if kind != "A":
                    for state in self.states[kind]:
                        state[self.index[target], row] = state[self.index[source], row]
                elif self.group(step, offset) not in written and self.group(step, offset) not in done:
                    done.add(self.group(step, offset))
                    self._copy_positions(self.index[source], self.index[target], row, start, end)

    def _copy_positions(self, source: int, target: int, row, start: int, end: int) -> None:
        """K/V of positions [start, end) from storage slot ``source`` to ``target`` for ``row``
        (``looplm.kernels.ops.copy_positions``: the C kernel where it serves the storage)."""
        for storage in (self.keys, self.values):
            ops.copy_positions(storage, source, target, row, start, end)

    @property
    def state_tensors(self) -> list[torch.Tensor]:
        """Every recurrent-state tensor (Gated DeltaNet, RWKV, then ChannelMix), [slots of that kind, B, ...]."""
        return [tensor for kind in ("G", "R", "F") for tensor in self.states[kind]]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in (self.keys, self.values, *self.state_tensors))

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K/V per position and sequence (recurrent states do not grow with the sequence)."""
        return (self.keys.nbytes + self.values.nbytes) // (self.keys.shape[1] * self.max_len)
