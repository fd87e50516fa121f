"""The serving engine: one worker thread runs the model; every request decodes in one running batch.

Each submitted ``Job`` is one prompt with its generation ``Settings`` and a ``sink`` receiving its
events (``Token`` per emitted token, then ``Done`` or ``Failed``) from the worker thread.  When
idle, the worker waits for a job, then collects more for ``batch_wait`` seconds or up to
``max_batch``.  A batch (``looplm.generate.BatchSession`` over the depth scheduler: ``max_batch``
rows of ``max_context`` positions) is built for the oldest waiting job; between iterations the
waiting jobs join, in arrival order, whenever a row is free — whatever their exit policy, steps,
sampling (a seed: its own generator) and stop strings; only the KV layout and the cache's depth
are the batch's, so a job needing another waits until the batch drains.  A job leaves the moment
it finishes or its client disconnects.  Prompts are reused from a shared ``PrefixCache``.  A job
whose prefill fails fails alone; an exception inside an iteration fails that batch's jobs; the
worker keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

from looplm.errors import LoopLMError, one_line
from looplm.generate import BatchSession, Generation, Settings  # noqa: F401  (Settings: the jobs' type)
from looplm.prefix_cache import PrefixCache

log = logging.getLogger("looplm.serve")
MAX_BATCH = 1024            # rows of a batch (its cache is made for all of them)
MAX_BATCH_WAIT_MS = 10_000  # how long a request may wait for others to batch with


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
    batch_size: int                  # the most jobs decoding at once while this one did


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
    cancelled: bool = False          # set when the client went away: the job leaves at the next iteration
    emitted: int = 0
    batch_size: int = 1


@dataclass
class EngineStats:
    requests: int = 0              # jobs finished (one per prompt), their client still there
    cancelled: int = 0             # jobs whose client went away before they finished
    batches: int = 0               # batches run (from idle until drained)
    batched_requests: int = 0      # jobs that decoded beside at least one other
    joined_running_batch: int = 0  # jobs that joined a batch already decoding (continuous batching)
    largest_batch: int = 0
    tokens: int = 0                # tokens handed to clients
    failures: int = 0

    def as_dict(self) -> dict:
        return {**asdict(self), "mean_batch_size": self.requests / self.batches if self.batches else 0.0}


class Engine:
    """Runs submitted jobs on ``model`` in a background thread (``start``/``stop``)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 prefix_cache: PrefixCache | None = None, max_context: int | None = None, max_queue: int = 256,
                 standby: int = 0):
        """max_context: positions per batch row (default the model's context); a batch's cache
        takes (max_batch + standby) × max_context × ``KVCache.bytes_per_token``.  max_queue: the most
        unfinished jobs (running or waiting) the engine holds; ``submit`` refuses more
        (``Overloaded``).  standby: slots for jobs waiting for a row, prefilled early
        (``BatchSession``)."""
        for name, value, least, most in (("max_batch", max_batch, 1, MAX_BATCH), ("standby", standby, 0, MAX_BATCH),
                                         ("max_context", max_context or 1, 1, None),
                                         ("batch_wait_ms", batch_wait_ms, 0, MAX_BATCH_WAIT_MS),
                                         ("max_queue", max_queue, 1, None)):
            if not least <= value <= (most or value):
                raise LoopLMError(f"{name} must be in [{least}, {most}], got {value}" if most else
                                  f"{name} must be >= {least}, got {value}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait, self.standby = max_batch, batch_wait_ms / 1000.0, standby
        self.max_context = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        self.max_queue = max_queue
        self.stats = EngineStats()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.unfinished = 0              # jobs submitted and not yet finished
        self.closing = False             # set by ``stop``: no new jobs; waiting ones are refused
        self._stopping = False           # the worker met the stop mark: finish the batch, then stop

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (or has not been started: ``run`` serves in the caller's)."""
        return self._thread is None or self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve_forever, name="looplm-engine", daemon=True)
            self._thread.start()

    def begin_stop(self) -> None:
        """Start a graceful shutdown without waiting for it (a signal handler's part): no new jobs,
        the running batch finishes, waiting jobs get ``Failed`` (503); ``stop`` then joins."""
        self.closing = True
        self.jobs.put(None)

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

    def run(self, jobs: Sequence[Job]) -> None:
        """Run ``jobs`` to completion in the calling thread."""
        waiting = list(jobs)
        while waiting:
            self._run_batch(waiting)

    def _serve_forever(self) -> None:
        waiting: list[Job] = []
        while not (self.closing or self._stopping):
            waiting[:] = [job for job in waiting if not self._dropped(job)]
            if waiting:
                try:
                    self._run_batch(waiting, serving=True)
                except Exception as error:  # noqa: BLE001 - the server goes on: only the jobs at hand fail
                    log.exception("a batch could not run")
                    for job in waiting:
                        self._fail(job, error)
                    waiting.clear()
            elif (jobs := self._collect()) is not None:
                waiting.extend(jobs)
            else:
                break
        self._take_arrivals(waiting)
        for job in waiting:
            self._fail(job, Overloaded("the server shut down before this request started"), 503)
        self._stopping = False

    def _dropped(self, job: Job) -> bool:
        """A job whose client left before it started is finished at once, without decoding."""
        if job.cancelled:
            self._cancel(job)
        return job.cancelled

    def _cancel(self, job: Job) -> None:
        """A job whose client left: counted, and finished with a 499 nobody reads."""
        self.stats.cancelled += 1
        self._done(job, Failed("the client went away", 499))

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

    def _run_batch(self, waiting: list[Job], serving: bool = False) -> None:
        """One batch, built for the oldest waiting job (its layout, the deepest steps of the jobs
        waiting with that layout): run it until it drains, taking in waiting jobs in order of
        arrival as long as they fit (and, ``serving``, the jobs arriving meanwhile)."""
        layout, loop_steps = waiting[0].settings.layout, self.model.config.loop_steps
        depth = max(job.settings.exit_policy.max_steps(loop_steps) for job in waiting if job.settings.layout == layout)
        length = min(max(self.max_context, max(len(job.prompt) + max(job.max_tokens, 1) for job in waiting)),
                     self.model.config.max_seq_len)
        try:
            session = BatchSession(self.model, self.max_batch, length, tokenizer=self.tokenizer, layout=layout,
                                   max_steps=depth, prefix_cache=self.prefix_cache, standby=self.standby)
        except Exception as error:  # noqa: BLE001 - e.g. no memory for its cache: only the jobs needing it fail
            log.warning("no batch of %d loop steps (layout %s) could be made: %s", depth, layout, one_line(error))
            for job in [job for job in waiting if job.settings.layout == layout
                        and job.settings.exit_policy.max_steps(loop_steps) == depth]:
                waiting.remove(job)
                self._fail(job, error, 503)
            return
        if not session.fits(waiting[0].prompt, waiting[0].max_tokens, waiting[0].settings):
            # not even an empty batch built for it takes it: it would be retried for ever
            job = waiting.pop(0)
            return self._fail(job, LoopLMError(f"a prompt of {len(job.prompt)} tokens with {job.max_tokens} new"
                                               " tokens does not fit this server's batches"))
        members: dict[int, Job] = {}  # id(request) → its job
        self.stats.batches += 1
        while True:
            while waiting and not (self.closing or self._stopping) and session.fits(
                    waiting[0].prompt, waiting[0].max_tokens, waiting[0].settings):
                self._admit(session, waiting.pop(0), members)
            if not session.active:
                return
            size = min(len(session.requests), self.max_batch)  # (the others wait in standby slots)
            self.stats.largest_batch = max(self.stats.largest_batch, size)
            try:
                for request in session.requests.values():
                    job = members[id(request)]
                    request.cancelled, job.batch_size = job.cancelled, max(job.batch_size, size)
                finished = session.step()
            except Exception as error:  # noqa: BLE001 - one bad iteration must not stop the server
                log.exception("a batch of %d requests failed", len(members))
                for job in members.values():
                    self._fail(job, error)
                return
            for request in finished:
                self._finish(members.pop(id(request)), request)
            if serving:
                self._take_arrivals(waiting)
                waiting[:] = [job for job in waiting if not self._dropped(job)]

    def _admit(self, session: BatchSession, job: Job, members: dict[int, Job]) -> None:
        """Prefill ``job`` into the batch (its first token is emitted at once)."""
        late = bool(session.requests) and session.scheduler.iterations > 0  # joins a batch already decoding
        try:
            request = session.admit([job.prompt], [job.max_tokens], [partial(self._emit, job)], [job.settings])[0]
        except LoopLMError as error:  # what the request asked for cannot be done: its answer says why
            return self._fail(job, error)
        except Exception as error:  # noqa: BLE001 - the failure is this request's alone
            log.exception("request failed")
            return self._fail(job, error)
        self.stats.joined_running_batch += late
        if request in session.done:  # finished with its first token
            session.done.remove(request)
            return self._finish(job, request)
        members[id(request)] = job

    @staticmethod
    def _emit(job: Job, token: int, steps: int, text: str) -> None:
        job.emitted += 1
        job.sink(Token(token, steps, text))

    def _finish(self, job: Job, request) -> None:
        if request.error is not None:
            return self._fail(job, request.error)
        generation = request.generation
        if job.cancelled:  # its client left: nobody reads the rest
            self.stats.tokens += job.emitted
            return self._cancel(job)
        self.stats.requests += 1
        self.stats.tokens += len(generation.ids)
        self.stats.batched_requests += job.batch_size > 1
        self._done(job, Done(generation, generation.layer_applications, generation.full_depth_applications,
                             job.batch_size))

    def _done(self, job: Job, event: Event) -> None:
        with self._lock:
            self.unfinished -= 1
        job.sink(event)

    def _fail(self, job: Job, error: Exception, status: int | None = None) -> None:
        self.stats.failures += 1
        if isinstance(error, LoopLMError):
            self._done(job, Failed(str(error), status or 400))
        else:
            message = f"generation failed: {type(error).__name__}: {one_line(error)[:300]}"
            self._done(job, Failed(message, status or 500))
