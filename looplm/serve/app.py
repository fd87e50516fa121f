"""The HTTP side: FastAPI routes that turn OpenAI-style requests into engine jobs (docs/SERVING.md).

The model runs only in the engine's worker thread; a route submits one ``Job`` per prompt and
waits on an ``asyncio.Queue`` that the worker feeds through ``loop.call_soon_threadsafe``, so
the event loop never blocks on the model.  Streaming responses are server-sent events: one
``data: {chunk}`` per token, a final chunk per choice with its finish_reason, ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from looplm.cache import KV_LAYOUTS
from looplm.errors import LoopLMError, is_int
from looplm.exit_policy import ACTExit, FixedSteps, check_depth, parse_exit, refuse_act_over_mixing
from looplm.generate import Sampling, Settings
from looplm.serve.body import BODY_SECONDS, MAX_BODY_BYTES, BoundedBodies
from looplm.serve.engine import Done, Engine, Failed, Job, Overloaded, Token
from looplm.serve.protocol import (
    FINISH_REASONS,
    ChatRequest,
    CompletionRequest,
    Shape,
    error_body,
    usage,
    validation_message,
)

# A client told to come back (503) is told when.
RETRY_AFTER_SECONDS = 1
# A prompt of more characters than this many per context token is refused before it is tokenized.
MAX_CHARACTERS_PER_TOKEN = 64
log = logging.getLogger("looplm.serve")


@dataclass(frozen=True)
class ServerConfig:
    """Server-wide defaults; requests override exit, steps and layout per call."""

    model_name: str = "looplm"
    exit: str = "static"
    steps: int | None = None
    layout: str = "last_exited"
    max_tokens_default: int = 128
    max_prompts: int = 64              # prompts in one request
    max_request_tokens: int = 65536    # prompt tokens + max_tokens for each prompt, summed over a request
    max_body_bytes: int = MAX_BODY_BYTES  # a request body larger than this gets 413
    body_seconds: float = BODY_SECONDS    # one that takes longer to arrive gets 408
    max_steps: int | None = None  # loop steps a request may run a token (None: the default exit's);
                                  # a batch's cache holds K/V for as many

    def __post_init__(self) -> None:
        if self.max_prompts < 1 or self.max_request_tokens < 1 or self.max_body_bytes < 1:
            raise LoopLMError("max_prompts, max_request_tokens and max_body_bytes must be >= 1, got"
                              f" {self.max_prompts}, {self.max_request_tokens}, {self.max_body_bytes}")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise LoopLMError(f"max_steps must be an int >= 1 (None: the default exit's steps), got {self.max_steps!r}")
        if not self.body_seconds > 0:
            raise LoopLMError(f"body_seconds must be > 0, got {self.body_seconds}")


def _shortened(message: str, most: int = 500) -> str:
    """An error message as sent back: a request's long value is not echoed whole."""
    return message if len(message) <= most else message[:most] + "…"


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: a message may quote a request's text, and a lone surrogate in it
    (a JSON escape such as \\ud800) cannot be encoded as UTF-8."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class CatchAll:
    """Any exception a route raises becomes one logged line and a 500 JSON error (Starlette's own
    handler for ``Exception`` answers and then re-raises, so uvicorn logged every error twice)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as error:  # noqa: BLE001 - one JSON line for the client, never a traceback
            log.exception("request failed")
            if not started:  # else the response is under way: the connection closes
                await ErrorResponse(error_body(f"internal error: {type(error).__name__}", "server_error"),
                                    status_code=500)(scope, receive, send)


def check_generation_options(model, exit: str | dict, steps: int | None, layout: str, min_steps: int | None = None):
    """The exit policy an (exit, steps, layout) choice names (``exit``: the string or JSON form of
    ``looplm.exit_policy.parse_exit``), or a LoopLMError saying what is wrong; model None checks
    only what needs no model (the CLI, before loading one)."""
    if layout not in KV_LAYOUTS:
        raise LoopLMError(f"unknown layout {layout!r}: use one of {', '.join(KV_LAYOUTS)}")
    policy = parse_exit(exit, steps, min_steps)
    if model is None:
        return policy
    check_depth(policy, model.config.loop_steps)
    if policy.needs_gate and model.exit_gate is None:
        raise LoopLMError(f"exit {exit!r} needs a model with an exit gate: use static, hidden:<eps> or kl:<eps>")
    if isinstance(policy, ACTExit):
        refuse_act_over_mixing(model)
    return policy


def create_app(model, tokenizer, config: ServerConfig = ServerConfig(), engine: Engine | None = None) -> FastAPI:
    """The FastAPI application serving ``model``; it starts and stops ``engine`` (default: a new
    ``Engine(model, tokenizer)``) with the server."""
    engine = engine or Engine(model, tokenizer)
    context, trained = model.config.max_seq_len, model.config.loop_steps
    default_depth = check_generation_options(model, config.exit, config.steps, config.layout).max_steps(trained)
    max_steps = config.max_steps or default_depth
    # a model whose loop attends to step-1 K/V keeps them one way only (KVCache): that is its layout
    default_layout = "append_first" if model.config.kv_append_first else config.layout
    if max_steps < default_depth:
        raise LoopLMError(f"max_steps ({max_steps}) is below the default exit's {default_depth} loop steps: raise it")
    check_depth(FixedSteps(max_steps), trained)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="looplm", lifespan=lifespan)
    app.add_middleware(BoundedBodies, max_bytes=config.max_body_bytes, seconds=config.body_seconds)
    app.add_middleware(CatchAll)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        message = validation_message(error.errors(), request.headers.get("content-type"))
        return ErrorResponse(error_body(message), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = str(error.detail)
        if message == "There was an error parsing the body":  # FastAPI's, for bytes it could not read as JSON
            message = ("the request body could not be read as JSON: send UTF-8 JSON text, not compressed, not"
                       " nested deeper than a few hundred levels, with no integer of thousands of digits")
        return ErrorResponse(error_body(message), status_code=error.status_code)

    @app.exception_handler(LoopLMError)
    async def user_error(request: Request, error: LoopLMError):
        return ErrorResponse(error_body(_shortened(str(error))), status_code=400)

    def prepare(request: CompletionRequest | ChatRequest) -> tuple[list[list[int]], int, Settings]:
        if (reason := request.unsupported()) is not None:
            raise LoopLMError(reason)
        steps = request.steps
        if steps is None and not (isinstance(request.exit, dict) and "steps" in request.exit):
            steps = config.steps  # the server's default, unless the request's exit gives its own
        layout = request.layout or default_layout
        if model.config.kv_append_first and layout != "append_first":
            raise LoopLMError(f"this model's loop attends to step-1 K/V (model.kv_append_first), so its KV layout is"
                              f" append_first, not {layout}: leave layout out")
        policy = check_generation_options(model, request.exit or config.exit, steps, layout, request.min_steps)
        if (depth := policy.max_steps(trained)) > max_steps:
            raise LoopLMError(f"this server runs at most {max_steps} loop steps a token, got steps {depth}: lower"
                              " steps (looplm serve --max-steps raises the limit)")
        sampling = Sampling(request.temperature, request.top_k, request.top_p, request.seed)
        texts = request.prompts()
        if len(texts) > min(config.max_prompts, engine.max_queue):
            raise LoopLMError(f"the request has {len(texts)} prompts; this server takes at most"
                              f" {min(config.max_prompts, engine.max_queue)} per request: split it")
        prompts = []
        for index, text in enumerate(texts):
            if len(text) > MAX_CHARACTERS_PER_TOKEN * context:  # far longer than the context: not tokenized
                raise LoopLMError(f"prompt {index} has {len(text):,} characters, far more than the model's context"
                                  f" of {context} tokens holds: shorten it")
            ids = tokenizer.encode_prompt(text)
            if not ids:
                raise LoopLMError(f"prompt {index} encodes to no tokens (this tokenizer adds no start token):"
                                  " send some text")
            if len(ids) > context:
                raise LoopLMError(f"prompt {index} has {len(ids)} tokens, longer than the model's context of"
                                  f" {context}: shorten it")
            prompts.append(ids)
        limit = request.max_tokens
        if limit is None and isinstance(request, ChatRequest):
            limit = request.max_completion_tokens
        limit = config.max_tokens_default if limit is None else limit
        total = sum(len(ids) + min(limit, context - len(ids)) for ids in prompts)
        if total > config.max_request_tokens:
            raise LoopLMError(f"the request asks for {total} tokens (prompts plus max_tokens each);"
                              f" this server takes at most {config.max_request_tokens} per request:"
                              " lower max_tokens or split it")
        return prompts, limit, Settings(policy, layout, sampling, request.stop_strings())

    async def complete(request: CompletionRequest | ChatRequest, chat: bool, connection: Request):
        prompts, limit, settings = prepare(request)
        shape = Shape(chat, config.model_name)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt, limit, settings, partial(_deliver, loop, events, index))
                for index, prompt in enumerate(prompts)]
        try:
            engine.submit(*jobs)
        except Overloaded as error:
            return ErrorResponse(error_body(str(error), "server_error"), status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        if request.stream:
            return StreamingResponse(_stream(shape, jobs, events, settings, request.include_usage),
                                     media_type="text/event-stream")
        finished: dict[int, Done | Failed] = {}
        gone = asyncio.ensure_future(_disconnect(connection))
        try:
            while len(finished) < len(jobs):
                arrival = asyncio.ensure_future(events.get())
                await asyncio.wait({arrival, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not arrival.done():  # nobody will read the answer: free the rows at once
                    arrival.cancel()
                    for job in jobs:
                        job.cancelled = True
                    return ErrorResponse(error_body("the client closed the connection"), status_code=499)
                index, event = arrival.result()
                if not isinstance(event, Token):
                    finished[index] = event
        finally:
            gone.cancel()
        failures = [event for event in finished.values() if isinstance(event, Failed)]
        if failures:
            kind = "invalid_request_error" if failures[0].status == 400 else "server_error"
            return ErrorResponse(error_body(failures[0].message, kind), status_code=failures[0].status)
        results = [finished[index] for index in range(len(jobs))]
        choices = [shape.choice(index, done.generation.text, FINISH_REASONS[done.generation.stop_reason])
                   for index, done in enumerate(results)]
        return shape.response(choices, _usage(results), _summary(results, settings, model.config))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, connection: Request):
        return await complete(request, False, connection)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, connection: Request):
        return await complete(request, True, connection)

    @app.get("/v1/models")
    async def models():
        model_config = model.config
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": int(time.time()), "owned_by": "looplm",
            "looplm": {"loop_steps": model_config.loop_steps, "max_seq_len": context,
                       "exit_gate": model.exit_gate is not None,
                       "default_exit": config.exit, "default_layout": default_layout, "max_steps": max_steps}}]}

    @app.get("/v1/looplm/stats")
    async def stats():
        prefix = engine.prefix_cache.stats
        return {**engine.stats.as_dict(), "prefix_cache": {"requests": prefix.requests, "hits": prefix.hits,
                                                           "reused_tokens": prefix.reused_tokens,
                                                           "computed_tokens": prefix.computed_tokens}}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped", "model": config.model_name}, status_code=503)
        return {"status": "ok", "model": config.model_name, "stats": await stats()}

    return app


async def _disconnect(connection: Request) -> None:
    """Return when the client of a request whose body was read closes its connection."""
    while (await connection.receive())["type"] != "http.disconnect":
        pass


def _deliver(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, event) -> None:
    """Called in the worker thread: hand ``event`` to the request's queue on the event loop."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, (index, event))
    except RuntimeError:  # the event loop has closed (server shutting down)
        pass


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _stream(shape: Shape, jobs: list[Job], events: asyncio.Queue, settings: Settings, include_usage: bool):
    """Server-sent events for a streaming request: token chunks, a final chunk per choice, [DONE]."""
    streamed = [""] * len(jobs)
    finished: dict[int, Done | Failed] = {}
    try:
        if shape.chat:
            for index in range(len(jobs)):
                yield _sse(shape.chunk(index, "", first=True))
        while len(finished) < len(jobs):
            index, event = await events.get()
            if isinstance(event, Token):
                streamed[index] += event.text
                yield _sse(shape.chunk(index, event.text, looplm={"token": event.id, "steps": event.steps}))
            elif isinstance(event, Failed):
                finished[index] = event
                message = f"prompt {index}: {event.message}" if len(jobs) > 1 else event.message
                yield _sse(error_body(message, "server_error" if event.status >= 500 else "invalid_request_error"))
            else:
                finished[index] = event
                text = event.generation.text
                rest = text[len(streamed[index]):] if text.startswith(streamed[index]) else ""
                yield _sse(shape.chunk(index, rest, FINISH_REASONS[event.generation.stop_reason],
                                       looplm=_choice_summary(index, event)))
        done = [event for event in finished.values() if isinstance(event, Done)]
        if include_usage and done:
            yield _sse(shape.usage_chunk(_usage(done)))
        yield _sse("[DONE]")
    finally:
        for job in jobs:
            job.cancelled = True


def _usage(results: list[Done]) -> dict:
    return usage(sum(done.generation.prompt_tokens for done in results),
                 sum(len(done.generation.ids) for done in results))


def _choice_summary(index: int, done: Done) -> dict:
    generation = done.generation
    return {"index": index, "steps": generation.steps, "mean_steps": generation.mean_steps,
            "layer_applications": done.layer_applications,
            "full_depth_layer_applications": done.full_depth_applications, "batch_size": done.batch_size}


def _summary(results: list[Done], settings: Settings, model_config) -> dict:
    """The response's ``looplm`` field: per-choice loop steps and compute, and the settings used."""
    tokens = sum(len(done.generation.steps) for done in results)
    return {"exit": settings.exit_policy.spec(), "max_steps": settings.exit_policy.max_steps(model_config.loop_steps),
            "layout": settings.layout,
            "mean_steps": sum(sum(done.generation.steps) for done in results) / tokens if tokens else 0.0,
            "layer_applications": sum(done.layer_applications for done in results),
            "full_depth_layer_applications": sum(done.full_depth_applications for done in results),
            "choices": [_choice_summary(index, done) for index, done in enumerate(results)]}

