"""No request can stall the server: requests are bounded (400), the queue is bounded (503 with
Retry-After), a non-streaming client that leaves frees its row, shutdown finishes the running
batch and refuses the queue, and prompts of different lengths share one batch."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch

from looplm.batch import BatchSession
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.exit_policy import FixedSteps
from looplm.generate import generate
from looplm.model import LoopLM
from looplm.serve.app import ServerConfig, create_app
from looplm.serve.engine import Done, Engine, Failed, Job, Overloaded, Settings

from conftest import serving, tiny_config

TOKENIZER = byte_tokenizer()


def _model() -> LoopLM:
    torch.manual_seed(3)
    return LoopLM(tiny_config(vocab_size=TOKENIZER.vocab_size, max_seq_len=64)).eval()


@pytest.fixture
def slow_tokens(monkeypatch):
    """Every decoding iteration (one loop step of the running rows) takes 40 ms, so a long
    generation lasts seconds (one iteration a call: the rows do not run on in C)."""
    from looplm.scheduler import Scheduler

    iterate = Scheduler.iterate

    def slow(self, *ahead):
        time.sleep(0.04)
        return iterate(self)

    monkeypatch.setattr(Scheduler, "iterate", slow)


def test_oversized_requests_get_400_and_others_are_still_served():
    engine = Engine(_model(), TOKENIZER, max_batch=4)
    with serving(engine, ServerConfig(max_prompts=3, max_request_tokens=100)) as (client, _):
        too_many = client.post("/v1/completions", json={"prompt": ["a"] * 4, "max_tokens": 2})
        assert too_many.status_code == 400 and "at most 3" in too_many.json()["error"]["message"]
        too_long = client.post("/v1/completions", json={"prompt": ["abc", "de"], "max_tokens": 60})
        assert too_long.status_code == 400 and "at most 100" in too_long.json()["error"]["message"]
        fine = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": 0})
        assert fine.status_code == 200 and len(fine.json()["choices"]) == 1


def test_a_prompt_of_no_tokens_is_refused_and_cannot_stall_the_engine():
    """With a tokenizer that adds no start token, a prompt can encode to nothing: the server says
    so (400) and goes on serving; a job no batch can take fails (400) instead of being retried for ever."""
    from looplm.data.word_char import word_entries, word_tokenizer

    words = word_tokenizer(word_entries([b"hello", b"world"]))
    torch.manual_seed(3)
    model = LoopLM(tiny_config(vocab_size=words.vocab_size, max_seq_len=64)).eval()
    engine = Engine(model, words, max_batch=2)
    with serving(engine, ServerConfig()) as (client, _):
        for prompt in ([""], "\r"):
            empty = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3}, timeout=10)
            assert empty.status_code == 400 and "no tokens" in empty.json()["error"]["message"], empty.text
        fine = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "temperature": 0}, timeout=10)
        assert fine.status_code == 200, fine.text
    events = []
    Engine(model, words, max_batch=2).run([Job([], 3, Settings(FixedSteps()), events.append)])
    assert isinstance(events[-1], Failed) and events[-1].status == 400 and "does not fit" in events[-1].message


def test_the_loop_steps_a_request_may_ask_for_are_bounded():
    """A batch's cache holds K/V for its deepest request, so a request may not ask for more loop
    steps than the server's ``max_steps`` (default: the default exit's); an operator raises it."""
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "layout": "full", "steps": 6}
    with serving(Engine(_model(), TOKENIZER, max_batch=2), ServerConfig()) as (client, _):
        deep = client.post("/v1/completions", json=body)
        assert deep.status_code == 400 and "--max-steps" in deep.json()["error"]["message"], deep.text
        assert client.post("/v1/completions", json={**body, "steps": 3}).status_code == 200  # the trained T
        assert client.get("/v1/models").json()["data"][0]["looplm"]["max_steps"] == 3
    with serving(Engine(_model(), TOKENIZER, max_batch=2), ServerConfig(max_steps=6)) as (client, _):
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.post("/v1/completions", json={**body, "steps": 7}).status_code == 400
    with pytest.raises(LoopLMError, match="below the default"):
        create_app(_model(), TOKENIZER, ServerConfig(steps=3, max_steps=2))


def test_a_batch_that_cannot_be_made_fails_only_the_jobs_that_need_it(monkeypatch):
    """No memory for a deep request's cache: that request fails (503), the others are served."""
    from looplm.exit_policy import FixedSteps as Fixed
    from looplm.serve import engine as engine_module

    def short_of_memory(*args, max_steps, **kwargs):
        if max_steps > 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp] can't allocate memory")
        return BatchSession(*args, max_steps=max_steps, **kwargs)

    monkeypatch.setattr(engine_module, "BatchSession", short_of_memory)
    events = {"deep": [], "plain": []}
    jobs = [Job([1, 2], 2, Settings(Fixed(6)), events["deep"].append),
            Job([1, 2], 2, Settings(Fixed()), events["plain"].append)]
    Engine(_model(), TOKENIZER, max_batch=2).run(jobs)
    assert isinstance(events["deep"][-1], Failed) and events["deep"][-1].status == 503
    assert "allocate" in events["deep"][-1].message
    assert isinstance(events["plain"][-1], Done)


