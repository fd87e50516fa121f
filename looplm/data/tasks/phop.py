"""p-hop induction (Sanford et al. 2024; a depth-bound task in Saunshi et al. 2025).

A sequence of symbols; start at its last position and hop ``p`` times, where one hop from
position i goes to the position right after the previous occurrence of the symbol at i::

    hop(i) = j + 1,   j = max{k < i : s_k = s_i}

The answer is the symbol at the final position.  One ASCII line: p, ``:``, the sequence over
the first ``alphabet`` lowercase letters, then ``?``::

    prompt  "2:abcbdacbd?"      answer  "b"      meta {"hops": 2}

The last symbol ``d`` (position 8) occurred before at position 4, so the first hop lands on
position 5 (``a``); that ``a`` occurred before at position 0, so the second hop lands on
position 1, whose symbol ``b`` is the answer.

Knobs: ``hops`` (the largest p), ``min_hops`` (p is uniform in ``[min_hops, hops]`` and is
written in the prompt), ``length`` (symbols in the sequence) and ``alphabet`` (how many
distinct symbols, 3–26).  No symbol repeats the one before it (each symbol is uniform among
the other ``alphabet − 1``): a repeat ``…xx`` would make a hop land where it started, so a
draw would need no work at all, and under rejection such draws would crowd out the rest.
Every hop therefore moves back at least one position (so ``hops < length``).  Sequences are
conditioned on every hop being defined: a draw where some hop finds no earlier occurrence of
its symbol is rejected.  An induction
head resolves one hop per attention layer application, so p hops need depth that grows with
p — depth a looped model can supply by looping.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from looplm.data.tasks.base import Example, Task, register
from looplm.errors import LoopLMError

# Draws per example before giving up: with the default knobs about 1 in 10 draws is rejected.
MAX_DRAWS = 1000


def hop_positions(sequence: str, hops: int) -> list[int] | None:
    """Positions visited from the last one by ``hops`` hops (start included), or None when a
    hop finds no earlier occurrence of its symbol."""
    position = len(sequence) - 1
    visited = [position]
    for _ in range(hops):
        previous = next((k for k in range(position - 1, -1, -1) if sequence[k] == sequence[position]), None)
        if previous is None:
            return None
        position = previous + 1
        visited.append(position)
    return visited


@register
@dataclass
class PHopTask(Task):
    """p-hop induction over ``length`` symbols from ``alphabet`` letters; see the module docstring."""

    name = "phop"

    hops: int = 3
    min_hops: int = 1
    length: int = 24
    alphabet: int = 4

    def __post_init__(self) -> None:
        self.require_in("hops", 1, 99)
        self.require(1 <= self.min_hops <= self.hops, f"min_hops must be in [1, hops={self.hops}], got {self.min_hops}")
        self.require_in("alphabet", 3, 26)
        self.require(self.length > self.hops,
                     f"length must be > hops={self.hops} (every hop moves back at least one symbol), got {self.length}")

    @property
    def max_prompt_chars(self) -> int:
        return len(str(self.hops)) + 1 + self.length + 1

    @property
    def max_answer_chars(self) -> int:
        return 1

    def sample(self, rng: random.Random) -> Example:
        hops = rng.randint(self.min_hops, self.hops)
        symbols = string.ascii_lowercase[:self.alphabet]
        for _ in range(MAX_DRAWS):
            drawn = [rng.choice(symbols)]
            while len(drawn) < self.length:
                drawn.append(rng.choice(symbols.replace(drawn[-1], "")))
            sequence = "".join(drawn)
            visited = hop_positions(sequence, hops)
            if visited is not None:
                return Example(prompt=f"{hops}:{sequence}?", answer=sequence[visited[-1]], meta={"hops": hops})
        raise LoopLMError(f"phop task: no sequence with {hops} defined hops in {MAX_DRAWS} draws of length"
                          f" {self.length} over {self.alphabet} symbols; raise length or lower alphabet or hops")
