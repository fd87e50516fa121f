"""The OpenAI-compatible server (issue #5) through a real HTTP client on 127.0.0.1: completions and
chat equal ``looplm.generate``; streams concatenate to the same text; concurrent requests decode
in one batch; bad requests get 400 and the server keeps serving; a failing generation fails only
its own request."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch

from looplm.batch import generate_batch
from looplm.cli import main
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.exit_policy import ACTExit, FixedSteps, KLExit, QExit
from looplm.generate import Sampling, generate
from looplm.model import LoopLM
from looplm.serve import engine as engine_module
from looplm.serve.app import ServerConfig
from looplm.serve.engine import Engine, Job, Settings, Token
from looplm.serve.protocol import CHAT_STOP, Message, chat_prompt

from conftest import serving, tiny_config

TOKENIZER = byte_tokenizer()
CONTEXT = 64


def _model(**overrides) -> LoopLM:
    torch.manual_seed(3)
    model = LoopLM(tiny_config(vocab_size=TOKENIZER.vocab_size, max_seq_len=CONTEXT, **overrides))
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    model.exit_gate.bias.data.fill_(-0.5)  # exits spread over the steps
    return model.eval()


@pytest.fixture(scope="module")
def server():
    """A uvicorn server in a background thread on a free port; yields (client, engine, model)."""
    model = _model()
    engine = Engine(model, TOKENIZER, max_batch=8, batch_wait_ms=5)
    with serving(engine, ServerConfig(model_name="tiny")) as (client, _):
        yield client, engine, model


def _expected(model, text, max_tokens, policy=None, stop=()):
    ids = [TOKENIZER.bos_id] + TOKENIZER.encode(text)
    return generate(model, ids, max_tokens, Sampling(), policy or FixedSteps(), TOKENIZER, stop)


def _events(response) -> list:
    """The SSE stream's data payloads (JSON decoded, '[DONE]' kept as a string)."""
    payloads = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in response.text.split("\n\n") if line)
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