def test_errors_are_ascii_json_and_an_unexpected_one_is_logged_once(monkeypatch, caplog):
    """A message quoting a request's lone surrogate is still sent (400, ASCII JSON); an exception a
    route did not expect is one 500 JSON line and one log record, not re-raised to the server."""
    from starlette.testclient import TestClient

    engine = Engine(_model(), TOKENIZER, max_batch=2)
    app = create_app(engine.model, TOKENIZER, ServerConfig(), engine)
    with TestClient(app) as client:  # it re-raises what reaches the server
        odd = client.post("/v1/completions", content=b'{"prompt": "a", "exit": {"name": "q", "\\ud800": 1}}',
                          headers={"content-type": "application/json"})
        assert odd.status_code == 400 and "\\ud800" in odd.text, odd.text

        def broken(*jobs):
            raise RuntimeError("unexpected")

        monkeypatch.setattr(engine, "submit", broken)
        with caplog.at_level("ERROR"):
            failed = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert failed.status_code == 500 and failed.json()["error"]["message"] == "internal error: RuntimeError"
        assert len([record for record in caplog.records if record.levelname == "ERROR"]) == 1


def test_act_over_an_act_mixing_model_is_refused_before_it_reaches_the_engine(caplog):
    """Its readouts already are ACT mixtures: the request gets 400 from the request check, and
    nothing is logged as a failure."""
    from starlette.testclient import TestClient

    torch.manual_seed(3)
    model = LoopLM(tiny_config(vocab_size=TOKENIZER.vocab_size, max_seq_len=64, act_mixing=True,
                                  exit_gate=True, step_norm=False)).eval()
    engine = Engine(model, TOKENIZER, max_batch=2)
    with TestClient(create_app(model, TOKENIZER, ServerConfig(), engine)) as client, caplog.at_level("ERROR"):
        act = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "exit": "act"})
        assert act.status_code == 400 and "act exit policy" in act.json()["error"]["message"], act.text
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    assert engine.stats.failures == 0 and not [record for record in caplog.records if record.levelname == "ERROR"]


def test_an_append_first_model_reports_its_one_layout_and_refuses_others():
    """A model whose loop attends to step-1 K/V keeps them one way (append_first): a request for
    another layout gets 400 instead of an answer that says it was honoured."""
    from starlette.testclient import TestClient

    torch.manual_seed(3)
    model = LoopLM(tiny_config(vocab_size=TOKENIZER.vocab_size, max_seq_len=64, kv_append_first=True)).eval()
    with TestClient(create_app(model, TOKENIZER, ServerConfig(), Engine(model, TOKENIZER, max_batch=2))) as client:
        full = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "layout": "full"})
        assert full.status_code == 400 and "append_first" in full.json()["error"]["message"], full.text
        plain = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert plain.status_code == 200 and plain.json()["looplm"]["layout"] == "append_first"
        assert client.get("/v1/models").json()["data"][0]["looplm"]["default_layout"] == "append_first"


def test_a_non_streaming_client_that_leaves_frees_its_row_within_a_second(slow_tokens):
    engine = Engine(_model(), TOKENIZER, max_batch=1)
    with serving(engine) as (client, port):
        body = b'{"prompt": "leaving early", "max_tokens": 50, "temperature": 0}'
        leaver = socket.create_connection(("127.0.0.1", port))
        leaver.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)  # it is decoding (about 2 s of tokens left)
        leaver.close()
        started = time.monotonic()
        answer = client.post("/v1/completions", json={"prompt": "next", "max_tokens": 2, "temperature": 0})
        assert answer.status_code == 200
        assert time.monotonic() - started < 1.0 + 2 * 3 * 0.04 + 0.5  # the slot freed within a second
        stats = client.get("/v1/looplm/stats").json()
        assert (stats["requests"], stats["cancelled"]) == (1, 1)  # the one that left is not counted as served


