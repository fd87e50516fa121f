"""What one call's loop steps hand to the later steps of the same tokens.

Four mechanisms read a token's *earlier loop steps* besides the state h: loop-axis memory
caching (``model.loop_mc``, looplm.model.gdn), nanochat's global gates
(``model.global_gates``, looplm.model.global_gates), append-first attention
(``model.kv_append_first``, looplm.model.attention: step 1's keys and values) and OpenMythos's
ACT mixing of the loop states (``model.act_mixing``, looplm.model.lm).  A ``LoopCarry`` holds their per-step
values for the positions of one call — the full forward creates one per forward, a decoder one
per token — keyed by (module, step), written once and never overwritten in place, so a step
recomputed under activation checkpointing reads exactly what the first run read.  Nothing in
it crosses calls: what later tokens need lives in the ``KVCache``.

``RowCarry`` is the same for decode rows that sit at different loop steps of their own tokens
(``looplm.scheduler``): it keeps every module's value per (cache row, step) across calls, and a
row's earlier steps are its own — loops another row has and this one has not yet run are marked
invalid (``valid``), so the global gates and loop-axis memory read exactly what a one-row
decode reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LoopCarry:
    """Per-(module, loop step) values of the current call; ``step`` is the step running now."""

    def __init__(self) -> None:
        self.step = 0
        self._values: dict[tuple[int, int], Any] = {}

    started = None  # every row is at ``step`` (RowCarry: which rows are past their first step)

    def put(self, module: nn.Module, value: Any) -> None:
        """Record ``module``'s value for the current step."""
        self._values[(id(module), self.step)] = value

    def latest(self, module: nn.Module) -> Any:
        """``module``'s value of the previous step, None at step 0."""
        return self._values[(id(module), self.step - 1)] if self.step else None

    def first(self, module: nn.Module) -> Any:
        """``module``'s value of step 0 (append-first attention reuses its keys and values)."""
        return self._values[(id(module), 0)]

    def current(self, module: nn.Module) -> Any:
        """``module``'s value of the step running now (put by an earlier part of the same step)."""
        return self._values[(id(module), self.step)]

    def earlier(self, module: nn.Module) -> list[Any]:
        """``module``'s values of steps 0 .. step − 1, in step order (all must have run)."""
        return [self._values[(id(module), step)] for step in range(self.step)]

    def valid(self, loops: int) -> None:
        """Every row has run all ``earlier`` loops (RowCarry: a [R, loops] mask)."""
        return None


def _map(value: Any, function) -> Any:
    return tuple(function(part) for part in value) if isinstance(value, tuple) else function(value)


def _parts(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


class RowCarry:
    """Every module's value per (cache row, loop step), kept across calls in ``values`` (owned by
    the caller; (module, step) → [capacity, ...] tensors or tuples of them).  ``rows`` [R] are the
    running rows' cache rows; ``step`` (set by ``LoopLM.core_step``) their steps, [R] or one int."""

    def __init__(self, values: dict, rows: torch.Tensor, capacity: int):
        self.values, self.rows, self.capacity = values, rows, capacity
        self.step: torch.Tensor | int = 0

    def _steps(self) -> torch.Tensor:
        return torch.as_tensor(self.step, device=self.rows.device).expand(len(self.rows))

    @property
    def started(self) -> torch.Tensor:
        """[R, 1, 1]: the rows past their token's first step."""
        return (self._steps() > 0).view(-1, 1, 1)

    def put(self, module: nn.Module, value: Any) -> None:
        steps = self._steps()
        for step in steps.unique().tolist():
            chosen = steps == step
            key = (id(module), step)
            if key not in self.values:
                self.values[key] = _map(value, lambda part: part.new_zeros(self.capacity, *part.shape[1:]))
            for store, part in zip(_parts(self.values[key]), _parts(value)):
                store[self.rows[chosen]] = part[chosen]

    def _read(self, module: nn.Module, steps: torch.Tensor) -> Any:
        """Each row's value at its own ``steps`` [R] (zeros where it has none)."""
        found = [step for step in steps.unique().tolist() if (id(module), step) in self.values]
        if not found:
            return None
        template = self.values[(id(module), found[0])]
        out = _map(template, lambda part: part.new_zeros(len(self.rows), *part.shape[1:]))
        for step in found:
            chosen = steps == step
            for target, source in zip(_parts(out), _parts(self.values[(id(module), step)])):
                target[chosen] = source[self.rows[chosen]]
        return out

    def current(self, module: nn.Module) -> Any:
        """Each row's value of the step it is running now (put earlier in the same step)."""
        return self._read(module, self._steps())

    def latest(self, module: nn.Module) -> Any:
        """Each row's value of its previous step (rows at step 0: zeros, masked by ``started``)."""
        return self._read(module, self._steps() - 1) if bool(self.started.any()) else None

    def earlier(self, module: nn.Module) -> list[Any]:
        """Each row's values of loops 0 .. max(step) − 1 (zeros past a row's own step: ``valid``)."""
        return [self._read(module, torch.full_like(self._steps(), loop)) for loop in range(int(self._steps().max()))]

    def valid(self, loops: int) -> torch.Tensor:
        """[R, loops]: which of ``earlier``'s loops each row has run."""
        return torch.arange(loops, device=self.rows.device).unsqueeze(0) < self._steps().unsqueeze(1)
