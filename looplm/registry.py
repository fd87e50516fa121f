"""Name → implementation tables, one per kind of choice.

A config names its choices with strings (``model.injection = "lti"``, ``model.ffn = "moe"``,
a layer kind ``"G"`` in ``layer_pattern``) so that files stay plain JSON and old checkpoints
keep loading; the code never compares those strings in if/elif chains.  Each kind of choice
has one ``Registry`` next to the classes it chooses between, filled where each class is
defined; looking up a name that is not registered is a one-line ``LoopLMError`` that lists
the names there are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from looplm.errors import LoopLMError

T = TypeVar("T")


class Registry(dict):
    """A name → class (or factory) table for one kind of choice, e.g. ``Registry("injection")``."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that enters the decorated class under ``name`` (each name once)."""

        def enter(implementation: T) -> T:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self[name] = implementation
            return implementation

        return enter

    def __missing__(self, name: str):
        raise LoopLMError(f"unknown {self.what} {name!r}: choose one of {', '.join(map(str, self))}")
