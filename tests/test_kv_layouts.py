"""KV layouts (issue #5, docs/MATH.md §4): each layout keeps what its definition says, in prefill
and in decode; ``full`` equals the uncached forward; prefix reuse equals fresh computation."""

import pytest
import torch

from looplm.cache import KV_LAYOUTS, KVCache
from looplm.errors import LoopLMError
from looplm.exit_policy import FixedSteps, QExit
from looplm.generate import Decoder, generate
from looplm.model import LoopLM
from looplm.prefix_cache import PrefixCache

from conftest import tiny_config
from test_architectures import build

T = 4


def _model(**overrides) -> LoopLM:
    torch.manual_seed(2)
    model = LoopLM(tiny_config(loop_steps=T, n_kv_heads=2, **overrides))
    torch.nn.init.normal_(model.exit_gate.weight, std=1.0)
    model.exit_gate.bias.data.fill_(-0.5)
    return model.eval()


def _prefilled(model, layout, ids, **options) -> KVCache:
    cache = KVCache(model.config, 1, 24, T, layout=layout, **options)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache


def _core(cache: KVCache, step: int, length: int) -> torch.Tensor:
    """Keys of core layer 0 at ``step`` for positions [0, length)."""
    return cache.store("core", 0, step)[0][0, :, :length]


def test_prefill_stores_what_each_layout_defines():
    model = _model()
    ids = torch.randint(0, 64, (1, 9))
    full = _prefilled(model, "full", ids)
    per_step = torch.stack([_core(full, step, 9) for step in range(T)])
    assert not torch.allclose(per_step[0], per_step[-1])  # the steps really differ
    torch.testing.assert_close(_core(_prefilled(model, "last", ids), 0, 9), per_step[-1])
    torch.testing.assert_close(_core(_prefilled(model, "first", ids), 0, 9), per_step[0])
    torch.testing.assert_close(_core(_prefilled(model, "avg", ids), 0, 9), per_step.mean(0))
    modulo = _prefilled(model, "modulo", ids, modulo_slots=3)  # step t → group t mod 3: 3 holds step 3
    torch.testing.assert_close(_core(modulo, 0, 9), per_step[3])
    torch.testing.assert_close(_core(modulo, 1, 9), per_step[1])
    torch.testing.assert_close(_core(modulo, 2, 9), per_step[2])
    # Every step of a single-group layout reads the same storage.
    last = _prefilled(model, "last", ids)
    assert _core(last, 3, 9).data_ptr() == _core(last, 0, 9).data_ptr()


def test_storage_and_bytes_per_token_follow_the_layout():
    model = _model(n_prelude_layers=1, n_coda_layers=1)
    sizes = {layout: KVCache(model.config, 1, 16, T, layout=layout, modulo_slots=2) for layout in KV_LAYOUTS}
    loop_layers = model.config.n_core_layers + model.config.n_coda_layers
    assert sizes["full"].keys.shape[0] == 1 + T * loop_layers
    assert sizes["last_exited"].keys.shape[0] == 1 + T * loop_layers
    for layout in ("last", "first", "avg"):
        assert sizes[layout].keys.shape[0] == 1 + loop_layers
    assert sizes["modulo"].keys.shape[0] == 1 + 2 * loop_layers  # at most K slots per layer
    per_slot = 2 * model.config.n_kv_heads * model.config.head_dim * 4
    assert sizes["full"].bytes_per_token == (1 + T * loop_layers) * per_slot
    assert sizes["last"].bytes_per_token == (1 + loop_layers) * per_slot
    with pytest.raises(LoopLMError, match="KV layout must be one of"):
        KVCache(model.config, 1, 16, T, layout="sideways")


def _decode(model, layout, prompt, tokens, policy, **options):
    decoder = Decoder(model, policy, len(prompt) + len(tokens), backend="reference", layout=layout, **options)
    outputs = []
    with torch.no_grad():
        outputs.append(decoder.prefill(torch.tensor([prompt])))
        for token in tokens:
            outputs.append(decoder.step(token))
    return decoder, outputs


def test_full_layout_equals_the_uncached_forward_under_early_exit():
    model = _model()
    ids = torch.randint(0, 64, (1, 14))
    decoder, outputs = _decode(model, "full", ids[0, :5].tolist(), ids[0, 5:].tolist(), QExit(0.5))
    with torch.no_grad():
        forward = model(ids)
    steps = [steps for _, steps in outputs]
    assert len(set(steps)) > 1  # exits vary, yet every token ran every step
    for offset, (logits, exit_step) in enumerate(outputs):
        torch.testing.assert_close(logits, forward.logits(exit_step)[0, 4 + offset], atol=1e-5, rtol=0)


def test_last_exited_fills_the_deeper_steps_with_the_exit_step():
    model = _model()
    prompt, tokens = [3, 9, 4], [7, 1, 8, 2, 5, 6, 10, 11]
    decoder, outputs = _decode(model, "last_exited", prompt, tokens, QExit(0.5))
    cache = decoder.cache
    exits = [steps for _, steps in outputs[1:]]
    assert min(exits) < T
    for offset, exit_step in enumerate(exits):
        position = len(prompt) + offset
        for step in range(exit_step, T):
            torch.testing.assert_close(_core(cache, step, position + 1)[:, position],
                                       _core(cache, exit_step - 1, position + 1)[:, position])