def test_a_streaming_client_that_leaves_mid_stream_frees_its_row(slow_tokens):
    engine = Engine(_model(), TOKENIZER, max_batch=1)
    with serving(engine) as (client, port):
        body = {"prompt": "leaving mid-stream", "max_tokens": 50, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = [line for _, line in zip(range(3), response.iter_lines()) if line]
        assert events and events[0].startswith("data: ")  # it was streaming (about 6 s of tokens left)
        started = time.monotonic()
        answer = client.post("/v1/completions", json={"prompt": "next", "max_tokens": 2, "temperature": 0})
        assert answer.status_code == 200
        assert time.monotonic() - started < 1.0 + 2 * 3 * 0.04 + 0.5  # the row freed within a second
        stats = client.get("/v1/looplm/stats").json()
        assert (stats["requests"], stats["cancelled"]) == (1, 1)
        assert 3 <= stats["tokens"] < 50 + 2  # what the leaver was sent, and the next request's


def test_a_full_queue_answers_503_with_retry_after(slow_tokens):
    engine = Engine(_model(), TOKENIZER, max_batch=1, max_queue=2)
    with serving(engine) as (client, port):
        results = []

        def ask():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as own:
                results.append(own.post("/v1/completions", json={"prompt": "busy", "max_tokens": 10,
                                                                 "temperature": 0}))

        threads = [threading.Thread(target=ask) for _ in range(5)]
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        for thread in threads:
            thread.join()
    codes = sorted(response.status_code for response in results)
    assert codes.count(200) >= 2 and 503 in codes
    refused = next(response for response in results if response.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["error"]["message"]


def test_shutdown_finishes_the_running_batch_and_refuses_the_queue(slow_tokens):
    engine = Engine(_model(), TOKENIZER, max_batch=1)
    events: dict[str, list] = {"running": [], "queued": []}
    settings = Settings(FixedSteps())
    ids = [TOKENIZER.bos_id] + TOKENIZER.encode("shut")
    engine.start()
    engine.submit(Job(ids, 8, settings, events["running"].append))
    time.sleep(0.15)
    engine.submit(Job(ids, 8, settings, events["queued"].append))
    engine.stop()
    done = events["running"][-1]
    assert isinstance(done, Done) and done.generation.ids == generate(engine.model, ids, 8).ids
    assert isinstance(events["queued"][-1], Failed) and events["queued"][-1].status == 503
    with pytest.raises(Overloaded):
        engine.closing = True
        engine.submit(Job(ids, 1, settings, events["queued"].append))


def test_prompts_of_different_lengths_share_one_batch(caplog):
    model = _model()
    engine = Engine(model, TOKENIZER, max_batch=8, batch_wait_ms=200)
    texts = ["a", "bb", "a longer prompt", "xy", "the longest prompt of them all", "q", "mid size", "z9"]
    jobs, events = [], [[] for _ in texts]
    for index, text in enumerate(texts):
        jobs.append(Job([TOKENIZER.bos_id] + TOKENIZER.encode(text), 20, Settings(FixedSteps()), events[index].append))
    engine.submit(*jobs)
    engine.start()
    deadline = time.monotonic() + 60
    while not all(events_ and not isinstance(events_[-1], type(None)) and isinstance(events_[-1], (Done, Failed))
                  for events_ in events) and time.monotonic() < deadline:
        time.sleep(0.02)
    engine.stop()
    stats = engine.stats.as_dict()
    assert stats["largest_batch"] == 8 and stats["batches"] == 1 and stats["failures"] == 0
    assert "retrying its jobs one by one" not in caplog.text
    for text, received in zip(texts, events):
        expected = generate(model, [TOKENIZER.bos_id] + TOKENIZER.encode(text), 20)
        assert received[-1].generation.ids == expected.ids


def test_what_the_join_check_lets_in_admit_takes():
    """The engine's join check (``BatchSession.fits``, one job at a time in arrival order) and
    ``BatchSession.admit`` agree for random prompts, limits and depths, on an idle session and
    on a running one; what does not fit is refused by admit too."""
    import random

    from looplm.errors import LoopLMError

    model, chooser = _model(), random.Random(0)
    for trial in range(40):
        session = BatchSession(model, 4, 40)
        if trial % 2:  # a running session: one row decoding at index 6
            session.admit([list(range(1, 7))], [20])
        for _ in range(chooser.randint(1, 6)):
            prompt, limit = list(range(1, chooser.randint(1, 30) + 1)), chooser.randint(1, 40)
            settings = Settings(FixedSteps(chooser.choice([None, 2, 5])))
            if session.fits(prompt, limit, settings):
                session.admit([prompt], [limit], settings=[settings])  # never raises
            else:
                with pytest.raises(LoopLMError, match="does not fit"):
                    session.admit([prompt], [limit], settings=[settings])


def test_a_request_that_breaks_sampling_or_its_settings_fails_alone_and_the_server_goes_on():
    """A temperature so small that logits / temperature overflow, settings of the wrong type in the
    JSON exit object, a null threshold: each fails its own request (400, one JSON line) — once they
    stopped the engine thread for good or failed their whole batch — and later requests are served."""
    engine = Engine(_model(), TOKENIZER, max_batch=4)
    with serving(engine, ServerConfig()) as (client, _):
        for body in ({"prompt": "hi", "max_tokens": 3, "temperature": 1e-300},
                     {"prompt": "hi", "max_tokens": 3, "exit": {"name": "static", "steps": 3.0}},
                     {"prompt": "hi", "max_tokens": 3, "exit": {"name": "q", "threshold": 0.5, "min_steps": 1.5}},
                     {"prompt": "hi", "max_tokens": 3, "exit": {"name": "q", "threshold": None}},
                     {"prompt": "hi", "max_tokens": 3, "exit": ""}):
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 400, (body, response.text)
            message = response.json()["error"]["message"]
            assert message and "\n" not in message
            fine = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "temperature": 0})
            assert fine.status_code == 200, (body, fine.text)
        assert client.get("/health").json()["status"] == "ok"


