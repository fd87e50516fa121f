"""Generation: prompts with their settings, decoded by the depth scheduler (``looplm.scheduler``).

Exit policies (``looplm.exit_policy``) decide per token how many loop steps run, and early exit
really skips work; the cache's layout (``looplm.cache.KV_LAYOUTS``) decides what later tokens
see of an exited token (default: its exit-step K/V stand in for the deeper steps, docs/MATH.md
§4).  Every path — ``stream``/``generate``, ``looplm.batch.generate_batch``, the server — runs
its requests on a ``BatchSession``: scheduler rows at their own loop steps, and per request one
sampling, stop and emission rule (``Request``).  Backends (``looplm.steppers``): ``native`` (C),
``torch`` (vector torch ops), ``reference`` (the model's modules; every batch); ``auto`` picks the
fastest that runs.  ``dtype`` chooses float32 or bf16 weights (``looplm.bf16``; ``auto``: bf16 where
the kernel multiplies bf16 natively; ``Scheduler.precision`` says what was chosen and why); a
request that names no exit policy gets the model's (``default_exit_policy``).  ``Decoder`` feeds
one row explicit tokens (tests, benchmarks).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from looplm.errors import LoopLMError, is_int, is_number, one_line
from looplm.exit_policy import (  # noqa: F401
    ACTExit,
    ExitPolicy,
    FixedSteps,
    HiddenDiffExit,
    KLExit,
    PerplexityExit,
    QExit,
    Signal,
    default_exit_policy,
    make_exit_policy,
    parse_exit,
)
from looplm.scheduler import Scheduler, check_token_ids

# How long one BatchSession.step may run greedy rows on in C: short enough that requests arriving
# meanwhile (a server's) wait little, long enough that the Python between iterations is rare.
RUN_AHEAD_SECONDS = 0.005
MIN_TOP_P = 1e-6  # smaller top_p values are refused: one that rounds to 0 in float32 keeps no token


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted to the
    top_k most likely tokens (0 = all) and to the smallest set with mass ≥ top_p; a ``seed``
    gives the request its own generator."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, right in (("temperature", is_number), ("top_k", is_int), ("top_p", is_number),
                            ("seed", lambda value: value is None or is_int(value))):
            value = getattr(self, name)
            if not right(value):
                raise LoopLMError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise LoopLMError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LoopLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LoopLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_p < MIN_TOP_P:  # it would round to 0 in float32 and keep no token
            raise LoopLMError(f"top_p must be at least {MIN_TOP_P} (any smaller keeps only the likeliest token, as"
                              f" temperature 0 does), got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise LoopLMError(f"the sampling seed must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class Settings:
    """What shapes one request's generation besides its prompt and token limit (per row)."""

    exit_policy: ExitPolicy = FixedSteps()
    layout: str = "last_exited"
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from looplm.cache import KV_LAYOUTS

        if isinstance(self.exit_policy, str | dict):  # the string / JSON form (parse_exit)
            object.__setattr__(self, "exit_policy", parse_exit(self.exit_policy))
        if not isinstance(self.exit_policy, ExitPolicy):
            raise LoopLMError(f"exit_policy must be an ExitPolicy (QExit(0.5)) or its string form ('q:0.5'), got"
                              f" {self.exit_policy!r}")
        if self.layout not in KV_LAYOUTS:
            raise LoopLMError(f"unknown layout {self.layout!r}: use one of {', '.join(KV_LAYOUTS)}")
        if not isinstance(self.sampling, Sampling):
            raise LoopLMError(f"sampling must be a Sampling (e.g. Sampling(temperature=0.8)), got {self.sampling!r}")
        object.__setattr__(self, "stop", stop_strings_of(self.stop))


