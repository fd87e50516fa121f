"""GGUF export/import: exact f32 round trip, f16, bf16 and Q8_0 within their rounding, metadata readable
by the gguf package's own reader, and one-line errors for broken or foreign files."""

import json

import numpy as np
import pytest
import torch

import looplm
from looplm.cli import main
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.interop.gguf import export_gguf, load_gguf, read_metadata
from looplm.model import LoopLM
from looplm.quant import Int8Linear

from conftest import tiny_config, write_gguf

gguf = pytest.importorskip("gguf")

CONFIGS = {
    "ouro": {},
    "prelude-coda": {"n_prelude_layers": 1, "n_coda_layers": 1, "injection": "lti", "loop_index_embedding": True,
                     "depth_lora_rank": 4, "tie_embeddings": False, "norm": "pre", "step_norm": False},
    "hybrid": {"layer_pattern": "GAR", "n_core_layers": 3, "attention": "gated", "norm": "pre"},
    "moe-mla": {"ffn": "moe", "n_experts": 4, "attention": "mla", "mla_kv_rank": 32, "mla_rope_dim": 4},
    "mhc-append-first": {"hyper_connections": 2, "n_prelude_layers": 1, "n_coda_layers": 1, "kv_append_first": True},
    "attnres-ternary": {"attnres_block_size": 3, "ternary": "core", "n_prelude_layers": 1},
}


def make_model(seed=0, **overrides) -> LoopLM:
    torch.manual_seed(seed)
    model = LoopLM(tiny_config(vocab_size=259, d_model=64, **overrides))
    with torch.no_grad():  # non-trivial values for the parameters that start at zero or one
        for name, parameter in model.named_parameters():
            parameter.add_(torch.randn_like(parameter) * (0.5 if name.startswith("exit_gate") else 0.02))
    return model.eval()


def outputs(model, ids):
    with torch.no_grad():
        output = model(ids)
        return output.step_logits, output.gate_logits


