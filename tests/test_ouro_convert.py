"""Ouro checkpoints ↔ looplm: a hand-built Ouro checkpoint against a plain reference forward
written here from the Ouro equations, round trips, sharding, and one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import looplm
from looplm.cli import main
from looplm.config import ModelConfig
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.interop.safetensors_io import parse_size, read_tensors, write_tensors
from looplm.model import LoopLM

TINY_OURO = dict(model_type="ouro", architectures=["OuroForCausalLM"], vocab_size=50, hidden_size=32,
                 intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64, hidden_act="silu",
                 tie_word_embeddings=False, total_ut_steps=3, early_exit_threshold=1.0, rope_scaling=None,
                 use_sliding_window=False)
LAYER_NORMS = ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2")


def ouro_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in Ouro's published layout; norm scales away from 1 so a swapped norm shows."""
    generator = torch.Generator().manual_seed(seed)
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    head_dim = dim // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    tensors = {"model.embed_tokens.weight": rand(config["vocab_size"], dim),
               "model.norm.weight": 1 + rand(dim), "model.early_exit_gate.weight": rand(1, dim, scale=0.5),
               "model.early_exit_gate.bias": rand(1)}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(config["vocab_size"], dim)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors.update({prefix + f"{name}.weight": 1 + rand(dim) for name in LAYER_NORMS})
        tensors.update({prefix + "self_attn.q_proj.weight": rand(dim, dim),
                        prefix + "self_attn.k_proj.weight": rand(kv, dim),
                        prefix + "self_attn.v_proj.weight": rand(kv, dim),
                        prefix + "self_attn.o_proj.weight": rand(dim, dim),
                        prefix + "mlp.gate_proj.weight": rand(hidden, dim),
                        prefix + "mlp.up_proj.weight": rand(hidden, dim),
                        prefix + "mlp.down_proj.weight": rand(dim, hidden)})
    return tensors


def write_ouro(directory, config: dict, tensors: dict) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(directory / "model.safetensors"))


