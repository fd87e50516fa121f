"""Request bodies and response shapes of the OpenAI-compatible API (docs/SERVING.md).

Requests are pydantic models in strict mode ("5" is not a number, true is not an integer).
Unknown fields are refused, as OpenAI's API refuses them (a misspelled ``exit_policy`` or another
server's ``min_p`` would otherwise be dropped without a word); OpenAI's fields that change nothing
here (``HARMLESS``: user, metadata, ...) are accepted.  Fields OpenAI defines that would change the
output and that looplm does not honour (``UNSUPPORTED``: logprobs, penalties, logit_bias,
response_format, tools, ...) are refused when set to anything that asks for something.

Chat messages become one prompt (looplm tokenizers carry no chat template)::

    system: You are terse.\\n
    user: Hi\\n
    assistant:

and a chat completion also stops at ``CHAT_STOP`` (the model starting the next user turn).
"""

from __future__ import annotations

import difflib
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from looplm.errors import LoopLMError, is_int

CHAT_STOP = "\nuser:"
MAX_STOP_STRINGS = 16          # stop strings a request may give (OpenAI: 4), each checked after every token
MAX_STOP_CHARACTERS = 256      # characters of each
MAX_SPEC_CHARACTERS = 200      # of an exit or layout string (they name a policy or a layout)


def _is_zero(value) -> bool:
    return type(value) in (int, float) and value == 0


# field → whether a value asks for nothing (None always does): False, 0, 1 (best_of), "" or an
# empty list or object, text output, no tool call.
UNSUPPORTED = {
    "logprobs": lambda value: value is False or _is_zero(value),
    "top_logprobs": _is_zero,
    "echo": lambda value: value is False,
    "best_of": lambda value: type(value) is int and value == 1,
    "suffix": lambda value: value == "",
    "presence_penalty": _is_zero,
    "frequency_penalty": _is_zero,
    "logit_bias": lambda value: value == {},
    "response_format": lambda value: value == {"type": "text"},
    "tools": lambda value: value == [],
    "tool_choice": lambda value: value == "none",
    "functions": lambda value: value == [],
    "function_call": lambda value: value == "none",
    "prediction": lambda value: False,
    "modalities": lambda value: value == ["text"],
    "audio": lambda value: False,
    "reasoning_effort": lambda value: False,
    "verbosity": lambda value: False,
    "web_search_options": lambda value: False,
}
# OpenAI's fields that change no output: accepted and not used.
HARMLESS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
            "parallel_tool_calls")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    seed: int | None = None
    # looplm extensions
    top_k: int = Field(0, ge=0)
    exit: Annotated[str, Field(min_length=1, max_length=MAX_SPEC_CHARACTERS)] | dict | None = None
    steps: int | None = Field(None, ge=1)
    min_steps: int | None = Field(None, ge=1)
    layout: str | None = Field(None, min_length=1, max_length=MAX_SPEC_CHARACTERS)
    # OpenAI fields that would change the output and that looplm does not implement: refused unless
    # left at a value that asks for nothing (``UNSUPPORTED``), never silently ignored
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = False
    best_of: Any = None
    suffix: Any = None
    presence_penalty: Any = 0
    frequency_penalty: Any = 0
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    modalities: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    # OpenAI fields that change no output (``HARMLESS``)
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    parallel_tool_calls: Any = None

    def unsupported(self) -> str | None:
        """Why this request asks for something the server does not do, or None."""
        if self.n != 1:
            return f"n must be 1 (looplm returns one choice per prompt), got {self.n}"
        for name, asks_nothing in UNSUPPORTED.items():
            value = getattr(self, name)
            if not (value is None or asks_nothing(value)):
                return f"{name} is not supported by looplm (got {_short(value)}): leave it out"
        return None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(len(stop) > MAX_STOP_CHARACTERS for stop in stops):
            raise LoopLMError(f"each stop string may have at most {MAX_STOP_CHARACTERS} characters")
        return tuple(stop for stop in stops if stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: str = Field(min_length=1)
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)

    def unsupported(self) -> str | None:
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            return (f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) differ:"
                    " give one of them")
        return super().unsupported()

    def prompts(self) -> list[str]:
        return [chat_prompt(self.messages)]

    def stop_strings(self) -> tuple[str, ...]:
        return (*super().stop_strings(), CHAT_STOP)


