"""MLA: the cache holds only the latent and the rope key; the absorbed decode attention equals
recomputing K/V from the cached latent; bad configs fail at construction."""

import pytest
import torch

from looplm.cache import KVCache
from looplm.errors import LoopLMError
from looplm.generate import Decoder, FixedSteps
from looplm.model import LoopLM
from looplm.model.mla import MultiHeadLatentAttention

from conftest import tiny_config

MLA = dict(attention="mla", mla_kv_rank=12, mla_rope_dim=4)


def test_cache_holds_only_latent_and_rope_key():
    config = tiny_config(**MLA)
    cache = KVCache(config, 1, 10)
    slots = config.n_core_layers * config.loop_steps
    assert cache.keys.shape == (slots, 1, 1, 10, 12) and cache.values.shape == (slots, 1, 1, 10, 4)
    assert cache.bytes_per_token == slots * (12 + 4) * 4
    dense = KVCache(tiny_config(), 1, 10)
    assert dense.bytes_per_token == slots * 2 * 4 * 8 * 4
    assert cache.bytes_per_token < dense.bytes_per_token / 3


def test_cache_contents_are_the_latent_the_forward_computes():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(**MLA)).eval()
    ids = torch.randint(0, 64, (1, 7))
    cache = KVCache(model.config, 1, 7)
    model(ids, cache=cache)
    attention = model.core[0].attn
    cos, sin = model.rope.tables(0, 7)
    e = model.embed_input(ids)
    c, k_rope = attention.latent(model.core[0].attn_norm(e), cos, sin)
    torch.testing.assert_close(cache.keys[cache.slot("core", 0, 0)], c, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache.values[cache.slot("core", 0, 0)], k_rope, atol=1e-6, rtol=0)


@pytest.mark.parametrize("q_rank", [0, 16])
def test_absorbed_decode_equals_recomputed_keys_and_values(monkeypatch, q_rank):
    torch.manual_seed(1)
    model = LoopLM(tiny_config(mla_q_rank=q_rank, **MLA)).eval()
    ids = torch.randint(0, 64, (1, 12))

    def decode(absorb: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(MultiHeadLatentAttention, "absorb_for_decode", absorb)
        decoder = Decoder(model, FixedSteps(), 12, backend="reference")
        with torch.no_grad():
            decoder.prefill(ids[:, :5])
            return [decoder.step(int(token))[0] for token in ids[0, 5:]]

    for absorbed, recomputed in zip(decode(True), decode(False)):
        torch.testing.assert_close(absorbed, recomputed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    ({"mla_kv_rank": 0}, "model.mla_kv_rank must be >= 1"),
    ({"mla_rope_dim": 3}, "model.mla_rope_dim must be even and >= 2, got 3"),
    ({"mla_q_rank": -1}, "model.mla_q_rank must be >= 0"),
])
def test_bad_mla_configs(overrides, message):
    with pytest.raises(LoopLMError, match=message):
        tiny_config(attention="mla", **overrides)