def test_stop_strings_prompt_sizes_and_prompt_counts_are_bounded():
    engine = Engine(_model(), TOKENIZER, max_batch=2, max_queue=3)
    with serving(engine, ServerConfig(max_prompts=8)) as (client, _):
        for body, words in (({"prompt": "a", "stop": ["x"] * 17}, "stop"),
                            ({"prompt": "a", "stop": "y" * 300}, "at most 256 characters"),
                            ({"prompt": "a" * 100_000}, "far more than the model's context"),
                            ({"prompt": ["a"] * 4}, "at most 3 per request")):  # the queue's size, not 503
            response = client.post("/v1/completions", json={"max_tokens": 2, **body})
            assert response.status_code == 400 and words in response.json()["error"]["message"], response.text


def test_the_prefix_cache_keeps_to_its_byte_budget():
    from looplm.prefix_cache import PrefixCache

    model = _model()
    roomy = PrefixCache()
    generate(model, list(range(1, 41)), 1, prefix_cache=roomy, backend="reference")
    one = roomy.nbytes
    tight = PrefixCache(max_bytes=2 * one + 1)
    for start in range(1, 6):  # five different prompts of the same length
        generate(model, list(range(start, start + 40)), 1, prefix_cache=tight, backend="reference")
        assert tight.nbytes <= tight.max_bytes
    assert len(tight.entries) == 2
    small = PrefixCache(max_bytes=one - 1)  # an entry larger than the budget is not stored
    generate(model, list(range(1, 41)), 1, prefix_cache=small, backend="reference")
    assert not small.entries


def test_a_shutdown_signal_stops_the_engine_taking_jobs_before_uvicorn_waits():
    """SIGTERM first closes the engine (waiting requests get 503 at once), then uvicorn waits for
    the open responses: the queue is not decoded in full before the server exits."""
    import signal

    import uvicorn

    from looplm.cli import _engine_server

    engine = Engine(_model(), TOKENIZER, max_batch=1)
    engine.start()
    server = _engine_server()(uvicorn.Config(app=None))
    server.engine = engine
    server.handle_exit(signal.SIGTERM, None)
    assert engine.closing and server.should_exit
    with pytest.raises(Overloaded, match="shutting down"):
        engine.submit(Job([1, 2], 2, Settings(), lambda event: None))
    engine.stop()


def test_request_bodies_are_bounded_in_size_and_time():
    """A body over max_body_bytes gets 413 (before it is read, when its Content-Length says so; as it
    arrives, when it comes in chunks) and one that trickles in past body_seconds gets 408; the server
    keeps serving."""
    engine = Engine(_model(), TOKENIZER, max_batch=2)
    with serving(engine, ServerConfig(max_body_bytes=2000, body_seconds=0.5)) as (client, port):
        big = client.post("/v1/completions", json={"prompt": "x" * 3000, "max_tokens": 1})
        assert big.status_code == 413 and "larger than 2000 bytes" in big.json()["error"]["message"]

        def chunks():
            for _ in range(5):
                yield b" " * 600
        chunked = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        trickler = socket.create_connection(("127.0.0.1", port))
        trickler.settimeout(5)
        trickler.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        started = time.monotonic()
        answer = b""
        while chunk := trickler.recv(4096):  # the server closes the connection after its answer
            answer += chunk
        answer = answer.decode()
        trickler.close()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer
        assert time.monotonic() - started < 3
        fine = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2, "temperature": 0})
        assert fine.status_code == 200 and client.get("/health").status_code == 200
    with pytest.raises(Exception, match="body_seconds must be > 0"):
        ServerConfig(body_seconds=0)
