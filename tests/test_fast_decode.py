"""The fast decode backends (torch ``FastStepper``, C ``NativeStepper``) equal the reference
decoder token for token: logits, exit steps and every cache slot."""

import pytest
import torch

from looplm.generate import Decoder, FixedSteps, QExit, generate
from looplm.model import LoopLM

from conftest import tiny_config


@pytest.mark.parametrize("overrides", [
    {},
    {"norm": "pre", "step_norm": False},
    {"n_prelude_layers": 1, "n_coda_layers": 1, "n_kv_heads": 2, "tie_embeddings": False},
])
@pytest.mark.parametrize("policy", [FixedSteps(), FixedSteps(5), QExit(0.4)])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fast_steps_equal_reference_steps(overrides, policy, backend):
    torch.manual_seed(0)
    model = LoopLM(tiny_config(**overrides)).eval()
    torch.nn.init.normal_(model.exit_gate.weight, std=2.0)
    prompt = torch.randint(0, 64, (1, 5))
    tokens = torch.randint(0, 64, (20,)).tolist()
    reference = Decoder(model, policy, 25, backend="reference")
    fast = Decoder(model, policy, 25, backend=backend)
    assert fast.backend == backend
    with torch.no_grad():
        reference.prefill(prompt)
        fast.prefill(prompt)
        for token in tokens:
            expected, expected_steps = reference.step(token)
            logits, steps = fast.step(token)
            assert steps == expected_steps
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.cache.keys, reference.cache.keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.cache.values, reference.cache.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "torch", "native"])
def test_fast_generation_equals_reference_generation(tiny_model, backend):
    prompt = torch.randint(0, 64, (7,)).tolist()
    for policy in (FixedSteps(), QExit(0.5)):
        a = generate(tiny_model, prompt, 25, exit_policy=policy, stop_ids=[], backend=backend)
        b = generate(tiny_model, prompt, 25, exit_policy=policy, stop_ids=[], backend="reference")
        assert a.ids == b.ids and a.steps == b.steps


@pytest.mark.slow
def test_compiled_fast_steps_equal_reference(tiny_model):
    """torch.compile of the fast loop step keeps the reference decoder's tokens and exit steps."""
    prompt = torch.randint(0, 64, (7,)).tolist()
    for policy in (FixedSteps(), QExit(0.5)):
        compiled = generate(tiny_model, prompt, 12, exit_policy=policy, stop_ids=[], compile_steps=True)
        reference = generate(tiny_model, prompt, 12, exit_policy=policy, stop_ids=[], backend="reference")
        assert compiled.ids == reference.ids and compiled.steps == reference.steps


def test_bfloat16_fast_steps_equal_reference_steps():
    """A bf16 model decodes on the torch backend (its attention mask follows the cache's dtype)
    with the reference decoder's logits, within bf16 rounding."""
    torch.manual_seed(0)
    model = LoopLM(tiny_config(n_prelude_layers=1, n_coda_layers=1)).eval().to(torch.bfloat16)
    prompt = torch.randint(0, 64, (1, 5))
    reference = Decoder(model, FixedSteps(), 12, backend="reference")
    fast = Decoder(model, FixedSteps(), 12, backend="torch")
    with torch.no_grad():
        reference.prefill(prompt)
        fast.prefill(prompt)
        for token in torch.randint(0, 64, (6,)).tolist():
            expected, _ = reference.step(token)
            logits, _ = fast.step(token)
            assert logits.dtype == torch.bfloat16
            torch.testing.assert_close(logits, expected, atol=0.05, rtol=0.05)
