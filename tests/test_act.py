"""ACT halting (docs/MATH.md §5): vectorised weights equal a per-token loop, the remainder rule,
the ACT objective trains the gate through the ponder cost, and ACT decoding equals the full
forward with every depth's cache filled."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.cache import KVCache
from looplm.errors import LoopLMError
from looplm.generate import ACTExit, Decoder, generate, make_exit_policy
from looplm.model import LoopLM
from looplm.model.exit import act_weights, act_weights_reference
from looplm.training.objectives import compute_loss

from conftest import tiny_config


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 6), positions=st.integers(1, 7), threshold=st.floats(0.05, 1.0),
       scale=st.floats(0.1, 6.0), seed=st.integers(0, 2**16))
def test_vectorised_weights_equal_the_per_token_loop(steps, positions, threshold, scale, seed):
    torch.manual_seed(seed)
    logits = torch.randn(steps, 2, positions, dtype=torch.float64) * scale
    weights, halting = act_weights(logits, threshold)
    expected_weights, expected_halting = act_weights_reference(logits, threshold)
    torch.testing.assert_close(weights, expected_weights)
    assert torch.equal(halting, expected_halting)
    torch.testing.assert_close(weights.sum(0), torch.ones(2, positions, dtype=torch.float64))
    after = torch.arange(1, steps + 1).view(-1, 1, 1) > halting  # halted positions contribute once
    assert torch.all(weights[after] == 0)


def test_remainder_rule_by_hand():
    # p = 0.3, 0.5, 0.9 with threshold 0.7: halts at step 2 with remainder 1 − 0.3 = 0.7.
    logits = torch.logit(torch.tensor([0.3, 0.5, 0.9])).view(3, 1)
    weights, halting = act_weights(logits, 0.7)
    torch.testing.assert_close(weights.view(-1), torch.tensor([0.3, 0.7, 0.0]))
    assert halting.item() == 2
    # Never reaching the threshold: the last step takes the remainder.
    weights, halting = act_weights(torch.logit(torch.tensor([0.1, 0.1])).view(2, 1), 0.99)
    torch.testing.assert_close(weights.view(-1), torch.tensor([0.1, 0.9]))
    assert halting.item() == 2


def test_act_objective_trains_and_its_ponder_cost_reaches_the_gate():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(act_threshold=0.9))
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    ids = torch.randint(0, 64, (2, 10))
    result = compute_loss(model(ids), ids, "act", act_ponder_weight=1.0)
    result.loss.backward()
    assert torch.isfinite(result.loss) and model.exit_gate.weight.grad.abs().sum() > 0
    with pytest.raises(LoopLMError, match="objective act needs an exit gate"):
        compute_loss(LoopLM(tiny_config(exit_gate=False))(ids), ids, "act")


@pytest.mark.parametrize("overrides", [{}, {"n_coda_layers": 1, "injection": "additive"}])
def test_act_decode_equals_full_forward_and_fills_every_depth(overrides):
    torch.manual_seed(0)
    model = LoopLM(tiny_config(act_threshold=0.6, **overrides)).eval()
    torch.nn.init.normal_(model.exit_gate.weight, std=0.3)
    ids = torch.randint(0, 64, (1, 14))
    with torch.no_grad():
        full = model(ids)
    # A threshold at the median of p₁ + p₂ makes about half the positions halt by step 2.
    threshold = float(torch.sigmoid(full.gate_logits[:2, 0]).sum(0).median()) + 1e-4  # off any tie
    state, _, halting = full.act(threshold)
    expected = model.logits(state)[0]
    decoder = Decoder(model, ACTExit(threshold), 14)
    with torch.no_grad():
        logits, used = decoder.prefill(ids[:, :6])
        torch.testing.assert_close(logits, expected[5], atol=1e-5, rtol=0)
        for position in range(6, 14):
            logits, used = decoder.step(int(ids[0, position]))
            assert used == int(halting[0, position])
            torch.testing.assert_close(logits, expected[position], atol=1e-5, rtol=0)
    assert len(set(halting[0].tolist())) > 1  # the test exercises different halting steps
    cache = KVCache(model.config, 1, 14)  # every depth's cache holds what the full forward writes
    model(ids, cache=cache)
    torch.testing.assert_close(decoder.cache.keys, cache.keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder.cache.values, cache.values, atol=1e-5, rtol=0)


def test_act_generation_and_policy_errors():
    torch.manual_seed(0)
    model = LoopLM(tiny_config()).eval()
    result = generate(model, [1, 2, 3], 5, exit_policy=ACTExit(0.5), stop_ids=[])
    assert len(result.ids) == 5 and all(1 <= s <= 3 for s in result.steps)
    with pytest.raises(LoopLMError, match="choose one exit policy"):
        make_exit_policy(q=0.5, act=True)
    with pytest.raises(LoopLMError, match="ACT threshold must be in"):
        ACTExit(1.5)
