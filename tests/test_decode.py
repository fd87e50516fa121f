"""Cached decoding equals the full forward; Q-exit skips work and keeps caches consistent."""

import pytest
import torch

from looplm.cache import KVCache
from looplm.errors import LoopLMError
from looplm.generate import Decoder, FixedSteps, QExit, Sampling, generate, sample_next
from looplm.model import LoopLM

from conftest import tiny_config


@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("chunks", [[12, 1, 1, 1, 1], [5, 4, 3, 4], [1] * 16])
def test_cached_forward_equals_full_forward(tiny_model, steps, chunks):
    ids = torch.randint(0, 64, (2, sum(chunks)))
    full = tiny_model(ids, steps=steps)
    cache = KVCache(tiny_model.config, 2, 32, max_steps=steps)
    begin = 0
    for size in chunks:
        part = tiny_model(ids[:, begin:begin + size], steps=steps, cache=cache)
        for step in range(1, steps + 1):
            torch.testing.assert_close(part.logits(step), full.logits(step)[:, begin:begin + size],
                                       atol=1e-5, rtol=0)
        torch.testing.assert_close(part.gate_logits, full.gate_logits[:, :, begin:begin + size], atol=1e-5, rtol=0)
        begin += size
    assert cache.length == sum(chunks)


def test_cached_forward_with_prelude_coda_and_gqa():
    torch.manual_seed(3)
    model = LoopLM(tiny_config(n_prelude_layers=1, n_coda_layers=1, n_kv_heads=2)).eval()
    ids = torch.randint(0, 64, (1, 10))
    full = model(ids, steps=4)
    cache = KVCache(model.config, 1, 16, max_steps=4)
    first = model(ids[:, :7], steps=4, cache=cache)
    second = model(ids[:, 7:], steps=4, cache=cache)
    for step in range(1, 5):
        torch.testing.assert_close(torch.cat([first.logits(step), second.logits(step)], 1), full.logits(step),
                                   atol=1e-5, rtol=0)


def test_decoder_fixed_steps_matches_full_forward(tiny_model):
    ids = torch.randint(0, 64, (1, 14))
    for steps in (3, 5):
        full = tiny_model(ids, steps=steps).logits()
        decoder = Decoder(tiny_model, FixedSteps(steps), 14)
        with torch.no_grad():
            logits, used = decoder.prefill(ids[:, :6])
            torch.testing.assert_close(logits, full[0, 5], atol=1e-5, rtol=0)
            for position in range(6, 14):
                logits, used = decoder.step(int(ids[0, position]))
                assert used == steps
                torch.testing.assert_close(logits, full[0, position], atol=1e-5, rtol=0)


def test_q_exit_with_q_one_equals_full_depth(tiny_model):
    prompt = torch.randint(0, 64, (12,)).tolist()
    full = generate(tiny_model, prompt, 20, exit_policy=FixedSteps(), stop_ids=[])
    q_one = generate(tiny_model, prompt, 20, exit_policy=QExit(1.0), stop_ids=[])
    assert q_one.ids == full.ids
    assert q_one.steps == [3] * 20


@pytest.mark.parametrize("backend", ["reference", "torch", "native"])
def test_q_exit_skips_steps_and_fills_deeper_caches_last_exited(tiny_model, backend):
    """A token that exits at step e runs no deeper step; its step-e K/V fill the deeper slots."""
    torch.nn.init.normal_(tiny_model.exit_gate.weight, std=2.0)
    prompt = torch.randint(0, 64, (6,))
    config = tiny_model.config
    decoder = Decoder(tiny_model, QExit(0.5), 40, backend=backend)
    calls = []
    if backend == "torch":
        layer_call = decoder.stepper._layer
        decoder.stepper._layer = lambda *args: calls.append(1) or layer_call(*args)
    elif backend == "native":  # count the layers each kernel call runs for the core (per-step path;
        decoder.fused = False  # the one-call loop is held equal to it in test_native_decode.py)
        run = decoder.stepper._run
        core = {id(packed) for packed in decoder.stepper.core}
        decoder.stepper._run = lambda packed, count, *args: (
            calls.extend([1] * count * (id(packed) in core)) or run(packed, count, *args))
    else:
        for layer in tiny_model.core:
            layer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        decoder.prefill(prompt.unsqueeze(0))
        calls.clear()
        exits = []
        for token in torch.randint(0, 64, (30,)).tolist():
            position = decoder.row.position  # where the next token goes
            before = len(calls)
            _, used = decoder.step(token)
            exits.append(used)
            assert len(calls) - before == used * config.n_core_layers
            cache = decoder.cache
            for layer in range(config.n_core_layers):
                source = cache.slot("core", layer, used - 1)
                for deeper in range(used, config.loop_steps):
                    target = cache.slot("core", layer, deeper)
                    assert torch.equal(cache.keys[target, :, :, position], cache.keys[source, :, :, position])
                    assert torch.equal(cache.values[target, :, :, position], cache.values[source, :, :, position])
    assert min(exits) < config.loop_steps and len(set(exits)) > 1, exits


