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

    def put(self, module: nn.Module, value: Any) -> None:
        """Record ``module``'s value for the current step."""
        self._values[(id(module), self.step)] = value

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of every value (dim 0; tuples element-wise): the batched engine's
        rows that still run once others have exited.  The values are replaced, not changed."""
        self._values = {key: _rows(value, rows) for key, value in self._values.items()}

    def first(self, module: nn.Module) -> Any:
        """``module``'s value of step 0 (append-first attention reuses its keys and values)."""
        return self._values[(id(module), 0)]
    def current(self, module: nn.Module) -> Any:
        """``module``'s value of the step running now (put by an earlier part of the same step)."""
        return self._values[(id(module), self.step)]

    def earlier(self, module: nn.Module) -> list[Any]:
        """``module``'s values of steps 0 .. step − 1, in step order (all must have run)."""
        return [self._values[(id(module), step)] for step in range(self.step)]


def _rows(value: Any, rows: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return tuple(_rows(part, rows) for part in value)
    return value[rows] if isinstance(value, torch.Tensor) else value