def stop_strings_of(stop) -> tuple[str, ...]:
    """Stop strings as a tuple: one string is one stop string (not its characters)."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(text, str) for text in stop):
        raise LoopLMError(f"stop strings must be strings, got {list(stop)!r}")
    return stop


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
    layer_applications: int = 0       # core + coda layer applications its decoded tokens ran
    full_depth_applications: int = 0  # the same tokens at full depth

    @property
    def decision_steps(self) -> list[int]:
        """Loop steps of every decoding decision, including the one that chose the stop token."""
        return self.steps + ([self.stop_token_steps] if self.stop_token_steps is not None else [])

    @property
    def mean_steps(self) -> float:
        return sum(self.steps) / len(self.steps) if self.steps else 0.0


def sample_next(logits: torch.Tensor | None, sampling: Sampling, generator: torch.Generator | None,
                greedy: int | None = None, greedy_logit: float | None = None) -> int:
    """Pick the next token id from logits [V] (``greedy``: their argmax, when already known;
    ``greedy_logit``: the logit there, when known too — greedy sampling then needs no logits).
    A non-finite readout (a model that overflowed, e.g. run far deeper than it was trained)
    stops generation with one line instead of emitting garbage."""
    if sampling.temperature == 0:
        token = int(logits.argmax()) if greedy is None else greedy
        value = float(logits[token]) if greedy is None or greedy_logit is None else greedy_logit
        if not math.isfinite(value):  # NaN propagates to every logit: one check suffices
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


def check_prompt(prompt: Sequence[int], context: int, name: str = "the prompt") -> None:
    """A prompt must hold 1 .. context tokens."""
    if len(prompt) == 0:
        raise LoopLMError(f"{name} is empty: give at least one token")
    if len(prompt) > context:
        raise LoopLMError(f"{name} has {len(prompt)} tokens, longer than the context of {context}:"
                          " shorten it or use a model with a larger max_seq_len")


@dataclass
class StreamedText:
    """A generation's text as its tokens arrive, decoding a window of the last few ids per token
    rather than the whole generation each time (decoding made a long stream quadratic in its
    length; what is left growing with it is appending to the text).

    ``ids[window:read]`` decoded is the end of what was handed out; a new token's piece is what
    ``ids[window:]`` decodes to beyond that, handed out once it does not end in an unfinished
    character (U+FFFD) and then the window moves up to the previous end.  Decoding from the same
    start both times keeps what depends on context the same as a whole decode: a multi-byte
    character across tokens, a tokenizer dropping the leading space of a decode's first word."""

    tokenizer: object
    text: str = ""     # decoded, whole characters
    pending: str = ""  # decoded beyond it (ends in an unfinished character)
    window: int = 0
    read: int = 0
    given: int = 0     # characters of ``text`` handed out (``record_token`` holds back a possible stop string)

    def push(self, ids: Sequence[int]) -> str:
        before = self.tokenizer.decode(ids[self.window:self.read])
        after = self.tokenizer.decode(ids[self.window:])
        self.pending = after[len(before):]
        if not self.pending or self.pending.endswith("\ufffd"):
            return ""
        piece, self.pending = self.pending, ""
        self.window, self.read = self.read, len(ids)
        self.text += piece
        return piece


