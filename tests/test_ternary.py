"""Ternary weights (model.ternary): BitLinear's absmean codes and int8 activations against a hand
computation, the straight-through gradient, the packed TernaryLinear against its unpacked
reference and against the trained model, checkpoints and GGUF."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from looplm.checkpoint.ternary import pack_ternary, unpack_ternary
from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.bitlinear import BitLinear, quantize_activations, ternary_codes
from looplm.model.loading import load_model
from looplm.quant import is_quantized, quantize_model
from looplm.ternary import TernaryLinear, is_packed, pack_model

from conftest import tiny_config


def test_codes_and_activations_follow_the_definition():
    weight = torch.tensor([[0.30, -0.05, 0.0, -0.90], [0.10, 0.20, -0.25, 0.02]])
    codes, scale = ternary_codes(weight)
    assert scale.item() == pytest.approx(weight.abs().mean().item())  # absmean = 0.2275
    # round(w / 0.2275): 1.32 → 1, −0.22 → 0, 0, −3.96 → −1 (clamped); 0.44 → 0, 0.88 → 1, −1.10 → −1, 0.09 → 0
    assert codes.tolist() == [[1, 0, 0, -1], [0, 1, -1, 0]]
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0]])
    levels, factor = quantize_activations(x)
    assert factor.item() == pytest.approx(127.0)  # 127 / max|x|
    assert levels.tolist() == [[64.0, -127.0, 32.0, 0.0]]  # round(63.5) = 64 (half to even: 63.5 → 64)
    layer = BitLinear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    expected = (levels / factor) @ (codes * scale).T
    assert torch.equal(layer(x), expected)


def test_zero_inputs_and_weights_stay_finite():
    layer = BitLinear(8, 3)
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.isfinite(layer(torch.zeros(2, 8))).all()


def test_straight_through_gradient_is_the_ternary_layers_gradient():
    torch.manual_seed(0)
    layer = BitLinear(6, 4, bias=True)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).pow(2).sum().backward()
    # The same loss through a plain linear with the rounded values fixed: STE passes its
    # gradients to the shadow weight and the input unchanged.
    levels, factor = quantize_activations(x.detach())
    rounded_x = (levels / factor).requires_grad_(True)
    rounded_w = layer.ternary_weight().detach().requires_grad_(True)
    F.linear(rounded_x, rounded_w, layer.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, rounded_w.grad)
    torch.testing.assert_close(x.grad, rounded_x.grad)


@pytest.mark.parametrize("width", [1, 4, 7, 33])
def test_pack_unpack_round_trip(width):
    codes = torch.randint(-1, 2, (5, width), generator=torch.Generator().manual_seed(width)).to(torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-width // 4))
    assert torch.equal(unpack_ternary(packed, width), codes)
    # The documented layout: code + 1, four per byte, lowest bits first.
    first = [int(code) + 1 for code in codes[0, :4]] + [1] * (4 - min(width, 4))
    assert int(packed[0, 0]) == first[0] | first[1] << 2 | first[2] << 4 | first[3] << 6
    with pytest.raises(LoopLMError):
        pack_ternary(torch.tensor([[2, 0]]))


def test_packed_forward_equals_its_unpacked_reference_and_the_bitlinear():
    torch.manual_seed(1)
    layer = BitLinear(45, 17, bias=True)
    packed = TernaryLinear.from_bitlinear(layer)
    x = torch.randn(2, 5, 45) * 3
    assert torch.equal(packed.reference_forward(x), layer(x))  # the same operations
    torch.testing.assert_close(packed(x), packed.reference_forward(x), atol=1e-5, rtol=1e-6)
    assert packed.packed.nbytes == 17 * 12  # 2 bits per weight, rows padded to whole bytes


def _trained_ternary(scope: str, **overrides) -> LoopLM:
    torch.manual_seed(0)
    model = LoopLM(tiny_config(ternary=scope, n_prelude_layers=1, n_coda_layers=1, **overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 12))
    for _ in range(5):  # move the shadow weights so codes and scales are not the initial ones
        model(ids[:, :-1]).logits().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_scope_picks_the_layers():
    core = LoopLM(tiny_config(ternary="core", n_prelude_layers=1, n_coda_layers=1))
    every = LoopLM(tiny_config(ternary="all", n_prelude_layers=1, n_coda_layers=1, ffn="moe", n_experts=4))
    assert all(isinstance(module, BitLinear) for module in (core.core[0].attn.qkv, core.core[1].ffn.down))
    assert type(core.prelude[0].attn.qkv) is nn.Linear and type(core.coda[0].ffn.gate_up) is nn.Linear
    assert isinstance(every.prelude[0].attn.out, BitLinear) and isinstance(every.coda[0].ffn.shared.down, BitLinear)
    assert type(every.core[0].ffn.router) is nn.Linear  # routing decisions keep float weights
    assert type(every.exit_gate) is nn.Linear
    plain = LoopLM(tiny_config())
    assert not any(isinstance(module, BitLinear) for module in plain.modules())
    with pytest.raises(LoopLMError, match="model.ternary"):
        tiny_config(ternary="some")


def test_pack_model_keeps_the_function_and_int8_leaves_ternary_layers():
    model = _trained_ternary("all")
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits()
        pack_model(model)
        assert is_packed(model) and not any(isinstance(module, BitLinear) for module in model.modules())
        torch.testing.assert_close(model(ids).logits(), expected, atol=1e-4, rtol=0)
    with pytest.raises(LoopLMError, match="nothing to pack"):
        pack_model(LoopLM(tiny_config()))
    core = _trained_ternary("core")
    quantize_model(core)  # int8 for the float layers; ternary layers keep their own quantisation
    assert is_quantized(core) and isinstance(core.core[0].attn.qkv, BitLinear)


def test_checkpoint_keeps_the_shadow_weights(tmp_path):
    model = _trained_ternary("core")
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.core[0].ffn.gate_up, BitLinear)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert stored["core.0.attn.qkv.weight"].dtype == torch.float32  # shadow weights, not codes
    assert len(stored["core.0.attn.qkv.weight"].unique()) > 3


@pytest.mark.parametrize("width", [32, 256])  # 256: TQ2_0 rows; 32: looplm's 2-bit layout
def test_gguf_ternary_round_trip_is_exact(tmp_path, width):
    gguf = pytest.importorskip("gguf")
    from looplm.interop.gguf import export_gguf, load_gguf, read_metadata

    model = _trained_ternary("all", d_model=width)
    path = export_gguf(model, tmp_path / "m.gguf", "ternary")
    loaded, _ = load_gguf(path)
    expected = pack_model(model)
    for name, module in expected.named_modules():
        if isinstance(module, TernaryLinear):
            restored = loaded.get_submodule(name)
            assert isinstance(restored, TernaryLinear)
            assert torch.equal(restored.packed, module.packed) and torch.equal(restored.scale, module.scale)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits(), expected(ids).logits(), atol=0, rtol=0)
    reader = gguf.GGUFReader(str(path))
    kinds = {tensor.name: gguf.GGMLQuantizationType(int(tensor.tensor_type)) for tensor in reader.tensors}
    wanted = gguf.GGMLQuantizationType.TQ2_0 if width == 256 else gguf.GGMLQuantizationType.I8
    assert kinds["blk.0.attn_output.weight"] == wanted
    assert kinds["blk.0.attn_output.ternary_scale"] == gguf.GGMLQuantizationType.F32
    assert "blk.0.attn_output.weight" in read_metadata(path)["looplm.ternary.weights"]
    float_bytes = sum(t.numel() * 4 for n, t in model.state_dict().items())
    assert path.stat().st_size < 0.5 * float_bytes


def test_gguf_float_dtypes_keep_shadow_weights_exact(tmp_path):
    pytest.importorskip("gguf")
    from looplm.interop.gguf import export_gguf, load_gguf

    model = _trained_ternary("core", d_model=64)
    loaded, _ = load_gguf(export_gguf(model, tmp_path / "m.gguf", "q8_0"))
    assert isinstance(loaded.core[0].attn.qkv, BitLinear)
    assert torch.equal(loaded.core[0].attn.qkv.weight, model.core[0].attn.qkv.weight)
    with pytest.raises(LoopLMError, match="has none"):
        export_gguf(LoopLM(tiny_config()), tmp_path / "plain.gguf", "ternary")
    with pytest.raises(LoopLMError, match="inference only"):
        export_gguf(pack_model(model), tmp_path / "packed.gguf", "ternary")


def test_cli_exports_ternary_and_generates_packed(tmp_path, capsys):
    pytest.importorskip("gguf")
    from looplm.cli import main
    from looplm.data.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    model = LoopLM(tiny_config(vocab_size=259, ternary="all"))
    model.save(tmp_path / "ckpt", byte_tokenizer())
    assert main(["export", "gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--dtype", "ternary"]) == 0
    assert "ternary" in capsys.readouterr().out
    answers = []
    for source, extra in ((tmp_path / "ckpt", ["--ternary"]), (tmp_path / "m.gguf", [])):
        assert main(["generate", str(source), "--prompt", "ab", "--max-new-tokens", "6", "--no-stream"] + extra) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]  # the packed checkpoint and the packed file decode alike
    assert main(["generate", str(tmp_path / "m.gguf"), "--prompt", "ab", "--ternary"]) == 2
    assert "nothing to pack" in capsys.readouterr().err
