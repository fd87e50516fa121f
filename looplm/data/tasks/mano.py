"""Mano: knowledge manipulation by modular arithmetic on expression trees (Ouro App. B.2).

Ouro compares looped and deep models on Mano (from Allen-Zhu's *Physics of Language Models*
Part 4.1): an arithmetic expression over ``+ - *`` modulo the prime 23, written in prefix
(Polish) notation, whose value the model must compute without intermediate steps; the
difficulty knob is the largest number of operations L (Ouro uses L ∈ {10, 16, 24}).  The
``modarith`` task already has this format; ``mano`` is the same generator with the paper's
settings as defaults and two more rules::

    prompt  "* + 7 3 - 20 * 4 9 ="      answer  "1"      meta {"ops": 4, "depth": 3}

* The modulus must be a prime (the paper's is 23): every non-zero operand then has a
  multiplicative inverse, so ``*`` loses no information and no value class is favoured.
* ``max_depth`` (0 = no limit) bounds the expression tree's depth (an operand has depth 0, an
  operator 1 + its deeper operand's), the number of results that must be computed one after
  another; ``n_ops`` bounds the number of operations.  A tree of depth d holds at most
  2^d − 1 operators, so ``n_ops <= 2^max_depth − 1`` is required.

The number of operations is uniform in ``[min_ops, n_ops]`` (default ``[1, 10]``); each
operator's left subtree gets a uniform share of the remaining operators among the shares that
respect ``max_depth``.  Operands are uniform in ``[0, modulus)``; the answer is the value in
``[0, modulus)``.  Every operand and operator is one whitespace-separated token, as in the
paper; with the byte tokenizer a two-digit operand is two tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from looplm.data.tasks.base import Example, register
from looplm.data.tasks.modarith import ModArithTask, evaluate


def is_prime(number: int) -> bool:
    """Trial division (moduli are small)."""
    return number >= 2 and all(number % divisor for divisor in range(2, int(number ** 0.5) + 1))


@register
@dataclass
class ManoTask(ModArithTask):
    """Prefix-notation arithmetic modulo a prime with at most ``n_ops`` operations and tree depth
    at most ``max_depth`` (0 = unlimited); see the module docstring."""

    name = "mano"

    n_ops: int = 10
    max_depth: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(is_prime(self.modulus), f"modulus must be a prime (the paper uses 23), got {self.modulus}")
        self.require_in("max_depth", 0)
        if self.max_depth:
            most = 2 ** self.max_depth - 1
            self.require(self.n_ops <= most,
                         f"n_ops must be <= 2^max_depth - 1 = {most} (a tree of depth {self.max_depth} holds"
                         f" no more operators), got {self.n_ops}; raise max_depth or lower n_ops")

    def sample(self, rng: random.Random) -> Example:
        count = rng.randint(self.min_ops, self.n_ops)
        tokens: list[str] = []
        depth = self._grow(rng, count, tokens, depth_limit=min(self.max_depth or count, count))
        prompt = " ".join(tokens) + " ="
        return Example(prompt=prompt, answer=str(evaluate(prompt, self.modulus)),
                       meta={"ops": count, "depth": depth})
