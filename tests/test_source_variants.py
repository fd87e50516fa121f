"""The keys of the faithful source variants against hand computations: LayerNorm with bias and
the embedding norm, OpenMythos's loop step (lti_residual, LoRA on the output), ACT mixing of the
loop states against a per-position loop, MoE in the core only, dropout, and that the defaults
change nothing (an old config builds the same parameters)."""

import pytest
import torch

from looplm.config import ModelConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.carry import LoopCarry
from looplm.model.exit import act_mixing_step
from looplm.model.ffn import SwiGLU
from looplm.model.moe import MoE
from looplm.model.norms import LayerNorm

from conftest import tiny_config


def randomised(config: ModelConfig, seed: int = 0) -> LoopLM:
    torch.manual_seed(seed)
    model = LoopLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def test_layer_norm_is_torch_layer_norm_with_bias():
    norm = LayerNorm(8, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 8)
    mean, variance = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(norm(x), norm.weight * (x - mean) / torch.sqrt(variance + 1e-6) + norm.bias)


def test_layer_norm_and_embed_norm_reach_every_norm():
    model = randomised(tiny_config(norm_type="layer", embed_norm=True, n_coda_layers=1))
    norms = [name for name, module in model.named_modules() if isinstance(module, LayerNorm)]
    assert sorted(norms) == sorted(["embed_norm", "norm", *(f"{stack}.{i}.{part}" for stack, count in
                                                            (("core", 2), ("coda", 1)) for i in range(count)
                                                            for part in ("attn_norm", "attn_post_norm", "ffn_norm",
                                                                         "ffn_post_norm"))])
    ids = torch.randint(0, 64, (1, 5))
    expected = model.embed_norm(model.embed(ids))
    torch.testing.assert_close(model.embed_input(ids), expected)


def test_lti_residual_step_by_hand():
    config = tiny_config(injection="lti_residual", norm="pre", step_norm=False, loop_index_embedding=True,
                         depth_lora_rank=3, depth_lora_position="output", n_core_layers=1)
    model = randomised(config)
    from looplm.model.loop import loop_index_signal

    h, e = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    injection, lora = model.injection, model.depth_lora
    x = injection.input_norm(h + loop_index_signal(1, 32) + e)
    cos, sin = model.rope.tables(0, 4)
    y = model.core[0](x, cos, sin)
    y = y + lora.up(lora.down(y) * lora.scale[1])
    decay = torch.exp(-torch.exp(injection.log_dt + injection.log_a))
    expected = decay * h + injection.b * e + y
    torch.testing.assert_close(model.core_step(h, 1, injected=e), expected)
    assert injection.log_dt.shape == (1,)
    fresh = LoopLM(config).injection
    torch.testing.assert_close(fresh.decay(), torch.full((32,), torch.exp(torch.tensor(-1.0)).item()))
    assert torch.equal(fresh.b, torch.full((32,), 0.1))


def test_act_mixing_step_equals_a_per_position_loop():
    torch.manual_seed(0)
    steps, positions, threshold = 5, 40, 0.8
    logits = torch.randn(steps, positions) * 2
    states = torch.randn(steps, positions, 3)
    state = None
    for step in range(steps):
        state = act_mixing_step(state, states[step], logits[step], threshold)
        mixture = state[2]
        for position in range(positions):
            total, expected, halted = 0.0, torch.zeros(3), False
            for earlier in range(step + 1):
                p = float(torch.sigmoid(logits[earlier, position]))
                if halted:
                    continue
                weight = max(1.0 - total, 0.0) if total + p >= threshold else p
                expected += weight * states[earlier, position]
                total += p
                halted = total >= threshold
            torch.testing.assert_close(mixture[position], expected, atol=1e-6, rtol=0)


def test_act_mixing_readout_is_the_coda_of_the_mixture():
    model = randomised(tiny_config(act_mixing=True, norm="pre", step_norm=False, n_coda_layers=1,
                                   injection="additive"))
    ids = torch.randint(0, 64, (1, 6))
    output = model(ids, steps=3)
    e = model.embed_input(ids)
    h, state, carry = e, None, LoopCarry()
    for step in range(3):
        h = model.core_step(h, step, injected=e, carry=carry)
        z = model.exit_gate(h).squeeze(-1)
        state = act_mixing_step(state, h, z, model.config.act_threshold)
        torch.testing.assert_close(output.gate_logits[step], z)
    cos, sin = model.rope.tables(0, 6)
    expected = model.norm(model.coda[0](state[2], cos, sin))
    torch.testing.assert_close(output.hidden_states[2], expected)
    with pytest.raises(LoopLMError, match="already is the ACT mixture"):
        output.act()


def test_moe_in_the_core_only():
    model = LoopLM(tiny_config(ffn="moe", moe_scope="core", n_prelude_layers=1, n_coda_layers=1, n_experts=4,
                               expert_hidden=8, shared_expert_hidden=12, n_shared_experts=2))
    assert all(isinstance(layer.ffn, MoE) for layer in model.core)
    assert all(type(layer.ffn) is SwiGLU for layer in [*model.prelude, *model.coda])
    assert model.core[0].ffn.shared.hidden == 24


def test_dropout_only_in_training():
    config = tiny_config(dropout=0.3, n_coda_layers=1)
    model = randomised(config)
    plain = LoopLM(tiny_config(n_coda_layers=1)).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(model(ids).logits(), plain(ids).logits(), atol=0, rtol=0)
    model.train()
    first, second = model(ids).logits(), model(ids).logits()
    assert (first - second).abs().max() > 1e-3
    torch.manual_seed(5)
    again = model(ids).logits()
    torch.manual_seed(5)
    torch.testing.assert_close(model(ids).logits(), again, atol=0, rtol=0)


def test_defaults_build_what_they_built_before():
    """No new parameter appears for a config that leaves the new keys alone (old checkpoints
    load under strict names; tests/test_goldens.py holds their outputs)."""
    names = set(LoopLM(tiny_config(ffn="moe", attention="mla", mla_kv_rank=8)).state_dict())
    assert not any(name.endswith("norm.bias") or name.startswith(("embed_norm", "injection")) for name in names)


@pytest.mark.parametrize("values, message", [
    (dict(norm_type="batch"), "model.norm_type must be one of rms, layer"),
    (dict(act_mixing=True), "model.act_mixing reads halting probabilities"),
    (dict(dropout=1.0), "model.dropout must be in [0, 1)"),
    (dict(injection="lti_residual", loop_index_embedding=True, d_model=24, n_heads=2),
     "needs d_model / 8 even"),
    (dict(mla_value_dim=0), "model.mla_value_dim must be >= 1"),
])
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(LoopLMError, match=message.replace("[", r"\[").replace(")", r"\)")):
        tiny_config(**values)