def chat_prompt(messages: list[Message]) -> str:
    """"role: content" lines, then "assistant:" for the model to continue."""
    return "".join(f"{message.role}: {message.content}\n" for message in messages) + "assistant:"


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def validation_message(errors: list[dict], content_type: str | None = "application/json") -> str:
    """One line from pydantic's errors: the first error's field path and message.  A body that is
    not a JSON object as a whole (``content_type``: the request's, where it was not JSON the body
    was never parsed as JSON) says what to send."""
    error = errors[0]
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if tuple(error.get("loc", ())) == ("body",):
        media = (content_type or "").split(";")[0].strip().lower()
        if media != "application/json":
            return (f"the request body must be a JSON object sent with Content-Type: application/json (got"
                    f" {media or 'no Content-Type'})")
        if error.get("type") == "missing":
            return "the request body is empty: send a JSON object of the request's fields"
        return "the request body must be a JSON object of the request's fields"
    fields = list(dict.fromkeys(_field(error)[:1] for error in errors))  # the request's fields at fault
    field = [error for error in errors if _field(error)[:1] == fields[0]]
    if error.get("type") == "extra_forbidden":
        path = list(_field(error))
        return (f"{'.'.join(path)} is not a field looplm knows{_close_field(path)}: leave it out"
                " (docs/SERVING.md lists them)")
    if fields[0] == ("prompt",) and any(is_int(error.get("input")) for error in field):
        return "prompt: looplm takes text prompts (a string or a list of strings), not token ids: send the text"
    error = _member_error(field)
    where = ".".join(_field(error))
    extra = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    return (f"{where}: {error['msg']}" if where else f"request body: {error['msg']}") + extra


def _field(error: dict) -> tuple[str, ...]:
    return tuple(str(part) for part in error.get("loc", ()) if part != "body" and not _is_type_tag(part))


def _member_error(errors: list[dict]) -> dict:
    """Of one field's errors against each member of a union, one from the member of the value's own
    type (an empty string prompt: the string's error, not the list's)."""
    kind = type(errors[0].get("input")).__name__
    for error in errors:
        tags = [part for part in error.get("loc", ()) if _is_type_tag(part)]
        tag = tags[0].removeprefix("constrained-") if tags else ""
        if tag == kind or tag.startswith(kind + "["):
            return error
    return errors[0]


# other names of looplm's request fields (other tools', or the CLI's)
FIELD_ALIASES = {"exit_policy": "exit", "policy": "exit", "kv_layout": "layout", "max_steps": "steps",
                 "loop_steps": "steps", "num_steps": "steps", "max_new_tokens": "max_tokens"}


def _close_field(path: list[str]) -> str:
    """", did you mean X?" for another name or a misspelling of a request field, else ""."""
    if len(path) != 1:
        return ""
    known = sorted({*CompletionRequest.model_fields, *ChatRequest.model_fields} - {*UNSUPPORTED, *HARMLESS})
    close = [FIELD_ALIASES[path[0]]] if path[0] in FIELD_ALIASES else difflib.get_close_matches(path[0], known, 1, 0.85)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_type_tag(part) -> bool:
    """pydantic names the union member in an error's location (``prompt.str``, ``stop.list[str]``)."""
    return isinstance(part, str) and (part.removeprefix("constrained-") in ("str", "int", "float", "bool", "dict")
                                      or "[" in part)


class Shape:
    """Builds the response objects of one endpoint: text completions or chat completions."""

    def __init__(self, chat: bool, model_name: str):
        self.chat, self.model_name = chat, model_name
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def choice(self, index: int, text: str, finish_reason: str) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def response(self, choices: list[dict], usage: dict, looplm: dict) -> dict:
        return {**self._envelope(False), "choices": choices, "usage": usage, "looplm": looplm}

    def chunk(self, index: int, text: str, finish_reason: str | None = None, first: bool = False,
              looplm: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._envelope(True), "choices": [choice]}
        if looplm is not None:
            body["looplm"] = looplm
        return body

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope(True), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length", "context": "length"}
