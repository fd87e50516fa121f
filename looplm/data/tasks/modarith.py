"""Modular arithmetic in prefix (Polish) notation, after the Mano task of the Ouro paper (App. B.2).

Format (one ASCII line; tokens separated by single spaces, ending with ``=``)::

    prompt  "+ * 3 4 - 5 6 ="      answer  "11"     meta {"ops": 3}     (modulus 23)
    prompt  "- 8 * 12 9 ="         answer  "15"     meta {"ops": 2}     (modulus 23)

An operator token (one of ``ops``, drawn from ``+ - *``) is followed by its two operands, each
an operand or a sub-expression.  Operands are decimal integers uniform in ``[0, modulus)``.
The number of operators is uniform in ``[min_ops, n_ops]``; the tree shape is drawn by giving
each operator's left subtree a uniform share of the remaining operators.  The answer is the
value reduced into ``[0, modulus)`` as a decimal string.  Prefix notation needs no brackets,
so the expression is unambiguous and its length is linear in the operator count.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from looplm.data.tasks.base import Example, Task, register

OPERATORS = "+-*"
# Generation and evaluation recurse once per operator in the worst (chain-shaped) tree, so stay
# well inside Python's default recursion limit of 1000.
MAX_OPS = 256


def evaluate(expression: str, modulus: int) -> int:
    """Value in ``[0, modulus)`` of a prefix expression such as ``"+ * 3 4 - 5 6"``.

    A trailing ``=`` is allowed, so a prompt can be passed as is.  Malformed expressions raise
    ``ValueError``.
    """
    tokens = expression.split()
    if tokens and tokens[-1] == "=":
        tokens.pop()
    stream = iter(tokens)
    value = _evaluate_next(stream, modulus)
    leftover = list(stream)
    if leftover:
        raise ValueError(f"trailing tokens {leftover} after a complete expression in {expression!r}")
    return value


def _evaluate_next(stream: Iterator[str], modulus: int) -> int:
    token = next(stream, None)
    if token is None:
        raise ValueError("expression ended where an operand was expected")
    if token not in OPERATORS:
        return int(token) % modulus
    left = _evaluate_next(stream, modulus)
    right = _evaluate_next(stream, modulus)
    if token == "+":
        return (left + right) % modulus
    if token == "-":
        return (left - right) % modulus
    return (left * right) % modulus


@register
@dataclass
class ModArithTask(Task):
    """Prefix-notation arithmetic modulo ``modulus`` with ``min_ops``..``n_ops`` operators."""

    name = "modarith"

    modulus: int = 23
    ops: str = OPERATORS
    n_ops: int = 2
    min_ops: int = 1

    def __post_init__(self) -> None:
        self.require(self.modulus >= 2, f"modulus must be >= 2, got {self.modulus}")
        distinct = len(set(self.ops)) == len(self.ops)
        self.require(len(self.ops) > 0 and distinct and set(self.ops) <= set(OPERATORS),
                     f"ops must be distinct characters from {OPERATORS!r}, got {self.ops!r}")
        self.require(1 <= self.n_ops <= MAX_OPS, f"n_ops must be in [1, {MAX_OPS}], got {self.n_ops}")
        self.require(1 <= self.min_ops <= self.n_ops,
                     f"min_ops must be in [1, n_ops={self.n_ops}], got {self.min_ops}")

    @property
    def operand_chars(self) -> int:
        return len(str(self.modulus - 1))

    @property
    def max_prompt_chars(self) -> int:
        # n operators, n + 1 operands, a space after each of those 2n + 1 tokens, then "=".
        return self.n_ops + (self.n_ops + 1) * self.operand_chars + (2 * self.n_ops + 1) + 1

    @property
    def max_answer_chars(self) -> int:
        return self.operand_chars

    def sample(self, rng: random.Random) -> Example:
        count = rng.randint(self.min_ops, self.n_ops)
        tokens: list[str] = []
        self._grow(rng, count, tokens, depth_limit=count)
        prompt = " ".join(tokens) + " ="
        return Example(prompt=prompt, answer=str(evaluate(prompt, self.modulus)), meta={"ops": count})

    def _grow(self, rng: random.Random, count: int, tokens: list[str], depth_limit: int) -> int:
        """Append the prefix tokens of a random expression with ``count`` operators and tree
        depth at most ``depth_limit`` (an operand has depth 0, an operator 1 + its deeper
        operand's); return the depth.  A subtree of depth d holds at most 2^d − 1 operators, so
        the left share is uniform over the splits that keep both subtrees within the limit
        (``depth_limit = count`` never binds: every split is allowed)."""
        if count == 0:
            tokens.append(str(rng.randrange(self.modulus)))
            return 0
        tokens.append(rng.choice(self.ops))
        capacity = 2 ** (depth_limit - 1) - 1
        left = rng.randint(max(0, count - 1 - capacity), min(count - 1, capacity))
        left_depth = self._grow(rng, left, tokens, depth_limit - 1)
        right_depth = self._grow(rng, count - 1 - left, tokens, depth_limit - 1)
        return 1 + max(left_depth, right_depth)
