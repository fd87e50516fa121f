"""The looplm checkpoint directory: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``).

``config.json`` holds the ``ModelConfig`` fields and a format marker; ``model.safetensors`` one
tensor per state-dict entry (a tied head is stored once, as the embedding).  Training
checkpoints add ``run_config.json`` and ``train_state.pt`` (looplm.training.state).  A run
directory holds its checkpoints under ``checkpoints/step_NNNNNNN``; ``resolve_checkpoint`` picks
the newest.  Reading never executes anything from the files: JSON and safetensors only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from looplm.checkpoint.atomic import save_safetensors
from looplm.checkpoint.stored import StoredModel
from looplm.config import ModelConfig, model_config_from_json
from looplm.errors import LoopLMError, check_readable
from looplm.file_names import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CONFIG_FILE,
    RUN_CONFIG_FILE,
    TOKENIZER_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
)

# the tokenizer files a Hugging Face directory may hold (copied through by the converters)
HF_TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "added_tokens.json", "chat_template.jinja")
# every other file a checkpoint directory's writers write (sharded weights: model-00001-of-00002.safetensors)
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, RUN_CONFIG_FILE, TRAIN_STATE_FILE, "model.safetensors.index.json",
                    "generation_config.json", "modeling_looplm.py")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def checkpoint_entry(name: str) -> bool:
    """Whether a checkpoint directory's writer (looplm's, Hugging Face's, Ouro's) may have written
    ``name``: what replacing such a directory may remove (``atomic_directory``'s ``replaceable``)."""
    return (name in CHECKPOINT_FILES or name in HF_TOKENIZER_FILES
            or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None)


def config_json(config: ModelConfig) -> str:
    return json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **config.to_dict()}, indent=2) + "\n"


def write_model_files(config: ModelConfig, weights: dict[str, torch.Tensor], directory: Path, tokenizer=None) -> None:
    """Write config.json, model.safetensors and tokenizer.json into an existing (staging) directory;
    floating-point weights only, as ``read_directory`` reads them."""
    for name, tensor in weights.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise LoopLMError(f"save the trained float32 model: {name} is {str(tensor.dtype).removeprefix('torch.')},"
                              " as in an int8 (looplm.quant) or packed ternary model, which is for inference only"
                              " (export_gguf writes packed weights)")
    (directory / CONFIG_FILE).write_text(config_json(config), encoding="utf-8")
    save_safetensors({name: tensor.detach().contiguous() for name, tensor in weights.items()},
                     directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)



def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose newest checkpoint is used."""
    path = Path(path)
    if not path.exists():
        raise LoopLMError(f"checkpoint {str(path)!r} not found: give a directory written by looplm")
    if (path / CONFIG_FILE).is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    steps = [step for step in steps if (step / CONFIG_FILE).is_file()]
    if not steps:
        hint = (f": give the run directory {str(path.parent)!r}" if path.name == "checkpoints"
                and (path.parent / "checkpoints").is_dir() else "")
        raise LoopLMError(f"{str(path)!r} holds no config.json and no checkpoints/: not a looplm checkpoint{hint}")
    return steps[-1]


def read_directory(path: str | Path, device: str | torch.device = "cpu") -> StoredModel:
    """The config and tensors of a checkpoint (or run) directory; one-line errors for broken files."""
    directory = resolve_checkpoint(path)
    config = model_config_from_json(directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise LoopLMError(f"missing {WEIGHTS_FILE} in {str(directory)!r}: the checkpoint is incomplete")
    check_readable(weights_path)
    try:
        weights = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise LoopLMError(f"{str(weights_path)!r} is corrupt or truncated ({str(error).splitlines()[0]})") from None
    for name, tensor in weights.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise LoopLMError(f"{str(weights_path)!r}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')},"
                              " not floating point: this is not a looplm checkpoint")
    weights = {name: tensor.float() for name, tensor in weights.items()}
    return StoredModel(config, weights, weights_path)


def read_directory_tokenizer(path: str | Path):
    """The tokenizer saved beside a checkpoint, or None."""
    from looplm.data.tokenizer import Tokenizer

    directory = resolve_checkpoint(path)
    return Tokenizer.from_file(directory) if (directory / TOKENIZER_FILE).is_file() else None
