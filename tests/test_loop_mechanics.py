"""Loop mechanics (docs/MATH.md §5): injection kinds, decay bounds in every precision, stability
with depth, the loop-index signal, depth LoRA's clamped step index, the noise initial state."""

import math

import pytest
import torch

from looplm.config import ModelConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.loop import loop_index_signal, make_injection

from conftest import tiny_config


def state_norms(injection: str, steps: int, scale: float = 3.0) -> list[float]:
    """Largest per-position state norm after each loop step, weights scaled up ``scale``×."""
    torch.manual_seed(0)
    model = LoopLM(tiny_config(norm="pre", step_norm=False, injection=injection)).eval()
    norms = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("injection") and "norm" not in name:
                parameter.mul_(scale)
        e = model.embed_input(torch.randint(0, 64, (2, 12)))
        h = model.initial_state(e)
        for step in range(steps):
            h = model.core_step(h, step, 0, None, e)
            norms.append(h.norm(dim=-1).max().item())
    return norms


def test_decaying_injections_stay_bounded_where_additive_grows_without_bound():
    trained = tiny_config().loop_steps
    for kind in ("lti", "diagonal"):
        norms = state_norms(kind, 16 * trained)
        assert all(math.isfinite(n) for n in norms)
        assert max(norms[4 * trained - 1:]) < 1.5 * norms[trained - 1], (kind, norms)
    additive = state_norms("additive", 16 * trained)
    assert additive[4 * trained - 1] > 3 * additive[trained - 1]
    assert additive[16 * trained - 1] > 3 * additive[4 * trained - 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lti", "diagonal"])
def test_decay_strictly_inside_zero_one_in_every_precision(kind, dtype):
    injection = make_injection(tiny_config(injection=kind)).to(dtype)
    with torch.no_grad():
        for value in (-40.0, -17.5, -8.5, -6.3, 0.0, 5.0):  # around where exp(−exp(x)) rounds to 1
            for parameter in injection.parameters():
                if parameter.dim() == 1:
                    parameter.fill_(value)
            decay = injection.decay()
            assert decay.dtype == dtype
            assert torch.all(decay < 1) and torch.all(decay >= 0), (value, decay.max())
            h = torch.ones(4, tiny_config().d_model, dtype=dtype)
            assert torch.all((decay * h).abs() < h.abs())  # the contraction survives rounding


def test_injection_kinds_compute_their_formulas():
    torch.manual_seed(0)
    h, e = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    assert make_injection(tiny_config(injection="identity")) is None  # u = h: no module
    assert torch.equal(make_injection(tiny_config(injection="additive"))(h, e), h + e)
    lti = make_injection(tiny_config(injection="lti"))
    torch.testing.assert_close(lti.decay(), torch.full((32,), 0.5))  # initial A = 0.5
    torch.testing.assert_close(lti(h, e), 0.5 * h + e)
    diagonal = make_injection(tiny_config(injection="diagonal"))
    torch.testing.assert_close(diagonal(h, e), 0.5 * h + math.log(2.0) * e)  # Ā = 0.5, Δ = log 2, B = I
    concat = make_injection(tiny_config(injection="concat"))
    torch.testing.assert_close(concat(h, e), h + e)  # adapter starts as [I | I]
    assert sum(p.numel() for p in make_injection(tiny_config(injection="additive")).parameters()) == 0


def test_loop_index_signal_is_a_sinusoid_on_the_first_eighth():
    signal = loop_index_signal(3, 64)
    assert torch.all(signal[8:] == 0)
    torch.testing.assert_close(signal[0], torch.tensor(math.sin(3.0)))
    torch.testing.assert_close(signal[4], torch.tensor(math.cos(3.0)))
    assert not torch.equal(loop_index_signal(2, 64), signal)


def test_depth_lora_clamps_the_step_index_beyond_training_depth():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(depth_lora_rank=4)).eval()
    with torch.no_grad():
        model.depth_lora.scale.copy_(torch.randn_like(model.depth_lora.scale))
        torch.nn.init.normal_(model.depth_lora.up.weight)
        x = torch.randn(1, 2, 32)
        last = model.config.loop_steps - 1
        assert torch.equal(model.depth_lora(x, last + 3), model.depth_lora(x, last))
        assert not torch.equal(model.depth_lora(x, 0), model.depth_lora(x, 1))


def test_noise_state_fresh_in_training_fixed_by_position_in_eval():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(injection="additive", initial_state="noise"))
    e = torch.zeros(1, 6, 32)
    model.train()
    assert not torch.equal(model.initial_state(e), model.initial_state(e))
    model.eval()
    whole = model.initial_state(e)
    torch.testing.assert_close(model.initial_state(e[:, :2], start=4), whole[:, 4:6])
    assert whole.std().item() == pytest.approx(1.0, abs=0.25)


def test_plain_loop_adds_no_parameters():
    assert LoopLM(tiny_config()).num_parameters() == LoopLM(tiny_config(injection="additive")).num_parameters()
    assert LoopLM(tiny_config(injection="lti")).num_parameters() == LoopLM(tiny_config()).num_parameters() + 3 * 32


@pytest.mark.parametrize("overrides, message", [
    ({"injection": "sum"},
     "model.injection must be one of identity, additive, lti, diagonal, concat, lti_residual, got 'sum'"),
    ({"initial_state": "zeros"}, "model.initial_state must be one of prelude, noise"),
    ({"initial_state": "noise"}, "initial_state=noise needs an injection other than identity"),
    ({"depth_lora_rank": -1}, "model.depth_lora_rank must be >= 0"),
    ({"injection": "lti", "initial_noise_std": 0}, "model.initial_noise_std must be > 0"),
])
def test_bad_loop_configs_fail_at_construction(overrides, message):
    with pytest.raises(LoopLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**overrides)
