"""Hugging Face format: a looplm checkpoint loads through transformers' Auto classes with
looplm's own logits, generates greedily, and stays loadable by looplm."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import looplm
from looplm.cli import main
from looplm.config import ModelConfig
from looplm.data.tokenizer import byte_tokenizer
from looplm.errors import LoopLMError
from looplm.model import LoopLM

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import looplm.interop.hf  # noqa: E402,F401  (registers model_type "looplm")
from looplm.interop.hf import LoopLMForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(tie: bool = True, vocab_size: int = 259) -> LoopLM:
    torch.manual_seed(0)
    model = LoopLM(ModelConfig(vocab_size=vocab_size, d_model=32, n_heads=4, n_kv_heads=2, n_core_layers=2,
                               loop_steps=3, max_seq_len=48, tie_embeddings=tie))
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    return model.eval()


@pytest.fixture
def hf_dir(tmp_path, capsys):
    """A looplm checkpoint with the byte tokenizer, converted by `looplm convert hf`."""
    model = tiny_model()
    model.save(tmp_path / "ckpt", byte_tokenizer())
    assert main(["convert", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    return model, tmp_path / "hf"


def test_convert_hf_writes_the_layout(hf_dir):
    _, directory = hf_dir
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json",
                                                           "model.safetensors", "modeling_looplm.py",
                                                           "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "looplm" and config["architectures"] == ["LoopLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_looplm.LoopLMForCausalLM"
    assert config["loop_steps"] == 3  # looplm's own keys stay


@pytest.mark.parametrize("tie", [True, False])
def test_auto_model_gives_looplm_logits(tmp_path, tie):
    model = tiny_model(tie)
    looplm.interop.hf.save_hf(model, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(loaded, LoopLMForCausalLM) and not loaded.training
    ids = torch.randint(0, 259, (2, 13))
    with torch.no_grad():
        for steps in (None, 1, 5):
            expected = model(ids, steps=steps).logits()
            torch.testing.assert_close(loaded(ids, steps=steps).logits, expected, atol=1e-5, rtol=0)
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())  # looplm's names, nothing extra


def test_looplm_load_reads_the_hf_directory(hf_dir):
    model, directory = hf_dir
    again = looplm.load(directory)
    assert again.config == model.config
    assert all(torch.equal(tensor, again.state_dict()[name]) for name, tensor in model.state_dict().items())
    assert looplm.load_tokenizer(directory).encode("loop") == byte_tokenizer().encode("loop")


def test_generate_greedy_matches_an_argmax_loop(tmp_path):
    model = tiny_model(vocab_size=64)
    looplm.interop.hf.save_hf(model, tmp_path / "hf")  # no tokenizer: no eos to stop on
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    prompt = torch.tensor([[5, 17, 33, 2]])
    generated = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(sequence).logits()[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert generated.tolist() == sequence.tolist()
    deeper = loaded.generate(prompt, max_new_tokens=3, do_sample=False, steps=5)
    with torch.no_grad():
        assert deeper[0, 4].item() == model(prompt, steps=5).logits()[0, -1].argmax().item()


def test_labels_give_next_token_cross_entropy(hf_dir):
    model, directory = hf_dir
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(0, 259, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        loss = loaded(ids, labels=labels).loss
        log_probs = F.log_softmax(model(ids).logits()[:, :-1], dim=-1)
    picked = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = labels[:, 1:] != -100
    torch.testing.assert_close(loss, -picked[keep].mean())


def test_auto_tokenizer_matches_looplm_tokenizer(hf_dir):
    _, directory = hf_dir
    tokenizer = AutoTokenizer.from_pretrained(directory)
    reference = byte_tokenizer()
    text = "loops ∘ depth"
    assert tokenizer(text)["input_ids"] == reference.encode(text)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        reference.bos_id, reference.eos_id, reference.pad_id)


def test_save_pretrained_output_loads_in_looplm(hf_dir, tmp_path):
    model, directory = hf_dir
    AutoModelForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "saved")
    ids = torch.randint(0, 259, (1, 7))
    with torch.no_grad():
        assert torch.equal(looplm.load(tmp_path / "saved")(ids).logits(), model(ids).logits())


def test_wrapper_shares_weights_with_the_looplm_model():
    model = tiny_model()
    wrapper = LoopLMForCausalLM.from_looplm(model)
    assert wrapper.looplm is model and wrapper.get_input_embeddings() is model.embed
    with torch.no_grad():
        model.norm.weight.mul_(2.0)
        ids = torch.randint(0, 259, (1, 5))
        assert torch.equal(wrapper(ids).logits, model(ids).logits())


def test_padding_masks_and_mismatched_weights_are_refused(hf_dir):
    _, directory = hf_dir
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(LoopLMError, match="padding"):
        loaded(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    weights = load_file(str(directory / "model.safetensors"))
    del weights["norm.weight"]
    save_file(weights, str(directory / "model.safetensors"))
    with pytest.raises(LoopLMError, match="missing keys"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_missing_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "looplm.interop.hf")
    with pytest.raises(LoopLMError, match=r"pip install 'looplm\[hf\]'"):
        importlib.import_module("looplm.interop.hf")


def test_convert_hf_refuses_existing_destination(hf_dir, capsys):
    model, directory = hf_dir
    before = (directory / "model.safetensors").read_bytes()
    assert main(["convert", "hf", str(directory), str(directory.parent / "hf")]) == 2
    assert main(["convert", "hf", str(directory.parent / "ckpt"), str(directory)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2 and "--force" in err
    assert (directory / "model.safetensors").read_bytes() == before


def test_trust_remote_code_without_importing_looplm(hf_dir, tmp_path):
    """A fresh interpreter that never imports looplm itself: transformers follows auto_map."""
    model, directory = hf_dir
    ids = [[3, 1, 4, 1, 5, 9, 2, 6]]
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'looplm' not in sys.modules\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(directory)!r}, trust_remote_code=True)\n"
        f"print(json.dumps(model(torch.tensor({ids})).logits.tolist()))\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(torch.tensor(ids)).logits(), atol=1e-5, rtol=0)
