"""The serving engine: one worker thread runs the model; requests arriving together decode together.

Each submitted ``Job`` is one prompt with its generation ``Settings`` and a ``sink`` that receives
its events (``Token`` for every emitted token, then ``Done`` or ``Failed``) from the worker thread.

Scheduling (continuous batching):

1. The worker blocks until a job arrives, then keeps collecting jobs for ``batch_wait`` seconds
   or until it holds ``max_batch`` of them.
2. Jobs are grouped by ``Settings`` (exit policy with its steps, KV layout, sampling, stop
   strings): a batch runs one of each.  Greedy jobs group regardless of top_k/top_p/seed; a
   sampled job with a seed runs alone, so its draws do not depend on which other requests
   happened to arrive with it.
3. When two or more jobs of the oldest job's group are waiting, they start a ``BatchSession``
   (``looplm.batch``; ``max_batch`` slots, ``max_context`` positions).  Between decode steps the
   session takes in newly arrived jobs of its group (a free slot, a prompt no longer than the
   batch's write position, and room for its tokens), and a finished or cancelled job leaves at
   once, freeing its slot.  Jobs of other groups, or that do not fit, wait for the session to end.
4. A job alone in its group runs through ``looplm.generate.stream`` (batch 1, the fastest
   per-token backend, reusing prompt prefixes through a shared ``PrefixCache``).

A failing batch does not take its jobs down with it: each of its jobs that has received no
token yet is retried alone, and only the jobs that fail alone (or had already streamed tokens) get
``Failed``.  The worker keeps serving after any exception.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

from looplm.batch import BatchSession
from looplm.cache import SKIPPING_LAYOUTS
from looplm.errors import LoopLMError
from looplm.exit_policy import ACTExit, ExitPolicy, ExitRule
from looplm.generate import Generation, Sampling, stream
from looplm.prefix_cache import PrefixCache

log = logging.getLogger("looplm.serve")


@dataclass(frozen=True)
class Settings:
    """Everything besides the prompt and the token limit that shapes a generation; jobs with
    equal settings can share a batch."""

    exit_policy: ExitPolicy
    layout: str = "last_exited"
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Token:
    id: int
    steps: int   # loop steps the token's decision used
    text: str    # the text it completed ("" while a multi-byte character is unfinished)


@dataclass(frozen=True)
class Done:
    generation: Generation
    layer_applications: int          # core + coda layer applications of the decoded tokens
    full_depth_applications: int     # the same tokens at full depth
    batch_size: int                  # how many jobs decoded together with this one


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500                # 400 for a LoopLMError (the request asked for something impossible),
                                     # 503 when the server shuts down before the job started


class Overloaded(LoopLMError):
    """The engine holds ``max_queue`` unfinished jobs already: the request is refused (HTTP 503)."""


Event = Token | Done | Failed


@dataclass(eq=False)
class Job:
    prompt: list[int]
    max_tokens: int
    settings: Settings
    sink: Callable[[Event], None]
    cancelled: bool = False          # set when the client went away; batch-1 decoding stops early
    emitted: int = 0


@dataclass
class EngineStats:
    requests: int = 0        # jobs finished (one per prompt)
    batches: int = 0         # model runs: a batch of several jobs or one job alone
    batched_jobs: int = 0    # jobs that ran in batches of two or more
    joined_running: int = 0  # jobs that joined a batch already decoding (continuous batching)
    largest_batch: int = 0
    tokens: int = 0          # tokens handed to clients
    failures: int = 0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "batched_requests": self.batched_jobs,
                "joined_running_batch": self.joined_running,
                "largest_batch": self.largest_batch,
                "mean_batch_size": self.requests / self.batches if self.batches else 0.0,
                "tokens": self.tokens, "failures": self.failures}


def layer_applications(config, settings: Settings, decision_steps: Sequence[int]) -> tuple[int, int]:
    """(run, full depth) core + coda layer applications of one generation's decoded tokens.

    The first decision comes from the prompt's prefill (full depth, not counted); every later
    decision is one decoded token that ran ``steps`` loop steps (all of them under the ``full``
    layout), each step applying the core layers, and the coda at every step when the exit policy
    reads every step (else once).  The same count as ``BatchResult.layer_applications``."""
    policy = settings.exit_policy
    deepest = policy.max_steps(config.loop_steps)
    act = isinstance(policy, ACTExit)  # every step runs and is read out; ``steps`` is the halting step
    reads_every_step = act or ExitRule(policy, 1, config.loop_steps).active or (
        bool(config.n_coda_layers) and settings.layout in ("first", "avg"))
    run = full = 0
    for steps in decision_steps[1:]:
        ran = steps if settings.layout in SKIPPING_LAYOUTS and not act else deepest
        run += ran * config.n_core_layers + (ran if reads_every_step else 1) * config.n_coda_layers
        full += deepest * (config.n_core_layers + config.n_coda_layers)
    return run, full


def _fitting(session: BatchSession, jobs: list[Job]) -> list[Job]:
    """The jobs that can join ``session`` together, by the same rule ``BatchSession.admit`` checks:
    an idle session restarts at the longest prompt admitted, so each job is measured at the longest
    of them all (a subset's longest is no longer, so the subset fits too)."""
    start = max((len(job.prompt) for job in jobs), default=0)
    return [job for job in jobs if session.fits(job.prompt, job.max_tokens, start)][:session.free_slots]


class Engine:
    """Runs submitted jobs on ``model`` in a background thread (``start``/``stop``)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 prefix_cache: PrefixCache | None = None, max_context: int | None = None, max_queue: int = 256):
        """max_context: positions per batch slot (default the model's context); a batch's cache
        takes max_batch × max_context × ``KVCache.bytes_per_token``.  max_queue: the most unfinished
        jobs (running or waiting) the engine holds; ``submit`` refuses more (``Overloaded``)."""
        if max_batch < 1:
            raise LoopLMError(f"max_batch must be >= 1, got {max_batch}")
        if max_context is not None and max_context < 1:
            raise LoopLMError(f"max_context must be >= 1, got {max_context}")
        if batch_wait_ms < 0:
            raise LoopLMError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000.0
        self.max_context = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        if max_queue < 1:
            raise LoopLMError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self.stats = EngineStats()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.unfinished = 0              # jobs submitted and not yet finished
        self.closing = False             # set by ``stop``: no new jobs; waiting ones are refused

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve_forever, name="looplm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Graceful shutdown: the running batch finishes, waiting jobs get ``Failed`` (503), and
        ``submit`` refuses new ones."""
        self.closing = True
        if self._thread is not None:
            self.jobs.put(None)
            self._thread.join()
            self._thread = None
        self.closing = False

    def submit(self, *jobs: Job) -> None:
        """Queue ``jobs`` (all of them or none: ``Overloaded`` when they would pass ``max_queue``)."""
        with self._lock:
            if self.closing:
                raise Overloaded("the server is shutting down")
            if self.unfinished + len(jobs) > self.max_queue:
                raise Overloaded(f"the server is busy ({self.unfinished} requests in progress, at most"
                                 f" {self.max_queue}): retry shortly")
            self.unfinished += len(jobs)
        for job in jobs:
            self.jobs.put(job)

    def _done(self, job: Job, event: Event) -> None:
        with self._lock:
            self.unfinished -= 1
        job.sink(event)

    def _serve_forever(self) -> None:
        waiting: list[Job] = []
        self._stopping = False
        while True:
            if self.closing:
                self._take_arrivals(waiting)
                for job in waiting:
                    self._fail(job, Overloaded("the server shut down before this request started"), 503)
                return
            waiting[:] = [job for job in waiting if not self._dropped(job)]
            if not waiting:
                if self._stopping or (jobs := self._collect()) is None:
                    return
                waiting.extend(job for job in jobs if not self._dropped(job))
                continue
            self._run_next(waiting)

    def _dropped(self, job: Job) -> bool:
        """A job whose client left before it started is finished at once, without decoding."""
        if job.cancelled:
            self._done(job, Failed("the client went away", 499))
        return job.cancelled

    def _collect(self) -> list[Job] | None:
        """Block for a job, then gather more for up to ``batch_wait`` seconds; None = stop."""
        first = self.jobs.get()
        if first is None:
            return None
        jobs = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # finish what was collected, then stop
                break
            jobs.append(job)
        return jobs

    def run(self, jobs: Sequence[Job]) -> None:
        """Run ``jobs`` to completion in the calling thread (batching them by settings)."""
        waiting = list(jobs)
        while waiting:
            self._run_next(waiting)

    def _run_next(self, waiting: list[Job]) -> None:
        """Run the oldest waiting job's group: a continuous batch when two or more of it wait,
        else the oldest job alone.  Removes what it ran from ``waiting``."""
        key = self._group_key(waiting[0])
        group = [job for job in waiting if self._group_key(job) == key][:self.max_batch]
        if len(group) > 1:
            self._run_session(group, waiting)
        else:
            job = waiting.pop(0)
            self._run_alone(job)

    @staticmethod
    def _group_key(job: Job) -> object:
        sampling = job.settings.sampling
        if sampling.temperature == 0:
            return replace(job.settings, sampling=Sampling())
        if sampling.seed is not None:
            return job  # reproducible draws: never share a generator with other requests
        return job.settings

    def _run_session(self, group: list[Job], waiting: list[Job]) -> None:
        """Decode ``group`` in one ``BatchSession``, taking in same-group jobs as they arrive."""
        settings = group[0].settings
        key = self._group_key(group[0])
        longest = max(len(job.prompt) for job in group)
        need = max(longest + max(job.max_tokens, 1) for job in group)
        positions = min(max(self.max_context, need), self.model.config.max_seq_len)
        session = BatchSession(self.model, self.max_batch, positions,
                               settings.sampling, settings.exit_policy, self.tokenizer, settings.stop,
                               layout=settings.layout)
        members: dict[int, Job] = {}   # id(row) → job, while it decodes
        unfinished: list[Job] = []     # every job taken in and not finished yet

        def admit(jobs: list[Job]) -> None:
            for job in jobs:
                waiting.remove(job)
                unfinished.append(job)
            for job, row in zip(jobs, session.admit([job.prompt for job in jobs], [job.max_tokens for job in jobs],
                                                    [partial(self._emit, job) for job in jobs])):
                members[id(row)] = job

        fitting = _fitting(session, group)
        if not fitting:
            waiting.remove(group[0])
            self._run_alone(group[0])
            return
        try:
            admit(fitting)
            self._count_batch(len(members))
            size = len(members)
            while session.active:
                for row in session.rows.values():
                    row.cancelled = members[id(row)].cancelled
                for row in session.step():
                    job = members.pop(id(row))
                    unfinished.remove(job)
                    self._finish(job, row.generation, size, row)
                self._take_arrivals(waiting)
                joining = [] if self.closing else _fitting(session, [
                    job for job in waiting if self._group_key(job) == key and not job.cancelled])
                if joining:
                    admit(joining)
                    self.stats.joined_running += len(joining)
                    self.stats.batched_jobs += len(joining)
                    size = max(size, len(session.rows))
                    self.stats.largest_batch = max(self.stats.largest_batch, len(session.rows))
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the server
            log.exception("batch of %d failed; retrying its jobs one by one", len(unfinished))
            for job in unfinished:
                if job.emitted == 0:
                    self._run_alone(job)
                else:
                    self._fail(job, error)

    def _take_arrivals(self, waiting: list[Job]) -> None:
        """Move jobs that arrived meanwhile from the queue to ``waiting`` (without blocking)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._stopping = True  # finish the running batch, then stop
            else:
                waiting.append(job)

    @staticmethod
    def _emit(job: Job, token: int, steps: int, text: str) -> None:
        job.emitted += 1  # the session stops a row at its own max_tokens
        job.sink(Token(token, steps, text))

    def _run_alone(self, job: Job) -> None:
        settings = job.settings
        generation = Generation()
        try:
            for token in stream(self.model, job.prompt, job.max_tokens, settings.sampling, settings.exit_policy,
                                self.tokenizer, settings.stop, result=generation, layout=settings.layout,
                                prefix_cache=self.prefix_cache):
                job.emitted += 1
                job.sink(Token(token.id, token.steps, token.text))
                if job.cancelled:
                    break
        except Exception as error:  # noqa: BLE001 - the failure is this request's alone
            log.exception("request failed")
            self._fail(job, error)
            return
        if generation.stop_reason != "stop_string":
            generation.text = self.tokenizer.decode(generation.ids)
        self._count_batch(1)
        self._finish(job, generation, 1)

    def _count_batch(self, size: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.largest_batch = max(stats.largest_batch, size)
        if size > 1:
            stats.batched_jobs += size

    def _finish(self, job: Job, generation: Generation, batch_size: int, row=None) -> None:
        """row: the job's ``BatchRow`` (its layer applications were counted as they ran);
        batch-1 jobs count theirs from the decision steps."""
        if row is not None:
            run, full = row.layer_applications, row.full_depth_applications
        else:
            run, full = layer_applications(self.model.config, job.settings, generation.decision_steps)
        self.stats.requests += 1
        self.stats.tokens += len(generation.ids)
        self._done(job, Done(generation, run, full, batch_size))

    def _fail(self, job: Job, error: Exception, status: int | None = None) -> None:
        self.stats.failures += 1
        if isinstance(error, LoopLMError):
            self._done(job, Failed(str(error), status or 400))
        else:
            self._done(job, Failed(f"generation failed: {type(error).__name__}: {error}"))
