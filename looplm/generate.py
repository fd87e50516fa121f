"""Generation: prefill + token-by-token decode with a KV cache per (loop step, layer).

Exit policies (``looplm.exit_policy``: fixed steps, Q-exit, hidden-state difference, KL, ACT)
decide, per token, how many loop steps run.  Early exit really skips work: a token that exits
at step e runs neither the core layers nor the readout of steps e+1..T, and the cache's layout
(``looplm.cache.KV_LAYOUTS``) decides what later tokens see of it — by default its step-e keys
and values stand in for the deeper steps (LAST_EXITED, docs/MATH.md §4).  Under the ``full``
layout every token runs every step and the exit only picks the readout (Ouro's reference).
The prompt is always prefilled at full depth, because every depth's cache must hold it.

Three backends run the per-token steps with the same math (``Decoder``'s ``backend``):
``native`` (C, ``looplm.kernels``: every family), ``torch`` (``looplm.fast_decode``) and
``reference`` (the model's own modules); ``auto`` picks native where it can run.  ``dtype``
chooses float32 or bf16 weights (``looplm.bf16``; ``auto``: bf16 where the kernel multiplies
bf16 natively).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from looplm.cache import KVCache
from looplm.config import DECODE_BACKENDS as BACKENDS
from looplm.errors import LoopLMError
from looplm.exit_policy import (ACTExit, ExitPolicy, ExitRule, FixedSteps, HiddenDiffExit, KLExit,  # noqa: F401
                                PerplexityExit, QExit, default_exit_policy, make_exit_policy,
                                refuse_act_over_mixing)
from looplm.model.carry import LoopCarry


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted to the
    top_k most likely tokens (0 = all) and to the smallest set with mass ≥ top_p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise LoopLMError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LoopLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LoopLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise LoopLMError(f"the sampling seed must be in [0, 2**63), got {self.seed}")


class NonFiniteOutput(LoopLMError):
    def __init__(self):
        super().__init__("the model's next-token scores are not finite (NaN or inf): it has overflowed; use fewer"
                         " --steps (closer to the trained loop steps) or check the checkpoint's weights")


@dataclass
class GeneratedToken:
    """One decoded token: its id, the loop steps it used, and the text it completed."""

    id: int
    steps: int
    text: str


@dataclass
class Generation:
    ids: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"
    prompt_tokens: int = 0
    stop_token_steps: int | None = None

    @property
    def decision_steps(self) -> list[int]:
        """Loop steps of every decoding decision, including the one that chose the stop token."""
        return self.steps + ([self.stop_token_steps] if self.stop_token_steps is not None else [])

    @property
    def mean_steps(self) -> float:
        return sum(self.steps) / len(self.steps) if self.steps else 0.0


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                greedy: int | None = None) -> int:
    """Pick the next token id from logits [V] (``greedy``: the argmax, when the kernel already
    found it).  A non-finite readout (a model that overflowed, e.g. run far deeper than it was
    trained) stops generation with one line instead of emitting garbage."""
    if sampling.temperature == 0:
        token = int(logits.argmax()) if greedy is None else greedy
        if not math.isfinite(float(logits[token])):  # NaN propagates to every logit: one check suffices
            raise NonFiniteOutput()
        return token
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutput()
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= sampling.top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Decoder:
    """Runs one sequence (batch 1) through the model with a cache and an exit policy."""

    def __init__(self, model, exit_policy: ExitPolicy, max_len: int, backend: str = "auto",
                 compile_steps: bool = False, layout: str = "last_exited", modulo_slots: int = 2,
                 dtype: str = "fp32"):
        """backend: which per-token implementation runs the steps (``BACKENDS``): "native" (C on
        a float32 CPU model, every family: the fused plain-loop kernel or the runtime,
        ``looplm.kernels``), "torch" (``FastStepper``, vector-shaped torch ops, any device; Ouro's
        plain loop), "reference" (the model's own modules; every configuration) or "auto" (the
        fastest that supports this model).
        compile_steps: torch.compile the torch backend's loop step (worth it only for long
        generations: the first call compiles for ~20 s).
        layout, modulo_slots: the KV layout (``looplm.cache.KV_LAYOUTS``).
        dtype: the projections' weights (``looplm.precision.decode_precision``): "fp32" (the
        model as given), "bf16" (bf16 copies, ``looplm.bf16``: the native backend reads them and
        a bf16 head, the reference backend runs torch's bf16 matmuls; the torch backend reads
        float32 only) or "auto" (bf16 where the native backend runs and the C kernel has the
        native bf16 dot product, else fp32); ``self.precision`` says what was chosen and why."""
        if backend not in BACKENDS:
            raise LoopLMError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        from looplm.precision import Precision, decode_precision

        self.precision = decode_precision(dtype)
        backend_asked = backend
        self.model = model
        self.policy = exit_policy
        self.max_steps = exit_policy.max_steps(model.config.loop_steps)
        if isinstance(exit_policy, (QExit, ACTExit)) and model.exit_gate is None:
            raise LoopLMError("Q-exit and ACT need a model with an exit gate: use fixed steps")
        if isinstance(exit_policy, ACTExit):
            refuse_act_over_mixing(model)
        self.act_threshold = None
        if isinstance(exit_policy, ACTExit):
            self.act_threshold = exit_policy.threshold or model.config.act_threshold
        device = next(model.parameters()).device
        self.cache = KVCache(model.config, 1, max_len, self.max_steps, device=device,
                             dtype=next(model.parameters()).dtype, layout=layout, modulo_slots=modulo_slots)
        self.rule = ExitRule(exit_policy, 1, model.config.loop_steps, device)
        # first/avg combine every step's coda K/V: run the readout (coda) at every step then.
        self.dense_readout = bool(model.coda) and self.cache.layout in ("first", "avg")
        if compile_steps and backend in ("auto", "native"):
            backend = "torch"
        if backend in ("auto", "native"):
            # bf16 weights where asked and a C path reads them (the plain-loop kernel does), else float32.
            refused = []
            for weights in ([self._weights(model)] if self.precision.name == "bf16" else []) + [model]:
                self.stepper, reason = _native_stepper(weights, self.cache)
                if self.stepper is not None:
                    break
                refused.append(reason)
            if self.stepper is not None:
                if weights is model and self.precision.name == "bf16":
                    self.precision = Precision("fp32", f"bf16 weights are not read by this model's C path ({refused[0]})")
                self.model = model = weights
                backend = "native"
            elif backend == "native":
                raise LoopLMError(f"the native backend cannot run here: {reason}; use backend 'torch'")
            else:
                backend = "torch"
        if backend != "native" and self.precision.name == "bf16":
            if dtype == "auto":
                self.precision = Precision("fp32", f"auto: the {backend} backend decodes in float32")
            elif backend_asked == "torch":
                raise LoopLMError("dtype bf16 decodes with backend 'native' or 'reference' (the torch backend reads"
                                  " float32 weights): drop --backend torch or use dtype fp32")
            else:
                backend = "reference"
        if backend == "torch":
            from looplm.fast_decode import FastStepper, fast_unsupported

            reason = fast_unsupported(model, cache=self.cache)
            if reason is None:
                self.stepper = FastStepper(model, self.cache, compile_steps)
            elif backend_asked == "torch":
                raise LoopLMError(f"the torch backend cannot run here: {reason}; use backend 'reference'")
            else:
                backend = "reference"
        if backend == "reference":
            self.model = model = self._weights(model)
            self.stepper = ReferenceStepper(model, self.cache)
        self.backend = backend
        self.threshold = exit_policy.threshold if isinstance(exit_policy, QExit) else 1.0
        # The greedy token of the last ``step``'s logits when the kernel already picked it (the
        # fused loop does, in C); None otherwise.  Finite logits: the same index as argmax.
        self.greedy: int | None = None
        # The C kernel runs a whole token's loop, Q-exit and LAST_EXITED copy in one call.
        self.fused = (backend == "native" and self.stepper.fuses_exit_loop and self.act_threshold is None
                      and self.rule.kind in ("q", "static") and self.cache.layout in self.stepper.fused_layouts)
        self.fused_q = self.threshold if self.rule.kind == "q" else 2.0  # the kernel's q: > 1 = no exit
        # True: the fused path's ``step`` returns the kernel's logits buffer itself, which the next
        # step overwrites, instead of a copy (``generate`` reads the logits before stepping again).
        self.logits_view = False

    def _weights(self, model):
        """The model with bf16 projections when bf16 was chosen (``looplm.bf16``), else as given."""
        if self.precision.name != "bf16":
            return model
        from looplm.bf16 import bf16_weights

        return bf16_weights(model)

    def prefill(self, ids: torch.Tensor, prefix_cache=None) -> tuple[torch.Tensor, int]:
        """Fill every depth's cache with the prompt ids [1, S]; return last-position logits.
        prefix_cache: restore the longest stored prefix of the prompt and compute only the rest."""
        self.greedy = None
        if prefix_cache is None and self.act_threshold is None and self._prefills_natively(ids.shape[1]):
            if getattr(self.stepper, "prefills", False):  # the whole prompt in one C call
                return self.stepper.prefill(ids[0].tolist(), self.max_steps, self.rule.min_steps, self.fused_q)
            return self._prefill_by_tokens(ids[0].tolist())
        if prefix_cache is not None:
            output = prefix_cache.prefill(self.model, ids[0].tolist(), self.cache, self.max_steps)
        else:
            output = self.model(ids, steps=self.max_steps, cache=self.cache)
        if self.act_threshold is not None:
            state, _, halting = output.act(self.act_threshold)
            return self.model.logits(state[0, -1]), int(halting[0, -1])
        steps = self.max_steps
        if self.rule.active:
            self.rule.reset()
            for step in range(self.max_steps - 1):
                readout = output.hidden_states[step][:, -1]
                gate = (lambda: output.gate_logits[step][:, -1]) if self.model.config.act_mixing else (
                    lambda: self.model.gate_logits(readout))  # act_mixing: the gate read the state, not the readout
                if bool(self.rule.decide(step, None, readout, gate, lambda: self.model.logits(readout))[0]):
                    steps = step + 1
                    break
        return self.model.logits(output.hidden_states[steps - 1][0, -1]), steps

    def _prefills_natively(self, length: int) -> bool:
        """Short prompts of small models go through C token by token at full depth (see
        ``native_stepper.NATIVE_PREFILL_BYTES``), whenever the token loop is fused in C."""
        if not self.fused or self.cache.length:
            return False
        from looplm.kernels.native_stepper import NATIVE_PREFILL_BYTES

        return length * self.max_steps * self.stepper.token_step_bytes <= NATIVE_PREFILL_BYTES

    def _prefill_by_tokens(self, tokens: list[int]) -> tuple[torch.Tensor, int]:
        """``prefill`` as decode steps at full depth: the same cache contents and decision as the
        batched forward (every prompt token runs every step).  The last token goes step by step,
        so the exit rule sees each step's readout, and runs on to full depth."""
        stepper, cache, rule = self.stepper, self.cache, self.rule
        for position, token in enumerate(tokens[:-1]):
            stepper.exit_loop(stepper.embed(token, position), position, self.max_steps, self.max_steps, 2.0, False)
            cache.advance(1)
        start = len(tokens) - 1
        e = stepper.embed(tokens[-1], start)
        h = stepper.initial_state(e, start)
        rule.reset()
        chosen, steps = None, self.max_steps
        for step in range(self.max_steps):
            h = stepper.core_step(h, step, start, e)
            readout = stepper.readout(h, step, start)
            if chosen is None and step + 1 < self.max_steps and rule.active and rule.decide_one(
                    step, readout, lambda: stepper.gate_logit(readout), lambda: stepper.logits(readout)):
                chosen, steps = readout.clone(), step + 1
        cache.advance(1)
        return stepper.logits(readout if chosen is None else chosen), steps

    def step(self, token: int) -> tuple[torch.Tensor, int]:
        """Decode one token; return its logits [V] and the loop steps it ran.

        With an early-exit policy the loop stops at the first step the policy exits; the
        deeper steps are never run (except under the ``full`` layout) and the cache layout
        decides what their slots hold for this token (``KVCache.finish``).
        """
        stepper, cache, rule = self.stepper, self.cache, self.rule
        start = cache.length
        if self.fused:  # embedding, loop, exit, LAST_EXITED copy, head and argmax: one C call
            q = self.fused_q
            if stepper.runs_whole_tokens:
                ran = stepper.token(token, start, self.max_steps, rule.min_steps, q)
            else:
                ran = stepper.exit_loop(stepper.embed(token, start), start, self.max_steps, rule.min_steps, q,
                                        fill=True, logits=True)
            cache.advance(1)
            self.greedy = stepper.best.value
            return (stepper.logits_buffer if self.logits_view else stepper.logits_buffer.clone()), ran
        self.greedy = None
        e = stepper.embed(token, start)
        h = stepper.initial_state(e, start)
        if self.act_threshold is not None:
            return self._act_step(h, e, start)
        rule.reset()
        chosen = exit_step = None
        for step in range(self.max_steps):
            h = stepper.core_step(h, step, start, e)
            last = step + 1 == self.max_steps
            if last or rule.active or self.dense_readout:
                readout = stepper.readout(h, step, start)
            cache.after_step(step, start, start + 1)
            if last:
                break
            if exit_step is None and rule.active and rule.decide_one(
                    step, readout, lambda: stepper.gate_logit(readout), lambda: stepper.logits(readout)):
                exit_step = step + 1
                if cache.skips:
                    break
                chosen = readout.clone()  # the steppers reuse their buffers
        ran = step + 1
        cache.finish(start, start + 1, ran)
        cache.advance(1)
        if exit_step is None:
            return stepper.logits(readout), ran
        return stepper.logits(readout if chosen is None else chosen), exit_step

    def _act_step(self, h: torch.Tensor, e: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """ACT for one token, weights as ``exit.act_weights`` computes them.  Steps after the
        halting step still run (core and readout), so every depth's cache holds the token."""
        stepper, total, state, halting = self.stepper, 0.0, None, None
        for step in range(self.max_steps):
            h = stepper.core_step(h, step, start, e)
            readout = stepper.readout(h, step, start)
            self.cache.after_step(step, start, start + 1)
            if halting is not None:
                continue
            probability = 0.5 * (1.0 + math.tanh(0.5 * float(stepper.gate_logit(readout))))  # σ(z), stable
            if total + probability >= self.act_threshold or step + 1 == self.max_steps:
                weight, halting = 1.0 - total, step + 1
            else:
                weight, total = probability, total + probability
            state = weight * readout if state is None else state + weight * readout
        self.cache.finish(start, start + 1, self.max_steps)
        self.cache.advance(1)
        return stepper.logits(state), halting


def _native_stepper(model, cache: KVCache):
    """(the C stepper for this model and cache, None) or (None, why neither C path can run): the
    fused plain-loop kernel where it serves, else the runtime that runs every model family."""
    from looplm.kernels.native_stepper import NativeStepper, native_unsupported

    if native_unsupported(model, cache) is None:
        return NativeStepper(model, cache), None
    from looplm.kernels.runtime_stepper import RuntimeStepper, runtime_unsupported

    reason = runtime_unsupported(model, cache)
    return (RuntimeStepper(model, cache), None) if reason is None else (None, reason)


class ReferenceStepper:
    """Per-token methods through the model's own modules (the reference for ``FastStepper``)."""

    def __init__(self, model, cache: KVCache):
        self.model = model
        self.cache = cache
        self.carry = None

    def embed(self, token: int, start: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.cache.keys.device)
        return self.model.embed_input(ids, start, self.cache)

    def initial_state(self, e: torch.Tensor, start: int) -> torch.Tensor:
        return self.model.initial_state(e, start)

    def core_step(self, h: torch.Tensor, step: int, start: int, injected: torch.Tensor) -> torch.Tensor:
        if step == 0:  # a new token: what its earlier steps leave its later ones (loop_mc, global_gates, act_mixing)
            self.carry = LoopCarry() if self.model.needs_carry else None
        return self.model.core_step(h, step, start, self.cache, injected, carry=self.carry)

    def readout(self, h: torch.Tensor, step: int, start: int) -> torch.Tensor:
        return self.model.readout(h, step, start, self.cache, carry=self.carry)

    def gate_logit(self, readout: torch.Tensor) -> torch.Tensor:
        return self.model.gate_logits(readout, self.carry).reshape(())

    def logits(self, readout: torch.Tensor) -> torch.Tensor:
        return self.model.logits(readout[0, -1])


def stream(model, prompt_ids: Sequence[int], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
           exit_policy: ExitPolicy | None = None, tokenizer=None, stop_strings: Sequence[str] = (),
           stop_ids: Sequence[int] | None = None, result: Generation | None = None, backend: str = "auto",
           compile_steps: bool = False, layout: str = "last_exited", modulo_slots: int = 2,
           prefix_cache=None, dtype: str = "fp32") -> Iterator[GeneratedToken]:
    """Yield generated tokens one at a time (see ``generate`` for the arguments).

    ``result``, when given, is filled in as tokens arrive (ids, steps, text, stop_reason).
    """
    exit_policy = exit_policy or default_exit_policy(model.config)  # fixed T steps unless the model records one
    result = result if result is not None else Generation()
    context = model.config.max_seq_len
    if len(prompt_ids) == 0:
        raise LoopLMError("the prompt is empty: give at least one token")
    if len(prompt_ids) > context:
        raise LoopLMError(f"the prompt has {len(prompt_ids)} tokens, longer than the context of {context}:"
                          " shorten it or use a model with a larger max_seq_len")
    if max_new_tokens < 0:
        raise LoopLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids if tokenizer is not None else []
    stop_ids = set(stop_ids)
    result.prompt_tokens = len(prompt_ids)
    budget = min(max_new_tokens, context - len(prompt_ids))
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            decoder = Decoder(model, exit_policy, max(len(prompt_ids) + budget, 1), backend, compile_steps,
                              layout, modulo_slots, dtype)
            decoder.logits_view = True  # each step's logits are used before the next step
            prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
            logits, steps = decoder.prefill(prompt, prefix_cache)
            emitted = ""
            for index in range(budget):
                token = sample_next(logits.cpu() if generator is not None else logits, sampling, generator,
                                    decoder.greedy)  # greedy: picked in the kernel, no torch call per token
                if token in stop_ids:
                    result.stop_reason = "stop_token"
                    result.stop_token_steps = steps
                    return
                piece, emitted = record_token(result, token, steps, tokenizer, stop_strings, emitted)
                if result.stop_reason == "stop_string":
                    if piece:
                        yield GeneratedToken(token, steps, piece)
                    return
                yield GeneratedToken(token, steps, piece)
                if index + 1 < budget:
                    logits, steps = decoder.step(token)
            result.stop_reason = "length" if budget == max_new_tokens else "context"
    finally:
        model.train(was_training)


def record_token(result: Generation, token: int, steps: int, tokenizer, stop_strings: Sequence[str],
                 emitted: str) -> tuple[str, str]:
    """Append ``token`` (decided in ``steps`` loop steps) to ``result`` and update its text.
    ``emitted`` is the text handed out so far; returns (the new text to hand out for this
    token, the text handed out after it).  The piece stays "" while a multi-byte character is
    unfinished.  When a stop string completes, ``result`` ends before it (stop_reason
    "stop_string") and the piece is what precedes the stop string."""
    result.ids.append(token)
    result.steps.append(steps)
    if tokenizer is None:
        return "", emitted
    text = tokenizer.decode(result.ids)
    stop_at = _find_stop(text, stop_strings, len(emitted))
    if stop_at is not None:
        result.text, result.stop_reason = text[:stop_at], "stop_string"
        return text[len(emitted):stop_at], text[:stop_at]
    result.text = text
    if text.endswith("\ufffd"):
        return "", emitted
    return text[len(emitted):], text


def _find_stop(text: str, stop_strings: Sequence[str], emitted: int) -> int | None:
    """Earliest index where a stop string starts (only looking at text not yet final)."""
    positions = []
    for stop in stop_strings:
        if stop:
            found = text.find(stop, max(0, emitted - len(stop)))
            if found >= 0:
                positions.append(found)
    return min(positions) if positions else None


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
             exit_policy: ExitPolicy | None = None, tokenizer=None, stop_strings: Sequence[str] = (),
             stop_ids: Sequence[int] | None = None, backend: str = "auto", compile_steps: bool = False,
             layout: str = "last_exited", modulo_slots: int = 2, prefix_cache=None, dtype: str = "fp32") -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (batch 1).

    Stops at a stop id (default: the tokenizer's eos), a stop string (needs ``tokenizer``;
    the text is cut before it), or the end of the model's context.  Returns the new ids, the
    loop steps each token used, the decoded text and why it stopped.  ``backend`` picks the
    per-token implementation (see ``Decoder``; every backend gives the same tokens);
    ``compile_steps`` compiles the torch backend's loop step.  ``layout``/``modulo_slots``:
    the KV layout (``looplm.cache.KV_LAYOUTS``).  ``prefix_cache``: a ``PrefixCache`` whose
    stored prompt prefixes are reused instead of recomputed (same output).  ``dtype``: the
    weights' precision, "fp32" (default), "bf16" or "auto" (bf16 where the C kernel has the
    native bf16 dot product; see ``Decoder``).
    """
    result = Generation()
    for _ in stream(model, prompt_ids, max_new_tokens, sampling, exit_policy, tokenizer, stop_strings,
                    stop_ids, result, backend, compile_steps, layout, modulo_slots, prefix_cache, dtype):
        pass
    if tokenizer is not None and result.stop_reason != "stop_string":
        result.text = tokenizer.decode(result.ids)
    return result