def test_completion_equals_generate(server):
    client, _, model = server
    response = client.post("/v1/completions", json={"prompt": "hello loops", "max_tokens": 9, "temperature": 0,
                                                    "exit": "q:0.5"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = _expected(model, "hello loops", 9, QExit(0.5))
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert choice["text"] == expected.text and choice["index"] == 0
    assert choice["finish_reason"] == ("length" if expected.stop_reason == "length" else "stop")
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": len(expected.ids),
                             "total_tokens": 12 + len(expected.ids)}
    looplm = body["looplm"]
    assert looplm["choices"][0]["steps"] == expected.steps
    assert looplm["mean_steps"] == pytest.approx(expected.mean_steps)
    assert looplm["exit"] == "q:0.5" and looplm["max_steps"] == 3
    assert 0 < looplm["layer_applications"] <= looplm["full_depth_layer_applications"]


def test_chat_completion_uses_the_documented_template(server):
    client, _, model = server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 7, "temperature": 0,
                                                         "steps": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    prompt = chat_prompt([Message(**message) for message in messages])
    assert prompt == "system: be brief\nuser: hi\nassistant:"
    expected = _expected(model, prompt, 7, FixedSteps(2), (CHAT_STOP,))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["looplm"]["choices"][0]["steps"] == [2] * len(expected.ids)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_concatenates_to_the_plain_response(server, chat):
    client, _, _ = server
    path, body = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "stream me"}]}) if chat
                  else ("/v1/completions", {"prompt": "stream me"}))
    body.update(max_tokens=10, temperature=0, exit="hidden:0.05")
    plain = client.post(path, json=body).json()
    streamed = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed)
    assert events[-1] == "[DONE]"
    chunks = [event for event in events[:-1] if event["choices"]]
    key = (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"])
    assert "".join(key(chunk["choices"][0]) for chunk in chunks) == (
        plain["choices"][0]["message"]["content"] if chat else plain["choices"][0]["text"])
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert [chunk["looplm"]["steps"] for chunk in chunks if "token" in chunk.get("looplm", {})] == \
        plain["looplm"]["choices"][0]["steps"]
    assert events[-2]["usage"] == plain["usage"]  # include_usage: a last chunk with no choices


def test_a_stream_never_sends_the_start_of_a_stop_string(server):
    """A stop string that spans tokens: the stream holds back its first characters until it
    completes (then they are cut), so the pieces concatenate to the plain response's text."""
    client, _, _ = server
    body = {"prompt": "a", "max_tokens": 24, "temperature": 0}  # its text ends in a run of "o"
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    spans = [index for index in range(1, len(free) - 1) if "\ufffd" not in free[index:index + 2]
             and free.find(free[index:index + 2]) == index]
    assert spans, free
    body["stop"] = free[spans[0]:spans[0] + 2]
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    assert plain["text"] == free[:spans[0]] and plain["finish_reason"] == "stop"
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(event["choices"][0]["text"] for event in events[:-1]) == plain["text"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_tokens(server):
    client, engine, model = server
    prompts = ["a", "the loop", "depth is time", "x y z", "recurrent", "six"]
    limits = [4, 9, 6, 9, 2, 7]  # a batch decodes to its largest limit; each request keeps its own
    before = engine.stats.as_dict()
    engine.batch_wait, engine.max_batch = 30.0, 6  # the batch closes once all six have arrived

    def send(index):
        body = {"prompt": prompts[index], "max_tokens": limits[index], "temperature": 0, "exit": "q:0.6",
                "stream": index % 3 == 0}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        if body["stream"]:
            return "".join(event["choices"][0]["text"] for event in _events(response)[:-1])
        return response.json()["choices"][0]["text"]

    try:
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(send, range(6)))
    finally:
        engine.batch_wait, engine.max_batch = 0.005, 8
    after = engine.stats.as_dict()
    assert texts == [_expected(model, prompt, limit, QExit(0.6)).text for prompt, limit in zip(prompts, limits)]
    assert after["batches"] - before["batches"] == 1 and after["largest_batch"] == 6
    assert after["batched_requests"] - before["batched_requests"] == 6
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["stats"]["mean_batch_size"] > 1


def test_requests_with_different_settings_share_one_batch(server):
    """Exit policies (string and JSON form), steps, min_steps, temperatures, top-k and seeds,
    stop strings: five concurrent requests decode as one batch, each row with its own settings,
    and each gets exactly its per-prompt generation (a seeded row draws from its own generator)."""
    from looplm.exit_policy import parse_exit

    client, engine, model = server
    bodies = [{"prompt": "mixed one", "max_tokens": 6, "temperature": 0, "exit": "q:0.5"},
              {"prompt": "mixed two", "max_tokens": 8, "temperature": 0, "exit": "hidden:0.05", "steps": 2},
              {"prompt": "three", "max_tokens": 5, "temperature": 0.8, "seed": 7, "exit": "act"},
              {"prompt": "four", "max_tokens": 7, "temperature": 0, "exit": {"name": "kl", "epsilon": 0.01},
               "stop": ["e"]},
              {"prompt": "five", "max_tokens": 6, "temperature": 1.0, "top_k": 8, "seed": 3, "exit": "q:0.3",
               "min_steps": 2}]
    before = engine.stats.as_dict()
    engine.batch_wait, engine.max_batch = 30.0, 5  # the batch closes once all five have arrived
    try:
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda body: client.post("/v1/completions", json=body).json(), bodies))
    finally:
        engine.batch_wait, engine.max_batch = 0.005, 8
    after = engine.stats.as_dict()
    assert after["batches"] - before["batches"] == 1 and after["largest_batch"] >= 5
    for body, answer in zip(bodies, answers):
        policy = parse_exit(body["exit"], body.get("steps"), body.get("min_steps"))
        sampling = Sampling(body["temperature"], body.get("top_k", 0), 1.0, body.get("seed"))
        expected = generate(model, [TOKENIZER.bos_id] + TOKENIZER.encode(body["prompt"]), body["max_tokens"],
                            sampling, policy, TOKENIZER, body.get("stop", ()))
        assert answer["choices"][0]["text"] == expected.text, body
        assert answer["looplm"]["choices"][0]["steps"] == expected.steps and answer["looplm"]["exit"] == policy.spec()


