"""Mechanisms that read a token's earlier loop steps (looplm.model.carry): loop-axis memory
caching on GDN layers (model.loop_mc), nanochat's global gates (model.global_gates), and the
lrnnSMDDS ChannelMix FFN (model.ffn=channelmix).  The architecture contract
(tests/test_architectures.py) holds them to decode == forward, save/load and causality; here
they are checked against hand-written equations, against a leaky reading, and against off."""

import pytest
import torch
from torch.nn import functional as F

from looplm.config import ModelConfig
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.block import Layer
from looplm.model.carry import LoopCarry
from looplm.model.gdn import GatedDeltaNet, delta_rule_chunked, select_and_blend
from looplm.training.objectives import compute_loss

from conftest import tiny_config

LOOP_MC = dict(layer_pattern="G", n_core_layers=1, loop_steps=3, loop_mc=True, loop_mc_top_k=2,
               loop_mc_detach=False)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LoopLM(tiny_config(**overrides)).eval()


def _leaky_read(self, online, q, k, v, g, beta, x, state_store, carry):
    """The public version's reading: each earlier loop's END-OF-SEQUENCE state and key sum."""
    batch, heads, length, dim = q.shape
    carry.put(self, (k, v, g, beta))
    earlier = carry.earlier(self)
    if not earlier:
        return online
    finals = [delta_rule_chunked(q, k_, v_, g_, beta_)[1] for k_, v_, g_, beta_ in earlier]
    reads = torch.stack([torch.einsum("bhkv,bhnk->bhnv", state, q) for state in finals], dim=3)
    keys = torch.stack([F.normalize(k_.sum(dim=2), dim=-1) for k_, *_ in earlier], dim=2)  # [B, H, j, d]
    route = F.normalize(self.loop_router(x).view(batch, length, heads, dim), dim=-1).transpose(1, 2)
    scores = torch.einsum("bhnk,bhjk->bhnj", route, keys) * self.head_dim ** -0.5
    return select_and_blend(online, scores, reads, self.loop_online_bias, self.loop_top_k)


def _changed_logits(model, position=6):
    ids = torch.randint(0, 64, (1, 11), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, position] = (ids[0, position] + 7) % 64
    return model(ids), model(changed)


def test_later_loops_read_only_earlier_tokens(monkeypatch):
    """Token j changes: no logit before j moves at any loop step; the leaky reading moves them
    from the second step on (so this test detects the leak)."""
    model = _model(**LOOP_MC)
    a, b = _changed_logits(model)
    for step in range(1, 4):
        torch.testing.assert_close(a.logits(step)[:, :6], b.logits(step)[:, :6], atol=1e-6, rtol=0)
    monkeypatch.setattr(GatedDeltaNet, "_loop_read", _leaky_read)
    a, b = _changed_logits(model)
    torch.testing.assert_close(a.logits(1)[:, :6], b.logits(1)[:, :6], atol=1e-6, rtol=0)  # nothing to read yet
    assert (a.logits(2)[:, :6] - b.logits(2)[:, :6]).abs().max() > 1e-4


def test_loop_memory_changes_later_steps_only():
    """The same weights with loop_mc off: step 1 (no earlier loop) is identical, later steps differ."""
    on = _model(**LOOP_MC)
    off = LoopLM(tiny_config(**{**LOOP_MC, "loop_mc": False})).eval()
    missing = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing.missing_keys
    assert sorted(missing.unexpected_keys) == ["core.0.attn.loop_online_bias", "core.0.attn.loop_router.weight"]
    ids = torch.randint(0, 64, (2, 9))
    with_memory, without = on(ids), off(ids)
    torch.testing.assert_close(with_memory.logits(1), without.logits(1), atol=0, rtol=0)
    for step in (2, 3):
        assert (with_memory.logits(step) - without.logits(step)).abs().max() > 1e-3