def reference_ouro(config: dict, tensors: dict, ids: torch.Tensor, steps: int):
    """Ouro's forward written out: per-step logits [T, B, S, V] and exit probabilities [T, B, S]."""
    eps, heads, kv_heads = config["rms_norm_eps"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    batch, length = ids.shape
    w = {name: tensor.double() for name, tensor in tensors.items()}
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])

    def rms_norm(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    angles = torch.arange(length, dtype=torch.float64)[:, None] * config["rope_theta"] ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)

    def rope(x):  # [B, H, S, hd], rotate-half layout
        first, second = x[..., :head_dim // 2], x[..., head_dim // 2:]
        return torch.cat([first * angles.cos() - second * angles.sin(),
                          second * angles.cos() + first * angles.sin()], -1)

    def attention(x, p):
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(batch, length, heads, head_dim).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = rope(q) @ rope(k).transpose(-1, -2) / head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        return o @ w[p + "self_attn.o_proj.weight"].T

    def mlp(x, p):
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        return (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T

    h = w["model.embed_tokens.weight"][ids]
    logits, exits = [], []
    for _ in range(steps):
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = h + rms_norm(attention(rms_norm(h, w[p + "input_layernorm.weight"]), p),
                             w[p + "input_layernorm_2.weight"])
            h = h + rms_norm(mlp(rms_norm(h, w[p + "post_attention_layernorm.weight"]), p),
                             w[p + "post_attention_layernorm_2.weight"])
        h = rms_norm(h, w["model.norm.weight"])  # closes every step and feeds the next
        logits.append(h @ lm_head.T)
        exits.append(torch.sigmoid(h @ w["model.early_exit_gate.weight"].T
                                   + w["model.early_exit_gate.bias"]).squeeze(-1))
    return torch.stack(logits).float(), torch.stack(exits).float()


def ouro_shaped_model(tie: bool = False) -> LoopLM:
    torch.manual_seed(1)
    model = LoopLM(ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, n_core_layers=2,
                               loop_steps=3, max_seq_len=64, tie_embeddings=tie))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.startswith("exit_gate"):
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("tie", [False, True])
def test_converted_ouro_matches_the_reference_forward(tmp_path, capsys, tie):
    config = {**TINY_OURO, "tie_word_embeddings": tie}
    tensors = ouro_tensors(config)
    write_ouro(tmp_path / "ouro", config, tensors)
    byte_tokenizer().save(tmp_path / "ouro")
    assert run_cli(capsys, "convert", "ouro", tmp_path / "ouro", tmp_path / "looplm") == (0, "")
    model = looplm.load(tmp_path / "looplm")
    assert model.config.loop_steps == 3 and model.config.n_kv_heads == 2 and model.config.tie_embeddings == tie
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(3))
    for steps in (3, 4):  # the trained T, and one step of extrapolation
        expected_logits, expected_exits = reference_ouro(config, tensors, ids, steps)
        with torch.no_grad():
            output = model(ids, steps=steps)
            torch.testing.assert_close(output.step_logits, expected_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(output.exit_probs, expected_exits, atol=1e-5, rtol=1e-5)
    assert looplm.load_tokenizer(tmp_path / "looplm").encode("hi") == [104, 105]


def test_looplm_to_ouro_to_looplm_round_trip(tmp_path, capsys):
    model = ouro_shaped_model()
    model.save(tmp_path / "original", byte_tokenizer())
    assert run_cli(capsys, "convert", "to-ouro", tmp_path / "original", tmp_path / "ouro")[0] == 0
    exported = json.loads((tmp_path / "ouro" / "config.json").read_text())
    assert exported["model_type"] == "ouro" and exported["total_ut_steps"] == 3 and exported["eos_token_id"] == 258
    # The export direction on its own: Ouro's equations on the written tensors give looplm's logits.
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(4))
    expected_logits, expected_exits = reference_ouro(exported, load_file(str(tmp_path / "ouro" / "model.safetensors")),
                                                     ids, 3)
    with torch.no_grad():
        output = model(ids)
        torch.testing.assert_close(output.step_logits, expected_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(output.exit_probs, expected_exits, atol=1e-5, rtol=1e-5)
    assert run_cli(capsys, "convert", "ouro", tmp_path / "ouro", tmp_path / "back")[0] == 0
    back = looplm.load(tmp_path / "back")
    assert back.config == model.config
    original = model.state_dict()
    assert original.keys() == back.state_dict().keys()
    assert all(torch.equal(original[name], tensor) for name, tensor in back.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(ids, steps=4).step_logits, model(ids, steps=4).step_logits)
    assert ((tmp_path / "back" / "tokenizer.json").read_bytes()
            == (tmp_path / "original" / "tokenizer.json").read_bytes())


def test_tied_model_round_trips_without_lm_head(tmp_path, capsys):
    model = ouro_shaped_model(tie=True)
    model.save(tmp_path / "original")
    assert run_cli(capsys, "convert", "to-ouro", tmp_path / "original", tmp_path / "ouro")[0] == 0
    assert "lm_head.weight" not in load_file(str(tmp_path / "ouro" / "model.safetensors"))
    assert run_cli(capsys, "convert", "ouro", tmp_path / "ouro", tmp_path / "back")[0] == 0
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        assert torch.equal(looplm.load(tmp_path / "back")(ids).step_logits, model(ids).step_logits)


def test_sharded_write_and_read(tmp_path, capsys):
    model = ouro_shaped_model()
    model.save(tmp_path / "original")
    code, _ = run_cli(capsys, "convert", "to-ouro", tmp_path / "original", tmp_path / "ouro",
                      "--max-shard-size", "12KB")
    assert code == 0
    index = json.loads((tmp_path / "ouro" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "ouro" / "model.safetensors").exists()
    assert shards == sorted(p.name for p in (tmp_path / "ouro").glob("model-*-of-*.safetensors"))
    sizes = {shard: sum(t.numel() * 4 for t in load_file(str(tmp_path / "ouro" / shard)).values()) for shard in shards}
    assert all(size <= 12_000 or len(load_file(str(tmp_path / "ouro" / s))) == 1 for s, size in sizes.items())
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert run_cli(capsys, "convert", "ouro", tmp_path / "ouro", tmp_path / "back")[0] == 0
    back = looplm.load(tmp_path / "back").state_dict()
    assert all(torch.equal(tensor, back[name]) for name, tensor in model.state_dict().items())


def test_write_and_read_tensors_directly(tmp_path):
    tensors = {f"t{i}": torch.full((10, i + 1), float(i)) for i in range(6)}  # 40, 80, ..., 240 bytes
    written = write_tensors(tensors, tmp_path, max_shard_bytes=130)
    index = json.loads((tmp_path / written[-1]).read_text())
    assert written[-1] == "model.safetensors.index.json" and len(written) == 6
    assert [sorted(load_file(str(tmp_path / shard))) for shard in written[:-1]] == [["t0", "t1"], ["t2"], ["t3"],
                                                                                    ["t4"], ["t5"]]
    assert index["metadata"]["total_size"] == 840
    assert ({name: t.tolist() for name, t in read_tensors(tmp_path).items()}
            == {n: t.tolist() for n, t in tensors.items()})
    single = tmp_path / "single"
    single.mkdir()
    assert write_tensors(tensors, single) == ["model.safetensors"]
    assert all(torch.equal(read_tensors(single)[name], tensor) for name, tensor in tensors.items())


@pytest.mark.parametrize("text, expected", [("2GB", 2 * 10**9), ("512KiB", 524288), ("1000", 1000),
                                            ("1.5MB", 1_500_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2XB", "-1GB", "0", "GB"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(LoopLMError, match="not a size"):
        parse_size(text)


def _break(directory, how):
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    config = json.loads(config_path.read_text())
    tensors = load_file(str(weights_path))
    if how == "missing tensor":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif how == "wrong shape":
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    elif how == "extra tensor":
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    elif how == "bad json":
        config_path.write_text("{not json")
    elif how == "missing key":
        del config["num_key_value_heads"]
    elif how == "wrong model type":
        config["model_type"] = "llama"
    elif how == "sliding window":
        config["use_sliding_window"] = True
    elif how == "truncated weights":
        weights_path.write_bytes(weights_path.read_bytes()[:300])
        return
    elif how == "no weights":
        weights_path.unlink()
        return
    elif how == "broken tokenizer":  # it had been copied through, to fail only at generate
        (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nothing"}}')
        return
    elif how == "missing shard":
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {name: "model-00002-of-00002.safetensors" for name in tensors}}))
        weights_path.unlink()
        return
    if how != "bad json":
        config_path.write_text(json.dumps(config))
    save_file(tensors, str(weights_path))


@pytest.mark.parametrize("how", ["missing tensor", "wrong shape", "extra tensor", "bad json", "missing key",
                                 "wrong model type", "sliding window", "truncated weights", "no weights",
                                 "missing shard", "broken tokenizer"])
def test_broken_ouro_checkpoints_fail_with_one_line(tmp_path, capsys, how):
    write_ouro(tmp_path / "ouro", TINY_OURO, ouro_tensors(TINY_OURO))
    _break(tmp_path / "ouro", how)
    code, err = run_cli(capsys, "convert", "ouro", tmp_path / "ouro", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("looplm: error: "), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging directory left


def test_not_a_directory_and_non_ouro_shaped_models_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for source in (tmp_path / "file", tmp_path / "missing"):
        code, err = run_cli(capsys, "convert", "ouro", source, tmp_path / "out")
        assert code == 2 and "not a directory" in err
    LoopLM(ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_prelude_layers=1, n_core_layers=1)).save(tmp_path / "m")
    code, err = run_cli(capsys, "convert", "to-ouro", tmp_path / "m", tmp_path / "out")
    assert code == 2 and "model.n_prelude_layers=1 has no Ouro equivalent" in err


def test_existing_destination_needs_force(tmp_path, capsys):
    write_ouro(tmp_path / "ouro", TINY_OURO, ouro_tensors(TINY_OURO))
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "convert", "ouro", tmp_path / "ouro", destination)
    assert code == 2 and "--force" in err and (destination / "keep.txt").read_text() == "mine"
    code, err = run_cli(capsys, "convert", "ouro", tmp_path / "ouro", tmp_path / "ouro", "--force")
    assert code == 2 and "is the input" in err
    code, err = run_cli(capsys, "convert", "ouro", tmp_path / "ouro", destination, "--force")  # not its output
    assert code == 2 and "holds keep.txt" in err and (destination / "keep.txt").read_text() == "mine"
    (destination / "keep.txt").unlink()
    for _ in range(2):  # --force replaces an earlier conversion
        assert run_cli(capsys, "convert", "ouro", tmp_path / "ouro", destination, "--force")[0] == 0
    assert looplm.load(destination).config.d_model == 32


# The released checkpoints' config.json fields that matter here (public model cards and configs:
# ByteDance/Ouro-1.4B has 24 layers, Ouro-2.6B 48), with the extra keys such files carry.
RELEASED_OURO = dict(model_type="ouro", architectures=["OuroForCausalLM"], vocab_size=49152, hidden_size=2048,
                     intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=65536, hidden_act="silu",
                     tie_word_embeddings=False, rope_scaling=None, use_sliding_window=False, sliding_window=None,
                     total_ut_steps=4, early_exit_threshold=1.0, torch_dtype="bfloat16", bos_token_id=0,
                     eos_token_id=0, attention_dropout=0.0, initializer_range=0.02, use_cache=True)


@pytest.mark.parametrize("layers, billions", [(24, (1.3, 1.5)), (48, (2.5, 2.8))], ids=["1.4B", "2.6B"])
def test_released_ouro_configs_convert_and_expect_the_published_tensors(layers, billions):
    """A released Ouro config.json (with its layer_types list) becomes the matching preset's
    shapes, and the converter then expects exactly the published tensor names and shapes (built
    on the meta device: no weights here)."""
    from looplm.config import preset
    from looplm.interop.ouro import looplm_config_from_ouro, ouro_state_from_looplm

    raw = dict(RELEASED_OURO, num_hidden_layers=layers, layer_types=["full_attention"] * layers)
    config = looplm_config_from_ouro(raw)
    reference = preset("ouro-1.4b" if layers == 24 else "ouro-2.6b")
    for key in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "n_core_layers", "loop_steps",
                "rope_theta", "norm", "step_norm", "tie_embeddings", "exit_gate"):
        assert getattr(config, key) == getattr(reference, key), key
    assert config.max_seq_len == 65536 and config.norm_eps == 1e-6
    with torch.device("meta"):
        model = LoopLM(config)
        shapes = {name: tuple(tensor.shape) for name, tensor in ouro_state_from_looplm(model).items()}
    dim, hidden, vocab = 2048, 5632, 49152
    published = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim),
                 "model.early_exit_gate.weight": (1, dim), "model.early_exit_gate.bias": (1,)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        published.update({prefix + f"{name}.weight": (dim,) for name in LAYER_NORMS})
        published.update({prefix + f"self_attn.{p}_proj.weight": (dim, dim) for p in "qkvo"})
        published.update({prefix + "mlp.gate_proj.weight": (hidden, dim), prefix + "mlp.up_proj.weight": (hidden, dim),
                          prefix + "mlp.down_proj.weight": (dim, hidden)})
    assert shapes == published
    assert billions[0] * 1e9 < model.num_parameters() < billions[1] * 1e9
    with pytest.raises(LoopLMError, match="layer_types"):
        looplm_config_from_ouro(dict(raw, layer_types=["sliding_attention"] * layers))
