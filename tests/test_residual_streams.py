"""mHC hyper-connections and block attention residuals (looplm.model.residual): the Sinkhorn
projection, the coefficient equations by hand, the plain residual as a special case, the streams
carried through the loop, and block attention residuals against their equations."""

import math

import pytest
import torch

from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.carry import LoopCarry
from looplm.model.residual import DepthAttention, DepthSources, HyperConnection, sinkhorn

from conftest import tiny_config


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_sinkhorn_gives_doubly_stochastic_matrices(scale):
    logits = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0)) * scale
    matrix = sinkhorn(logits)
    assert (matrix >= 0).all()
    torch.testing.assert_close(matrix.sum(-1), torch.ones(6, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(matrix.sum(-2), torch.ones(6, 4), atol=1e-6, rtol=0)
    # Already doubly stochastic after exp (constant row and column sums): only rescaled.
    torch.testing.assert_close(sinkhorn(torch.zeros(3, 3)), torch.full((3, 3), 1 / 3))


def test_sinkhorn_stays_finite_for_huge_logits():
    # 20 iterations do not converge on such matrices, but in log space nothing overflows and the
    # last normalisation (columns) holds exactly.
    matrix = sinkhorn(torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0)) * 200)
    assert torch.isfinite(matrix).all()
    torch.testing.assert_close(matrix.sum(-2), torch.ones(6, 4), atol=1e-6, rtol=0)


def test_hyper_connection_coefficients_by_hand():
    torch.manual_seed(0)
    layer = HyperConnection(tiny_config(d_model=4, n_heads=2, hyper_connections=2))
    with torch.no_grad():
        layer.gain.copy_(torch.tensor([0.5, -1.0, 2.0]))
        for parameter in (layer.pre_bias, layer.post_bias, layer.mix_bias):
            parameter.normal_()
    streams = torch.randn(1, 1, 2, 4)
    flat = streams.reshape(8)
    normed = flat / torch.sqrt(flat.pow(2).mean() + layer.eps)
    z = layer.router.weight @ normed
    pre = torch.sigmoid(0.5 * z[:2] + layer.pre_bias)
    post = 2 * torch.sigmoid(-1.0 * z[2:4] + layer.post_bias)
    mix = torch.exp(2.0 * z[4:].view(2, 2) + layer.mix_bias)
    for _ in range(200):  # Sinkhorn–Knopp to convergence, written plainly
        mix = mix / mix.sum(1, keepdim=True)
        mix = mix / mix.sum(0, keepdim=True)
    x, context = layer.read(streams)
    torch.testing.assert_close(x[0, 0], pre[0] * streams[0, 0, 0] + pre[1] * streams[0, 0, 1])
    update = torch.randn(1, 1, 4)
    expected = torch.stack([mix[i, 0] * streams[0, 0, 0] + mix[i, 1] * streams[0, 0, 1] + post[i] * update[0, 0]
                            for i in range(2)])
    torch.testing.assert_close(layer.write(streams, update, context)[0, 0], expected, atol=1e-5, rtol=1e-5)


def _neutral(model: LoopLM) -> None:
    """mix = I, pre = 1/n, post = 1 in every hyper-connection: each stream is the plain residual."""
    n = model.config.residual_streams
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HyperConnection):
                module.gain.zero_()
                module.pre_bias.fill_(-math.log(n - 1))
                module.post_bias.zero_()
                module.mix_bias.fill_(-1e4).fill_diagonal_(0.0)


@pytest.mark.parametrize("mechanics", [
    {"n_prelude_layers": 1, "n_coda_layers": 1},  # Ouro's step norm, sandwich norms
    {"norm": "pre", "step_norm": False, "injection": "lti", "loop_index_embedding": True, "depth_lora_rank": 4},
])
@pytest.mark.parametrize("streams", [2, 3])
def test_mhc_with_identity_mixing_is_the_plain_residual(mechanics, streams):
    torch.manual_seed(0)
    plain = LoopLM(tiny_config(**mechanics)).eval()
    with torch.no_grad():
        for parameter in plain.parameters():  # nothing left at its neutral initial value
            parameter.add_(torch.randn_like(parameter) * 0.05)
    wide = LoopLM(tiny_config(hyper_connections=streams, **mechanics)).eval()
    missing, unexpected = wide.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("_residual." in name for name in missing)
    _neutral(wide)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        a, b = plain(ids, steps=4), wide(ids, steps=4)
    for step in range(1, 5):
        torch.testing.assert_close(b.logits(step), a.logits(step), atol=2e-5, rtol=0)


