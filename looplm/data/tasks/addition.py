"""Multi-digit addition (a depth-bound task in Saunshi et al. 2025): carries chain through digits.

One ASCII line, the two operands in decimal, then ``=``; the answer is the sum, most
significant digit first, or least significant first with ``reverse=true`` (the order in which
carries are produced, so each answer digit depends only on digits already seen)::

    prompt  "358+74="      answer  "432"     meta {"digits": 3, "carries": 2}
    prompt  "358+74="      answer  "234"     (reverse=true)

Each operand's number of digits is uniform in ``[min_digits, digits]`` and its value uniform
among numbers with exactly that many digits (no leading zeros; one digit means 0-9).
``meta["carries"]`` counts the digit positions that produce a carry, a difficulty label: a
long carry chain is what needs depth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from looplm.data.tasks.base import Example, Task, register

MAX_DIGITS = 40


def carries(first: int, second: int) -> int:
    """How many digit positions of first + second produce a carry (schoolbook addition)."""
    count = carry = 0
    while first or second:
        carry = (first % 10 + second % 10 + carry) // 10
        count += carry
        first, second = first // 10, second // 10
    return count


@register
@dataclass
class AdditionTask(Task):
    """Sum of two operands of ``min_digits``..``digits`` digits; see the module docstring."""

    name = "addition"

    digits: int = 3
    min_digits: int = 1
    reverse: bool = False

    def __post_init__(self) -> None:
        self.require_in("digits", 1, MAX_DIGITS)
        self.require(1 <= self.min_digits <= self.digits,
                     f"min_digits must be in [1, digits={self.digits}], got {self.min_digits}")
        self.require(isinstance(self.reverse, bool), f"reverse must be true or false, got {self.reverse!r}")

    @property
    def max_prompt_chars(self) -> int:
        return 2 * self.digits + 2

    @property
    def max_answer_chars(self) -> int:
        return self.digits + 1

    def _operand(self, rng: random.Random) -> int:
        width = rng.randint(self.min_digits, self.digits)
        return rng.randrange(10 ** (width - 1) if width > 1 else 0, 10 ** width)

    def sample(self, rng: random.Random) -> Example:
        first, second = self._operand(rng), self._operand(rng)
        total = str(first + second)
        return Example(prompt=f"{first}+{second}=", answer=total[::-1] if self.reverse else total,
                       meta={"digits": max(len(str(first)), len(str(second))), "carries": carries(first, second)})
