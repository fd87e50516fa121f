import json
import warnings
from pathlib import Path

import pytest
import torch

from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.loading import load_model

from conftest import tiny_config, write_gguf


def test_save_load_bit_identical(tmp_path, tiny_model):
    tiny_model.save(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == tiny_model.config
    for (name, a), (_, b) in zip(sorted(tiny_model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(tiny_model(ids, steps=5).step_logits, loaded(ids, steps=5).step_logits)


def test_untied_head_round_trips(tmp_path):
    model = LoopLM(tiny_config(tie_embeddings=False, n_prelude_layers=1, n_coda_layers=1)).eval()
    model.save(tmp_path / "ckpt")
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(model(ids).logits(), load_model(tmp_path / "ckpt")(ids).logits())


def test_save_is_atomic_and_replaces(tmp_path, tiny_model):
    target = tmp_path / "ckpt"
    tiny_model.save(target)
    tiny_model.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_save_never_removes_what_it_would_not_write(tmp_path, tiny_model, capsys):
    """Replacing a directory is for outputs of the same kind: a directory also holding the user's
    files, or a file where the directory would go, is refused with one line and left as it was —
    through the API (``save``) and the CLI (``convert hf --force``, ``eval --out --overwrite``)."""
    from looplm.cli import main
    from looplm.data.tokenizer import byte_tokenizer

    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(LoopLMError, match="holds thesis.tex, which this output would not replace"):
        tiny_model.save(home)
    assert sorted(path.name for path in home.iterdir()) == ["thesis.tex"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home"]  # no staging left behind
    note = tmp_path / "note.txt"
    note.write_text("mine")
    with pytest.raises(LoopLMError, match="is a file, not a directory"):
        tiny_model.save(note)
    model = LoopLM(tiny_config(vocab_size=259))
    checkpoint = model.save(tmp_path / "ckpt", byte_tokenizer())
    for argv in (["convert", "hf", str(checkpoint), str(note), "--force"],
                 ["convert", "hf", str(checkpoint), str(home), "--force"],
                 ["eval", str(checkpoint), "--task", "binding", "--examples", "4", "--out", str(home), "--overwrite"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert note.read_text() == "mine" and sorted(path.name for path in home.iterdir()) == ["thesis.tex"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt", "home", "note.txt"]
    model.save(checkpoint)  # its own kind: replaced (without the tokenizer, which it may drop)
    assert main(["convert", "hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert main(["convert", "hf", str(checkpoint), str(tmp_path / "hf"), "--force"]) == 0


def _broken(tmp_path, tiny_model, how):
    target = tmp_path / "ckpt"
    tiny_model.save(target)
    weights = target / "model.safetensors"
    config = target / "config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "garbage":
        weights.write_bytes(b"not a safetensors file at all")
    elif how == "no-weights":
        weights.unlink()
    elif how == "no-config":
        config.unlink()
    elif how == "bad-json":
        config.write_text("{not json")
    elif how == "unknown-key":
        data = json.loads(config.read_text())
        data["loop_stepz"] = 3
        config.write_text(json.dumps(data))
    elif how == "shape":
        data = json.loads(config.read_text())
        data["d_model"] = 64
        config.write_text(json.dumps(data))
    return target


@pytest.mark.parametrize("how", ["truncated", "garbage", "no-weights", "no-config", "bad-json", "unknown-key", "shape"])
def test_broken_checkpoints_give_one_line_errors(tmp_path, tiny_model, how):
    target = _broken(tmp_path, tiny_model, how)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(LoopLMError) as error:
        load_model(target)
    assert "\n" not in str(error.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_missing_checkpoint(tmp_path):
    with pytest.raises(LoopLMError):
        load_model(tmp_path / "nowhere")


# Hostile or damaged files: each is one LoopLMError line, never a traceback, a crash, a hang or a
# model built from values it may misread.

DEEP_JSON = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError, not JSONDecodeError


def _rewrite_config(directory, change):
    config = directory / "config.json"
    config.write_text(json.dumps(change(json.loads(config.read_text()))))


@pytest.mark.parametrize("change, message", [
    (lambda config: DEEP_JSON, r"config.json' is not valid JSON \(RecursionError\)"),
    (lambda config: {**config, "version": 2}, "uses looplm checkpoint format version 2; this looplm reads up to 1"),
    (lambda config: {**config, "version": "1"}, "its version is '1', not a whole number"),
    (lambda config: {**config, "format": "pytorch"}, "says format 'pytorch', not 'looplm'"),
    (lambda config: {**config, "init_std": -1.0}, "model.init_std must be >= 0"),
    (lambda config: {**config, "norm_eps": -1.0}, "model.norm_eps must be >= 0"),
    (lambda config: {**config, "d_model": 10**30}, "model.d_model must be <= 16777216"),
    (lambda config: {**config, "loop_steps": 10**9}, "model.loop_steps must be <= 16777216"),
    # more layers than the file holds is refused before the model is built (a million took hours)
    (lambda config: {**config, "n_core_layers": 3}, "holds no tensors of layer core.2, which its config's"
                                                    " n_core_layers=3 needs"),
    (lambda config: {**config, "n_prelude_layers": 1}, "holds no tensors of layer prelude.0"),
])
def test_a_hostile_config_json_is_one_line(tmp_path, tiny_model, change, message):
    target = tiny_model.save(tmp_path / "ckpt")
    if change({}) == DEEP_JSON:
        (target / "config.json").write_text(DEEP_JSON)
    else:
        _rewrite_config(target, change)
    with pytest.raises(LoopLMError, match=message) as error:
        load_model(target)
    assert "\n" not in str(error.value)


def test_a_config_too_large_to_build_is_one_line(tmp_path, tiny_model):
    """Sizes each within bounds whose product overflows torch's int64 shapes."""
    target = tiny_model.save(tmp_path / "ckpt")
    _rewrite_config(target, lambda config: {**config, "hyper_connections": 2**24})
    with pytest.raises(LoopLMError, match="its config asks for tensors too large to build"):
        load_model(target)


def test_a_config_without_format_marker_still_loads(tmp_path, tiny_model):
    """transformers' save_pretrained writes no format/version: such a config.json loads as before."""
    target = tiny_model.save(tmp_path / "ckpt")
    _rewrite_config(target, lambda config: {k: v for k, v in config.items() if k not in ("format", "version")})
    assert load_model(target).config == tiny_model.config


def test_deeply_nested_json_beside_the_weights_is_one_line(tmp_path, tiny_model):
    from looplm.data.tokenizer import byte_tokenizer
    from looplm.interop.safetensors_io import read_tensors
    from looplm.model.loading import load_checkpoint_tokenizer

    target = tiny_model.save(tmp_path / "ckpt", byte_tokenizer())
    (target / "tokenizer.json").write_text(DEEP_JSON)
    with pytest.raises(LoopLMError, match="tokenizer file .* is not valid JSON"):
        load_checkpoint_tokenizer(target)
    (target / "model.safetensors.index.json").write_text(DEEP_JSON)
    with pytest.raises(LoopLMError, match=r"index.json' is not valid JSON \(RecursionError\)"):
        read_tensors(target)


def _gguf_copy(source, target, fields=None, tensors=None):
    """A copy of ``source`` (a looplm GGUF file) with metadata ``fields`` (key → writer call)
    replaced and tensors passed through ``tensors(name, array)``."""
    import gguf
    import numpy as np

    fields = fields or {}
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), "looplm")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in fields:
            fields.pop(key)(writer)
            continue
        value = field.contents()
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    for add in fields.values():
        add(writer)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
        data = tensors(tensor.name, data) if tensors else data
        if kind == gguf.GGMLQuantizationType.TQ2_0:
            writer.add_tensor(tensor.name, data, raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, data)
    return write_gguf(writer, target)


@pytest.mark.parametrize("damage, message", [
    ("version-string", "its looplm.format_version is '1', not a whole number"),
    ("config-not-string", "the looplm.config metadata is not valid JSON"),
    ("config-deep", "the looplm.config metadata is not valid JSON"),
    ("rows-not-a-list", "must list tensor names and their row lengths"),
    ("rows-too-long", "does not hold 96 rows of 36 codes and one scale"),
    ("three-scales", "does not hold 96 rows of 32 codes and one scale"),
    ("code-three", "holds codes other than -1, 0 and 1"),
    ("config-not-utf8", "its looplm.config metadata is not valid UTF-8"),
])
def test_damaged_gguf_metadata_is_one_line(tmp_path, damage, message):
    pytest.importorskip("gguf")
    import numpy as np

    from looplm.interop.gguf import export_gguf

    torch.manual_seed(0)
    source = export_gguf(LoopLM(tiny_config(ternary="core", ffn_hidden=64)).eval(), tmp_path / "good.gguf", "ternary")
    packed = "blk.0.attn_qkv.weight"  # 96 rows of 32 codes, looplm's 2-bit layout
    fields, tensors = {}, None
    if damage == "version-string":
        fields["looplm.format_version"] = lambda writer: writer.add_string("looplm.format_version", "1")
    elif damage == "config-not-string":
        fields["looplm.config"] = lambda writer: writer.add_uint32("looplm.config", 5)
    elif damage == "config-deep":
        fields["looplm.config"] = lambda writer: writer.add_string("looplm.config", DEEP_JSON)
    elif damage == "rows-not-a-list":
        fields["looplm.ternary.row_lengths"] = lambda writer: writer.add_uint32("looplm.ternary.row_lengths", 32)
    elif damage == "rows-too-long":
        import gguf

        rows = gguf.GGUFReader(source).fields["looplm.ternary.row_lengths"].contents()
        fields["looplm.ternary.row_lengths"] = lambda writer: writer.add_array("looplm.ternary.row_lengths",
                                                                               [row + 4 for row in rows])
    elif damage == "three-scales":
        def tensors(name, data):
            return np.ones(3, np.float32) if name == packed.replace("weight", "ternary_scale") else data
    elif damage == "code-three":
        def tensors(name, data):
            return np.full_like(data, -1) if name == packed else data  # 0xff: every 2-bit field is 3
    bad = _gguf_copy(source, tmp_path / "bad.gguf", fields, tensors)
    if damage == "config-not-utf8":  # one byte of the config's JSON text (same length) is no UTF-8
        raw = bad.read_bytes()
        bad.write_bytes(raw.replace(b'"d_model"', b'"\xff_model"', 1))
    with pytest.raises(LoopLMError, match=message) as error:
        load_model(bad)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": "linear"}, "rope_scaling must be a mapping or null, got 'linear'"),
    # older configs name the kind "type": a scaled RoPE must not load as plain RoPE
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling=.* is not supported by looplm"),
    ({"layer_types": 5}, "layer_types must be a list of layer kinds, got 5"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"use_sliding_window": "false"}, "use_sliding_window must be true or false, got 'false'"),
    ({"rms_norm_eps": -1.0}, "model.norm_eps must be >= 0"),
])
def test_a_hostile_ouro_config_is_one_line(change, message):
    from looplm.interop.ouro import looplm_config_from_ouro

    raw = dict(model_type="ouro", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=64, tie_word_embeddings=False, total_ut_steps=3)
    with pytest.raises(LoopLMError, match=message) as error:
        looplm_config_from_ouro({**raw, **change}, "config.json")
    assert "\n" not in str(error.value)


def test_ouro_weights_with_too_few_layers_or_nan_values(tmp_path):
    from safetensors.torch import load_file, save_file

    from looplm.interop.ouro import convert_looplm_to_ouro, load_ouro

    model = LoopLM(tiny_config(vocab_size=64)).eval()
    ouro = convert_looplm_to_ouro(model.save(tmp_path / "ckpt"), tmp_path / "ouro")
    config = json.loads((ouro / "config.json").read_text())
    (ouro / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(LoopLMError, match="hold no tensors of model.layers.2, which num_hidden_layers = 3"):
        load_ouro(ouro)  # refused before the model is built (a million layers took hours)
    (ouro / "config.json").write_text(json.dumps(config))
    tensors = load_file(ouro / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, ouro / "model.safetensors")
    with pytest.warns(UserWarning, match=r"hold non-finite values \(model.norm.weight\)"):
        load_ouro(ouro)


def test_a_saved_checkpoint_is_readable_as_the_users_other_files(tmp_path):
    """safetensors creates its file with mode 0600 whatever the umask: the weights are made as
    readable as config.json, so a server running as another account can load them."""
    import os

    from looplm.model import LoopLM

    from conftest import tiny_config

    mask = os.umask(0o022)
    try:
        LoopLM(tiny_config()).save(tmp_path / "ckpt")
    finally:
        os.umask(mask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "ckpt").iterdir()}
    assert modes["model.safetensors"] == 0o644 == modes["config.json"], modes


def test_a_file_that_cannot_be_read_is_named_as_such(tmp_path, monkeypatch):
    """Before safetensors opens the weights (it reports no permission as "No such file"), the file
    is opened once, so the message says what is wrong with it."""
    import errno
    import os

    from looplm.errors import LoopLMError
    from looplm.model import LoopLM
    from looplm.model.loading import load_model

    from conftest import tiny_config

    LoopLM(tiny_config()).save(tmp_path / "ckpt")
    real_open = open

    def denied(path, *args, **kwargs):
        if str(path).endswith("model.safetensors"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(LoopLMError, match="cannot read .*model.safetensors.*Permission denied.*check the permissions"):
        load_model(tmp_path / "ckpt")


def test_a_config_lacking_model_keys_loads_with_a_warning_naming_them(tmp_path, tiny_model):
    """looplm writes every model key; a config.json without some (written by hand or by another
    tool) loads with looplm's defaults, and says which keys took them — a RoPE base or a norm's
    placement changes the outputs and no tensor's shape.  A saved checkpoint loads silently."""
    target = tiny_model.save(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(target).config == tiny_model.config
    _rewrite_config(target, lambda config: {k: v for k, v in config.items() if k not in ("rope_theta", "step_norm")})
    with pytest.warns(UserWarning, match=r"lacks 2 model key\(s\) \(rope_theta, step_norm\): they take looplm's"
                                         " defaults") as caught:
        assert load_model(target).config == tiny_model.config  # the tiny model's values are the defaults
    assert "\n" not in str(caught[0].message)


def test_the_keys_older_checkpoints_lack_are_the_ones_added_since():
    """looplm 0.1's checkpoint (a fixture) lacks exactly the keys added since, which load silently
    with their defaults; every other key is one every checkpoint holds."""
    from looplm.config.assemble import KEYS_ADDED_SINCE_0_1
    from looplm.config.model import KEY_TYPES

    legacy = Path(__file__).parent / "data" / "legacy-0.1" / "run" / "checkpoints" / "step_0000004"
    assert set(KEY_TYPES) - set(json.loads((legacy / "config.json").read_text())) == KEYS_ADDED_SINCE_0_1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(legacy)
