"""Multi-hop variable binding: follow a chain of assignments back to a digit.

Format (one ASCII line; every variable is one lowercase letter, every value one digit)::

    prompt  "z=2,i=8,q=i,p=q,m=p;m?"              answer  "8"     meta {"hops": 4}
    prompt  "c=8,h=5,x=h,k=x,g=c,s=g,w=k;h?"      answer  "5"     meta {"hops": 1}

Statements are separated by ``,``, then ``;`` and the queried variable followed by ``?``.
The prompt holds ``n_chains`` independent chains.  A chain starts with a root ``x=<digit>``
and each further statement ``y=x`` copies the previous variable of the same chain.  The
*depth* of a variable is the number of statements followed to reach a digit: a root has
depth 1, the variable after it depth 2, and so on.

* The query depth is uniform in ``[min_hops, hops]``; the queried chain has a length uniform
  in ``[depth, hops]`` and the query names its variable at that depth (so the queried variable
  is not always the last one of its chain).
* Each of the other ``n_chains - 1`` chains (distractors) has a length uniform in ``[1, hops]``.
* Letters are distinct, drawn from a-z, so ``n_chains * hops <= 26``; root digits are uniform
  in 0-9 and chains may share digits (every variable is bound once, so the answer is unique).
* Statements of all chains are interleaved uniformly at random while keeping each chain's
  own order, so every statement refers to a variable defined earlier in the prompt.  A looped
  model can therefore resolve all statements in parallel, one hop per loop step.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from looplm.data.tasks.base import Example, Task, register

LETTERS = string.ascii_lowercase


@register
@dataclass
class BindingTask(Task):
    """Multi-hop variable binding; ``hops`` is the largest query depth (see module docstring)."""

    name = "binding"

    hops: int = 4
    min_hops: int = 1
    n_chains: int = 2

    def __post_init__(self) -> None:
        self.require(self.hops >= 1, f"hops must be >= 1, got {self.hops}")
        self.require(1 <= self.min_hops <= self.hops,
                     f"min_hops must be in [1, hops={self.hops}], got {self.min_hops}")
        self.require(self.n_chains >= 1, f"n_chains must be >= 1, got {self.n_chains}")
        statements = self.n_chains * self.hops
        self.require(statements <= len(LETTERS),
                     f"n_chains * hops must be <= {len(LETTERS)} (one letter per variable), "
                     f"got {self.n_chains} * {self.hops} = {statements}; lower n_chains or hops")

    @property
    def max_statements(self) -> int:
        """The most statements a prompt can hold: every chain at full length."""
        return self.n_chains * self.hops

    @property
    def max_prompt_chars(self) -> int:
        # Each statement is 3 characters plus a separator (',' between, ';' after the last),
        # then the two-character query "x?".
        return 4 * self.max_statements + 2

    @property
    def max_answer_chars(self) -> int:
        return 1

    def sample(self, rng: random.Random) -> Example:
        depth = rng.randint(self.min_hops, self.hops)
        lengths = [rng.randint(depth, self.hops)]
        lengths += [rng.randint(1, self.hops) for _ in range(self.n_chains - 1)]
        letters = rng.sample(LETTERS, sum(lengths))

        chains: list[list[str]] = []
        for length in lengths:
            chains.append(letters[:length])
            letters = letters[length:]

        # Shuffling a multiset of chain indices gives every order-preserving interleaving
        # the same probability.
        order = [index for index, length in enumerate(lengths) for _ in range(length)]
        rng.shuffle(order)

        values = [str(rng.randrange(10)) for _ in chains]
        position = [0] * len(chains)
        statements = []
        for index in order:
            chain, step = chains[index], position[index]
            source = values[index] if step == 0 else chain[step - 1]
            statements.append(f"{chain[step]}={source}")
            position[index] += 1

        query = chains[0][depth - 1]
        prompt = ",".join(statements) + f";{query}?"
        return Example(prompt=prompt, answer=values[0], meta={"hops": depth})
