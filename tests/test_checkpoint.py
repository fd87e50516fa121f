import json

import pytest
import torch

from looplm.errors import LoopLMError
from looplm.model import LoopLM
from looplm.model.loading import load_model

from conftest import tiny_config


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
