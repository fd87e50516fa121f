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
counts the positions a sequence forward has filled (every row at once).  For MLA the "keys" hold
the latent c [.., B, 1, max_len, r_kv] and the "values" the rotated rope keys
[.., B, 1, max_len, d_rope] (``looplm.model.mla``).

Layers never see these tensors: ``layer_storage`` hands each layer a plain storage object —
for attention one with ``write``/``read``/``attend`` (``SequenceKV``: every row at positions
start..start+S−1; ``RowKV``: each row at its own slot and position, read in place by the C
kernel), for a recurrent mixer its state tensors, and a ChannelMix FFN its previous input.
``RowsView`` is the cache as the scheduler's rows see it (``looplm.scheduler``): each row at
its own loop step and position, rows left-aligned (row b's positions start at 0).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.errors import LoopLMError
from looplm.kernels import ops

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


class LayerStorage(NamedTuple):
    """What one layer is handed: its mixer's storage (an attention store or the recurrent state
    tensors) and, with ffn=channelmix, the FFN's previous input [B, D] (else None)."""

    mixer: object
    ffn: torch.Tensor | None


def causal_mask(queries: int, keys: int, device=None) -> torch.Tensor:
    """Boolean [queries, keys] mask, True = may attend: query i sits at key position keys−queries+i."""
    query_positions = torch.arange(queries, device=device).unsqueeze(1) + keys - queries
    return torch.arange(keys, device=device).unsqueeze(0) <= query_positions


class SharedKV(NamedTuple):
    """A cache slot whose keys and values an earlier loop step of the same token wrote
    (append-first, ``KVCache.store``): the layer attends to them and writes nothing.
    keys, values [B, H_kv, max_len, hd] (MLA: its latent and rope-key storage)."""

    keys: torch.Tensor
    values: torch.Tensor


class SequenceKV:
    """One attention slot for every row, this call's tokens at positions start..start+S−1:
    keys, values [B, H_kv, max_len, w] written in place; ``shared``: an append-first slot after
    step 1, read and never written."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, shared: bool = False):
        self.keys, self.values, self.shared = keys, values, shared

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store k, v [B, H_kv, S, w] at positions start..start+S−1."""
        if self.shared:
            return
        self.keys[:, :, start:start + k.shape[2]] = k
        self.values[:, :, start:start + k.shape[2]] = v

    def read(self, start: int, length: int):
        """Keys, values [B, H_kv, start+S, w] and the mask of the keys each query sees (None: all)."""
        end = start + length
        mask = None if length == 1 else causal_mask(length, end, self.keys.device)
        return self.keys[:, :, :end], self.values[:, :, :end], mask

    def attend(self, q: torch.Tensor, start: int) -> torch.Tensor:
        """softmax(q·kᵀ/√w)·v over the keys each query sees; q [B, H, S, w]."""
        keys, values, mask = self.read(start, q.shape[2])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != q.shape[1])


