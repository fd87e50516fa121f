"""What one call's loop steps hand to the later steps of the same tokens.

Two mechanisms read a token's *earlier loop steps* besides the state h: loop-axis memory
caching (``model.loop_mc``, looplm.model.gdn) and nanochat's global gates
(``model.global_gates``, looplm.model.global_gates).  A ``LoopCarry`` holds their per-step
values for the positions of one call — the full forward creates one per forward, a decoder one
per token — keyed by (module, step), written once and never overwritten in place, so a step
recomputed under activation checkpointing reads exactly what the first run read.  Nothing in
it crosses calls: what later tokens need lives in the ``KVCache``.

``RowCarry`` is the same for decode rows that sit at different loop steps of their own tokens
(``looplm.scheduler``): it keeps each module's *latest* value per cache row, enough for the
global gates (a running mean); loop-axis memory reads every earlier step and keeps its rows in
step (a ``LoopCarry``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from looplm.errors import LoopLMError


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

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of every value (dim 0; tuples element-wise): the batched engine's
        rows that still run once others have exited.  The values are replaced, not changed."""
        self._values = {key: _rows(value, rows) for key, value in self._values.items()}

    def earlier(self, module: nn.Module) -> list[Any]:
        """``module``'s values of steps 0 .. step − 1, in step order (all must have run)."""
        return [self._values[(id(module), step)] for step in range(self.step)]


def _rows(value: Any, rows: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return tuple(_rows(part, rows) for part in value)
    return value[rows] if isinstance(value, torch.Tensor) else value


class RowCarry:
    """The latest value of each module per cache row, across the rows' own loop steps.

    ``step`` [R] (set by ``LoopLM.core_step``) are the running rows' steps; ``rows`` [R] their
    cache rows; ``values`` the persistent store (module → [cache rows, ...]), kept by the caller
    across calls.  ``latest`` gives the rows' previous-step values (rows at step 0 get a stale
    or zero entry: ``started`` masks them out)."""

    def __init__(self, values: dict, rows: torch.Tensor, capacity: int):
        self.values, self.rows, self.capacity = values, rows, capacity
        self.step: torch.Tensor | int = 0

    @property
    def started(self) -> torch.Tensor:
        return (torch.as_tensor(self.step) > 0).reshape(-1, 1, 1)

    def latest(self, module: nn.Module) -> torch.Tensor | None:
        if id(module) not in self.values or not bool(self.started.any()):
            return None
        return self.values[id(module)][self.rows]

    def put(self, module: nn.Module, value: torch.Tensor) -> None:
        if id(module) not in self.values:
            self.values[id(module)] = value.new_zeros(self.capacity, *value.shape[1:])
        self.values[id(module)][self.rows] = value

    def earlier(self, module: nn.Module) -> list[Any]:
        raise LoopLMError("loop-axis memory reads every earlier loop step: decode its rows in step (a LoopCarry)")
