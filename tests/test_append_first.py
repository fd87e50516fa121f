"""Append-first K/V (nanochat's loop): only loop step 1 appends to the cache; later steps attend
to it, in prefill and in decode, with the token's own step-1 K/V.  The ``append_first`` layout on
a model trained with per-step K/V computes exactly what a ``model.kv_append_first`` model's full
forward computes with the same weights; it is not the ``first`` layout."""

import pytest
import torch

from looplm.batch import generate_batch
from looplm.cache import KVCache, SharedKV
from looplm.errors import LoopLMError
from looplm.exit_policy import FixedSteps, QExit
from looplm.generate import Decoder, generate
from looplm.model import LoopLM

from conftest import tiny_config

MECHANICS = dict(n_prelude_layers=1, n_coda_layers=1, n_kv_heads=2, loop_steps=3)


def _pair(**overrides) -> tuple[LoopLM, LoopLM]:
    """The same weights as a per-step model and as an append-first model."""
    torch.manual_seed(0)
    per_step = LoopLM(tiny_config(**MECHANICS, **overrides))
    torch.nn.init.normal_(per_step.exit_gate.weight, std=0.5)
    append_first = LoopLM(tiny_config(kv_append_first=True, **MECHANICS, **overrides))
    append_first.load_state_dict(per_step.state_dict())
    return per_step.eval(), append_first.eval()


def _decode(model, ids, layout, prompt=5):
    decoder = Decoder(model, FixedSteps(), ids.shape[1], backend="reference", layout=layout)
    with torch.no_grad():
        logits = [decoder.prefill(ids[:, :prompt])[0]]
        logits += [decoder.step(int(token))[0] for token in ids[0, prompt:]]
    return torch.stack(logits)


@pytest.mark.parametrize("overrides", [{}, {"attention": "mla", "mla_kv_rank": 12, "mla_rope_dim": 4}])
def test_layout_on_a_per_step_model_is_the_append_first_function(overrides):
    per_step, append_first = _pair(**overrides)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        expected = append_first(ids).logits()[0, 4:]
        plain = per_step(ids).logits()[0, 4:]
    torch.testing.assert_close(_decode(per_step, ids, "append_first"), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_decode(append_first, ids, "last_exited"), expected, atol=1e-5, rtol=0)
    assert (expected - plain).abs().max() > 1e-3  # reusing step-1 K/V is a different function
    # ``first`` is another rule: prefill keeps per-step K/V and each step sees its own K/V.
    assert (_decode(per_step, ids, "first") - expected).abs().max() > 1e-3


def test_only_step_one_writes_the_core_cache():
    per_step, append_first = _pair()
    ids = torch.randint(0, 64, (1, 9))
    cache = KVCache(append_first.config, 1, 16, layout="full")  # the model fixes its layout
    full = KVCache(per_step.config, 1, 16, layout="full")
    with torch.no_grad():
        append_first(ids, cache=cache)
        per_step(ids, cache=full)
    assert cache.layout == "append_first"
    assert isinstance(cache.store("core", 0, 1), SharedKV) and not isinstance(cache.store("core", 0, 0), SharedKV)
    step1 = cache.store("core", 1, 0)[0]
    for step in range(3):
        assert cache.store("core", 1, step)[0].data_ptr() == step1.data_ptr()
    # Step 1 is the same computation in both models: its keys are the full layout's step-1 keys.
    torch.testing.assert_close(step1[:, :, :9], full.store("core", 1, 0)[0][:, :, :9])
    # The coda keeps one K/V per step (its readout runs at every step).
    assert cache.store("coda", 0, 2)[0].data_ptr() != cache.store("coda", 0, 0)[0].data_ptr()
    assert cache.bytes_per_token < full.bytes_per_token


def test_batched_engine_and_early_exit_match_per_prompt_decode():
    per_step, _ = _pair()
    prompts = [[1, 5, 9, 2], [7, 3], [4, 4, 4, 4, 4, 8]]
    for policy in (FixedSteps(), QExit(0.5)):
        batch = generate_batch(per_step, prompts, 6, exit_policy=policy, layout="append_first")
        for prompt, generation in zip(prompts, batch.generations):
            single = generate(per_step, prompt, 6, exit_policy=policy, layout="append_first")
            assert generation.ids == single.ids and generation.steps == single.steps


def test_append_first_decodes_in_the_c_runtime_not_the_torch_backend():
    per_step = LoopLM(tiny_config()).eval()  # Ouro's plain loop: the fast backends' own ground
    assert Decoder(per_step, FixedSteps(), 8).backend != "reference"
    # the fused plain-loop kernel writes every step's K/V; the C runtime has the append_first layout
    assert Decoder(per_step, FixedSteps(), 8, layout="append_first").backend == "native"
    with pytest.raises(LoopLMError, match="append_first"):
        Decoder(per_step, FixedSteps(), 8, backend="torch", layout="append_first")