class RowKV(SequenceKV):
    """One token per row, each row at its own storage row and position: keys, values are
    the cache's storage seen as rows [slots·B, H_kv, max_len, w], ``rows`` [R] which of them;
    ``start`` [R] each token's position.  Attention reads the rows in place (the C kernel;
    ``looplm.kernels.ops.rows_attention``, its torch reference elsewhere)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                 shared: torch.Tensor | None = None):
        super().__init__(keys, values)
        self.rows, self.row_shared = rows, shared  # [R] bool: rows past step 1 of an append-first slot

    def write(self, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
        rows, k, v = self.rows, k[:, :, 0], v[:, :, 0]
        if self.row_shared is not None:
            writes = ~self.row_shared
            rows, start, k, v = rows[writes], start[writes], k[writes], v[writes]
        self.keys[rows, :, start] = k
        self.values[rows, :, start] = v

    def read(self, start: torch.Tensor, length: int = 1):
        return ops.gather_rows(self.keys, self.values, self.rows, start + 1)

    def attend(self, q: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return ops.rows_attention(q, self.keys, self.values, self.rows, start + 1)


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
        if config.attention.kind == "mla":  # the latent c and the rotated rope key, one "head" each
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
                            if config.ffn.kind == "channelmix" else [])
        # The loop's attention storage (shared by every layout rule below): indices into keys/values.
        self._loop_attention = sorted({self.index[slot] for slot, kind in enumerate(self.kinds)
                                       if kind == "A" and slot >= config.n_prelude_layers})
        self._loop = torch.tensor(self._loop_attention, dtype=torch.long, device=device)
        # first/avg keep each open position's step-1 K/V (or their sum) across the loop's steps
        self._keeps_steps = layout in ("first", "avg") and bool(self._loop_attention)
        self.storage_index = torch.tensor(self.index, dtype=torch.long, device=device)  # slot → storage
        self._saved = None  # first/avg: the open positions' step-1 K/V or their running sums
        self._fills: dict[int, dict] = {}
        self._fill_lists: dict[int, dict] = {}  # the same index pairs as Python lists
        self._row_views: dict[int, KVCache] = {}  # ``row``'s views, made once per cache row
        self.length = 0

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
    def batch_size(self) -> int:
        return self.keys.shape[1]

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

    def slot(self, stage: str, layer: int, step: int | torch.Tensor = 0) -> int | torch.Tensor:
        """The slot of a layer at a loop step (a tensor of slots for a tensor of steps)."""
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
        ``SharedKV`` (followed by the FFN's previous input with ffn=channelmix)."""
        storage = self.slot_storage(stage, layer, step)
        if not self.reads_first_step(stage, layer, step):
            return storage
        shared = SharedKV(*storage[:2])
        return shared if len(storage) == 2 else (shared,) + storage[2:]

    def layer_storage(self, stage: str, layer: int, step: int = 0) -> LayerStorage:
        """What the layer at this slot is handed for a sequence forward (``LayerStorage``)."""
        tensors = self.slot_storage(stage, layer, step)
        mixer, ffn = tensors[:len(tensors) - len(self.states["F"])], tensors[len(tensors) - len(self.states["F"]):]
        if self.kinds[self.slot(stage, layer, step)] == "A":
            mixer = SequenceKV(*mixer, shared=self.reads_first_step(stage, layer, step))
        return LayerStorage(mixer, ffn[0] if ffn else None)

    def row(self, row: int) -> KVCache:
        """Cache row ``row`` as a batch-1 cache sharing this one's storage (a prompt is prefilled
        into its slot by the ordinary forward, and prefix reuse restores into it), empty.  A row's
        view is made once and emptied again at each call (a small model's prompt felt the copy)."""
        view = self._row_views.get(row)
        if view is None:
            view = copy.copy(self)
            view.keys, view.values = self.keys[:, row:row + 1], self.values[:, row:row + 1]
            view.states = {kind: [tensor[:, row:row + 1] for tensor in tensors]
                           for kind, tensors in self.states.items()}
            view._row_views = {}
            self._row_views[row] = view
        for tensor in view.state_tensors:  # a new sequence starts from empty states
            tensor.zero_()
        view.length, view._saved = 0, None
        return view

    def check_steps(self, steps: int) -> None:
        if steps > self.max_steps:
            raise LoopLMError(f"the cache was built for {self.max_steps} loop steps, asked for {steps}:"
                              " create it with max_steps >= steps")

    def advance(self, length: int) -> None:
        if self.length + length > self.max_len:
            raise LoopLMError(f"the cache holds {self.max_len} positions; {self.length + length} needed")
        self.length += length

    # --- layout rules, applied after each loop step and when a token is finished ---------------
    # rows, positions: broadcastable index tensors of the open positions (a sequence forward: every
    # row × start..end−1; the scheduler: one position per row, [R, 1] each).
    def _span(self, start: int, end: int):
        device = self.keys.device
        return torch.arange(self.batch_size, device=device).unsqueeze(1), torch.arange(start, end, device=device)[None]

    def after_step(self, step: int, start: int, end: int) -> None:
        """Positions [start, end) of every row finished loop step ``step``."""
        if self._keeps_steps:  # (the other layouts keep nothing)
            self.after_rows_step(step, *self._span(start, end))

    def finish(self, start: int, end: int, steps_run: int) -> None:
        """Apply the layout's rule to positions [start, end) of every row, which ran ``steps_run`` steps."""
        if steps_run < self.max_steps or self._keeps_steps:
            self.finish_rows(steps_run, *self._span(start, end))

    def after_rows_step(self, step: int | torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """The open positions finished loop step ``step`` (int, or [R, 1] per row): first and avg
        keep their step-1 K/V or running sum, since the next step overwrites the shared slot."""
        if not self._keeps_steps:
            return
        index = (self._loop.view(-1, 1, 1), rows, slice(None), positions)
        columns = torch.arange(positions.shape[-1], device=self.keys.device)
        if self._saved is None or self._saved[0].shape[2] != len(columns):
            self._saved = tuple(torch.zeros(len(self._loop), self.batch_size, len(columns), *storage.shape[2:3],
                                            storage.shape[-1], dtype=storage.dtype, device=storage.device)
                                for storage in (self.keys, self.values))
        fresh = torch.as_tensor(step == 0, device=self.keys.device).view(1, -1, 1, 1, 1)
        for storage, saved in zip((self.keys, self.values), self._saved):
            current = storage[index]  # [loop slots, R, S, H, hd]
            kept = saved[:, rows, columns]
            saved[:, rows, columns] = torch.where(fresh, current, kept + current if self.layout == "avg" else kept)

    def finish_rows(self, steps_run: int | list[int], rows: torch.Tensor | list[int],
                    positions: torch.Tensor | list[int]) -> None:
        """Apply the layout's rule to the open positions, whose rows ran ``steps_run`` loop steps:
        an int (rows, positions: index tensors), or per row (lists [R] of the steps each ran, its
        cache row and its one open position)."""
        if isinstance(steps_run, int):
            if steps_run < self.max_steps:
                self._fill_skipped(steps_run, rows, positions)
        else:
            self._fill_skipped_rows(steps_run, rows, positions)
            if self._keeps_steps:
                device = self.keys.device
                steps_run = torch.tensor(steps_run, device=device)
                rows = torch.tensor(rows, device=device)[:, None]
                positions = torch.tensor(positions, device=device)[:, None]
        if self._keeps_steps:
            columns = torch.arange(positions.shape[-1], device=self.keys.device)
            index = (self._loop.view(-1, 1, 1), rows, slice(None), positions)
            scale = steps_run if isinstance(steps_run, int) else steps_run.view(1, -1, 1, 1, 1)
            for storage, saved in zip((self.keys, self.values), self._saved):
                storage[index] = saved[:, rows, columns] / scale if self.layout == "avg" else saved[:, rows, columns]

    def _fill_skipped(self, ran: int, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Rows that stopped after ``ran`` steps: the steps they skipped get their last step's
        entries (LAST_EXITED, docs/MATH.md §4).  Recurrent states of deeper steps take the last
        state (which has absorbed the token), under every layout; attention groups the token
        never wrote take its last K/V (per-step layouts: the deeper steps; modulo: the groups not
        reached; append_first: the core's one group is written by step 1)."""
        for kind, (source, target) in self._fill_pairs(ran).items():
            if kind == "A":
                for storage in (self.keys, self.values):
                    shape = (-1,) + (1,) * rows.dim()
                    storage[target.view(shape), rows, :, positions] = storage[source.view(shape), rows, :, positions]
            else:
                for state in self.states[kind]:
                    state[target.view(-1, 1), rows.reshape(-1)] = state[source.view(-1, 1), rows.reshape(-1)]

    def _fill_skipped_rows(self, steps_run: list[int], rows: list[int], positions: list[int]) -> None:
        """``_fill_skipped`` for rows at one position each that ran different numbers of steps
        (lists [R]), with one copy per storage tensor (the scheduler's rows leave a few at a time):
        the index lists are gathered in Python and made one tensor per kind."""
        gathered: dict[str, tuple[list[int], list[int], list[int], list[int]]] = {}
        for ran, row, position in zip(steps_run, rows, positions):
            if ran < self.max_steps:
                self._fill_pairs(ran)
                for kind, (source, target) in self._fill_lists[ran].items():
                    lists = gathered.setdefault(kind, ([], [], [], []))
                    lists[0].extend(source)
                    lists[1].extend(target)
                    lists[2].extend([row] * len(source))
                    lists[3].extend([position] * len(source))
        for kind, lists in gathered.items():
            if kind == "A":
                ops.copy_positions((self.keys, self.values), *lists)
                continue
            source, target, row, _ = torch.tensor(lists, device=self.keys.device)
            for state in self.states[kind]:
                state[target, row] = state[source, row]

    def _fill_pairs(self, ran: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(source, target) storage indices per kind ("A", "G", "R"; "F": slots) that a token
        which ran ``ran`` steps copies (computed once per ``ran``)."""
        if ran not in self._fills:
            first, pairs = self.config.n_prelude_layers, {}
            for offset in range(self.per_step):
                source = first + (ran - 1) * self.per_step + offset
                kind, done = self.kinds[source], set()
                written = {self.group(step, offset) for step in range(ran)}
                for step in range(ran, self.max_steps):
                    target = first + step * self.per_step + offset
                    if self.states["F"]:
                        pairs.setdefault("F", []).append((source, target))
                    if kind != "A":
                        pairs.setdefault(kind, []).append((self.index[source], self.index[target]))
                    elif self.group(step, offset) not in written | done:
                        done.add(self.group(step, offset))
                        pairs.setdefault("A", []).append((self.index[source], self.index[target]))
            self._fill_lists[ran] = {kind: tuple(list(side) for side in zip(*found)) for kind, found in pairs.items()}
            self._fills[ran] = {kind: tuple(torch.tensor(side, device=self.keys.device) for side in sides)
                                for kind, sides in self._fill_lists[ran].items()}
        return self._fills[ran]

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


class RowsView:
    """The cache as seen by ``rows`` [R] (cache rows), one token each, every row at its own loop
    step and position: ``layer_storage`` selects each row's slot (attention: the storage row
    slot·B + row, read in place; recurrent states and ChannelMix inputs: gathered copies that
    ``flush`` scatters back after the layers ran)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows
        self.written: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def layer_storage(self, stage: str, layer: int, step: int | torch.Tensor = 0) -> LayerStorage:
        cache = self.cache
        slots = cache.slot(stage, layer, step)
        if not isinstance(slots, torch.Tensor):
            slots = torch.full_like(self.rows, slots)
        kind = cache.kinds[cache.slot(stage, layer)]
        index = cache.storage_index[slots]
        ffn = self._gather(cache.states["F"][0], slots) if cache.states["F"] else None
        if kind == "A":
            batch = cache.batch_size
            rows = lambda storage: storage.view(-1, *storage.shape[2:])  # noqa: E731 - [slots·B, H, L, w]
            shared = None
            if cache.layout == "append_first" and stage == "core":  # rows past step 1 read step 1's K/V
                shared = (torch.as_tensor(step, device=self.rows.device) > 0).expand(len(self.rows))
            return LayerStorage(RowKV(rows(cache.keys), rows(cache.values), index * batch + self.rows, shared), ffn)
        return LayerStorage(tuple(self._gather(state, index) for state in cache.states[kind]), ffn)

    def _gather(self, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        part = tensor[index, self.rows]
        self.written.append((tensor, index, part))
        return part

    def flush(self) -> None:
        """Write the gathered states the layers updated back into the cache."""
        for tensor, index, part in self.written:
            tensor[index, self.rows] = part
        self.written.clear()
