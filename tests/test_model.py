import pytest
import torch

from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.exit import exit_cdf, exit_distribution, q_exit_steps

from conftest import tiny_config


def test_output_shapes(tiny_model):
    ids = torch.randint(0, 64, (2, 11))
    output = tiny_model(ids)
    assert output.steps == 3
    assert output.logits().shape == (2, 11, 64)
    assert output.step_logits.shape == (3, 2, 11, 64)
    assert output.gate_logits.shape == (3, 2, 11)
    assert output.exit_distribution.shape == (3, 2, 11)
    assert all(h.shape == (2, 11, 32) for h in output.hidden_states)


def test_exit_distribution_matches_hand_computation():
    lambdas = torch.tensor([0.2, 0.5, 0.3])
    logits = torch.log(lambdas / (1 - lambdas))
    p = exit_distribution(logits)
    # p1 = λ1; p2 = (1 − λ1) λ2; p3 = leftover (1 − λ1)(1 − λ2), λ3 unused.
    assert torch.allclose(p, torch.tensor([0.2, 0.8 * 0.5, 0.8 * 0.5]), atol=1e-6)
    assert torch.allclose(exit_cdf(logits), torch.tensor([0.2, 0.6, 1.0]), atol=1e-6)
    assert q_exit_steps(logits, 0.5).item() == 2
    assert q_exit_steps(logits, 0.1).item() == 1
    assert q_exit_steps(logits, 1.0).item() == 3


def test_exit_distribution_sums_to_one_even_for_extreme_gates():
    logits = torch.tensor([[-40.0, 40.0, 0.0, 3.0], [30.0, -30.0, 5.0, -5.0]]).T
    p = exit_distribution(logits)
    assert torch.isfinite(p).all()
    assert torch.allclose(p.sum(0), torch.ones(2))


def test_model_exit_distribution_sums_to_one(tiny_model):
    output = tiny_model(torch.randint(0, 64, (3, 9)), steps=5)
    assert torch.allclose(output.exit_distribution.sum(0), torch.ones(3, 9), atol=1e-6)


def test_causality_changing_token_j_keeps_earlier_logits(tiny_model):
    ids = torch.randint(0, 64, (1, 16))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 64
    a, b = tiny_model(ids, steps=4), tiny_model(changed, steps=4)
    for step in range(1, 5):
        assert torch.equal(a.logits(step)[:, :9], b.logits(step)[:, :9])
        assert not torch.allclose(a.logits(step)[:, 9:], b.logits(step)[:, 9:])
    assert torch.equal(a.gate_logits[:, :, :9], b.gate_logits[:, :, :9])


def test_steps_beyond_training_depth_run_and_prefix_steps_agree(tiny_model):
    ids = torch.randint(0, 64, (2, 7))
    short, long = tiny_model(ids, steps=3), tiny_model(ids, steps=9)
    assert long.steps == 9 and torch.isfinite(long.logits()).all()
    for step in range(1, 4):
        assert torch.equal(short.logits(step), long.logits(step))


def test_steps_below_one_is_a_user_error(tiny_model):
    with pytest.raises(LoopLMError):
        tiny_model(torch.zeros(1, 3, dtype=torch.long), steps=0)


def test_sequence_longer_than_context_is_a_user_error(tiny_model):
    with pytest.raises(LoopLMError) as error:
        tiny_model(torch.zeros(1, 49, dtype=torch.long))
    assert "max_seq_len" in str(error.value)


@pytest.mark.parametrize("overrides", [
    {"norm": "pre", "step_norm": False},
    {"n_prelude_layers": 1, "n_coda_layers": 1},
    {"n_kv_heads": 2, "tie_embeddings": False},
])
def test_variants_build_and_stay_causal(overrides):
    torch.manual_seed(1)
    model = LoopLM(tiny_config(**overrides)).eval()
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 3) % 64
    a, b = model(ids), model(changed)
    assert torch.equal(a.logits()[:, :6], b.logits()[:, :6])


def test_step_norm_feeds_next_step():
    """Ouro: the final norm closes every step, so each readout has unit RMS (× norm weight 1)."""
    torch.manual_seed(0)
    model = LoopLM(tiny_config(step_norm=True))
    output = model(torch.randint(0, 64, (1, 5)))
    for hidden in output.hidden_states:
        rms = hidden.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


def test_no_gate_model():
    model = LoopLM(tiny_config(exit_gate=False))
    output = model(torch.randint(0, 64, (1, 4)))
    assert output.gate_logits is None
    with pytest.raises(LoopLMError):
        _ = output.exit_distribution


def test_fused_rms_norm_equals_reference_values_and_gradients():
    from torch.nn import functional as F

    from looplm.model.norms import rms_norm_fused

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_fused(a, b, 1e-6), (x, weight))
    grad = torch.randn(3, 5, 16, dtype=torch.float64)
    fused = rms_norm_fused(x, weight, 1e-6)
    reference = F.rms_norm(x, (16,), weight, 1e-6)
    torch.testing.assert_close(fused, reference)
    for ours, theirs in zip(torch.autograd.grad(fused, (x, weight), grad),
                            torch.autograd.grad(reference, (x, weight), grad)):
        torch.testing.assert_close(ours, theirs)