def test_loop_memory_reads_each_earlier_loops_state_at_the_same_position():
    """One GDN layer, top-k ≥ loops, online logit −∞: the output at step 2 is the softmax mix of
    M^{s'}_tᵀ q_t over s' = 0, 1, each state computed by running loop s' on the prefix ≤ t."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=16, d_model=16, n_heads=2, layer_pattern="G", loop_mc=True, loop_mc_top_k=4,
                         n_core_layers=1, loop_steps=3)
    layer = GatedDeltaNet(config, looped=True).eval()
    with torch.no_grad():
        layer.loop_online_bias.fill_(-1e4)
    inputs = [torch.randn(1, 7, 16) for _ in range(3)]
    carry = LoopCarry()
    captured = []
    original = layer._loop_read

    def capture(online, q, k, v, g, beta, *rest):
        captured.append((q, k, v, g, beta))
        return original(online, q, k, v, g, beta, *rest)

    layer._loop_read = capture
    outputs = []
    for step, x in enumerate(inputs):
        carry.step = step
        outputs.append(layer(x, carry=carry))
    q2 = captured[2][0]
    route = F.normalize(layer.loop_router(inputs[2]).view(1, 7, 2, 8), dim=-1).transpose(1, 2)
    expected = torch.zeros_like(q2)
    for t in range(7):
        reads, scores = [], []
        for _, k, v, g, beta in captured[:2]:
            _, state = delta_rule_chunked(q2[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], g[:, :, :t + 1],
                                          beta[:, :, :t + 1], chunk=4)
            reads.append(torch.einsum("bhkv,bhk->bhv", state, q2[:, :, t]))
            key = F.normalize(k[:, :, :t + 1].sum(dim=2), dim=-1)
            scores.append((route[:, :, t] * key).sum(-1) / 8 ** 0.5)
        weights = torch.softmax(torch.stack(scores, dim=-1), dim=-1)
        expected[:, :, t] = (weights[..., None] * torch.stack(reads, dim=2)).sum(dim=2)
    z = layer.in_proj(inputs[2])[..., 48:64].view(1, 7, 2, 8)
    reference = layer.out((layer.out_norm(expected.transpose(1, 2)) * F.silu(z)).reshape(1, 7, 16))
    torch.testing.assert_close(outputs[2], reference, atol=1e-5, rtol=0)


def test_global_gates_follow_their_equations():
    """Three steps of one gated layer against the equations of looplm.model.global_gates."""
    torch.manual_seed(0)
    config = tiny_config(global_gates=True, norm="pre")
    model = LoopLM(config).eval()
    layer: Layer = model.core[0]
    with torch.no_grad():
        layer.global_gates.g_qk.normal_()
        layer.global_gates.g_ffn.normal_()
    cos, sin = model.rope.tables(0, 5)
    carry, state, updates = LoopCarry(), None, []
    for step in range(3):
        h = torch.randn(1, 5, 32)
        carry.step = step
        got = layer(h, cos, sin, carry=carry)
        a_in = layer.attn_norm(h)
        if state is not None:
            mix = torch.sigmoid(layer.global_gates.g_qk)
            a_in = mix * a_in + (1 - mix) * state
        attention = layer.attn(a_in, cos, sin)
        f_in = layer.ffn_norm(h + attention)
        if state is not None:
            mix = torch.sigmoid(layer.global_gates.g_ffn)
            f_in = mix * f_in + (1 - mix) * state
        ffn = layer.ffn(f_in)
        torch.testing.assert_close(got, h + attention + ffn, atol=1e-6, rtol=0)
        updates.append(0.5 * (attention + ffn))
        state = torch.stack(updates).mean(0)  # G_{s+1}: the mean over steps 0..s


def test_global_gates_change_outputs_after_the_first_step():
    on = _model(global_gates=True)
    off = LoopLM(tiny_config()).eval()
    off.load_state_dict(on.state_dict(), strict=False)
    ids = torch.randint(0, 64, (1, 8))
    a, b = on(ids), off(ids)
    torch.testing.assert_close(a.logits(1), b.logits(1), atol=0, rtol=0)
    assert (a.logits(2) - b.logits(2)).abs().max() > 1e-3


def test_channel_mix_is_a_one_step_shift_then_swiglu():
    torch.manual_seed(0)
    layer = LoopLM(tiny_config(ffn="channelmix")).core[0].ffn
    with torch.no_grad():
        layer.channel_mix.normal_()
    x = torch.randn(2, 6, 32)
    mix = torch.sigmoid(layer.channel_mix)
    expected = []
    for t in range(6):
        before = x[:, t - 1] if t else torch.zeros(2, 32)
        xm = mix * x[:, t] + (1 - mix) * before
        gate, up = (xm @ layer.gate_up.weight.T).split(layer.hidden, dim=-1)
        expected.append((F.silu(gate) * up) @ layer.down.weight.T)
    torch.testing.assert_close(layer(x), torch.stack(expected, dim=1), atol=1e-6, rtol=0)
    previous = torch.zeros(2, 32)  # the decode cache: pieces continue the sequence
    pieces = torch.cat([layer(x[:, :4], previous), layer(x[:, 4:5], previous), layer(x[:, 5:], previous)], dim=1)
    torch.testing.assert_close(pieces, layer(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(previous, x[:, -1])


@pytest.mark.parametrize("overrides", [{**LOOP_MC, "n_core_layers": 2, "layer_pattern": "GA"},
                                       {"global_gates": True, "ffn": "channelmix"}])
def test_activation_checkpointing_gives_the_same_gradients(overrides):
    from looplm.training.wrapping import checkpoint_layers

    model = _model(**overrides).train()
    ids = torch.randint(0, 64, (2, 9))

    def gradients():
        model.zero_grad()
        compute_loss(model(ids), ids, "stage1").loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = gradients()
    checkpoint_layers(model)
    checked = gradients()
    assert len(plain) == len(checked)
    for a, b in zip(plain, checked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides, field", [
    ({"loop_mc": True}, "model.loop_mc"),
    ({"loop_mc": True, "layer_pattern": "AG", "n_core_layers": 1, "n_coda_layers": 1}, "model.loop_mc"),
    ({"loop_mc": True, "layer_pattern": "G", "loop_mc_top_k": 0}, "model.loop_mc_top_k"),
    ({"ffn": "channel"}, "model.ffn"),
])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(LoopLMError, match=field.replace(".", r"\.")) as error:
        tiny_config(**overrides)
    assert "\n" not in str(error.value)


def test_core_step_without_a_carry_is_refused():
    model = _model(global_gates=True)
    with pytest.raises(LoopLMError, match="LoopCarry"):
        model.core_step(torch.zeros(1, 2, 32), 0)