def test_one_stream_is_the_plain_residual():
    torch.manual_seed(0)
    plain = LoopLM(tiny_config())
    torch.manual_seed(0)
    one = LoopLM(tiny_config(hyper_connections=1))
    assert one.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 64, (1, 7))
    assert torch.equal(one.eval()(ids).logits(), plain.eval()(ids).logits())


def test_the_streams_are_the_loop_state():
    torch.manual_seed(0)
    model = LoopLM(tiny_config(hyper_connections=3, n_prelude_layers=1)).eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        e = model.embed_input(ids)
        h = model.core_step(model.initial_state(e), 0, injected=e)
        assert e.shape == h.shape == (2, 5, 3 * 32)
        streams = h.view(2, 5, 3, 32)
        assert (streams[:, :, 0] - streams[:, :, 1]).abs().max() > 1e-4  # they diverge from the copies
        assert model.readout(h, 0).shape == (2, 5, 32)
    # mHC parameters are part of the checkpoint (and so of GGUF: every state-dict entry is stored).
    assert "core.0.attn_residual.mix_bias" in model.state_dict()


def test_depth_attention_by_hand():
    torch.manual_seed(0)
    reader = DepthAttention(tiny_config(d_model=4, n_heads=2), closes_block=True)
    with torch.no_grad():
        reader.query.normal_()
        reader.key_norm.weight.normal_()
    blocks = (torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    partial = torch.randn(1, 2, 4)
    sources = DepthSources(blocks, partial)
    values = [blocks[0], blocks[1], partial]
    logits = torch.stack([(reader.key_norm(v) * reader.query).sum(-1) for v in values])
    weights = torch.softmax(logits, dim=0)
    expected = sum(w.unsqueeze(-1) * v for w, v in zip(weights, values))
    torch.testing.assert_close(reader.read(sources)[0], expected)
    assert torch.equal(reader.read(DepthSources(blocks[:1]))[0], blocks[0])  # one source: itself
    update = torch.randn(1, 2, 4)
    closed = reader.write(sources, update)
    assert closed.partial is None and torch.equal(closed.blocks[-1], partial + update)


@pytest.mark.parametrize("block_size", [1, 3])
def test_block_attention_residuals_follow_their_equations(block_size):
    torch.manual_seed(0)
    model = LoopLM(tiny_config(attnres_block_size=block_size, n_core_layers=2, norm="pre", step_norm=False)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("query"):
                parameter.normal_()
    inputs, outputs = [], []
    hooks = []
    for layer in model.core:
        for norm, post in ((layer.attn_norm, layer.attn_post_norm), (layer.ffn_norm, layer.ffn_post_norm)):
            hooks.append(norm.register_forward_hook(lambda module, args, out: inputs.append(args[0])))
            hooks.append(post.register_forward_hook(lambda module, args, out: outputs.append(out)))
    u = torch.randn(1, 6, 32)
    with torch.no_grad():
        result = model.core_step(u, 0)
    for hook in hooks:
        hook.remove()
    readers = [residual for layer in model.core for residual in (layer.attn_residual, layer.ffn_residual)]

    def attend(reader, values):
        weights = torch.softmax(torch.stack([(reader.key_norm(v) * reader.query).sum(-1) for v in values]), dim=0)
        return sum(w.unsqueeze(-1) * v for w, v in zip(weights, values))

    blocks, partial = [u], None
    for sublayer, reader in enumerate(readers):
        torch.testing.assert_close(inputs[sublayer],
                                   attend(reader, blocks + ([partial] if partial is not None else [])))
        partial = outputs[sublayer] if partial is None else partial + outputs[sublayer]
        if (sublayer + 1) % block_size == 0:
            blocks, partial = blocks + [partial], None
    assert len(blocks) == 1 + 4 // block_size
    final = attend(model.stack_outputs["core"], blocks + ([partial] if partial is not None else []))
    torch.testing.assert_close(result, final)


def test_configuration_errors_are_one_line():
    with pytest.raises(LoopLMError, match="choose one"):
        tiny_config(hyper_connections=2, attnres_block_size=2)
    with pytest.raises(LoopLMError, match="hyper_connections"):
        tiny_config(hyper_connections=-1)
    with pytest.raises(LoopLMError, match="LoopCarry"):
        LoopLM(tiny_config(kv_append_first=True)).core_step(torch.zeros(1, 2, 32), 0)
    LoopLM(tiny_config(kv_append_first=True)).core_step(torch.zeros(1, 2, 32), 0, carry=LoopCarry())