@pytest.mark.parametrize("layout", ["last", "first", "avg"])
def test_single_group_layouts_store_their_rule_for_decoded_tokens(layout):
    """Decode with the layout while capturing, after every step, the K/V the token just wrote
    (the slot holds the current step's entry until the token finishes); then each decoded
    position must hold its last / first / mean captured entry."""
    model = _model()
    prompt, tokens = [3, 9, 4], [7, 1, 8, 2]
    decoder = Decoder(model, FixedSteps(), len(prompt) + len(tokens), backend="reference", layout=layout)
    cache, captured = decoder.cache, []
    original = decoder.stepper.core_step

    def capture(h, e, rows):  # after each decode step of the token at rows.positions[0]
        h = original(h, e, rows)
        position = rows.positions[0]
        captured.append((position, cache.store("core", 0, rows.steps[0])[0][0, :, position].clone()))
        return h

    decoder.stepper.core_step = capture
    with torch.no_grad():
        decoder.prefill(torch.tensor([prompt]))
        for token in tokens:
            decoder.step(token)
    for offset in range(len(tokens)):
        position = len(prompt) + offset
        per_step = torch.stack([key for start, key in captured if start == position])
        assert len(per_step) == T and not torch.allclose(per_step[0], per_step[-1])
        expected = {"last": per_step[-1], "first": per_step[0], "avg": per_step.mean(0)}[layout]
        torch.testing.assert_close(_core(cache, 0, position + 1)[:, position], expected)


def test_modulo_with_enough_slots_equals_full_and_fills_unreached_groups():
    model = _model()
    prompt, tokens = [5, 2, 8], [1, 4, 9, 3, 7]
    _, full = _decode(model, "last_exited", prompt, tokens, QExit(0.5))
    _, modulo = _decode(model, "modulo", prompt, tokens, QExit(0.5), modulo_slots=T)
    for (a, steps_a), (b, steps_b) in zip(full, modulo):
        assert steps_a == steps_b
        torch.testing.assert_close(a, b)
    model.exit_gate.weight.data.zero_()  # λ = σ(1) > q: every token exits at step 1, writing group 0 only
    model.exit_gate.bias.data.fill_(1.0)
    decoder, outputs = _decode(model, "modulo", prompt, tokens, QExit(0.5), modulo_slots=2)
    assert any(exit_step == 1 for _, exit_step in outputs[1:])
    for offset, (_, exit_step) in enumerate(outputs[1:]):
        if exit_step == 1:  # only group 0 was written: group 1 must hold the same K/V
            position = len(prompt) + offset
            torch.testing.assert_close(_core(decoder.cache, 1, position + 1)[:, position],
                                       _core(decoder.cache, 0, position + 1)[:, position])


@pytest.mark.parametrize("name", ["ouro", "gdn-hybrid", "rwkv-slots", "gdn-memory-caching"])
def test_prefix_reuse_equals_fresh_computation(name):
    model = build(name)
    prefix_cache = PrefixCache(block=4)
    shared = [5, 3, 9, 1, 2, 8, 7, 4, 6, 2]
    first = shared + [11, 12]
    second = shared + [13, 14, 15]
    policy = QExit(0.5) if model.exit_gate is not None else FixedSteps()
    for prompt in (first, second, second, shared[:6]):
        fresh = generate(model, prompt, 5, exit_policy=policy, backend="reference")
        reused = generate(model, prompt, 5, exit_policy=policy, backend="reference", prefix_cache=prefix_cache)
        assert (reused.ids, reused.steps) == (fresh.ids, fresh.steps)
    stats = prefix_cache.stats
    assert stats.hits == 3 and stats.reused_tokens > 0
    assert stats.computed_tokens < sum(len(p) for p in (first, second, second, shared[:6]))


def test_a_stored_prefix_of_weights_since_changed_is_not_reused():
    """Prefixes are stored per model and its weights as they are: after an in-place change (a
    training step) the old K/V would give another model's tokens."""
    model = build("ouro")
    prefix_cache = PrefixCache(block=4)
    prompt = [5, 3, 9, 1, 2, 8, 7, 4, 6, 2]
    generate(model, prompt, 3, backend="reference", prefix_cache=prefix_cache)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    reused = generate(model, prompt, 4, backend="reference", prefix_cache=prefix_cache)
    assert reused.ids == generate(model, prompt, 4, backend="reference").ids
    assert prefix_cache.stats.hits == 0


def test_a_cache_rows_view_is_made_once_and_empty_at_every_call():
    """``KVCache.row`` hands out one view per cache row (made once: a small model's prompt felt the
    copy), emptied at every call — length 0, recurrent states zero — and writing into the parent's
    storage at that row, so a prompt prefilled into a reused slot starts as in a new view."""
    config = tiny_config(layer_pattern="GA")
    cache = KVCache(config, 3, 16, config.loop_steps)
    view = cache.row(1)
    view.advance(5)
    for tensor in view.state_tensors:
        tensor.fill_(1.0)
    view.keys.fill_(2.0)
    again = cache.row(1)
    assert again is view and again.length == 0 and again._saved is None
    assert view.state_tensors and all(not tensor.any() for tensor in again.state_tensors)
    assert all(not tensor[:, [0, 2]].any() for tensor in cache.state_tensors)  # other rows untouched
    assert (cache.keys[:, 1] == 2).all() and not cache.keys[:, [0, 2]].any()
    assert cache.row(2) is not view and cache.row(2).keys.data_ptr() != view.keys.data_ptr()