def test_prompt_list_gives_one_choice_per_prompt(server):
    client, _, model = server
    body = client.post("/v1/completions", json={"prompt": ["one", "two two"], "max_tokens": 5, "temperature": 0,
                                                "exit": "kl:0.01", "layout": "last"}).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    for text, choice in zip(["one", "two two"], body["choices"]):
        ids = [TOKENIZER.bos_id] + TOKENIZER.encode(text)
        assert choice["text"] == generate(model, ids, 5, exit_policy=KLExit(0.01), tokenizer=TOKENIZER,
                                          layout="last").text


def test_act_decodes_one_by_one_and_reuses_prompt_prefixes(server):
    client, engine, model = server
    stats, texts, reused = engine.prefix_cache.stats, [], []
    for _ in range(2):
        before = stats.reused_tokens
        texts.append(client.post("/v1/completions", json={"prompt": "act now", "max_tokens": 6, "temperature": 0,
                                                          "exit": "act"}).json()["choices"][0]["text"])
        reused.append(stats.reused_tokens - before)
    assert texts == [_expected(model, "act now", 6, ACTExit()).text] * 2
    assert reused[1] == len("act now") + 1  # the repeated prompt (with bos) is restored, not recomputed


def test_act_requests_together_decode_as_one_batch(server):
    client, engine, model = server
    before = engine.stats.as_dict()
    body = client.post("/v1/completions", json={"prompt": ["act one", "act two two"], "max_tokens": 6,
                                                "temperature": 0, "exit": "act"}).json()
    after = engine.stats.as_dict()
    assert [choice["text"] for choice in body["choices"]] == [
        _expected(model, text, 6, ACTExit()).text for text in ("act one", "act two two")]
    assert after["batches"] - before["batches"] == 1
    assert after["batched_requests"] - before["batched_requests"] == 2


LONG_PROMPT = "x" * CONTEXT  # + bos = context + 1 tokens
BAD_REQUESTS = {
    "not json": "{prompt: hello",
    "json array": [1, 2],
    "missing prompt": {"max_tokens": 3},
    "prompt is a number": {"prompt": 7},
    "prompt list of numbers": {"prompt": [1, 2]},
    "max_tokens string": {"prompt": "a", "max_tokens": "5"},
    "negative max_tokens": {"prompt": "a", "max_tokens": -1},
    "negative temperature": {"prompt": "a", "temperature": -0.5},
    "top_p zero": {"prompt": "a", "top_p": 0},
    "top_p above one": {"prompt": "a", "top_p": 1.5},
    "unknown exit": {"prompt": "a", "exit": "sometimes"},
    "exit without number": {"prompt": "a", "exit": "q:"},
    "unknown layout": {"prompt": "a", "layout": "diagonal"},
    "zero steps": {"prompt": "a", "steps": 0},
    "too many steps": {"prompt": "a", "steps": 1000},
    "min_steps with fixed steps": {"prompt": "a", "exit": "static", "min_steps": 2},
    "n = 2": {"prompt": "a", "n": 2},
    "logprobs": {"prompt": "a", "logprobs": 3},
    "logprobs true": {"prompt": "a", "logprobs": True},
    "penalty": {"prompt": "a", "presence_penalty": 0.5},
    "logit_bias": {"prompt": "a", "logit_bias": {"50": -100}},
    "json output": {"prompt": "a", "response_format": {"type": "json_object"}},
    "tools": {"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]},
    "tool_choice": {"prompt": "a", "tool_choice": "required"},
    "suffix": {"prompt": "a", "suffix": "end"},
    "echo": {"prompt": "a", "echo": True},
    "over-long prompt": {"prompt": LONG_PROMPT},
    "stop is a number": {"prompt": "a", "stop": 3},
    "another server's sampling field": {"prompt": "a", "min_p": 0.1},
    "a misspelled looplm field": {"prompt": "a", "exit_policy": "q:0.5"},
    "steps in the exit and beside it": {"prompt": "a", "exit": {"name": "static", "steps": 2}, "steps": 3},
    "a JSON exit without its threshold": {"prompt": "a", "exit": {"name": "q"}},
    "audio output": {"prompt": "a", "modalities": ["text", "audio"]},
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body):
    client, _, _ = server
    if isinstance(body, str):
        response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and "\n" not in error["message"]
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_openai_fields_that_ask_for_nothing_are_accepted(server):
    """Clients send OpenAI's optional fields at their neutral values; those are not refused, and the
    output is the plain request's."""
    client, _, _ = server
    plain = {"prompt": "ab", "max_tokens": 3, "temperature": 0}
    neutral = {**plain, "logprobs": None, "top_logprobs": 0, "echo": False, "best_of": 1, "suffix": "",
               "presence_penalty": 0.0, "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"},
               "tools": [], "tool_choice": "none", "functions": None, "user": "someone", "metadata": {"k": "v"}}
    expected = client.post("/v1/completions", json=plain).json()["choices"][0]["text"]
    response = client.post("/v1/completions", json=neutral)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected
    from looplm.serve.protocol import HARMLESS, UNSUPPORTED, ChatRequest, CompletionRequest

    for request in (CompletionRequest, ChatRequest):  # each named OpenAI field is one the requests declare
        assert {*UNSUPPORTED, *HARMLESS} <= set(request.model_fields)
    refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                        "logit_bias": {"7": 5}})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "logit_bias is not supported by looplm (got {'7': 5}): leave it out"


