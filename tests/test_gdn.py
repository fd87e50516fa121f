"""Gated DeltaNet: chunked (WY) form equals the recurrent reference (values, final state and
gradients, fp32 1e-4) for any length and chunk; the layer's decode cache carries the conv and
recurrent state so decode equals the full forward; layer patterns build hybrids."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.cache import KVCache, recurrent_state_shapes
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.gdn import GatedDeltaNet, delta_rule_chunked, delta_rule_recurrent

from conftest import tiny_config


def random_inputs(batch, heads, length, key_dim, value_dim, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    q = torch.nn.functional.normalize(randn(batch, heads, length, key_dim), dim=-1) / key_dim ** 0.5
    k = torch.nn.functional.normalize(randn(batch, heads, length, key_dim), dim=-1)
    v = randn(batch, heads, length, value_dim)
    g = -torch.nn.functional.softplus(randn(batch, heads, length)) * 0.5
    beta = torch.sigmoid(randn(batch, heads, length))
    state = randn(batch, heads, key_dim, value_dim) * 0.1
    return [t.requires_grad_() for t in (q, k, v, g, beta, state)]


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 40), chunk=st.sampled_from([1, 4, 8, 16, 64]), key_dim=st.integers(2, 9),
       value_dim=st.integers(1, 9), with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_equals_recurrent_with_gradients(length, chunk, key_dim, value_dim, with_state, seed):
    inputs = random_inputs(2, 3, length, key_dim, value_dim, seed)
    state = inputs[5] if with_state else None
    fast_out, fast_state = delta_rule_chunked(*inputs[:5], state, chunk=chunk)
    ref_out, ref_state = delta_rule_recurrent(*inputs[:5], state)
    torch.testing.assert_close(fast_out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast_state, ref_state, atol=1e-4, rtol=1e-4)
    weights = torch.randn_like(ref_out)
    leaves = inputs if with_state else inputs[:5]
    fast_grads = torch.autograd.grad((fast_out * weights).sum() + fast_state.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_state.sum(), leaves)
    for ours, theirs in zip(fast_grads, ref_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_recurrence_by_hand_for_one_head():
    # Two steps, d_k = d_v = 1: M₁ = β₁ v₁ k₁ (from 0); M₂ = α₂ M₁ + k₂ β₂ (v₂ − α₂ M₁ k₂).
    q, k, v = (torch.tensor([[[[a], [b]]]]) for a, b in ((1.0, 2.0), (1.0, 1.0), (3.0, 5.0)))
    g, beta = torch.log(torch.tensor([[[1.0, 0.5]]])), torch.tensor([[[0.5, 0.25]]])
    out, state = delta_rule_recurrent(q, k, v, g, beta)
    m1 = 0.5 * 3.0
    m2 = 0.5 * m1 + 0.25 * (5.0 - 0.5 * m1)
    torch.testing.assert_close(out.view(-1), torch.tensor([m1 * 1.0, m2 * 2.0]))
    torch.testing.assert_close(state.view(-1), torch.tensor([m2]))


@pytest.mark.parametrize("chunks", [[9, 1, 1, 5], [1] * 8, [16]])
def test_layer_with_state_cache_equals_full_forward(chunks):
    torch.manual_seed(0)
    layer = GatedDeltaNet(tiny_config()).eval()
    layer.chunk_size = 4
    x = torch.randn(2, sum(chunks), 32)
    full = layer(x)
    conv_shape, state_shape = recurrent_state_shapes(tiny_config(layer_pattern="G"), "G", 2, 16)
    store = (torch.zeros(conv_shape), torch.zeros(state_shape))
    begin, pieces = 0, []
    for size in chunks:
        pieces.append(layer(x[:, begin:begin + size], state_store=store))
        begin += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_layer_pattern_builds_hybrids_and_the_cache_splits_by_kind():
    config = tiny_config(layer_pattern="GGGA", n_core_layers=4, n_prelude_layers=1)
    model = LoopLM(config)
    assert [layer.kind for layer in model.core] == ["G", "G", "G", "A"]
    assert isinstance(model.prelude[0].attn, GatedDeltaNet)
    cache = KVCache(config, 1, 8)
    assert cache.keys.shape[0] == config.loop_steps  # one attention layer per step
    assert cache.recurrent_states.shape[0] == 1 + 3 * config.loop_steps
    assert cache.store("core", 3, 2)[0].shape == (1, 4, 8, 8)
    assert cache.store("core", 0, 2)[1].shape == (1, 4, 8, 8)
    with pytest.raises(LoopLMError, match="model.layer_pattern may only use A, G"):
        tiny_config(layer_pattern="GAX")


def test_memory_caching_mixes_only_completed_segments():
    torch.manual_seed(0)
    plain = GatedDeltaNet(tiny_config(layer_pattern="G")).eval()
    cached = GatedDeltaNet(tiny_config(layer_pattern="G", mc_segment_size=4, mc_top_k=2)).eval()
    cached.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 13, 32)
    a, b = plain(x), cached(x)
    torch.testing.assert_close(b[:, :4], a[:, :4])  # the first segment has no memory yet: online only
    assert (b[:, 4:] - a[:, 4:]).abs().amax(dim=-1).min() > 1e-6  # later tokens read cached segments
    single = GatedDeltaNet(tiny_config(layer_pattern="G", mc_segment_size=4, mc_top_k=1)).eval()
    single.load_state_dict(cached.state_dict())
    out = single(x)
    torch.testing.assert_close(out[:, :8], b[:, :8])  # one completed segment: top-1 = top-2
    assert not torch.allclose(out[:, 8:], b[:, 8:])  # two completed segments: the choice matters
    with pytest.raises(LoopLMError, match="mc_segment_size caches Gated DeltaNet states"):
        tiny_config(mc_segment_size=4)


def _fla_contract_kernel(calls):
    """A stand-in for fla's ``chunk_gated_delta_rule`` built from its documented contract
    (q, k [B, S, H, d_k]; v [B, S, H, d_v]; g, beta [B, S, H]; q scaled by ``scale``; state
    [B, H, d_k, d_v]) on top of our recurrent reference: a wrong layout or scale changes it."""
    def kernel(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
        calls.append(q.shape)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        heads_first = [x.transpose(1, 2) for x in (q * scale, k, v, g, beta)]
        outputs, state = delta_rule_recurrent(*heads_first, initial_state)
        return outputs.transpose(1, 2), state if output_final_state else None
    return kernel


def test_fla_kernel_path_matches_the_chunked_form(monkeypatch):
    """The CUDA dispatch to flash-linear-attention, exercised on CPU with a contract stand-in:
    the model's logits and final states equal the torch chunked form (and the kernel ran, in
    sequence-first layout); a single decode token keeps the recurrent form."""
    from looplm.model import gdn

    torch.manual_seed(0)
    model = LoopLM(tiny_config(layer_pattern="GA", loop_steps=2)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    expected = model(ids).logits()
    calls = []
    monkeypatch.setattr(gdn, "sequence_kernel", lambda q: _fla_contract_kernel(calls))
    assert torch.allclose(model(ids).logits(), expected, atol=1e-5)
    batch, heads, head_dim = 2, model.config.n_heads, model.config.head_dim
    assert calls and all(shape == (batch, 11, heads, head_dim) for shape in calls)
    monkeypatch.setenv("LOOPLM_FLA", "0")
    assert gdn.fla_kernel() is None
