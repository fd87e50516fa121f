"""What every synthetic task shares: examples, knobs, scoring, the registry and the held-out split.

A task is a frozen-in-spirit dataclass whose fields are its *knobs* (``hops``, ``modulus`` ...),
validated in ``__post_init__``.  It draws ``Example`` objects from a ``random.Random`` it is
handed, so every stream of examples is fixed by a seed and nothing is downloaded.

Held-out split
--------------
Train and test examples come from the same generator; an example belongs to the *test* split
iff ``zlib.crc32(prompt) % 10 == 0`` and to the *train* split otherwise.  ``sample_split``
rejects draws from the other split, so no test prompt can ever occur in any training stream,
whatever seeds the two sides use.  The rule depends only on the prompt text, so it is stable
across runs, machines and Python versions (unlike ``hash``), and about a tenth of the prompt
space is held out.
"""

from __future__ import annotations

import abc
import dataclasses
import random
import typing
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from looplm.errors import LoopLMError, is_int

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

# One prompt in HELD_OUT_BUCKETS goes to the test split.
HELD_OUT_BUCKETS = 10
# Rejection sampling needs ~1.1 draws per train example and ~10 per test example; running out
# of this many means the knobs leave (almost) no prompts on one side of the split.
MAX_SPLIT_ATTEMPTS = 10_000
# Spellings accepted for a boolean knob given as a string (CLI, YAML).
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; ``meta`` carries difficulty labels such as ``{"hops": 3}``."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, hash=False)


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to: "test" iff its CRC-32 is divisible by 10, else "train"."""
    return "test" if zlib.crc32(prompt.encode("utf-8")) % HELD_OUT_BUCKETS == 0 else "train"


def check_split(split: str) -> Split:
    """Return ``split`` if it names a split, otherwise raise a one-line LoopLMError."""
    if split not in SPLITS:
        raise LoopLMError(f"split must be 'train' or 'test', got {split!r}")
    return typing.cast(Split, split)


class Task(abc.ABC):
    """A generator of prompt/answer examples.  Subclasses are dataclasses whose fields are knobs.

    Subclasses set ``name``, implement ``sample``, ``max_prompt_chars`` and
    ``max_answer_chars``, validate their knobs in ``__post_init__`` with ``require``, and are
    added to ``TASKS`` with the ``register`` decorator.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """Draw one example from the whole distribution, ignoring the train/test split."""

    @property
    @abc.abstractmethod
    def max_prompt_chars(self) -> int:
        """An upper bound on ``len(example.prompt)`` under the current knobs."""

    @property
    @abc.abstractmethod
    def max_answer_chars(self) -> int:
        """An upper bound on ``len(example.answer)`` under the current knobs."""

    def score(self, prediction: str, answer: str) -> bool:
        """Exact match after stripping surrounding whitespace from both sides."""
        return prediction.strip() == answer.strip()

    def sample_split(self, rng: random.Random, split: Split) -> Example:
        """Draw one example of ``split`` by rejecting draws whose prompt belongs to the other."""
        check_split(split)
        for _ in range(MAX_SPLIT_ATTEMPTS):
            example = self.sample(rng)
            if split_of(example.prompt) == split:
                return example
        raise LoopLMError(
            f"{self.name} task: no {split}-split example in {MAX_SPLIT_ATTEMPTS} draws; "
            f"the knobs {self.knob_values()} allow too few distinct prompts, widen them")

    def examples(self, n: int, seed: int, split: Split | None = None) -> list[Example]:
        """``n`` examples drawn from ``random.Random(seed)``; ``split=None`` ignores the split."""
        if not is_int(n) or n < 0:
            raise LoopLMError(f"{self.name} task: number of examples must be an integer >= 0, got {n!r}")
        rng = random.Random(seed)
        if split is None:
            return [self.sample(rng) for _ in range(n)]
        return [self.sample_split(rng, split) for _ in range(n)]

    def require(self, condition: bool, message: str) -> None:
        """Raise ``LoopLMError("<name> task: <message>")`` unless ``condition`` holds."""
        if not condition:
            raise LoopLMError(f"{self.name} task: {message}")

    def require_in(self, knob: str, low: int, high: int | None = None) -> None:
        """Raise ``"<name> task: <knob> must be in [low, high], got v"`` (or ``>= low`` without
        a ``high``) unless the knob's value lies there."""
        value = getattr(self, knob)
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        self.require(low <= value and (high is None or value <= high), f"{knob} must be {bounds}, got {value}")

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """The names of this task's knobs (its dataclass fields), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(typing.cast(Any, cls)) if f.init)

    def knob_values(self) -> dict[str, Any]:
        """The current knob settings, e.g. ``{"hops": 4, "min_hops": 1, "n_chains": 2}``."""
        return {name: getattr(self, name) for name in self.knob_names()}


TASKS: dict[str, type[Task]] = {}

TaskType = typing.TypeVar("TaskType", bound=type[Task])


def register(cls: TaskType) -> TaskType:
    """Class decorator: make a task constructible by name through ``make_task``."""
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, **knobs: Any) -> Task:
    """Build a registered task by name; knob values may be strings (from a CLI or YAML)."""
    if name not in TASKS:
        raise LoopLMError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    valid = cls.knob_names()
    for knob in knobs:
        if knob not in valid:
            raise LoopLMError(f"{name} task: unknown knob {knob!r}; valid knobs: {', '.join(valid)}")
    hints = typing.get_type_hints(cls)
    coerced = {knob: _coerce(value, hints[knob], f"{name} task: {knob}") for knob, value in knobs.items()}
    return cls(**coerced)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Turn a knob value (possibly a string) into the field's type, or raise one line."""
    if kind is int:
        # bool is an int subclass, but hops=True is surely a mistake.
        if is_int(value):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise LoopLMError(f"{where} must be an integer, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        raise LoopLMError(f"{where} must be true or false, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise LoopLMError(f"{where} must be a string, got {value!r}")
    return value