def test_unknown_and_conflicting_fields_say_what_to_send(server):
    """A field looplm does not know is refused (it would change nothing, silently), naming the field
    it was probably meant as; settings given twice, differently, are refused."""
    client, _, _ = server

    def message(path, body):
        response = client.post(path, json=body)
        assert response.status_code == 400, response.text
        return response.json()["error"]["message"]

    assert message("/v1/completions", {"prompt": "a", "kv_layout": "full"}) == (
        "kv_layout is not a field looplm knows (did you mean layout?): leave it out (docs/SERVING.md lists them)")
    assert "repetition_penalty is not a field" in message("/v1/completions", {"prompt": "a", "repetition_penalty": 1.1})
    assert "max_completion_tokens is not a field" in message("/v1/completions",
                                                            {"prompt": "a", "max_completion_tokens": 3})
    chat = {"messages": [{"role": "user", "content": "a"}]}
    assert "messages.0.name is not a field" in message("/v1/chat/completions",
                                                      {"messages": [{"role": "user", "content": "a", "name": "x"}]})
    assert "give one of them" in message("/v1/chat/completions", {**chat, "max_tokens": 2, "max_completion_tokens": 5})
    assert client.post("/v1/chat/completions", json={**chat, "max_tokens": 2, "max_completion_tokens": 2}).status_code \
        == 200
    assert "given twice" in message("/v1/completions", {"prompt": "a", "exit": {"name": "q", "threshold": 0.5,
                                                                                "min_steps": 3, "steps": 3},
                                                        "min_steps": 1})
    assert "needs its threshold" in message("/v1/completions", {"prompt": "a", "exit": {"name": "q",
                                                                                         "threshold": None}})
    same = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "exit": {"name": "static", "steps": 2},
                                                "steps": 2})
    assert same.status_code == 200 and same.json()["looplm"]["max_steps"] == 2


