"""Write a looplm model as a Hugging Face model directory (no ``transformers`` needed to write).

The directory is a looplm checkpoint with a few additions, so both ``looplm.load(dir)`` and
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` read it:

    config.json            looplm's ModelConfig keys, plus model_type "looplm", architectures
                           ["LoopLMForCausalLM"] and auto_map (for trust_remote_code=True)
    model.safetensors      looplm's own tensor names (the HF wrapper uses the same names)
    modeling_looplm.py     two lines importing looplm.interop.hf (the auto_map target)
    tokenizer.json, tokenizer_config.json, generation_config.json   when there is a tokenizer

``looplm.config.model_config_from_json`` skips the Hugging Face metadata keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from looplm.interop.directory import check_destination, check_source, copy_tokenizer_files

MODEL_TYPE = "looplm"
MODELING_FILE = "modeling_looplm.py"
HF_CONFIG_KEYS = {
    "model_type": MODEL_TYPE,
    "architectures": ["LoopLMForCausalLM"],
    "auto_map": {"AutoConfig": "modeling_looplm.LoopLMHFConfig",
                 "AutoModelForCausalLM": "modeling_looplm.LoopLMForCausalLM"},
}
MODELING_SOURCE = '''"""looplm model for transformers' trust_remote_code loading: the classes live in looplm
(pip install looplm[hf]); this file only points transformers at them."""
from looplm.interop.hf import LoopLMForCausalLM, LoopLMHFConfig

__all__ = ["LoopLMForCausalLM", "LoopLMHFConfig"]
'''


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_tokenizer_config(tokenizer, directory: Path, max_length: int) -> None:
    """tokenizer_config.json (so ``AutoTokenizer`` reads tokenizer.json) and generation_config.json
    (bos/eos/pad ids for ``generate``)."""
    token = tokenizer.backend.id_to_token
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(tokenizer.bos_id),
        "eos_token": token(tokenizer.eos_id), "pad_token": token(tokenizer.pad_id),
        "model_max_length": max_length, "clean_up_tokenization_spaces": False})
    _write_json(directory / "generation_config.json", {
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id})


def write_hf_files(model, directory: Path, tokenizer=None, tokenizer_source: Path | None = None) -> None:
    """Fill an existing directory: looplm's files, the HF config keys and the modeling file.
    Tokenizer files present in ``tokenizer_source`` are copied; a missing tokenizer_config.json
    is written from ``tokenizer``."""
    from looplm.checkpoint.directory import write_model_files
    from looplm.file_names import CONFIG_FILE

    write_model_files(model.config, model.state_dict(), directory, tokenizer)
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    _write_json(directory / CONFIG_FILE, {**config, **HF_CONFIG_KEYS})
    (directory / MODELING_FILE).write_text(MODELING_SOURCE, encoding="utf-8")
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, directory)
    if tokenizer is not None and not (directory / "tokenizer_config.json").is_file():
        write_tokenizer_config(tokenizer, directory, model.config.max_seq_len)


def save_hf(model, directory: str | Path, tokenizer=None) -> Path:
    """Save a LoopLM (and tokenizer) as a Hugging Face-loadable directory, atomically (replacing one)."""
    from looplm.checkpoint.atomic import atomic_directory
    from looplm.checkpoint.directory import checkpoint_entry

    return atomic_directory(Path(directory), lambda staging: write_hf_files(model, staging, tokenizer),
                            replaceable=checkpoint_entry)


def convert_looplm_to_hf(source: str | Path, destination: str | Path, force: bool = False) -> Path:
    """``looplm convert hf SRC DST``: a looplm checkpoint (or run directory's newest) → a
    Hugging Face-loadable directory."""
    from looplm.checkpoint.atomic import atomic_directory
    from looplm.checkpoint.directory import checkpoint_entry, resolve_checkpoint
    from looplm.model.loading import load_checkpoint_tokenizer, load_model

    checkpoint = resolve_checkpoint(check_source(source))
    destination = check_destination(checkpoint, destination, force)
    model = load_model(checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    return atomic_directory(destination, lambda staging: write_hf_files(model, staging, tokenizer, checkpoint),
                            replaceable=checkpoint_entry)
