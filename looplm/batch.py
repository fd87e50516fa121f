"""Batched generation: several prompts decoded together by the depth scheduler.

Each prompt gets a row of one ``BatchSession`` (``looplm.generate``), prefilled at full depth into
its own cache slot, then decoded at its own loop step (``looplm.scheduler``): a row whose token
exits early leaves the core at once and its next token enters step 1 beside rows still deep in
theirs.  Every model family batches; each row may have its own settings.  ``BatchResult``
counts the core and coda layer applications run for decoded tokens (``layer_applications``; the
compute early exit saved is the gap to ``full_depth_applications``).  Batched output equals
per-prompt ``generate`` with the same settings (tested), up to float rounding of batched matmuls.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from looplm.errors import LoopLMError
from looplm.exit_policy import ExitPolicy, default_exit_policy
from looplm.generate import BatchSession, Generation, Sampling, Settings, check_prompt, eval_mode  # noqa: F401


@dataclass
class BatchResult:
    """Per-prompt generations and what the batch computed while decoding (prefill excluded)."""

    generations: list[Generation]
    layer_applications: int = 0          # core + coda layer applications run for decoded tokens
    full_depth_applications: int = 0     # the same tokens at full depth (no early exit)
    decoded_tokens: int = 0              # tokens emitted
    cache_bytes: int = 0
    cache_bytes_per_token: int = 0
    iterations: int = 0                  # scheduler iterations (core steps of the batch)
    mixed_depth_iterations: int = 0      # those whose rows stood at different loop steps
    per_row_steps: list[list[int]] = field(default_factory=list)
    per_row_applications: list[int] = field(default_factory=list)        # layer applications per prompt
    per_row_full_applications: list[int] = field(default_factory=list)

    @property
    def saved_fraction(self) -> float:
        """Share of the full-depth layer applications that early exit skipped."""
        return 1.0 - self.layer_applications / self.full_depth_applications if self.full_depth_applications else 0.0


# The default of ``generate_batch``'s ``sampling`` (Sampling is a frozen dataclass: one shared instance is safe).
_DEFAULT_SAMPLING = Sampling()


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
                   sampling: Sampling = _DEFAULT_SAMPLING, exit_policy: ExitPolicy | None = None, tokenizer=None,
                   stop_strings: Sequence[str] = (), stop_ids: Sequence[int] | None = None,
                   layout: str = "last_exited", modulo_slots: int = 2,
                   on_token: Callable[[int, int, int, str], None] | None = None,
                   settings: Sequence[Settings] | None = None, dtype: str = "fp32",
                   backend: str = "auto") -> BatchResult:
    """Generate for several prompts at once; each row stops on its own (stop id, stop string,
    length, context).  Same arguments as ``generate`` (``max_new_tokens`` may give one limit
    per prompt; ``settings`` one ``Settings`` per prompt, overriding sampling, exit_policy and
    stop_strings, with the batch's ``layout``); ``on_token(row, id, steps, text)`` is called for
    every emitted token (streaming); ``dtype``: the weights (fp32, bf16, auto: bf16 copies where the
    CPU multiplies bf16 natively; ``looplm.steppers.make_stepper``); ``backend``: ``auto`` runs the rows
    in C (``NativeRowsStepper``: each core step of every row in one call) where the model is the plain
    loop on a float32 CPU, else the reference stepper; ``reference`` forces the model's own modules.
    A seeded row draws from its
    own generator."""
    context = model.config.max_seq_len
    if not prompts:
        raise LoopLMError("no prompts given")
    for number, prompt in enumerate(prompts):
        check_prompt(prompt, context, f"prompt {number}")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise LoopLMError(f"{len(limits)} max_new_tokens limits for {len(prompts)} prompts: give one per prompt")
    if min(limits) < 0:
        raise LoopLMError(f"max_new_tokens must be >= 0, got {min(limits)}")
    if settings is not None and (exit_policy is not None or sampling is not _DEFAULT_SAMPLING or stop_strings):
        warnings.warn("generate_batch: settings give each prompt its exit policy, sampling and stop strings; the"
                      " exit_policy, sampling and stop_strings arguments are ignored", stacklevel=2)
    settings = list(settings or [Settings(exit_policy or default_exit_policy(model.config), layout, sampling,
                                          tuple(stop_strings))] * len(prompts))
    depth = max(chosen.exit_policy.max_steps(model.config.loop_steps) for chosen in settings)
    longest = max(len(prompt) + max(min(limit, context - len(prompt)), 1) for prompt, limit in zip(prompts, limits))
    callbacks = [None if on_token is None else partial(on_token, row) for row in range(len(prompts))]
    with eval_mode(model):
        session = BatchSession(model, len(prompts), longest, tokenizer=tokenizer, stop_ids=stop_ids, layout=layout,
                               modulo_slots=modulo_slots, max_steps=depth, dtype=dtype, backend=backend)
        requests = session.admit(prompts, limits, callbacks, settings)
        session.admitting = False  # every prompt is in: a row whose request ends leaves at once
        while session.active:
            session.step()
    for request in requests:
        if request.error is not None:
            raise request.error
    generations = [request.generation for request in requests]
    scheduler = session.scheduler
    return BatchResult(generations, sum(g.layer_applications for g in generations),
                       sum(g.full_depth_applications for g in generations), sum(len(g.steps) for g in generations),
                       scheduler.cache.nbytes, scheduler.cache.bytes_per_token, scheduler.iterations,
                       scheduler.mixed_depth_iterations, [g.steps for g in generations],
                       [g.layer_applications for g in generations], [g.full_depth_applications for g in generations])
