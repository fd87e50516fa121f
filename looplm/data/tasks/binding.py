"""Multi-hop variable binding: follow a chain of references back to a value.

Two styles, chosen by the ``refs`` knob.  In both, the *depth* (``meta["hops"]``) of the
queried variable is the number of bindings followed to reach a value: a variable bound to a
value has depth 1, one bound to a depth-1 variable depth 2, and so on.

``refs="names"`` (the default): named variables
-----------------------------------------------

One ASCII line; every variable is one lowercase letter, every value one digit::

    prompt  "z=2,i=8,q=i,p=q,m=p;m?"              answer  "8"     meta {"hops": 4}
    prompt  "c=8,h=5,x=h,k=x,g=c,s=g,w=k;h?"      answer  "5"     meta {"hops": 1}

Statements are separated by ``,``, then ``;`` and the queried variable followed by ``?``.
The prompt holds ``n_chains`` independent chains.  A chain starts with a root ``x=<digit>``
and each further statement ``y=x`` copies the previous variable of the same chain.

* The query depth is uniform in ``[min_hops, hops]``; the queried chain has a length uniform
  in ``[depth, hops]`` and the query names its variable at that depth (so the queried variable
  is not always the last one of its chain).
* Each of the other ``n_chains - 1`` chains (distractors) has a length uniform in ``[1, hops]``.
* Letters are distinct, drawn from a-z, so ``n_chains * hops <= 26``; root digits are uniform
  in 0-9 and chains may share digits (every variable is bound once, so the answer is unique).
* Statements of all chains are interleaved uniformly at random while keeping each chain's
  own order, so every statement refers to a variable defined earlier in the prompt.  A looped
  model can therefore resolve all statements in parallel, one hop per loop step.

``refs="offsets"``: variables referenced by position
----------------------------------------------------

The variables are the ``cells`` characters of the prompt, in order, and a reference names
its target by how many cells back it lies (a relative, de Bruijn-style index) instead of by
a letter::

    prompt  "f1c14dh53c99?"      answer  "c"     meta {"hops": 2}
    prompt  "e11dbce73a21?"      answer  "c"     meta {"hops": 4}

A letter ``a``-``j`` is a variable bound to that value; a digit ``k`` in 1-9 is a variable
bound to the cell ``k`` places to its left.  ``?`` asks for the value of the last cell.  In
the first example the last cell ``9`` refers 9 cells back to ``c``: depth 2.  In the second
the last ``1`` refers to the ``2`` before it, which refers to the ``3`` two cells back, which
refers to the ``c`` three cells back: depth 4.  Knobs: ``cells`` (the prompt length before
``?``), ``hops`` and ``min_hops``; ``n_chains`` is not used.

* The query depth ``d`` is uniform in ``[min_hops, hops]`` (so ``hops <= cells`` and
  ``hops <= 10``).  The queried chain ends at the last cell and starts at a value letter whose
  position is uniform among the last 10 cells that leave room for the chain (at least
  ``d - 1`` cells before the end); its other ``d - 2`` cells are a uniform choice of the cells
  in between.  So the chain spans at most 10 cells, every jump is at most 9, and where the
  value sits says little about the depth (a chain built from random jumps would put the
  value of a deep query near the start of the prompt, which a model can guess without
  following the chain).
* Every other cell is, independently and in order, a value letter with probability 0.4
  (always for the first cell) or else a reference to a uniform earlier cell at most 9 back.
  These cells form distractor chains and trees; they never change the queried chain.
* Values are uniform in a-j, ten answers as in the names style.

Why offsets: a lookup by name needs two attention operations that must be learned together
(bring each statement's name next to its value, then match the query's name against it),
and a tiny model on a CPU sits on a plateau for far longer than the demo's budget before it
finds that pair (even for one hop).  A relative reference is resolved by one attention
operation whose target depends only on the digit read (jump ``k`` cells back), so every
loop step can follow one more link of every chain at once, and the demo's model learns to
do so within a few thousand steps.  Depth still has to be spent: the value of a depth-``d``
cell is not available until its chain has been followed.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from looplm.data.tasks.base import Example, Task, register

LETTERS = string.ascii_lowercase
REFS = ("names", "offsets")
# Offsets style: values are these letters, references are the digits 1..MAX_OFFSET.
OFFSET_VALUES = "abcdefghij"
MAX_OFFSET = 9
VALUE_PROBABILITY = 0.4


@register
@dataclass
class BindingTask(Task):
    """Multi-hop variable binding; ``hops`` is the largest query depth (see module docstring)."""

    name = "binding"

    hops: int = 4
    min_hops: int = 1
    n_chains: int = 2
    refs: str = "names"
    cells: int = 12

    def __post_init__(self) -> None:
        self.require(self.refs in REFS, f"refs must be one of {', '.join(REFS)}, got {self.refs!r}")
        self.require(self.hops >= 1, f"hops must be >= 1, got {self.hops}")
        self.require(1 <= self.min_hops <= self.hops,
                     f"min_hops must be in [1, hops={self.hops}], got {self.min_hops}")
        if self.refs == "offsets":
            self.require(self.hops <= MAX_OFFSET + 1,
                         f"hops must be <= {MAX_OFFSET + 1} with refs=offsets (a chain spans at most "
                         f"{MAX_OFFSET + 1} cells), got {self.hops}")
            self.require(self.cells >= self.hops,
                         f"cells must be >= hops={self.hops} (a depth-d chain needs d cells), got {self.cells}")
            return
        self.require(self.n_chains >= 1, f"n_chains must be >= 1, got {self.n_chains}")
        statements = self.n_chains * self.hops
        self.require(statements <= len(LETTERS),
                     f"n_chains * hops must be <= {len(LETTERS)} (one letter per variable), "
                     f"got {self.n_chains} * {self.hops} = {statements}; lower n_chains or hops")

    @property
    def max_statements(self) -> int:
        """The most statements (names) or cells (offsets) a prompt can hold."""
        return self.cells if self.refs == "offsets" else self.n_chains * self.hops

    @property
    def max_prompt_chars(self) -> int:
        if self.refs == "offsets":
            return self.cells + 1  # one character per cell, then "?"
        # Each statement is 3 characters plus a separator (',' between, ';' after the last),
        # then the two-character query "x?".
        return 4 * self.max_statements + 2

    @property
    def max_answer_chars(self) -> int:
        return 1

    def sample(self, rng: random.Random) -> Example:
        if self.refs == "offsets":
            return self._sample_offsets(rng)
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

    def _sample_offsets(self, rng: random.Random) -> Example:
        depth = rng.randint(self.min_hops, self.hops)
        cells: list[str | None] = [None] * self.cells
        last = self.cells - 1
        # The queried chain: its value cell, then depth - 1 references ending at the last cell.
        start = rng.randint(max(0, last - MAX_OFFSET), last - (depth - 1)) if depth > 1 else last
        chain = [start, *sorted(rng.sample(range(start + 1, last), depth - 2)), last] if depth > 1 else [last]
        answer = rng.choice(OFFSET_VALUES)
        cells[start] = answer
        for source, target in zip(chain, chain[1:]):
            cells[target] = str(target - source)
        for index, cell in enumerate(cells):
            if cell is not None:
                continue
            if index == 0 or rng.random() < VALUE_PROBABILITY:
                cells[index] = rng.choice(OFFSET_VALUES)
            else:
                cells[index] = str(rng.randint(1, min(MAX_OFFSET, index)))
        return Example(prompt="".join(cells) + "?", answer=answer, meta={"hops": depth})
