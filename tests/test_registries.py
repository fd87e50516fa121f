"""One registry per kind of choice (looplm.registry): every name a config may give is
registered, each builds its own class, and an unknown name is a one-line error naming the
choices."""

import pytest

from looplm import config as config_module
from looplm.errors import LoopLMError
from looplm.model.block import ATTENTIONS, FFNS, MIXERS, Layer
from looplm.model.loop import INJECTIONS, make_injection
from looplm.registry import Registry

from conftest import tiny_config


def test_every_config_choice_is_registered():
    assert set(INJECTIONS) | {"identity"} == set(config_module.INJECTIONS)
    assert set(FFNS) == set(config_module.FFN_KINDS)
    assert set(ATTENTIONS) == set(config_module.ATTENTION_KINDS)
    assert set(MIXERS) == set(config_module.LAYER_KINDS)


@pytest.mark.parametrize("kind", sorted(INJECTIONS))
def test_each_injection_builds_its_class(kind):
    injection = make_injection(tiny_config(injection=kind, norm="pre", step_norm=False))
    assert type(injection) is INJECTIONS[kind] and injection.kind == kind
    assert injection.residual == (kind == "lti_residual")


def test_layers_take_their_mixer_and_ffn_from_the_registries():
    config = tiny_config(layer_pattern="AGR", ffn="channelmix")
    kinds = [type(Layer(config, kind).attn).__name__ for kind in "AGR"]
    assert kinds == ["Attention", "GatedDeltaNet", "RWKVSlotMixer"]
    assert type(Layer(config, "A").ffn).__name__ == "ChannelMix"
    assert type(Layer(tiny_config(attention="mla", mla_kv_rank=8, mla_rope_dim=4), "A").attn).__name__ == \
        "MultiHeadLatentAttention"


def test_an_unknown_name_is_one_line_naming_the_choices():
    with pytest.raises(LoopLMError, match=r"^unknown injection 'spiral': choose one of additive, lti, "):
        INJECTIONS["spiral"]
    with pytest.raises(LoopLMError, match="unknown layer kind 'X'"):
        MIXERS["X"]
    registry = Registry("thing")
    registry.register("a")(int)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(float)