IDS = torch.randint(0, 259, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_round_trip_is_exact(tmp_path, name):
    model = make_model(**CONFIGS[name])
    path = export_gguf(model, tmp_path / "model.gguf", "f32", byte_tokenizer())
    loaded, tokenizer = load_gguf(path)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    for before, after in zip(outputs(model, IDS), outputs(loaded, IDS)):
        assert torch.equal(before, after)
    assert tokenizer.encode("héllo <eos>") == byte_tokenizer().encode("héllo <eos>")


def rounded(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The documented f16/bf16 rule: tensors of >= 2 dims to ``dtype``, except the exit gate and routers."""
    keep = name.startswith("exit_gate") or ".router." in name or tensor.dim() < 2
    return tensor if keep else tensor.to(dtype).float()


@pytest.mark.parametrize("storage, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("name", ["ouro", "hybrid"])
def test_f16_and_bf16_round_trips_are_their_rounding(tmp_path, name, storage, dtype):
    model = make_model(**CONFIGS[name])
    loaded, _ = load_gguf(export_gguf(model, tmp_path / "model.gguf", storage))
    expected = {key: rounded(key, tensor, dtype) for key, tensor in model.state_dict().items()}
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    reference = make_model(**CONFIGS[name])
    reference.load_state_dict(expected)
    for before, after in zip(outputs(reference, IDS), outputs(loaded, IDS)):
        assert torch.equal(before, after)


def q8_0_bound(weight: torch.Tensor) -> torch.Tensor:
    """Per element: d/2 + 127·|d − fp16(d)| with d = max|block|/127 (GGUF stores d as float16)."""
    blocks = weight.double().reshape(weight.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    rounding = (scale - scale.half().double()).abs()
    return (scale / 2 + 127 * rounding).expand_as(blocks).reshape(weight.shape)


@pytest.mark.parametrize("name", ["ouro", "prelude-coda"])
def test_q8_0_within_the_block_error_bound(tmp_path, name):
    model = make_model(**CONFIGS[name])
    path = export_gguf(model, tmp_path / "model.gguf", "q8_0")
    loaded, _ = load_gguf(path)
    types = {tensor.name: gguf.GGMLQuantizationType(int(tensor.tensor_type))
             for tensor in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["exit_gate.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    restored = loaded.state_dict()
    quantised = 0
    for key, tensor in model.state_dict().items():
        error = (restored[key].double() - tensor.double()).abs()
        if (tensor.dim() == 2 and tensor.shape[1] % 32 == 0
                and not key.startswith(("exit_gate", "injection", "depth_lora.scale"))):
            assert (error <= q8_0_bound(tensor) + 1e-9).all(), key
            quantised += bool(error.max() > 0)
        else:
            assert error.max() == 0, key
    assert quantised >= 5
    # Per-weight error ≤ ~0.56·d ≈ 0.5% of a block's largest weight; through a few layers the
    # logits move by well under 5% of their range (observed ≈ 0.5%).
    before, after = outputs(model, IDS)[0], outputs(loaded, IDS)[0]
    assert (before - after).abs().max() <= 0.05 * before.abs().max()


def test_q8_0_file_loads_as_int8_layers_with_the_same_values(tmp_path):
    model = make_model()
    path = export_gguf(model, tmp_path / "model.gguf", "q8_0")
    dequantised, _ = load_gguf(path)
    int8, _ = load_gguf(path, int8=True)
    layer = int8.core[0].attn.qkv
    assert isinstance(layer, Int8Linear)
    assert torch.equal(layer.weight, dequantised.core[0].attn.qkv.weight)
    assert not isinstance(int8.exit_gate, Int8Linear)
    for before, after in zip(outputs(dequantised, IDS), outputs(int8, IDS)):
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_metadata_readable_by_the_gguf_reader(tmp_path):
    model = make_model(**CONFIGS["prelude-coda"], n_kv_heads=2)
    tokenizer = byte_tokenizer()
    path = export_gguf(model, tmp_path / "model.gguf", "f32", tokenizer)
    reader = gguf.GGUFReader(path)
    value = {key: field.contents() for key, field in reader.fields.items()}
    config = model.config
    assert value["general.architecture"] == "looplm"
    assert value["looplm.loop.steps"] == config.loop_steps == 3
    assert (value["looplm.loop.prelude_layer_count"], value["looplm.loop.core_layer_count"],
            value["looplm.loop.coda_layer_count"]) == (1, 2, 1)
    assert value["looplm.loop.injection"] == "lti" and value["looplm.loop.step_norm"] is False
    assert value["looplm.loop.exit_threshold"] == 1.0 and value["looplm.loop.exit_gate"] is True
    assert value["looplm.core_mixer_kinds"] == ["A", "A"] and value["looplm.layer_pattern"] == "A"
    assert value["looplm.attention.kind"] == "mha" and value["looplm.norm_kind"] == "pre"
    assert value["looplm.context_length"] == 48 and value["looplm.embedding_length"] == 64
    assert value["looplm.block_count"] == 2 and value["looplm.feed_forward_length"] == config.ffn_hidden
    assert value["looplm.attention.head_count"] == 4 and value["looplm.attention.head_count_kv"] == 2
    assert value["looplm.rope.freq_base"] == 10000.0
    assert value["looplm.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert json.loads(value["looplm.config"]) == config.to_dict()
    assert value["tokenizer.huggingface.json"] == tokenizer.backend.to_str()
    assert value["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id == 258
    assert len(value["tokenizer.ggml.tokens"]) == 259
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert {"prelude_blk.0.attn_qkv.weight", "blk.1.ffn_down.weight", "coda_blk.0.ffn_gate_up.weight",
            "token_embd.weight", "output.weight", "output_norm.weight", "injection.log_a"} <= set(tensors)
    assert list(tensors["token_embd.weight"].shape) == [64, 259]  # ggml order: fastest dimension first
    assert read_metadata(path)["looplm.loop.steps"] == 3


def test_looplm_load_reads_gguf(tmp_path):
    model = make_model()
    path = export_gguf(model, tmp_path / "model.gguf", "f32", byte_tokenizer())
    loaded = looplm.load(path)
    assert torch.equal(outputs(loaded, IDS)[0], outputs(model, IDS)[0])
    assert looplm.load_tokenizer(path).decode([104, 105]) == "hi"


def rewrite(source, target, arch="looplm", drop=None, shorten=None):
    """Copy a looplm GGUF's config keys and f32 tensors into a new file, damaged as asked: another
    architecture, tensor ``drop`` left out, tensor ``shorten`` missing its last row."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), arch)
    writer.add_uint32(f"{arch}.format_version", reader.fields["looplm.format_version"].contents())
    writer.add_string(f"{arch}.config", reader.fields["looplm.config"].contents())
    for tensor in reader.tensors:
        if tensor.name == drop:
            continue
        data = np.array(tensor.data)
        writer.add_tensor(tensor.name, data[:-1] if tensor.name == shorten else data)
    return write_gguf(writer, target)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is not a readable GGUF file"),
    ("not-gguf", "is not a readable GGUF file"),
    ("arch", "holds a 'llama' model, not a looplm one"),
    ("missing", "lacks tensor 'blk.1.attn_output.weight'"),
    ("shape", r"tensor 'blk.0.attn_qkv.weight' has shape \(191, 64\), the config needs \(192, 64\)"),
    ("absent", "not found"),
])
def test_broken_or_foreign_files_fail_in_one_line(tmp_path, damage, message):
    good = export_gguf(make_model(), tmp_path / "good.gguf", "f32")
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "not-gguf":
        bad.write_text("this is a text file, not a model\n" * 10)
    elif damage == "arch":
        rewrite(good, bad, arch="llama")
    elif damage == "missing":
        rewrite(good, bad, drop="blk.1.attn_output.weight")
    elif damage == "shape":
        rewrite(good, bad, shorten="blk.0.attn_qkv.weight")
    with pytest.raises(LoopLMError, match=message) as caught:
        load_gguf(bad)
    assert "\n" not in str(caught.value)


def test_export_refuses_to_overwrite_and_checks_dtype(tmp_path):
    model = make_model()
    path = export_gguf(model, tmp_path / "model.gguf")
    with pytest.raises(LoopLMError, match="already exists: choose another path or pass --force"):
        export_gguf(model, path)
    export_gguf(model, path, "f16", force=True)
    assert read_metadata(path)["general.file_type"] == 1
    export_gguf(model, path, "bf16", force=True)
    assert read_metadata(path)["general.file_type"] == 32  # llama.cpp's MOSTLY_BF16
    with pytest.raises(LoopLMError, match="dtype must be one of f32, f16, bf16, q8_0"):
        export_gguf(model, tmp_path / "other.gguf", "q4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary files left


def test_cli_export_then_generate_from_the_gguf(tmp_path, capsys):
    checkpoint = make_model().save(tmp_path / "ckpt", tokenizer=byte_tokenizer())
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(checkpoint), str(out), "--dtype", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", "gguf", str(checkpoint), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "4", "--no-stream"]) == 0
    from_gguf = capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "4", "--no-stream", "--int8"]) == 0
    assert capsys.readouterr().out.strip() != "" and from_gguf.strip() != ""
