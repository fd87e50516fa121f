"""Attention variants: Qwen3.5 gated attention (output gate, per-head QK norm), partial RoPE,
zero-centred RMSNorm."""

import pytest
import torch

from looplm.errors import LoopLMError
from looplm.model.attention import Attention
from looplm.model.norms import RMSNorm
from looplm.model.rope import RotaryEmbedding, apply_rope

from conftest import tiny_config


def test_gate_scales_the_attention_output_by_its_sigmoid():
    torch.manual_seed(1)
    config = tiny_config(attention="gated")
    attention = Attention(config)
    assert attention.qkv.out_features == 2 * 32 + 2 * 32  # queries and gates, then keys and values
    x = torch.randn(2, 6, 32)
    cos, sin = RotaryEmbedding(config.rope_dim, 8).tables(0, 6)
    query_key, v, gate = attention._project(x)
    q, k = apply_rope(query_key, cos, sin).split([4, 4], dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = attention.out(o.transpose(1, 2).reshape(2, 6, -1) * torch.sigmoid(gate))
    torch.testing.assert_close(attention(x, cos, sin), expected)
    with torch.no_grad():  # a closed gate silences the layer
        attention.qkv.weight[[r for h in range(4) for r in range(h * 16 + 8, h * 16 + 16)]] = 0.0
        attention.qkv.weight[[r for h in range(4) for r in range(h * 16 + 8, h * 16 + 16)], 0] = -1e4
    closed = attention(torch.cat([torch.ones(2, 6, 1), x[..., 1:]], dim=-1), cos, sin)
    assert closed.abs().max() < 1e-6
    # q and k are unit-RMS per head after the QK norm (weights start at one).
    rms = query_key.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_partial_rope_rotates_only_the_first_dims():
    config = tiny_config(rope_fraction=0.25, d_model=64, n_heads=2)
    assert config.rope_dim == 8
    cos, sin = RotaryEmbedding(config.rope_dim, 16).tables(3, 4)
    x = torch.randn(1, 2, 4, 32)
    rotated = apply_rope(x, cos, sin)
    assert torch.equal(rotated[..., 8:], x[..., 8:])
    assert not torch.allclose(rotated[..., :8], x[..., :8])
    torch.testing.assert_close(rotated[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))  # a rotation


def test_zero_centered_norm_starts_as_the_plain_norm():
    x = torch.randn(3, 16)
    zero, plain = RMSNorm(16, zero_centered=True), RMSNorm(16)
    assert torch.all(zero.weight == 0)
    torch.testing.assert_close(zero(x), plain(x))
    with torch.no_grad():
        zero.weight.fill_(1.0)
    torch.testing.assert_close(zero(x), 2 * plain(x))


@pytest.mark.parametrize("overrides, message", [
    ({"attention": "mla2"}, "model.attention must be one of mha, gated"),
    ({"rope_fraction": 0.0}, "model.rope_fraction must be in (0, 1]"),
    ({"rope_fraction": 0.1}, "rotate at least 2 of the 8 head dims"),
])
def test_bad_attention_configs(overrides, message):
    with pytest.raises(LoopLMError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny_config(**overrides)


def test_rope_runs_in_the_dtype_of_its_input():
    """Under bf16 autocast the queries and keys stay bf16 (the float32 tables are rounded to bf16),
    within bf16's rounding of the float32 rotation; float32 input is rotated in float32."""
    rope = RotaryEmbedding(16, 32)
    cos, sin = rope.tables(0, 32)
    x = torch.randn(2, 3, 32, 16)
    assert apply_rope(x, cos, sin).dtype == torch.float32
    rotated = apply_rope(x.bfloat16(), cos, sin)
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.float(), apply_rope(x.bfloat16().float(), cos, sin), rtol=2e-2, atol=2e-2)