def test_a_wrong_value_is_named_in_its_own_terms(server):
    """The message speaks of what was sent: a string's characters, a list's items, token ids as
    such, a top_p too small to keep a token, bytes that are not JSON text."""
    client, _, _ = server
    cases = {"prompt: String should have at least 1 character": {"prompt": ""},
             "exit: String should have at most 200 characters": {"prompt": "a", "exit": "x" * 201},
             "stop: List should have at most 16 items": {"prompt": "a", "stop": ["a"] * 17},
             "not token ids": {"prompt": [1, 2, 3]},
             "top_p must be at least": {"prompt": "a", "top_p": 5e-324}}
    for expected, body in cases.items():
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400 and expected in response.json()["error"]["message"], response.text
    raw = client.post("/v1/completions", content=b'{"prompt": "\xff"}', headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "could not be read as JSON" in raw.json()["error"]["message"]


def test_a_body_that_is_not_a_json_object_says_what_to_send(server):
    client, _, _ = server
    body = b'{"prompt": "a", "max_tokens": 2}'
    for content_type, expected in (("text/plain", "sent with Content-Type: application/json (got text/plain)"),
                                   (None, "(got no Content-Type)")):
        response = client.post("/v1/completions", content=body,
                               headers={"content-type": content_type} if content_type else {})
        assert response.status_code == 400 and expected in response.json()["error"]["message"]
    for raw, expected in ((b"", "the request body is empty"), (b"[1, 2]", "must be a JSON object")):
        response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and expected in response.json()["error"]["message"]
    fine = client.post("/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert fine.status_code == 200


def test_bad_chat_requests_and_unknown_routes(server):
    client, _, _ = server
    for body in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": "hi"}):
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/v1/completions", json={"prompt": LONG_PROMPT}).json()["error"]["message"] == (
        f"prompt 0 has {CONTEXT + 1} tokens, longer than the model's context of {CONTEXT}: shorten it")
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["looplm"]["loop_steps"] == 3


def test_a_failing_generation_fails_only_its_own_request(server, monkeypatch):
    client, engine, model = server
    marker = TOKENIZER.encode("BOOM")

    def breaks_on_marker(function):
        def wrapped(first, prompts, *args, **kwargs):
            rows = prompts if isinstance(prompts[0], list) else [prompts]
            if any(row[1:5] == marker for row in rows):
                raise RuntimeError("injected failure")
            return function(first, prompts, *args, **kwargs)
        return wrapped

    class BreakingSession(engine_module.BatchSession):
        admit = breaks_on_marker(engine_module.BatchSession.admit)

    monkeypatch.setattr(engine_module, "BatchSession", BreakingSession)
    failures = engine.stats.failures
    engine.batch_wait, engine.max_batch = 30.0, 2  # both requests land in one batch, which fails
    try:
        with ThreadPoolExecutor(2) as pool:
            bad, good = pool.map(lambda prompt: client.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 5, "temperature": 0}), ["BOOM", "fine"])
    finally:
        engine.batch_wait, engine.max_batch = 0.005, 8
    assert bad.status_code == 500 and "injected failure" in bad.json()["error"]["message"]
    assert good.status_code == 200
    assert good.json()["choices"][0]["text"] == _expected(model, "fine", 5).text
    assert engine.stats.failures == failures + 1
    assert client.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200


def layer_applications(config, settings: Settings, decision_steps) -> tuple[int, int]:
    """(run, full depth) core + coda layer applications of one generation's decoded tokens, from
    its decision steps alone: the first decision comes from the prompt's prefill (not counted);
    every later one is a decoded token that ran ``steps`` loop steps (all of them under the
    ``full`` layout and ACT), each applying the core layers, and the coda at every step when the
    policy reads every step (else once)."""
    policy = settings.exit_policy
    deepest = policy.max_steps(config.loop_steps)
    run = full = 0
    for steps in decision_steps[1:]:
        ran = deepest if settings.layout == "full" or policy.runs_every_step else steps
        run += ran * config.n_core_layers + (ran if policy.reads_every_step else 1) * config.n_coda_layers
        full += deepest * (config.n_core_layers + config.n_coda_layers)
    return run, full


@pytest.mark.parametrize("layout", ["last_exited", "full"])
def test_layer_applications_match_the_batched_engine(layout):
    """The one count (each row as it ran: generate_batch, the server, generate) agrees with the
    count from the decision steps alone, and batch-1 generate counts the same per prompt."""
    model = _model(n_coda_layers=1)
    prompts = [[1, 5, 9, 2], [4, 8], [6, 2, 9, 9, 7]]
    for policy in (QExit(0.5), FixedSteps(2), ACTExit(0.6)):
        result = generate_batch(model, prompts, 6, exit_policy=policy, layout=layout)
        counted = [layer_applications(model.config, Settings(policy, layout), generation.decision_steps)
                   for generation in result.generations]
        singles = [generate(model, prompt, 6, exit_policy=policy, layout=layout) for prompt in prompts]
        assert [(one.layer_applications, one.full_depth_applications) for one in singles] == counted
        assert sum(run for run, _ in counted) == result.layer_applications
        assert sum(full for _, full in counted) == result.full_depth_applications
        assert [run for run, _ in counted] == result.per_row_applications  # counted per row as they ran
        assert [full for _, full in counted] == result.per_row_full_applications


def _drained(engine: Engine, finished: threading.Event) -> dict:
    """Run the engine's worker until ``finished`` is set (at most a minute); its stats."""
    engine.start()
    try:
        assert finished.wait(60)
    finally:
        engine.stop()
    return engine.stats.as_dict()