def stop_prefix(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could begin one of ``stops`` (the longest end of
    ``text`` that is a proper start of a stop string): the part a stream holds back."""
    if not text:
        return 0
    longest, last = 0, text[-1]
    for stop in stops:
        end = stop.rfind(last, 0, len(stop) - 1)  # stop[:end + 1] ends as text does
        while end + 1 > longest:
            if text.endswith(stop[:end + 1]):
                longest = end + 1
                break
            end = stop.rfind(last, 0, end)
    return longest


def record_token(result: Generation, token: int, steps: int, streamed: StreamedText | None,
                 stop_strings: Sequence[str]) -> str:
    """Append ``token`` (decided in ``steps`` loop steps) to ``result``, update its text, and return
    the new text to hand out: "" while a multi-byte character is unfinished, and without an end that
    could begin a stop string (handed out once the text goes on otherwise, or when the generation
    ends: ``BatchSession._finish``).  A completed stop string ends ``result`` before it."""
    result.ids.append(token)
    result.steps.append(steps)
    if streamed is None:
        return ""
    given = streamed.given
    streamed.push(result.ids)
    text = streamed.text + streamed.pending  # the whole decode so far (a stop string may end in it)
    starts = [found for stop in stop_strings
              if stop and (found := text.find(stop, max(0, given - len(stop)))) >= 0]
    if starts:
        result.text, result.stop_reason = text[:min(starts)], "stop_string"
        streamed.given = max(given, min(starts))
        return text[given:min(starts)]
    result.text = text
    streamed.given = max(given, len(streamed.text) - stop_prefix(streamed.text, stop_strings))
    return text[given:streamed.given]


@dataclass(eq=False)
class Request:
    """One prompt decoding on a scheduler row: its settings, limits and what it emitted."""

    generation: Generation
    settings: Settings
    budget: int                      # tokens it may emit (its limit, cut by the context)
    limit: int                       # the limit asked for
    on_token: Callable[[int, int, str], None] | None = None   # (id, steps, text) per emitted token
    generator: torch.Generator | None = None
    row: object = None
    streamed: StreamedText | None = None  # its text as it streams (with a tokenizer)
    held: tuple[int, int, str] | None = None  # its last token (id, steps, text) while part of its text is held back
    cancelled: bool = False          # set by the caller: the request leaves at the next step
    error: LoopLMError | None = None  # why it stopped early (a non-finite readout)


@contextmanager
def eval_mode(model):
    """Inference mode, the model in eval mode meanwhile (switched only when it trains: the
    switch walks every module, which a small model's decode step would feel)."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


class BatchSession:
    """Continuous batching: requests join and leave a running ``Scheduler`` between iterations.

    ``rows`` slots of ``max_len`` positions; each request has its own ``Settings`` (exit policy,
    sampling — a seed gives it its own generator —, stop strings) if its layout is the session's
    and its steps fit the cache's depth (``max_steps``: default the default policy's).  ``admit``
    prefills prompts into free slots and emits their first tokens; ``step`` runs one iteration and
    emits a token for each row whose token finished; a finished request frees its slot at once.
    Where the stepper runs whole iterations in C (``exit_step``), one ``step`` runs on for up to
    ``run_ahead`` seconds while every row done with a token is greedy (no stop strings, not at its
    last token, no stop id): those tokens are fed back in C and emitted when the step returns, in
    order, so a step may emit several tokens of a row.  The tokens are the same (tested); 0 runs
    one iteration a step.  ``standby`` slots more (of ``max_len`` each) take requests admitted while
    every row is busy: each is prefilled at once and waits, and takes the first row to free up —
    inside such a C step where a greedy request ends there with its last token, so the step runs on
    instead of returning to let the next request in; where a slot is free (nobody waits for one),
    or once the caller sets ``admitting`` to False, such a request's row just leaves and the step
    runs on."""

    def __init__(self, model, rows: int, max_len: int, sampling: Sampling = Sampling(),
                 exit_policy: ExitPolicy | None = None, tokenizer=None, stop_strings: Sequence[str] = (),
                 stop_ids: Sequence[int] | None = None, layout: str = "last_exited", modulo_slots: int = 2,
                 max_steps: int | None = None, backend: str = "auto", compile_steps: bool = False,
                 prefix_cache=None, dtype: str = "fp32", run_ahead: float = RUN_AHEAD_SECONDS, standby: int = 0):
        self.tokenizer, self.prefix_cache = tokenizer, prefix_cache
        if not is_number(run_ahead) or not 0 <= run_ahead < math.inf:
            raise LoopLMError(f"run_ahead must be seconds >= 0 (0: one iteration a step), got {run_ahead!r}")
        self.run_ahead = float(run_ahead)
        self.defaults = Settings(exit_policy or default_exit_policy(model.config), layout, sampling,
                                 stop_strings_of(stop_strings))
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise LoopLMError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only"
                              f" {model.config.vocab_size} embedding rows: use the model's own tokenizer")
        self._check_stops([self.defaults])
        if not is_int(rows) or rows < 1 or not is_int(max_len) or max_len < 1:
            raise LoopLMError(f"rows and max_len must be ints >= 1, got {rows!r}, {max_len!r}")
        if not is_int(standby) or standby < 0:
            raise LoopLMError(f"standby must be an int >= 0 (slots for requests waiting for a row), got {standby!r}")
        if max_steps is not None and (not is_int(max_steps) or max_steps < 1):
            raise LoopLMError(f"max_steps must be an int >= 1 (None: the policy's), got {max_steps!r}")
        self.stop_ids = set(tokenizer.stop_ids if stop_ids is None and tokenizer is not None else (stop_ids or []))
        self.context = model.config.max_seq_len
        depth = max_steps or self.defaults.exit_policy.max_steps(model.config.loop_steps)
        self.scheduler = Scheduler(model, rows + standby, max_len, depth, layout, modulo_slots, backend, compile_steps,
                                   dtype, width=rows)
        self.model, self.precision = self.scheduler.model, self.scheduler.precision  # bf16: the bf16 copy
        self.requests: dict[int, Request] = {}  # slot → request decoding there
        self.done: list[Request] = []           # finished, not yet returned by ``step``
        self.joined_late = 0                    # requests admitted while others were decoding
        self.admitting = True                   # False: the caller admits no more (ending rows leave at once)

    @property
    def active(self) -> bool:
        return bool(self.requests or self.done)

    @property
    def free_slots(self) -> int:
        return len(self.scheduler.free)

    def budget(self, prompt: Sequence[int], limit: int) -> int:
        return min(limit, self.context - len(prompt))

    def fits(self, prompt: Sequence[int], limit: int, settings: Settings | None = None) -> bool:
        """Whether ``prompt`` can join now: a free slot, room for its tokens, its layout and depth."""
        settings = settings or self.defaults
        cache = self.scheduler.cache
        same_layout = settings.layout == cache.layout or self.model.config.kv_append_first  # (its layout is fixed)
        return (self.free_slots > 0 and 0 < len(prompt) <= self.context and same_layout
                and settings.exit_policy.max_steps(self.model.config.loop_steps) <= cache.max_steps
                and len(prompt) + self.budget(prompt, limit) <= cache.max_len)  # its last token is never fed

    def admit(self, prompts: Sequence[Sequence[int]], limits: Sequence[int],
              on_tokens: Sequence[Callable | None] | None = None, settings: Sequence[Settings] | None = None,
              results: Sequence[Generation] | None = None) -> list[Request]:
        """Prefill ``prompts`` into free slots and emit their first tokens; one limit (and optional
        callback, settings, Generation to fill) per prompt."""
        settings = settings or [self.defaults] * len(prompts)
        for name, values in (("limits", limits), ("on_tokens", on_tokens), ("settings", settings),
                             ("results", results)):
            if values is not None and len(values) != len(prompts):
                raise LoopLMError(f"{len(values)} {name} for {len(prompts)} prompts: give one per prompt")
        try:
            counted = [operator.index(limit) for limit in limits]
        except TypeError:
            counted = [-1]
        if min(counted, default=0) < 0:
            raise LoopLMError(f"limits must be ints >= 0 (new tokens per prompt), got {list(limits)!r}")
        limits = counted
        if any(result.ids for result in results or ()):
            raise LoopLMError("a Generation given to fill already holds tokens: pass a new Generation()")
        self._check_stops(settings)
        for prompt, limit, chosen in zip(prompts, limits, settings):
            if not self.fits(prompt, limit, chosen):
                raise LoopLMError(f"a prompt of {len(prompt)} tokens with {limit} new tokens does not fit the batch")
        late, admitted = bool(self.requests), []
        with eval_mode(self.model):
            for index, (prompt, limit, chosen) in enumerate(zip(prompts, limits, settings)):
                seed = chosen.sampling.seed
                request = Request(results[index] if results else Generation(), chosen,
                                  self.budget(prompt, limit), limit,
                                  on_tokens[index] if on_tokens else None,
                                  None if seed is None else torch.Generator(device="cpu").manual_seed(seed))
                request.generation.prompt_tokens = len(prompt)
                request.streamed = None if self.tokenizer is None else StreamedText(self.tokenizer)
                request.row = self.scheduler.admit(list(prompt), chosen.exit_policy, self.prefix_cache)
                self.requests[request.row.slot] = request
                try:
                    self._emit(request)
                except BaseException:  # nothing of it stays in the batch
                    self.requests.pop(request.row.slot, None)
                    self.scheduler.release(request.row)
                    raise
                admitted.append(request)
        self.joined_late += len(admitted) if late else 0
        return admitted

    def _check_stops(self, settings: Sequence[Settings]) -> None:
        """Stop strings are matched in the decoded text: refuse them without a tokenizer."""
        if self.tokenizer is None and any(chosen.stop for chosen in settings):
            raise LoopLMError("stop strings are matched in the decoded text: give the tokenizer too")

    def step(self) -> list[Request]:
        """One scheduler iteration; emit a token for each row whose token finished.  Returns the
        requests that finished (their slots are free again)."""
        if self.model.training or not torch.is_inference_mode_enabled():
            with eval_mode(self.model):
                return self.step()
        for request in [request for request in self.requests.values() if request.cancelled]:
            self._finish(request)
        finished = self.scheduler.iterate(self._feeds, self.stop_ids, self.run_ahead, self.admitting)
        if self.scheduler.fed:  # greedy tokens the stepper fed back itself
            self._record_fed()
        for row in self.scheduler.ended:  # requests that ended with one of them
            self._finish(self.requests[row.slot])
        for row in finished:
            self._emit(self.requests[row.slot])
        done, self.done = self.done, []
        return done

    def _feeds(self, rows: list) -> list[int]:
        """How many tokens each row's request may take without ``_emit`` (``Scheduler.iterate``): a
        greedy one without stop strings, what is left of its budget."""
        requests = [self.requests[row.slot] for row in rows]
        return [0 if request.settings.sampling.temperature != 0 or request.settings.stop or request.cancelled
                else request.budget - len(request.generation.ids) for request in requests]

    def _record_fed(self) -> None:
        """Record the tokens the stepper fed back itself: each request's at once, or where one
        streams (a callback or text), every token through ``_record`` in the order taken."""
        fed = self.scheduler.fed
        requests = [self.requests[row.slot] for row, _, _ in fed]
        if any(request.on_token is not None or request.streamed is not None for request in requests):
            taken = {row: iter(zip(tokens, steps)) for row, tokens, steps in fed}
            for row in self.scheduler.fed_order:
                self._record(self.requests[row.slot], *next(taken[row]))
        else:
            for request, (_, tokens, steps) in zip(requests, fed):
                request.generation.ids += tokens
                request.generation.steps += steps
        for request, (row, _, _) in zip(requests, fed):
            request.generation.layer_applications = row.layer_applications
            request.generation.full_depth_applications = row.full_depth_applications

    def _emit(self, request: Request) -> None:
        """Sample and record the row's next token; feed it back, or finish the request."""
        result, row, settings = request.generation, request.row, request.settings
        result.layer_applications, result.full_depth_applications = row.layer_applications, row.full_depth_applications
        if request.cancelled or len(result.ids) >= request.budget:
            return self._finish(request)
        generator = request.generator
        try:
            sampling = settings.sampling
            logits = None if sampling.temperature == 0 and row.greedy_logit is not None else row.logits
            token = sample_next(logits.cpu() if generator is not None and logits is not None else logits, sampling,
                                generator, row.greedy, row.greedy_logit)
        except RuntimeError as error:  # torch's sampling refused the distribution: this request's alone
            request.error = LoopLMError(f"sampling failed ({one_line(error)[:200]}): use a temperature of at least"
                                        " 1e-3, or 0 for greedy decoding")
            return self._finish(request)
        except LoopLMError as error:  # this request's alone
            request.error = error
            return self._finish(request)
        if token in self.stop_ids:
            result.stop_reason, result.stop_token_steps = "stop_token", row.steps
            return self._finish(request)
        if self._record(request, token, row.steps):
            return self._finish(request)
        self.scheduler.feed(row, token)

    def _record(self, request: Request, token: int, steps: int) -> bool:
        """Record the request's next token and hand it to its callback; whether the request is done
        (a stop string, or its budget)."""
        result = request.generation
        piece = record_token(result, token, steps, request.streamed, request.settings.stop)
        if request.held is not None:  # the token before: its text is whole now
            request.on_token(*request.held)
            request.held = None
        if request.on_token is not None and (piece or result.stop_reason != "stop_string"):
            streamed = request.streamed
            if streamed is not None and result.stop_reason != "stop_string" and streamed.given < len(streamed.text):
                request.held = (token, steps, piece)  # its end could begin a stop string
            else:
                request.on_token(token, steps, piece)
        return result.stop_reason == "stop_string" or len(result.ids) >= request.budget

    def _finish(self, request: Request) -> None:
        result = request.generation
        if result.stop_reason not in ("stop_token", "stop_string"):
            result.stop_reason = "length" if request.budget == request.limit else "context"
        if self.tokenizer is not None and result.stop_reason != "stop_string":
            result.text = self.tokenizer.decode(result.ids)
        if request.held is not None:  # what was held back is not a stop string: hand it out with its token
            token, steps, piece = request.held
            request.held = None
            request.on_token(token, steps, piece + result.text[request.streamed.given:])
        self.scheduler.release(request.row)
        del self.requests[request.row.slot]
        self.done.append(request)


def stream(model, prompt_ids: Sequence[int], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
           exit_policy: ExitPolicy | None = None, tokenizer=None, stop_strings: Sequence[str] = (),
           stop_ids: Sequence[int] | None = None, result: Generation | None = None, backend: str = "auto",
           compile_steps: bool = False, layout: str = "last_exited", modulo_slots: int = 2,
           prefix_cache=None, dtype: str = "fp32") -> Iterator[GeneratedToken]:
    """Yield generated tokens one at a time (see ``generate``); ``result``, when given, is filled
    in as they arrive."""
    check_prompt(prompt_ids, model.config.max_seq_len)
    if max_new_tokens < 0:
        raise LoopLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    budget = min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))
    tokens: list[GeneratedToken] = []
    with eval_mode(model):
        session = BatchSession(model, 1, max(len(prompt_ids) + budget, 1), sampling, exit_policy, tokenizer,
                               stop_strings, stop_ids, layout, modulo_slots, backend=backend,
                               compile_steps=compile_steps, prefix_cache=prefix_cache, dtype=dtype)
        request = session.admit([prompt_ids], [max_new_tokens], [lambda *token: tokens.append(GeneratedToken(*token))],
                                results=[result] if result is not None else None)[0]
        while True:
            yield from tokens
            tokens.clear()
            if request.error is not None:
                raise request.error
            if not session.active:
                return
            session.step()


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
             exit_policy: ExitPolicy | None = None, tokenizer=None, stop_strings: Sequence[str] = (),
             stop_ids: Sequence[int] | None = None, backend: str = "auto", compile_steps: bool = False,
             layout: str = "last_exited", modulo_slots: int = 2, prefix_cache=None, dtype: str = "fp32") -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (one row); stop at a stop id (default:
    the tokenizer's eos), a stop string (needs ``tokenizer``; the text is cut before it), or the
    context's end.  ``backend``: ``looplm.steppers.BACKENDS`` (all give the same tokens);
    ``compile_steps``: compile the torch backend's step; ``layout``/``modulo_slots``: the KV
    layout; ``prefix_cache``: a ``PrefixCache`` whose stored prompt prefixes are reused; ``dtype``:
    the weights, "fp32" (default), "bf16" or "auto" (see ``looplm.steppers.make_stepper``)."""
    result = Generation()
    for _ in stream(model, prompt_ids, max_new_tokens, sampling, exit_policy, tokenizer, stop_strings,
                    stop_ids, result, backend, compile_steps, layout, modulo_slots, prefix_cache, dtype):
        pass
    return result


class Decoder:
    """One sequence token by token, the tokens given (no sampling): one row of a ``Scheduler``.
    ``prefill(ids [1, S])`` and ``step(token)`` return (logits [V], loop steps); ``fused``: whether
    tokens may run in the stepper's one call (``whole_token``); ``logits_view``: return the
    stepper's logits buffer itself, which the next step overwrites."""

    def __init__(self, model, exit_policy: ExitPolicy, max_len: int, backend: str = "auto",
                 compile_steps: bool = False, layout: str = "last_exited", modulo_slots: int = 2,
                 dtype: str = "fp32"):
        if not isinstance(exit_policy, ExitPolicy):
            raise LoopLMError(f"exit_policy must be an ExitPolicy (e.g. QExit(0.5); parse_exit('q:0.5') reads the"
                              f" string form), got {exit_policy!r}")
        if not is_int(max_len) or not 1 <= max_len <= model.config.max_seq_len:
            raise LoopLMError(f"max_len must be in [1, {model.config.max_seq_len}] (the model's context), got"
                              f" {max_len!r}")
        self.scheduler = Scheduler(model, 1, max_len, exit_policy.max_steps(model.config.loop_steps), layout,
                                   modulo_slots, backend, compile_steps, dtype)
        self.policy, self.row, self.logits_view = exit_policy, None, False

    cache = property(lambda self: self.scheduler.cache)
    stepper = property(lambda self: self.scheduler.stepper)
    backend = property(lambda self: self.scheduler.backend)
    model = property(lambda self: self.scheduler.model)
    precision = property(lambda self: self.scheduler.precision)
    greedy = property(lambda self: self.row.greedy)
    # whether this decoder's tokens run in the stepper's one call (the policy's exit read in it)
    fused = property(lambda self: self.scheduler.whole_tokens and self.policy.signal in (Signal.NONE, Signal.GATE)
                     and not isinstance(self.policy, ACTExit),
                     lambda self, value: setattr(self.scheduler, "whole_tokens", value))

    def prefill(self, ids: torch.Tensor, prefix_cache=None) -> tuple[torch.Tensor, int]:
        if self.row is not None:
            raise LoopLMError("this Decoder already holds a sequence: make a new Decoder for another prompt")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
            raise LoopLMError(f"prefill takes token ids of shape [1, S] (one sequence), got"
                              f" {tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        self.row = self.scheduler.admit(ids[0].tolist(), self.policy, prefix_cache)
        return self._result()

    def step(self, token: int) -> tuple[torch.Tensor, int]:
        if self.row is None:
            raise LoopLMError("step comes after prefill: give the Decoder its prompt first")
        (token,) = check_token_ids([token], self.model.config.vocab_size, "the token")
        if self.row.position >= self.cache.max_len:
            raise LoopLMError(f"the Decoder's {self.cache.max_len} positions are all used: make it with a larger"
                              " max_len (at most the model's context)")
        self.scheduler.feed(self.row, token)
        self.scheduler.finish_token(self.row)
        return self._result()

    def _result(self) -> tuple[torch.Tensor, int]:
        return (self.row.logits if self.logits_view else self.row.logits.clone()), self.row.steps