def test_q_exit_decision_matches_full_forward_gates(tiny_model):
    """With a cache whose deeper entries come from full depth, the exit step equals the CDF rule."""
    from looplm.model.exit import q_exit_steps

    torch.nn.init.normal_(tiny_model.exit_gate.weight, std=2.0)
    ids = torch.randint(0, 64, (1, 9))
    output = tiny_model(ids)
    expected = q_exit_steps(output.gate_logits, 0.5)[0, -1].item()
    decoder = Decoder(tiny_model, QExit(0.5), 9)
    with torch.no_grad():
        decoder.prefill(ids[:, :8])
        logits, used = decoder.step(int(ids[0, 8]))
    assert used == expected
    torch.testing.assert_close(logits, output.logits(used)[0, -1], atol=1e-5, rtol=0)


def test_sampling_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample_next(logits, Sampling(), None) == 1
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, Sampling(temperature=1.0, top_k=2), generator) for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_next(logits, Sampling(temperature=1.0, top_p=0.5), generator) for _ in range(100)}
    assert draws == {1}
    a = [sample_next(logits, Sampling(temperature=2.0), torch.Generator().manual_seed(5)) for _ in range(3)]
    b = [sample_next(logits, Sampling(temperature=2.0), torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a == b


def test_stop_strings_and_stop_ids():
    from looplm.data.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=259, max_seq_len=64)).eval()
    prompt = [tokenizer.bos_id] + tokenizer.encode("hello")
    free = generate(model, prompt, 30, tokenizer=tokenizer, stop_ids=[])
    assert len(free.ids) == 30 and free.stop_reason == "length"
    if len(free.text) >= 4:
        stop = free.text[2:4]
        cut = generate(model, prompt, 30, tokenizer=tokenizer, stop_strings=[stop], stop_ids=[])
        assert cut.stop_reason == "stop_string"
        assert cut.text == free.text[:free.text.find(stop)]
    first = free.ids[3]
    stopped = generate(model, prompt, 30, tokenizer=tokenizer, stop_ids=[first])
    assert stopped.stop_reason == "stop_token" and first not in stopped.ids


def test_streamed_pieces_hold_back_what_could_begin_a_stop_string():
    """A stream never hands out the start of a stop string that then completes, and what it held
    back is handed out (with its token) when the text goes on otherwise or the generation ends:
    the pieces concatenate to the generation's text, a piece for each token (but the one completing
    a stop string), however it stops."""
    from looplm.data.tokenizer import byte_tokenizer
    from looplm.generate import Generation, stream

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=259, max_seq_len=64)).eval()
    prompt = [tokenizer.bos_id] + tokenizer.encode("hello")
    free = generate(model, prompt, 30, tokenizer=tokenizer, stop_ids=[])
    # the longest run of these tokens whose text ends in a one-byte character
    count = max(size for size in range(2, 31) if tokenizer.decode(free.ids[:size])[-1:].isascii()
                and tokenizer.decode(free.ids[size - 1:size]).isascii())
    free = generate(model, prompt, count, tokenizer=tokenizer, stop_ids=[])
    spans = [index for index in range(1, len(free.text) - 1) if free.text[index:index + 2].isascii()
             and free.text.find(free.text[index:index + 2]) == index]
    assert spans and len(free.text) >= 3  # a stop string of two one-byte tokens
    first = max(index for index in range(1, len(free.ids)) if free.ids[index] not in free.ids[:index])
    before = tokenizer.decode(free.ids[:first])  # the text when that token comes
    cases = {"a stop string over two tokens": ([free.text[spans[0]:spans[0] + 2]], []),
             "the last character could begin one": ([free.text[-1] + "\x01"], []),
             "a stop id after a held back end": ([before[-1] + "\x01"], [free.ids[first]])}
    for name, (stops, stop_ids) in cases.items():
        result = Generation()
        tokens = list(stream(model, prompt, count, tokenizer=tokenizer, stop_strings=stops, stop_ids=stop_ids,
                             result=result))
        assert "".join(token.text for token in tokens) == result.text, name
        completing = result.stop_reason == "stop_string"  # the token completing it hands out nothing
        assert [token.id for token in tokens] == result.ids[:len(result.ids) - completing], name
    assert result.stop_reason == "stop_token" and result.text == before


def test_generation_stops_at_the_context_end(tiny_model):
    result = generate(tiny_model, list(range(40)), 100, stop_ids=[])
    assert len(result.ids) == 8 and result.stop_reason == "context"


@pytest.mark.parametrize("call", [
    lambda m: generate(m, list(range(60)), 4),
    lambda m: generate(m, [], 4),
    lambda m: generate(m, [1, 2], 4, exit_policy=QExit(1.5)),
    lambda m: generate(m, [1, 2], 4, exit_policy=QExit(-0.1)),
    lambda m: generate(m, [1, 2], 4, exit_policy=FixedSteps(0)),
    lambda m: generate(m, [1, 2], 4, sampling=Sampling(temperature=-1)),
])
def test_bad_generation_requests_are_one_line_errors(tiny_model, call):
    with pytest.raises(LoopLMError) as error:
        call(tiny_model)
    assert "\n" not in str(error.value)