def test_a_request_arriving_mid_batch_joins_the_running_batch():
    """Continuous batching, driven through the engine's queue: two jobs start a batch; when the
    first has streamed 3 tokens a third job is submitted, and it joins the batch that is still
    decoding (no second batch) and gets exactly its per-prompt tokens.  (A step runs greedy rows on
    in C, to their ends while a slot is free: the second job samples, so its tokens come back to
    Python one by one and the batch is still running when the third arrives.)"""
    model = _model()
    engine = Engine(model, TOKENIZER, max_batch=4, batch_wait_ms=50)
    settings, sampled = Settings(QExit(0.6)), Settings(QExit(0.6), sampling=Sampling(temperature=0.8, seed=5))
    done, events = {}, {name: [] for name in ("a", "b", "late")}
    prompts = {"a": "first prompt", "b": "second one", "late": "join"}
    ids = {name: [TOKENIZER.bos_id] + TOKENIZER.encode(text) for name, text in prompts.items()}
    finished = threading.Event()

    def sink(name, event):
        events[name].append(event)
        if name == "a" and len(events["a"]) == 3:
            engine.submit(Job(ids["late"], 5, settings, partial(sink, "late")))
        if not isinstance(event, Token):
            done[name] = event
            if len(done) == 3:
                finished.set()

    engine.submit(Job(ids["a"], 12, settings, partial(sink, "a")))
    engine.submit(Job(ids["b"], 12, sampled, partial(sink, "b")))
    stats = _drained(engine, finished)
    assert stats["batches"] == 1 and stats["joined_running_batch"] == 1 and stats["largest_batch"] >= 2
    for name, limit, chosen in (("a", 12, settings), ("b", 12, sampled), ("late", 5, settings)):
        expected = generate(model, ids[name], limit, chosen.sampling, QExit(0.6), tokenizer=TOKENIZER)
        assert done[name].generation.ids == expected.ids and done[name].generation.steps == expected.steps
        assert done[name].generation.text == expected.text
        assert [event.id for event in events[name] if isinstance(event, Token)] == expected.ids  # streamed
        assert (done[name].layer_applications, done[name].full_depth_applications) == layer_applications(
            model.config, settings, expected.decision_steps)


def test_serve_command_refuses_bad_defaults_in_one_line(tmp_path, capsys):
    _model().save(tmp_path / "ckpt", TOKENIZER)
    assert main(["serve", str(tmp_path / "ckpt"), "--exit", "soon"]) == 2
    assert main(["serve", str(tmp_path / "ckpt"), "--layout", "spiral"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("looplm: error: ") for line in errors)


def test_standby_slots_prefill_waiting_jobs_and_hand_them_rows():
    """An engine with standby slots: ten jobs for two rows and three standby slots, greedy and
    sampled, all through one batch (waiting ones prefilled early and taking rows as jobs end), each
    with exactly its per-prompt tokens and stream; the batch never decodes more than two."""
    model = _model()
    engine = Engine(model, TOKENIZER, max_batch=2, batch_wait_ms=50, standby=3)
    texts = [f"job {index} says" + " more" * (index % 4) for index in range(10)]
    chosen = [Settings(QExit(0.5)) if index % 3 else Settings(FixedSteps(), sampling=Sampling(temperature=0.7,
                                                                                              seed=index))
              for index in range(10)]
    done, streams, finished = {}, {index: [] for index in range(10)}, threading.Event()

    def sink(index, event):
        if isinstance(event, Token):
            streams[index].append(event.id)
            return
        done[index] = event
        if len(done) == 10:
            finished.set()

    for index, text in enumerate(texts):
        engine.submit(Job([TOKENIZER.bos_id] + TOKENIZER.encode(text), 3 + index % 5, chosen[index],
                          partial(sink, index)))
    stats = _drained(engine, finished)
    assert stats["batches"] == 1 and stats["largest_batch"] == 2
    for index, text in enumerate(texts):
        expected = generate(model, [TOKENIZER.bos_id] + TOKENIZER.encode(text), 3 + index % 5,
                            chosen[index].sampling, chosen[index].exit_policy, tokenizer=TOKENIZER)
        assert done[index].generation.ids == expected.ids == streams[index]
        assert done[index].generation.steps == expected.steps


def test_an_engine_refuses_a_negative_standby():
    with pytest.raises(LoopLMError, match="standby must be in"):
        Engine(_model(), TOKENIZER, standby=-1)
