"""Prefix reuse: a prompt prefix's cache is computed once and restored for later requests.

Keys and values of positions [0, p) depend only on tokens [0, p), so a stored prompt's K/V serve
any later prompt that shares its first p tokens.  Recurrent layers (Gated DeltaNet, RWKV slots)
have no per-position entries: their state is only valid at the position it was taken, so
prefill stops every ``block`` tokens to **checkpoint** those states (the dynamic state
checkpointing of lrnnSMDDS), and a later prompt resumes from the last checkpoint inside the
shared prefix.  The rest of the prompt is prefilled on top; the output equals recomputing the
whole prompt (the same math; chunked prefill equals one pass, tested).

Entries are kept least-recently-used, at most ``max_entries`` and ``max_bytes`` of tensors
together (each holds its prompt's K/V at every step; one that alone exceeds ``max_bytes`` is
not stored).
A cache is specific to one model and one cache shape (layout, loop steps): the key includes them.
Layouts whose steps share K/V (``last``, ``first``, ``avg``, ``modulo`` with fewer groups than
steps) are not reused: a stored prefix keeps only its finished entries, while prefill attends at
every step to that step's own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from looplm.cache import KVCache
from looplm.errors import LoopLMError, is_int
from looplm.model.lm import LoopOutput


@dataclass
class _Entry:
    ids: tuple[int, ...]
    keys: torch.Tensor                     # [slots, H_kv, L, hd] (batch row 0)
    values: torch.Tensor
    states: dict[int, list[torch.Tensor]]  # position → every recurrent state tensor (row 0)
    last: LoopOutput                       # the prompt's last position (per-step readouts, gates)


@dataclass
class PrefixStats:
    requests: int = 0
    hits: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0


@dataclass
class PrefixCache:
    """Stores prompt prefixes' caches; ``generate`` and the server use it."""

    max_entries: int = 32
    block: int = 64
    max_bytes: int = 1 << 30
    entries: OrderedDict = field(default_factory=OrderedDict)
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        if not all(is_int(value) and value >= 1 for value in (self.max_entries, self.block, self.max_bytes)):
            raise LoopLMError("a prefix cache needs whole numbers max_entries, block and max_bytes >= 1, got"
                              f" {self.max_entries!r}, {self.block!r}, {self.max_bytes!r}")

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(_entry_bytes(entry) for _, entry in self.entries.values())

    @staticmethod
    def _shape(model, cache: KVCache, steps: int) -> tuple:
        """What a stored prefix must share with a new prompt's: the model — its weights as they are
        now (each tensor's in-place version counter: a training step or load_state_dict makes
        every stored prefix of the old weights unusable) — the layout and the depth."""
        weights = tuple(tensor._version for tensor in model.parameters())
        return (id(model), weights, cache.layout, cache.groups, cache.max_steps, steps)

    def prefill(self, model, ids: list[int], cache: KVCache, steps: int) -> LoopOutput:
        """Prefill ``ids`` into the empty batch-1 ``cache``, restoring the longest stored prefix;
        returns the forward output whose last position is the prompt's last token."""
        if cache.length != 0 or cache.keys.shape[1] != 1:
            raise LoopLMError("prefix reuse fills an empty batch-1 cache")
        self.stats.requests += 1
        if cache.groups < cache.max_steps:  # steps share K/V: a stored prefix keeps only its finished
            self.stats.computed_tokens += len(ids)  # entries, not each step's, which prefill attends to
            return model(torch.tensor([ids], device=cache.keys.device), steps=steps, cache=cache)
        recurrent = any(tensor.numel() for tensor in cache.state_tensors)
        shape = self._shape(model, cache, steps)
        entry, start = self._lookup(shape, ids, recurrent)
        if entry is not None:
            self.stats.hits += 1
            self.stats.reused_tokens += start
            cache.keys[:, 0, :, :start] = entry.keys[:, :, :start]
            cache.values[:, 0, :, :start] = entry.values[:, :, :start]
            for mine, saved in zip(cache.state_tensors, entry.states.get(start, [])):
                _copy_overlap(mine[:, 0], saved)
            cache.length = start
            if start == len(ids):
                self.entries.move_to_end(entry.ids)
                return entry.last
        states: dict[int, list[torch.Tensor]] = {}
        output = None
        position = start
        while position < len(ids):
            # Stop at every block boundary to checkpoint recurrent states (attention needs none).
            end = min(len(ids), (position // self.block + 1) * self.block) if recurrent else len(ids)
            output = model(torch.tensor([ids[position:end]], device=cache.keys.device), steps=steps, cache=cache)
            position = end
            if recurrent:
                states[position] = [tensor[:, 0].clone() for tensor in cache.state_tensors]
        self.stats.computed_tokens += len(ids) - start
        if entry is not None and recurrent:
            states = {**{p: s for p, s in entry.states.items() if p <= start}, **states}
        last = LoopOutput([h[:, -1:].clone() for h in output.hidden_states],
                          None if output.gate_logits is None else output.gate_logits[:, :, -1:].clone(), model)
        self._store(shape, tuple(ids), cache, states, last)
        return output

    def _lookup(self, shape, ids: list[int], recurrent: bool) -> tuple[_Entry | None, int]:
        """The entry sharing the longest usable prefix with ``ids`` and that prefix's length."""
        best, best_length = None, 0
        for key, (entry_shape, entry) in self.entries.items():
            if entry_shape != shape:
                continue
            common = 0
            for mine, theirs in zip(ids, key):
                if mine != theirs:
                    break
                common += 1
            whole = common == len(ids) == len(key)
            if not whole:
                common = min(common, len(ids) - 1)  # the last prompt token must run for its logits
            if recurrent:  # resume only where states were checkpointed
                common = max((p for p in entry.states if p <= common), default=0)
            if common > best_length:
                best, best_length = entry, common
        return best, best_length

    def _store(self, shape, ids: tuple[int, ...], cache: KVCache, states, last: LoopOutput) -> None:
        length = len(ids)
        entry = _Entry(ids, cache.keys[:, 0, :, :length].clone(), cache.values[:, 0, :, :length].clone(),
                       states, last)
        if _entry_bytes(entry) > self.max_bytes:
            return
        self.entries[ids] = (shape, entry)
        self.entries.move_to_end(ids)
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)


def _entry_bytes(entry: _Entry) -> int:
    tensors = [entry.keys, entry.values, *(t for states in entry.states.values() for t in states),
               *entry.last.hidden_states]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _copy_overlap(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy a checkpointed state into a cache's state of maybe another capacity (memory caching
    sizes its segment bank by the cache length): the leading overlap; the rest stays empty."""
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(target.shape, source.shape))
    target.zero_()
    target[overlap] = source[overlap]
