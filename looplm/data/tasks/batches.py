"""Turning task examples into token batches for training and exact-match evaluation.

One example becomes the token sequence ``[bos] + encode(prompt) + encode(answer) + [eos]``;
its row has ``inputs = sequence[:-1]`` and ``targets = sequence[1:]``, with every target that
is a prompt token replaced by ``IGNORE_INDEX`` (-100), so the loss trains only the answer
tokens and the closing eos.  Rows are right-padded to ``seq_len`` with ``pad_id`` inputs and
ignored targets.  For the prompt ``"a=7;a?"`` and answer ``"7"`` with a byte tokenizer::

    inputs     <bos>  a     =     7     ;     a     ?     7      <pad> ...
    targets    -100   -100  -100  -100  -100  -100  7     <eos>  -100  ...

Tasks produce ASCII text, so a tokenizer emits at most one token per character and
``max_prompt_chars + max_answer_chars + 1`` tokens always fit a row; that is the default
``seq_len``, and a smaller one is refused so that no example is ever truncated.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Protocol

import torch

from looplm.data.tasks.base import Example, Split, Task, check_split
from looplm.errors import LoopLMError, is_int

IGNORE_INDEX = -100


class Tokenizer(Protocol):
    """What batching needs from a tokenizer (``looplm.data.tokenizer`` provides one)."""

    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


def encode_example(example: Example, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Unpadded ``(inputs, targets)`` of one example; prompt targets are ``IGNORE_INDEX``."""
    # Prompt and answer are encoded separately, exactly as a model sees them when it is given
    # the prompt and generates the answer.
    prompt = tokenizer.encode(example.prompt)
    answer = tokenizer.encode(example.answer)
    sequence = [tokenizer.bos_id, *prompt, *answer, tokenizer.eos_id]
    targets = [IGNORE_INDEX] * len(prompt) + sequence[1 + len(prompt):]
    return sequence[:-1], targets


@dataclass(frozen=True)
class EvalSet:
    """Held-out examples in two forms: prompts for generation and teacher-forced rows.

    ``prompts[i]`` is ``[bos] + encode(prompt)``; a model should continue it with
    ``encode(answers[i])`` and then eos.  ``inputs``/``targets`` are ``[B, S]`` rows as in
    ``TaskBatches.batch`` and ``answer_mask`` ``[B, S]`` marks the answer + eos targets.

    Teacher-forced scoring equals greedy generation: a causal model's greedy decoding emits
    exactly answer + eos iff the argmax at every masked position equals the target.  If all
    those argmaxes are right then, by induction, each generated prefix equals the true prefix,
    so each generated token is the argmax that was checked; and if some argmax is wrong, the
    first one is reached with a correct prefix, so generation emits that wrong token.  This
    token-level match is at least as strict as ``Task.score``, which also strips whitespace.
    """

    examples: list[Example]
    prompts: list[list[int]]
    answers: list[str]
    inputs: torch.Tensor
    targets: torch.Tensor
    answer_mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.examples)

    def to(self, device: torch.device | str) -> EvalSet:
        """A copy with the tensors on ``device``."""
        return dataclasses.replace(self, inputs=self.inputs.to(device), targets=self.targets.to(device),
                                   answer_mask=self.answer_mask.to(device))

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-example exact match ``[B]`` (bool) from teacher-forced logits ``[B, S, vocab]``."""
        predictions = logits.argmax(dim=-1)
        targets = self.targets.to(predictions.device)
        mask = self.answer_mask.to(predictions.device)
        return ((predictions == targets) | ~mask).all(dim=-1)


class TaskBatches:
    """Endless, reproducible batches of one split of a task.

    Each ``batch`` call draws one integer from the torch ``generator`` and seeds a
    ``random.Random`` from it (mixed with ``seed``), so the whole stream is fixed by the
    generator's state: saving ``generator.get_state()`` with a checkpoint resumes it exactly.
    """

    def __init__(self, task: Task, tokenizer: Tokenizer, seq_len: int | None = None,
                 split: Split = "train", seed: int = 0) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.split = check_split(split)
        self.seed = seed
        needed = task.max_prompt_chars + task.max_answer_chars + 1
        if seq_len is None:
            seq_len = needed
        if not is_int(seq_len) or seq_len < needed:
            raise LoopLMError(
                f"seq_len must be an integer >= {needed} to fit the longest {task.name} example "
                f"(prompt {task.max_prompt_chars} + answer {task.max_answer_chars} + eos), "
                f"got {seq_len!r}; raise it or leave it unset")
        self.seq_len = seq_len

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, both ``[batch_size, seq_len]`` int64; see the module docstring."""
        if not is_int(batch_size) or batch_size < 1:
            raise LoopLMError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        draw = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        # A string seed is hashed with SHA-512 by random.Random, so it is stable across runs.
        rng = random.Random(f"{self.seed}:{draw}")
        examples = [self.task.sample_split(rng, self.split) for _ in range(batch_size)]
        inputs, targets = self._rows(examples)
        return inputs, targets

    def eval_set(self, n: int, seed: int) -> EvalSet:
        """``n`` test-split examples drawn from ``random.Random(seed)``, ready for scoring."""
        if not is_int(n) or n < 1:
            raise LoopLMError(f"eval set size must be an integer >= 1, got {n!r}")
        return self.eval_set_of(self.task.examples(n, seed, split="test"))

    def eval_set_of(self, examples: list[Example]) -> EvalSet:
        """An ``EvalSet`` of the given examples (e.g. every fact of ``capo``)."""
        inputs, targets = self._rows(examples)
        prompts = [[self.tokenizer.bos_id, *self.tokenizer.encode(example.prompt)] for example in examples]
        return EvalSet(examples=examples, prompts=prompts, answers=[example.answer for example in examples],
                       inputs=inputs, targets=targets, answer_mask=targets != IGNORE_INDEX)

    def _rows(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = torch.full((len(examples), self.seq_len), self.tokenizer.pad_id, dtype=torch.long)
        targets = torch.full((len(examples), self.seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            row_inputs, row_targets = encode_example(example, self.tokenizer)
            if len(row_inputs) > self.seq_len:
                raise LoopLMError(
                    f"a {self.task.name} example needs {len(row_inputs)} tokens "
                    f"but seq_len is {self.seq_len}; "
                    f"this tokenizer emits more than one token per character, so raise seq_len")
            inputs[row, :len(row_inputs)] = torch.tensor(row_inputs, dtype=torch.long)
            targets[row, :len(row_targets)] = torch.tensor(row_targets, dtype=torch.long)
        return inputs, targets
