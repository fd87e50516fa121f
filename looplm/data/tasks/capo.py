"""Capo-lite: a knowledge-capacity probe (after Allen-Zhu & Li, *Physics of LMs* Part 3.3; Ouro App. B.1).

A fixed synthetic world of ``people`` individuals, each with ``attributes`` attributes whose
values are drawn independently and uniformly from a set of ``values`` values.  A question asks
one attribute of one person; the model can only answer it by having memorised the fact::

    prompt  "dabufo city?"      answer  "07"     (values=100)

Names are three consonant-vowel syllables, distinct, drawn with the attribute values from
``random.Random("capo:<world>")``, so a world is fixed by its knobs.  Values are written as
zero-padded decimals of equal width.  ``sample`` asks a uniform (person, attribute) pair;
``facts()`` lists every fact once, in order.

Splits.  A held-out split means nothing for memorisation — an unseen fact cannot be inferred —
so both splits draw from the same facts: the test split asks the facts the model was trained
on, and its accuracy measures how much of the world was memorised.  (The CRC rule of
``looplm.data.tasks.base`` is not applied.)

Capacity.  The values of one attribute over the world hold ``people · log2(values)`` bits.  A
model whose cross-entropy on the value tokens of all people totals ``L`` bits can encode them
in about ``L`` bits (arithmetic coding with its predictions), so it stores at least
``max(0, people · log2(values) − L)`` bits of that attribute; summed over attributes this is
the knowledge stored, and divided by the parameter count, bits per parameter (Allen-Zhu & Li
measure ≈ 2 bits/parameter at saturation).  ``looplm.eval.capacity.knowledge_bits`` computes it
from a model, per loop step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from looplm.data.tasks.base import Example, Split, Task, check_split, register

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = 3
ATTRIBUTES = ("city", "year", "job", "team", "food", "pet", "song", "car")
MAX_PEOPLE = 100_000
MAX_VALUES = 1000


def name_of(index: int) -> str:
    """The index-th name in the space of ``SYLLABLES`` consonant-vowel syllables."""
    letters = []
    for _ in range(SYLLABLES):
        index, syllable = divmod(index, len(CONSONANTS) * len(VOWELS))
        consonant, vowel = divmod(syllable, len(VOWELS))
        letters += [CONSONANTS[consonant], VOWELS[vowel]]
    return "".join(letters)


@register
@dataclass
class CapoTask(Task):
    """Questions about a fixed world of ``people`` × ``attributes`` facts; see the module docstring."""

    name = "capo"

    people: int = 100
    attributes: int = 4
    values: int = 10
    world: int = 0
    _facts: list = field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self) -> None:
        self.require_in("people", 1, MAX_PEOPLE)
        self.require_in("attributes", 1, len(ATTRIBUTES))
        self.require_in("values", 2, MAX_VALUES)
        rng = random.Random(f"capo:{self.world}")
        names = [name_of(index) for index in rng.sample(range((len(CONSONANTS) * len(VOWELS)) ** SYLLABLES),
                                                        self.people)]
        width = self.value_chars
        self._facts = [Example(prompt=f"{name} {attribute}?", answer=str(rng.randrange(self.values)).zfill(width),
                               meta={"person": person, "attribute": attribute})
                       for person, name in enumerate(names) for attribute in ATTRIBUTES[:self.attributes]]

    @property
    def value_chars(self) -> int:
        return len(str(self.values - 1))

    @property
    def prior_bits(self) -> float:
        """Bits in the whole world: people · attributes · log2(values)."""
        return self.people * self.attributes * math.log2(self.values)

    @property
    def max_prompt_chars(self) -> int:
        return 2 * SYLLABLES + 1 + max(len(attribute) for attribute in ATTRIBUTES[:self.attributes]) + 1

    @property
    def max_answer_chars(self) -> int:
        return self.value_chars

    def facts(self) -> list[Example]:
        """Every fact once: person-major, attributes in order."""
        return list(self._facts)

    def sample(self, rng: random.Random) -> Example:
        return self._facts[rng.randrange(len(self._facts))]

    def sample_split(self, rng: random.Random, split: Split) -> Example:
        """Both splits ask the same facts (memorisation has no held-out part)."""
        check_split(split)
        return self.sample(rng)
